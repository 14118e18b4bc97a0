"""End to end through Celery, side by side with its baselines, in one run:

1. the seed pipeline (../shared/reference/seed_pipeline.py: one ``get_clip`` per
   window, fp32, as a seed user tags a whole video), on the same windows, run by
   benchmarks/warm_pipelines.py: one process for all videos, one untimed warm-up
   forward first, as the in-process vidq below is warm;
2. the bare model forward at vidq's precision: the compute floor;
3. in-process ``vidq classify --strategy sliding`` (Classifier.classify_many);
4. ``vidq submit`` -> Redis -> one ``vidq worker`` process -> rows committed.

The seed and in-process vidq take turns for ``--rounds`` rounds (who goes first
alternates); their ratio prints as the median and spread over rounds. Prints
clips/s for each and the ratios the performance issue sets targets for,
where the end-to-end time goes, and the worker's peak RSS.

    python benchmarks/end_to_end.py [--videos 6] [--database sqlite|postgresql]
    python benchmarks/end_to_end.py --device cuda --videos 48 --no-seed   # on a GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import make_corpus  # noqa: E402

DEFAULT_SEED = ROOT.parent / "shared" / "reference" / "seed_pipeline.py"
WINDOWS_PER_VIDEO = 4


def seed_rate(videos: list[Path], script: Path) -> float:
    """The seed's code over every video in one warm process (warm_pipelines.py)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "warm_pipelines.py"), "seed",
         *map(str, videos), "--clips-per-video", str(WINDOWS_PER_VIDEO), "--warmup", "1",
         "--seed-script", str(script)],
        capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    return stats["clips"] / stats["total_s"]


