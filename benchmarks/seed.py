"""``vidq classify`` against the seed's own pipeline (seed/pipeline.py), same videos,
same windows.

Each video is a whole number of slow_r50 windows long (64/30 s), so the seed's
windows ``i * clip_duration`` and vidq's ``--strategy sliding`` are the same
windows. Each round runs both sides, each in a fresh process over all videos with
the same warm-up (the model built, one untimed forward on a random clip, then every
video timed; building the model is excluded on both sides, as the seed excludes it),
the order swapped each round:

* seed: seed/pipeline.py's loop per video: open, ``get_clip``, transform, forward,
  one clip at a time, fp32;
* vidq: the classifier's ``classify_many`` (what ``vidq classify`` runs): decoders,
  transforms, batched forward, assembly;
* bare forward: vidq's model alone on random input of its batch size and precision,
  in this process, for ``--floor-seconds`` each round: what the model allows.

Both sides use random slow_r50 weights (the pretrained checkpoint is a download),
which changes no timing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import vidq_worker
from benchmarks.common import Report, alternate, fresh_process
from benchmarks.corpus import SEED_SPAN, SEED_WINDOW_FRAMES, make_corpus, seed_windows


def seed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", type=int, default=3, help="videos to generate (default 3)")
    parser.add_argument("--frames", type=int, default=4 * SEED_WINDOW_FRAMES,
                        help="frames per video (default 256 = 4 windows)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="the .mp4 files in DIR (each the same whole number of windows "
                        "long) instead of generated videos")
    parser.add_argument("--device", default="auto", help="vidq's device (the seed's is cpu)")
    parser.add_argument("--precision", default="auto", help="vidq's precision")
    parser.add_argument("--batch-size", type=int, default=0, help="vidq's (0: its default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor-seconds", type=float, default=5.0,
                        help="seconds of bare forward passes per round")
    parser.add_argument("--quick", action="store_true",
                        help="one one-window video, two rounds, one second of floor")


def run_seed(videos: list[str], clips_per_video: int) -> dict[str, float]:
    """The seed side, in its own process: clips and seconds over every video."""
    import time

    import torch

    from seed.pipeline import CROP_SIZE, NUM_FRAMES, SeedPipeline

    seed = SeedPipeline()
    with torch.no_grad():
        seed.model(torch.randn(1, 3, NUM_FRAMES, CROP_SIZE, CROP_SIZE))
    clips, t0 = 0, time.perf_counter()
    for video in videos:
        clips += seed.run(video, clips_per_video)["clips"]
    return {"clips": clips, "total_s": time.perf_counter() - t0}


def run_vidq(videos: list[str], device: str, precision: str, batch_size: int
             ) -> dict[str, Any]:
    """The vidq side, in its own process."""
    import time

    clf = vidq_worker.classifier(device=device, precision=precision, batch_size=batch_size)
    vidq_worker.forward(clf, vidq_worker.random_views(clf))
    t0 = time.perf_counter()
    clips = vidq_worker.classify(clf, [Path(v) for v in videos])
    return {"clips": clips, "total_s": time.perf_counter() - t0,
            "precision": vidq_worker.describe(clf).precision}


def seed(args: argparse.Namespace) -> list[Report]:
    """vidq classify against the seed's pipeline (seed/pipeline.py): clips/s ratio."""
    if args.quick:
        args.videos, args.frames, args.rounds, args.floor_seconds = 1, SEED_WINDOW_FRAMES, 2, 1.0
    with tempfile.TemporaryDirectory(prefix="vidq_bench_") as tmp:
        if args.dir:
            videos = sorted(args.dir.glob("*.mp4"))
        else:
            videos = make_corpus(Path(tmp), args.videos, frames=args.frames)
        if not videos:
            raise SystemExit("no videos")
        windows = {seed_windows(v) for v in videos}
        if len(windows) != 1:
            raise SystemExit("every video must be the same number of windows long")
        per_video = windows.pop()
        paths = [str(v) for v in videos]
        floor_clf = vidq_worker.classifier(device=args.device, precision=args.precision,
                                           batch_size=args.batch_size)
        info = vidq_worker.describe(floor_clf)
        views = vidq_worker.random_views(floor_clf)
        vidq_worker.forward(floor_clf, views)  # oneDNN picks and caches its kernels
        print(f"{len(videos)} videos x {per_video} windows of {float(SEED_SPAN):.4f}s, "
              f"{args.rounds} rounds, {os.cpu_count()} CPUs; vidq {info.precision} batch "
              f"{info.batch_size} on {info.device}", flush=True)

        def side(name: str) -> float:
            if name == "seed":
                got = fresh_process("benchmarks.seed:run_seed", videos=paths,
                                    clips_per_video=per_video)
            else:
                got = fresh_process("benchmarks.seed:run_vidq", videos=paths,
                                    device=args.device, precision=args.precision,
                                    batch_size=args.batch_size)
            if got["clips"] != per_video * len(videos):
                raise SystemExit(f"{name} classified {got['clips']} clips, "
                                 f"not {per_video * len(videos)}")
            return got["clips"] / got["total_s"]

        rates = alternate({"seed": lambda: side("seed"), "vidq": lambda: side("vidq"),
                           "bare forward": lambda: vidq_worker.forward_rate(
                               floor_clf, views, seconds=args.floor_seconds)},
                          args.rounds,
                          show=lambda got: ", ".join(f"{n} {v:.3f} clips/s" for n, v in
                                                     got.items()))
    report = Report(f"slow_r50 clips/s, vidq ({info.precision}, batch {info.batch_size}, "
                    f"{info.device}) against the seed (fp32, one clip at a time)", "clips/s")
    report.add("seed pipeline", rates["seed"])
    report.add("vidq classify", rates["vidq"])
    report.add("bare forward", rates["bare forward"])
    share = report.ratio("vidq classify") / report.ratio("bare forward")
    report.notes.append(f"vidq classify reaches {share:.0%} of its model's bare forward")
    return [report]
