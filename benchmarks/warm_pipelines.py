"""One pipeline, one process, the same warm-up for both sides: the seed's code or
vidq's in-process classifier over a list of videos, after ``--warmup`` untimed
forward passes on a random clip. Prints one JSON line: clips, total_s, model_s.

    python benchmarks/warm_pipelines.py seed VIDEO... [--clips-per-video N] [--seed-script PATH]
    python benchmarks/warm_pipelines.py vidq VIDEO... [--precision auto] [--batch-size 0]

``seed`` runs the seed script's own code (/work/shared/reference/seed_pipeline.py):
its model and transform are built once, then its per-video loop runs for each video,
so its first forward is no colder than vidq's. Model construction is excluded on
both sides, as both scripts exclude it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SEED_SCRIPT = "/work/shared/reference/seed_pipeline.py"
SPLIT = "path = sys.argv[1]"


def run_seed(videos: list[str], *, clips: int, warmup: int, script: str) -> dict[str, float]:
    source = Path(script).read_text()
    setup, sep, per_video = source.partition(SPLIT)
    if not sep:
        sys.exit(f"{script}: no line {SPLIT!r} to split the set-up from the per-video loop")
    namespace: dict[str, object] = {"__name__": "seed_pipeline"}
    exec(compile(setup, script, "exec"), namespace)
    import torch

    model = namespace["model"]
    shape = (1, 3, namespace["num_frames"], namespace["crop_size"], namespace["crop_size"])
    with torch.no_grad():
        for _ in range(warmup):
            model(torch.randn(shape))  # type: ignore[operator]
    loop = compile(sep + per_video, script, "exec")
    totals = {"clips": 0, "total_s": 0.0, "model_s": 0.0}
    for video in videos:
        sys.argv = [script, video, str(clips)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(loop, namespace)
        stats = json.loads(out.getvalue().strip().splitlines()[-1])
        totals["clips"] += stats["clips"]
        totals["total_s"] += stats["total_s"]
        totals["model_s"] += stats["model_s"]
    return totals


def run_vidq(videos: list[str], *, warmup: int, precision: str, batch_size: int,
             strategy: str) -> dict[str, float]:
    import torch

    from vidq.sampling import Sampling
    from vidq.settings import Settings
    from worker.inference import Classifier

    clf = Classifier.from_settings(Settings.from_env(
        model="slow_r50", weights="random", precision=precision, batch_size=batch_size))
    p = clf.preset
    views = torch.randn(clf.batch_size, 3, p.num_frames, p.crop_size, p.crop_size)
    for _ in range(warmup):
        clf.forward(views)
    totals = {"clips": 0, "total_s": 0.0, "model_s": 0.0}
    t0 = time.perf_counter()
    for result in clf.classify_many(videos, Sampling(strategy=strategy)):  # as vidq classify
        if not hasattr(result, "clips"):
            sys.exit(f"vidq could not classify a video: {result}")
        totals["clips"] += len(result.clips)
        totals["model_s"] += result.timing.get("model_s", 0.0)
    totals["total_s"] = time.perf_counter() - t0
    totals["precision"] = clf.precision  # type: ignore[assignment]
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("side", choices=["seed", "vidq"])
    ap.add_argument("videos", nargs="+")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards first (default 1)")
    ap.add_argument("--clips-per-video", type=int, default=4, help="seed windows per video")
    ap.add_argument("--seed-script", default=DEFAULT_SEED_SCRIPT)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--strategy", default="sliding")
    args = ap.parse_args()
    if args.side == "seed":
        out = run_seed(args.videos, clips=args.clips_per_video, warmup=args.warmup,
                       script=args.seed_script)
    else:
        out = run_vidq(args.videos, warmup=args.warmup, precision=args.precision,
                       batch_size=args.batch_size, strategy=args.strategy)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