def forward_rate(classifier, n: int, rounds: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Bare forward passes on a fixed batch: the best of ``rounds`` rounds, so a
    noisy moment on a shared machine lowers the pipeline's figures, not the floor."""
    import torch

    p = classifier.preset
    views = torch.randn(classifier.batch_size, 3, p.num_frames, p.crop_size, p.crop_size)
    for _ in range(2):
        classifier.forward(views)
    best = 0.0
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            classifier.forward(views)
        best = max(best, per_round * classifier.batch_size / (time.perf_counter() - t))
    return best


def inprocess_rate(classifier, videos: list[Path]) -> float:  # type: ignore[no-untyped-def]
    from vidq.sampling import Sampling

    t = time.perf_counter()
    clips = sum(len(r.clips) for r in classifier.classify_many(videos, Sampling(strategy="sliding")))
    return clips / (time.perf_counter() - t)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def celery_run(videos: list[Path], *, env: dict[str, str], workdir: Path) -> dict[str, float]:
    from sqlalchemy import create_engine, select, text

    from producer.submit import JobRequest, submit
    from vidq.db import Job
    from vidq.settings import Settings

    log = workdir / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "vidq.cli", "worker", "--concurrency", "1"],
                              env=env, cwd=workdir, stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "ready:" not in log.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        settings = Settings.from_env(env)
        engine = create_engine(settings.database_url)
        t0 = time.perf_counter()
        report = submit([str(v) for v in videos], settings=settings, force=True,
                        request=JobRequest(model=settings.model, weights=settings.weights,
                                           strategy="sliding"),
                        batch=f"bench-{uuid.uuid4().hex[:6]}")
        ids = ",".join(map(str, report.job_ids))
        while True:
            with engine.connect() as conn:
                left = conn.execute(text(
                    f"select count(*) from jobs where id in ({ids}) and status in ('queued','running')"
                )).scalar()
            if not left:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        with engine.connect() as conn:
            rows = conn.execute(
                select(Job.status, Job.clips_done, Job.decode_s, Job.model_s, Job.started_at,
                       Job.finished_at).where(Job.id.in_(report.job_ids))
            ).all()
        engine.dispose()
        assert all(r[0] == "succeeded" for r in rows), rows
        job_wall = sum((r[5] - r[4]).total_seconds() for r in rows)
        child = children(worker.pid)
        return {
            "clips": sum(r[1] for r in rows),
            "wall_s": wall,
            "model_s": sum(r[3] for r in rows),
            "decode_s": sum(r[2] for r in rows),
            "job_wall_s": job_wall,
            "child_peak_rss_mb": peak_rss_mb(child[0]) if child else float("nan"),
        }
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    ap.add_argument("--seed-script", type=Path, default=DEFAULT_SEED)
    ap.add_argument("--no-seed", action="store_true", help="skip the seed baseline (e.g. on a GPU host)")
    ap.add_argument("--forward-iters", type=int, default=21, help="split over 3 rounds")
    ap.add_argument("--rounds", type=int, default=3, help="seed / in-process rounds")
    args = ap.parse_args()

    import redis
    import torch

    from vidq.settings import Settings
    from worker.inference import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos = make_corpus(work / "videos", args.videos)
        clips = len(videos) * WINDOWS_PER_VIDEO
        print(f"corpus: {len(videos)} videos x {WINDOWS_PER_VIDEO} windows = {clips} clips "
              f"(640x360 H.264, 30 fps); torch threads {torch.get_num_threads()}")

        import statistics

        settings = Settings.from_env(weights="random", device=args.device, precision=args.precision)
        classifier = Classifier.from_settings(settings)
        floor = forward_rate(classifier, args.forward_iters)  # also vidq's warm-up
        print(f"bare model forward ({classifier.precision}, batch {classifier.batch_size}, "
              f"{classifier.device}): {floor:6.2f} clips/s   (compute floor)")
        seeds, inprocs, ratios = [], [], []
        for r in range(args.rounds):
            sides = ["seed", "vidq"] if r % 2 == 0 else ["vidq", "seed"]
            for side in sides:
                if side == "seed" and not args.no_seed:
                    seeds.append(seed_rate(videos, args.seed_script))
                elif side == "vidq":
                    inprocs.append(inprocess_rate(classifier, videos))
            if seeds:
                ratios.append(inprocs[-1] / seeds[-1])
            print(f"round {r + 1} ({' then '.join(sides)}): "
                  + (f"seed {seeds[-1]:.2f} clips/s, " if seeds else "")
                  + f"vidq in-process {inprocs[-1]:.2f} clips/s"
                  + (f" = {ratios[-1]:.2f}x" if ratios else ""))
        seed = statistics.median(seeds) if seeds else None
        inproc = statistics.median(inprocs)
        if seed:
            print(f"seed pipeline (fp32, get_clip per window, warm): median {seed:6.2f} clips/s "
                  "(baseline)")
        print(f"vidq classify in-process (warm): median {inproc:6.2f} clips/s")
        del classifier

        if args.database == "sqlite":
            db_url = f"sqlite:///{work / 'bench.db'}"
            cleanup = None
        else:
            from sqlalchemy import create_engine, text

            name = f"vidq_e2e_{uuid.uuid4().hex[:8]}"
            admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            db_url = args.pg.rsplit("/", 1)[0] + "/" + name

            def cleanup() -> None:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

        redis.Redis.from_url(args.broker).flushdb()
        env = {**os.environ, "VIDQ_BROKER_URL": args.broker, "VIDQ_DATABASE_URL": db_url,
               "VIDQ_WEIGHTS": "random", "VIDQ_DEVICE": args.device,
               "VIDQ_PRECISION": args.precision, "VIDQ_RECONCILE_EVERY_S": "0"}
        try:
            e2e = celery_run(videos, env=env, workdir=work)
        finally:
            redis.Redis.from_url(args.broker).flushdb()
            if cleanup:
                cleanup()
        rate = e2e["clips"] / e2e["wall_s"]
        print(f"end to end via Celery + {args.database}:  {rate:6.2f} clips/s "
              f"({int(e2e['clips'])} clips in {e2e['wall_s']:.1f}s)")
        print("\nratios")
        if seed:
            print(f"  end to end / seed pipeline:     {rate / seed:5.2f}x   (target >= 5x)")
            print(f"  in-process / seed pipeline:     {statistics.median(ratios):5.2f}x median, "
                  f"rounds {min(ratios):.2f}-{max(ratios):.2f}x   (target >= 4x)")
        print(f"  end to end / model floor:       {rate / floor:5.1%}   (target >= 75%)")
        print(f"  end to end / in-process:        {rate / inproc:5.1%}   (target >= 90%)")
        wall = e2e["wall_s"]
        print("\nwhere the end-to-end time goes (share of wall time)")
        print(f"  model forward:                  {e2e['model_s'] / wall:5.1%}")
        print(f"  rest of each job (decode not hidden behind the model, transforms, claim, commit): "
              f"{(e2e['job_wall_s'] - e2e['model_s']) / wall:5.1%}")
        print(f"  between jobs (queue, submit):   {(wall - e2e['job_wall_s']) / wall:5.1%}")
        print(f"  (decode+transform thread busy:  {e2e['decode_s'] / wall:5.1%}, overlapped with the model)")
        print(f"\nworker process peak RSS: {e2e['child_peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
