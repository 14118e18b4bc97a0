"""The model's side: its forward beside a decoder, and int8 against float.

``forward``: how much slower the forward pass runs while a decode thread works
beside it, as in a CPU worker's pipeline. Rounds alternate alone / beside the
decoder (the decoder decodes and transforms every window of a 640x360 video, over
and over, on its own torch thread).

``int8``: vidq's int8 slow_r50 (worker/quantize.py, calibrated first on clips of one
extra video: its cost is printed, not counted) against vidq's fp32 fast path (BatchNorm
folded, channels_last_3d) and the seed's eager fp32 model (seed/pipeline.py), each
round in turn: the bare forward at batch 1 on a real clip's views, and whole videos
(vidq: ``classify_many`` with ``--strategy sliding``; the seed: its own loop over the
same windows). Random weights: the timing does not depend on them.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from benchmarks import vidq_worker
from benchmarks.common import Report, alternate
from benchmarks.corpus import make_corpus, make_video, seed_windows


def forward_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="slow_r50")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=4, help="forward passes per side per round")
    parser.add_argument("--quick", action="store_true", help="two rounds of one pass each")


def forward(args: argparse.Namespace) -> list[Report]:
    """The forward pass beside a decode thread against the forward alone: clips/s."""
    import torch

    if args.quick:
        args.rounds, args.iters = 2, 1
    clf = vidq_worker.classifier(model=args.model, precision=args.precision)
    info = vidq_worker.describe(clf)
    views = vidq_worker.random_views(clf)
    vidq_worker.forward(clf, views)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        video = make_video(Path(tmp) / "decode.mp4")
        stop = threading.Event()

        def decode_loop() -> None:
            torch.set_num_threads(1)  # as the pipeline's decode thread runs its transforms
            while not stop.is_set():
                vidq_worker.decode_windows(video, model=args.model)

        def beside() -> float:
            stop.clear()
            thread = threading.Thread(target=decode_loop, daemon=True)
            thread.start()
            time.sleep(0.5)  # the decoder is running
            try:
                return vidq_worker.forward_rate(clf, views, iters=args.iters)
            finally:
                stop.set()
                thread.join()

        rates = alternate(
            {"alone": lambda: vidq_worker.forward_rate(clf, views, iters=args.iters),
             "beside": beside}, args.rounds)
    report = Report(f"{info.model} forward ({info.precision}, batch {info.batch_size}, "
                    f"{torch.get_num_threads()} threads), clips/s", "clips/s")
    report.add("forward alone", rates["alone"])
    report.add("forward beside a decode thread", rates["beside"])
    return [report]


def int8_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", type=int, default=2, help="4 sliding windows each")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="forward passes per model per round")
    parser.add_argument("--calibration-clips", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="one one-window video, two rounds, one pass, two calibration clips")


def int8(args: argparse.Namespace) -> list[Report]:
    """int8 against vidq's fp32 fast path and the seed's eager fp32: clips/s."""
    import torch

    from seed.pipeline import SeedPipeline

    frames = 256
    if args.quick:
        args.videos, args.rounds, args.iters, args.calibration_clips = 1, 2, 1, 2
        frames = 64
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos = make_corpus(work / "videos", args.videos, frames=frames)
        extra = make_corpus(work / "calibration", 1, first_seed=100, frames=frames)
        t = time.perf_counter()
        int8_clf = vidq_worker.int8_classifier(videos=extra, calibration=work / "c.calibration",
                                               clips=args.calibration_clips)
        print(f"calibration on {args.calibration_clips} clips and the int8 model: "
              f"{time.perf_counter() - t:.1f}s (not counted)", flush=True)
        fp32_clf = vidq_worker.classifier(precision="fp32")
        seed = SeedPipeline()

        def seed_forward(views: torch.Tensor) -> None:
            seed.predict(views[0].contiguous())  # the seed's layout: contiguous, eager

        (views,) = vidq_worker.real_views(videos[:1], model="slow_r50", clips=1)
        forwards = {"seed": seed_forward,
                    "fp32": lambda v: vidq_worker.forward(fp32_clf, v),
                    "int8": lambda v: vidq_worker.forward(int8_clf, v)}
        for run in forwards.values():  # warm-up: allocator, kernels' packed weights
            run(views)

        def forward_rate(name: str) -> float:
            t = time.perf_counter()
            for _ in range(args.iters):
                forwards[name](views)
            return args.iters / (time.perf_counter() - t)

        windows = seed_windows(videos[0])
        clips = windows * len(videos)

        def classify_rate(name: str) -> float:
            t = time.perf_counter()
            if name == "seed":
                for v in videos:
                    seed.run(v, windows)
                done = clips
            else:
                done = vidq_worker.classify(fp32_clf if name == "fp32" else int8_clf, videos)
            return done / (time.perf_counter() - t)

        print(f"slow_r50, batch 1, torch threads {torch.get_num_threads()}; {len(videos)} "
              f"videos x {windows} windows (640x360 H.264)", flush=True)
        names = ["seed", "fp32", "int8"]
        print("bare forward:")
        fwd = alternate({n: partial(forward_rate, n) for n in names}, args.rounds)
        print("whole videos:")
        e2e = alternate({n: partial(classify_rate, n) for n in names}, args.rounds)
    reports = []
    for title, seed_row, table in (("bare forward, batch 1", "seed eager fp32", fwd),
                                   ("whole videos", "seed pipeline (fp32)", e2e)):
        report = Report(f"slow_r50 {title}, clips/s: int8 and vidq's fp32 against the "
                        "seed's eager fp32", "clips/s")
        report.add(seed_row, table["seed"])
        report.add("vidq fp32 fast path", table["fp32"])
        report.add("vidq int8", table["int8"])
        report.add("vidq int8, against vidq fp32", table["int8"], against="vidq fp32 fast path")
        reports.append(report)
    return reports
