"""``vidq classify`` against the seed's slow_r50 pipeline, same videos, same windows.

    python benchmarks/classify_vs_seed.py [--videos 3] [--rounds 3] [--seed-script PATH]
                                          [--dir DIR]

About 3 minutes with the defaults on 2 cores. ``--dir`` takes .mp4 files whose
length is a whole number of clip spans (64/30 s), so both sides see the same windows.

Each video is 640x360 at 30 fps, ``--frames`` long (default 256 = 4 clip spans of
64/30 s, so the seed's windows i * clip_duration and our sliding windows are the
same 4 windows). Content is /work/shared/reference/make_video.py's: moving shapes
over gradients plus noise, H.264 ``veryfast``, a keyframe every 60 frames.

Measured in this one run, ``--rounds`` times, the two sides taking turns to go
first (seed-ours, then ours-seed, ...), each in a fresh process over all videos
with the same warm-up (benchmarks/warm_pipelines.py: the model built once, one
untimed forward on a random clip, then every video timed):
  * seed: the seed script's own code (default /work/shared/reference/seed_pipeline.py),
    N_CLIPS = the video's whole clip spans; open, decode, transform, forward;
  * ours: vidq's ``Classifier.classify_many`` (what ``vidq classify`` runs) with
    ``--strategy sliding``: decode, transform, forward, assembly;
  * floor: the bare model forward (softmax included) on random input of our batch
    size and precision, in this process, after each round: what the model alone allows.
Each round prints both rates and the ratio; the summary gives the median ratio and
its spread over rounds. Both sides use random slow_r50 weights (the pretrained
checkpoint is not reachable offline), which changes no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SPAN = Fraction(64, 30)  # slow_r50: 8 frames x sampling rate 8 at 30 fps
DEFAULT_SEED_SCRIPT = "/work/shared/reference/seed_pipeline.py"


def write_video(path: Path, *, frames: int, fps: int = 30, width: int = 640, height: int = 360,
                seed: int = 0) -> None:
    """make_video.py's content with an exact frame count."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"preset": "veryfast", "g": "60"}
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            cx = int((i * 7 + seed * 50) % width)
            cy = int(height / 2 + 80 * np.sin(i / 15))
            img[..., 0] = ((xx + i * 3) % 256).astype(np.uint8)
            img[..., 1] = ((yy * 2 + i) % 256).astype(np.uint8)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 40**2] = (255, 64, 32)
            noise = rng.integers(-12, 12, img.shape)
            img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


def clip_spans(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / 1e6
    return max(int(Fraction(duration).limit_denominator(100000) / SPAN), 1)


WARM = str(Path(__file__).resolve().with_name("warm_pipelines.py"))


def run_side(side: str, videos: list[Path], args: argparse.Namespace, clips: int) -> dict:
    command = [sys.executable, WARM, side, *map(str, videos), "--clips-per-video", str(clips),
               "--seed-script", args.seed_script, "--precision", args.precision,
               "--batch-size", str(args.batch_size)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{side} pipeline failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ForwardFloor:
    """The bare forward (softmax included) of vidq's Classifier on random input."""

    def __init__(self, precision: str, batch_size: int) -> None:
        import torch

        from worker.inference import Classifier

        self.clf = Classifier(model="slow_r50", weights="random", precision=precision,
                              batch_size=batch_size)
        p = self.clf.preset
        self.views = torch.randn(self.clf.batch_size, 3, p.num_frames, p.crop_size, p.crop_size)
        self.clf.forward(self.views)  # first call: oneDNN picks and caches its kernels

    def measure(self, seconds: float) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            self.clf.forward(self.views)
            n += self.clf.batch_size
        return n, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=3, help="videos to generate (default 3)")
    parser.add_argument("--frames", type=int, default=256,
                        help="frames per video (default 256 = 4 clip spans)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="use the .mp4 files in DIR (whole clip spans long) instead "
                        "of generating videos")
    parser.add_argument("--seed-script", default=DEFAULT_SEED_SCRIPT)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=0, help="0: vidq's default")
    parser.add_argument("--rounds", type=int, default=3, help="seed-then-ours rounds (default 3)")
    parser.add_argument("--floor-seconds", type=float, default=5.0,
                        help="seconds of bare forward passes per round (default 5)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # before this script adds its own load

    with tempfile.TemporaryDirectory(prefix="vidq_bench_") as tmp:
        if args.dir:
            videos = sorted(args.dir.glob("*.mp4"))
        else:
            videos = [Path(tmp) / f"bench_{i}.mp4" for i in range(args.videos)]
            for i, v in enumerate(videos):
                write_video(v, frames=args.frames, seed=i)
        if not videos:
            sys.exit("no videos")
        spans = {v: clip_spans(v) for v in videos}
        print(f"{len(videos)} videos, {sum(spans.values())} clips of {float(SPAN):.4f}s "
              f"(slow_r50 8x8) per round, {args.rounds} rounds, {os.cpu_count()} CPUs")

        if len(set(spans.values())) != 1:
            sys.exit("every video must be the same number of clip spans long")
        clips = next(iter(spans.values()))
        floor = ForwardFloor(args.precision, args.batch_size)
        batch, floor_precision = floor.clf.batch_size, floor.clf.precision
        seed_rates, our_rates, floor_rates, ratios = [], [], [], []
        precision = "?"
        for r in range(args.rounds):
            sides = ["seed", "vidq"] if r % 2 == 0 else ["vidq", "seed"]
            got = {side: run_side(side, videos, args, clips) for side in sides}
            if got["seed"]["clips"] != got["vidq"]["clips"]:
                sys.exit(f"clip counts differ: seed {got['seed']['clips']}, "
                         f"vidq {got['vidq']['clips']}")
            precision = got["vidq"]["precision"]
            seed_rate = got["seed"]["clips"] / got["seed"]["total_s"]
            our_rate = got["vidq"]["clips"] / got["vidq"]["total_s"]
            f_clips, f_s = floor.measure(args.floor_seconds)
            seed_rates.append(seed_rate)
            our_rates.append(our_rate)
            floor_rates.append(f_clips / f_s)
            ratios.append(our_rate / seed_rate)
            print(f"round {r + 1} ({' then '.join(sides)}): seed {seed_rate:.3f} clips/s, "
                  f"vidq {our_rate:.3f} clips/s = {ratios[-1]:.2f}x; "
                  f"bare forward {floor_rates[-1]:.3f} clips/s")
        load_after = os.getloadavg()[0]

    med = statistics.median
    print(f"\nseed pipeline (fp32, one clip at a time, warm): median {med(seed_rates):.3f} "
          f"clips/s (baseline)")
    print(f"vidq classify pipeline ({precision}, batch {batch}, warm): median "
          f"{med(our_rates):.3f} clips/s = {med(ratios):.2f}x the seed "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)")
    floor_ratios = [o / f for o, f in zip(our_rates, floor_rates)]
    print(f"bare model forward ({floor_precision}, batch {batch}, random input): median "
          f"{med(floor_rates):.3f} clips/s = {med(floor_rates) / med(seed_rates):.2f}x the seed; "
          f"vidq reaches {med(floor_ratios):.0%} of it (rounds {min(floor_ratios):.0%}-"
          f"{max(floor_ratios):.0%})")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after (this benchmark "
          f"itself keeps the CPUs busy)")
    if load_before > 0.5 * (os.cpu_count() or 1):
        print("note: other processes were using the CPUs; the rounds' ratios are fairer than "
              "absolute rates; rerun on a quiet machine.")


if __name__ == "__main__":
    main()
