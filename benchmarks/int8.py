"""int8 against vidq's fp32 fast path and the seed's eager fp32 model, in one run.

    python benchmarks/int8.py [--videos 2] [--rounds 5] [--celery]

Three models, random slow_r50 weights (the timing does not depend on them):

- seed: the hub model as built (eager, BatchNorm unfolded, contiguous), fp32;
- fp32: vidq's fast path (BatchNorm folded, channels_last_3d);
- int8: vidq's int8 model (worker/quantize.py), calibrated first on clips of one
  extra video (the calibration's cost is printed, not counted).

Each round measures, for each model in turn, the bare forward (batch 1) and
``vidq classify --strategy sliding`` in-process (Classifier.classify_many: decode
thread, transforms, model) on 640x360 H.264 videos. Rounds alternate the models, so
a noisy moment on a shared machine hits all three; the ratios are printed per round
and as median (min-max). ``--celery`` adds, per round, fp32 and int8 end to end
through ``vidq submit`` -> Redis -> one ``vidq worker`` -> SQLite rows (the worker
starts outside the timed span, as in benchmarks/end_to_end.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import make_corpus  # noqa: E402
from benchmarks.end_to_end import celery_run  # noqa: E402

MODELS = ("seed", "fp32", "int8")


def forward_rate(forward: Callable[[Any], Any], views: Any, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        forward(views)
    return iters * views.shape[0] / (time.perf_counter() - t)


def classify_rate(classifier: Any, videos: list[Path]) -> float:
    from vidq.sampling import Sampling

    t = time.perf_counter()
    results = list(classifier.classify_many(videos, Sampling(strategy="sliding")))
    clips = sum(len(r.clips) for r in results)
    return clips / (time.perf_counter() - t)


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=2, help="4 sliding windows each")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3, help="forward passes per model per round")
    ap.add_argument("--calibration-clips", type=int, default=4)
    ap.add_argument("--celery", action="store_true",
                    help="also fp32 and int8 end to end via Redis and a vidq worker")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/11")
    args = ap.parse_args()

    import torch

    from worker import quantize
    from worker.inference import Classifier
    from worker.models import fold_batch_norms, load_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos = make_corpus(work / "videos", args.videos)
        (extra,) = make_corpus(work / "calibration", 1)
        calibration_file = work / "bench.calibration"
        fp32 = Classifier(weights="random", device="cpu", precision="fp32")
        t = time.perf_counter()
        float_model = load_model(fp32.preset, "random")
        fold_batch_norms(float_model.module)
        quantize.save_calibration(quantize.calibrate(
            float_model.module, preset=fp32.preset, weights_id=float_model.weights_id,
            views=quantize.calibration_views([extra], preset=fp32.preset,
                                             clips=args.calibration_clips),
        ), calibration_file)
        calibrate_s = time.perf_counter() - t
        t = time.perf_counter()
        int8 = Classifier(weights="random", device="cpu", precision="int8",
                          int8_calibration=str(calibration_file))
        build_s = time.perf_counter() - t
        print(f"calibration: {args.calibration_clips} clips in {calibrate_s:.1f}s; int8 model "
              f"built in {build_s:.1f}s (calibration {int8.calibration_id[:19]})")

        # The seed's model in the same pipeline: the instance's forward replaced by the
        # seed's own call (eager module, fp32, and the contiguous layout the seed's
        # transforms produce: vidq's views arrive channels_last_3d, which would speed
        # the eager convolutions up).
        seed = Classifier(weights="random", device="cpu", precision="fp32")
        seed_module = load_model(seed.preset, "random").module.eval()

        def seed_forward(views: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.softmax(seed_module(views.contiguous()), dim=1)

        seed.forward = seed_forward  # type: ignore[method-assign]
        # The pipeline's model loop calls forward_with_features: the seed's call there too.
        seed.forward_with_features = (  # type: ignore[method-assign]
            lambda views: (seed_forward(views), None))
        classifiers = {"seed": seed, "fp32": fp32, "int8": int8}
        # The bare forward runs on a real clip's views (random noise input can drive
        # the random-weight float models into slow denormal arithmetic).
        (views,) = quantize.calibration_views(videos[:1], preset=fp32.preset, clips=1)
        for c in classifiers.values():  # warm-up: allocator, kernels' packed weights
            c.forward(views)

        clips = len(videos) * 4
        print(f"slow_r50, batch 1, torch threads {torch.get_num_threads()}; {len(videos)} videos "
              f"x 4 windows = {clips} clips (640x360 H.264) per end-to-end run")
        fwd: dict[str, list[float]] = {m: [] for m in MODELS}
        e2e: dict[str, list[float]] = {m: [] for m in MODELS}
        celery: dict[str, list[float]] = {"fp32": [], "int8": []}
        for r in range(args.rounds):
            for m in MODELS:
                fwd[m].append(forward_rate(classifiers[m].forward, views, args.iters))
                e2e[m].append(classify_rate(classifiers[m], videos))
            line = "  ".join(f"{m} {fwd[m][-1]:5.2f} / {e2e[m][-1]:5.2f}" for m in MODELS)
            print(f"round {r + 1} clips/s forward / classify: {line}   int8/fp32 forward "
                  f"{fwd['int8'][-1] / fwd['fp32'][-1]:.2f}x, classify "
                  f"{e2e['int8'][-1] / e2e['fp32'][-1]:.2f}x", flush=True)
            if args.celery:
                for m in ("fp32", "int8"):
                    celery[m].append(celery_rate(videos, work=work, broker=args.broker,
                                                 precision=m, calibration=calibration_file))
                print(f"         celery end to end clips/s: fp32 {celery['fp32'][-1]:5.2f}  "
                      f"int8 {celery['int8'][-1]:5.2f}   "
                      f"{celery['int8'][-1] / celery['fp32'][-1]:.2f}x", flush=True)

        def ratios(table: dict[str, list[float]], a: str, b: str) -> list[float]:
            return [x / y for x, y in zip(table[a], table[b])]

        print(f"\nover {args.rounds} alternating rounds (ratio of the same round's rates):")
        for label, table in (("bare forward", fwd), ("classify in-process", e2e)):
            print(f"  {label:20s} int8 / fp32 fast path: {spread(ratios(table, 'int8', 'fp32'))}"
                  "   (target >= 1.7x end to end)")
            print(f"  {label:20s} int8 / seed eager:     {spread(ratios(table, 'int8', 'seed'))}")
            print(f"  {label:20s} fp32 / seed eager:     {spread(ratios(table, 'fp32', 'seed'))}")
            print(f"  {label:20s} rates, median clips/s: "
                  + ", ".join(f"{m} {statistics.median(table[m]):.2f}" for m in MODELS))
        if args.celery:
            print(f"  celery end to end    int8 / fp32 fast path: "
                  f"{spread(ratios(celery, 'int8', 'fp32'))}; median clips/s fp32 "
                  f"{statistics.median(celery['fp32']):.2f}, int8 {statistics.median(celery['int8']):.2f}")


def celery_rate(videos: list[Path], *, work: Path, broker: str, precision: str,
                calibration: Path) -> float:
    """One ``vidq worker`` at ``precision`` takes the videos' jobs: clips/s from submit
    until every row is committed."""
    import redis

    db = work / f"celery_{precision}.db"
    redis.Redis.from_url(broker).flushdb()
    env = {**os.environ, "VIDQ_BROKER_URL": broker, "VIDQ_DATABASE_URL": f"sqlite:///{db}",
           "VIDQ_WEIGHTS": "random", "VIDQ_DEVICE": "cpu", "VIDQ_PRECISION": precision,
           "VIDQ_INT8_CALIBRATION": str(calibration), "VIDQ_RECONCILE_EVERY_S": "0"}
    try:
        run = celery_run(videos, env=env, workdir=work)
    finally:
        redis.Redis.from_url(broker).flushdb()
    return run["clips"] / run["wall_s"]


if __name__ == "__main__":
    main()
