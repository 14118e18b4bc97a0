"""What a GPU host does with vidq (run through benchmarks/gpu.sh on the host).

1. the model floor: slow_r50 forward alone (bf16 by default), batch sizes 1 to 64;
2. the decode rate: decode + transform windows/s on one core, and on D parallel
   decoders (the worker's default D = cores - 1);
3. the whole pipeline end to end: ``vidq run`` (embedded: SQLite, no broker; the
   same claims, pipeline and commits as a worker) on a generated corpus, in
   clips/s and as a fraction of the model floor at the batch size it used.

Random weights (the timing does not depend on them). Every figure is measured in
this run; ratios are against baselines from this run.

    python benchmarks/gpu_bench.py                       # on the GPU host
    python benchmarks/gpu_bench.py --device cpu --model x3d_xs --quick   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.corpus import make_video  # noqa: E402
from benchmarks.feed_rate import bare_decode, bare_decode_rate  # noqa: E402
from vidq.sampling import Sampling  # noqa: E402
from worker.inference import Classifier  # noqa: E402
from worker.supervisor import cpu_cores, default_decode_workers  # noqa: E402


def forward_floor(clf: Classifier, batch: int, iters: int) -> float:
    """Clips/s of the forward pass alone, views already on the device."""
    p = clf.preset
    views = torch.randn(batch, 3, p.num_frames, p.crop_size, p.crop_size, device=clf.device)
    for _ in range(3):
        clf.forward(views)
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        clf.forward(views)  # returns on the CPU: synchronises
    return batch * iters / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="slow_r50")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = ap.parse_args()
    batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    iters = 2 if args.quick else 20
    n_videos = 4 if args.quick else args.videos

    dev = args.device
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    print(f"host: {name}, {cpu_cores()} cores, torch {torch.__version__}", flush=True)
    clf = Classifier(model=args.model, weights="random", device=dev, precision=args.precision)
    print(f"model {clf.preset.name}, {clf.precision} on {clf.device}", flush=True)

    print("\n1. forward floor (views on the device)")
    floor = {}
    for b in batches:
        floor[b] = forward_floor(clf, b, iters)
        print(f"   batch {b:3d}: {floor[b]:8.1f} clips/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        media = root / "media"
        media.mkdir()
        # 640x360, 30 fps, 4 slow_r50 windows each (sliding) = 4 clips a video.
        videos = [make_video(media / f"v{i:03d}.mp4", seed=i) for i in range(n_videos)]
        sampling = Sampling(strategy="sliding")

        print("\n2. decode + transform (640x360 H.264, 64-frame windows)")
        one = bare_decode_rate(clf, videos, sampling, 1)
        d = default_decode_workers()
        many = bare_decode_rate(clf, videos, sampling, d)
        procs = bare_decode(clf, videos, sampling, d, kind="processes")[0]
        print(f"   1 decoder: {one:.1f} windows/s; {d} decoder threads: {many:.1f} windows/s "
              f"({many / one:.1f}x); {d} decoder processes: {procs:.1f} windows/s "
              f"({procs / one:.1f}x)", flush=True)
        many = max(many, procs)

        from vidq.settings import decoder_kind

        print("\n3. end to end: vidq run's path (embedded: submit, claim, pipeline, commit), "
              f"{clf.decode_workers} decoder {decoder_kind(clf.decoders, clf.decode_workers)}")
        from producer.submit import JobRequest, submit
        from vidq.settings import Settings
        from worker.embedded import run_jobs

        settings = Settings.from_env(database_url=f"sqlite:///{root / 'vidq.db'}",
                                     weights="random", model=args.model, device=dev)
        request = JobRequest(model=args.model, weights="random", strategy="sliding")
        t = time.perf_counter()
        report = submit([str(v) for v in videos], settings=settings, request=request,
                        batch="gpu", publish=False)
        outcomes = run_jobs(report.job_ids, settings=settings, classifier=clf)
        elapsed = time.perf_counter() - t
        ok = sum(o.status == "succeeded" for o in outcomes)
        clips = 4 * ok
        rate = clips / elapsed
        batch = clf.batch_size
        ref = floor.get(batch) or max(floor.values())
        print(f"   {ok}/{len(videos)} videos, {clips} clips in {elapsed:.1f}s (hashing and "
              f"recording included): {rate:.1f} clips/s = {rate / ref:.0%} of the "
              f"batch-{batch} floor, {rate / many:.0%} of the {d}-decoder decode rate",
              flush=True)


if __name__ == "__main__":
    main()
