"""How much slower the model's forward runs while a decode thread works beside it,
as in vidq's pipeline (README: "The forward passes run about 15% slower beside it
than alone"). Rounds alternate alone / beside the decoder; prints each round's
rates, the slowdown per round, and its median and spread.

    python benchmarks/forward_beside_decoder.py [--rounds 4] [--iters 4] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=4, help="forward passes per side per round")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    import torch

    from benchmarks.corpus import make_video
    from vidq.sampling import Sampling, plan_windows
    from vidq.settings import Settings
    from worker.inference import Classifier
    from worker.transforms import clip_views
    from worker.video import VideoReader

    clf = Classifier.from_settings(Settings.from_env(model="slow_r50", weights="random",
                                                     precision=args.precision))
    p = clf.preset
    views = torch.randn(clf.batch_size, 3, p.num_frames, p.crop_size, p.crop_size)
    clf.forward(views)  # warm-up

    def forward_rate() -> float:
        t = time.perf_counter()
        for _ in range(args.iters):
            clf.forward(views)
        return args.iters * clf.batch_size / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        video = make_video(Path(tmp) / "decode.mp4")  # 640x360 H.264, 4 clip spans
        stop = threading.Event()

        def decode_loop() -> None:
            # What the pipeline's decode thread does: decode each window, then the
            # transforms, with one core for its own torch ops.
            torch.set_num_threads(1)
            while not stop.is_set():
                with VideoReader(video) as reader:
                    windows = plan_windows(Sampling(strategy="sliding"),
                                           reader.info.duration_s, p.clip_duration)
                    for clip in reader.clips(windows, num_frames=p.num_frames):
                        clip_views(clip.rgb, p)
                        if stop.is_set():
                            break

        slowdowns = []
        for r in range(args.rounds):
            order = ["alone", "beside"] if r % 2 == 0 else ["beside", "alone"]
            rates = {}
            for side in order:
                if side == "alone":
                    rates[side] = forward_rate()
                    continue
                stop.clear()
                thread = threading.Thread(target=decode_loop, daemon=True)
                thread.start()
                time.sleep(0.5)  # the decoder is running
                rates[side] = forward_rate()
                stop.set()
                thread.join()
            slowdowns.append(1 - rates["beside"] / rates["alone"])
            print(f"round {r + 1}: forward alone {rates['alone']:.3f} clips/s, beside the "
                  f"decoder {rates['beside']:.3f} clips/s: {slowdowns[-1]:.1%} slower")
        print(f"\nforward beside the decode thread ({clf.precision}, batch {clf.batch_size}, "
              f"{torch.get_num_threads()} threads): median {statistics.median(slowdowns):.1%} "
              f"slower (rounds {min(slowdowns):.1%} to {max(slowdowns):.1%})")


if __name__ == "__main__":
    main()
