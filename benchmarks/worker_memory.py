"""Worker memory over many jobs: RSS of one ``vidq worker`` process sampled as it
works through N jobs (default 1,000 small videos, slow_r50), compared with its
RSS after the first 100 jobs (the warmed-up baseline from the same run).

    python benchmarks/worker_memory.py [--jobs 1000] [--model slow_r50]
"""

from __future__ import annotations

import argparse
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

from benchmarks.corpus import make_video  # noqa: E402
from benchmarks.end_to_end import children  # noqa: E402


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=20, help="distinct videos (submitted with --force)")
    ap.add_argument("--model", default="slow_r50")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    args = ap.parse_args()

    import redis
    from sqlalchemy import create_engine, func, select

    from producer.submit import JobRequest, submit
    from vidq.db import Job
    from vidq.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "v").mkdir()
        videos = [str(make_video(work / "v" / f"m{i:03d}.mp4", frames=70, width=320, height=180, seed=i))
                  for i in range(args.distinct)]
        env = {**os.environ, "VIDQ_BROKER_URL": args.broker,
               "VIDQ_DATABASE_URL": f"sqlite:///{work / 'mem.db'}", "VIDQ_WEIGHTS": "random",
               "VIDQ_MODEL": args.model, "VIDQ_RECONCILE_EVERY_S": "0"}
        redis.Redis.from_url(args.broker).flushdb()
        log = work / "worker.log"
        worker = subprocess.Popen([sys.executable, "-m", "vidq.cli", "worker", "--concurrency", "1"],
                                  env=env, cwd=work, stdout=open(log, "wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while "ready:" not in log.read_text(errors="replace"):
                if worker.poll() is not None:
                    raise SystemExit(log.read_text()[-2000:])
                time.sleep(0.2)
            child = children(worker.pid)[0]
            settings = Settings.from_env(env)
            request = JobRequest(model=args.model, weights="random")
            batch = f"mem-{uuid.uuid4().hex[:6]}"
            for _ in range(args.jobs // args.distinct):
                submit(videos, settings=settings, request=request, batch=batch, force=True)
            engine = create_engine(settings.database_url)
            samples: list[tuple[int, float]] = []
            next_mark = 100
            t0 = time.perf_counter()
            while True:
                with engine.connect() as conn:
                    done = conn.execute(select(func.count()).where(
                        Job.status.in_(("succeeded", "failed")))).scalar() or 0
                if done >= next_mark or done >= args.jobs:
                    samples.append((done, rss_mb(child)))
                    print(f"  after {done:5d} jobs: worker RSS {samples[-1][1]:7.1f} MiB", flush=True)
                    next_mark += 100
                if done >= args.jobs:
                    break
                time.sleep(0.5)
            elapsed = time.perf_counter() - t0
            with engine.connect() as conn:
                failed = conn.execute(select(func.count()).where(Job.status == "failed")).scalar()
            assert child in children(worker.pid), "the worker child was replaced mid-run"
            base = samples[0][1]
            last = samples[-1][1]
            print(f"\n{args.jobs} jobs ({args.model}) in {elapsed:.0f}s, {failed} failed")
            print(f"worker RSS after 100 jobs (baseline): {base:.1f} MiB; after {samples[-1][0]}: "
                  f"{last:.1f} MiB; growth {last - base:+.1f} MiB ({(last - base) / base:+.1%})")
            # The allocator's pools settle over the first few hundred jobs; a leak keeps
            # growing after that, so the second half of the run is the test.
            mid = min(samples, key=lambda s: abs(s[0] - samples[-1][0] / 2))
            print(f"second half (after {mid[0]} -> {samples[-1][0]} jobs): {mid[1]:.1f} -> "
                  f"{last:.1f} MiB, growth {last - mid[1]:+.1f} MiB ({(last - mid[1]) / mid[1]:+.2%})")
            print(f"worker peak RSS (VmHWM): {rss_mb(child, 'VmHWM:'):.1f} MiB")
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
            redis.Redis.from_url(args.broker).flushdb()


if __name__ == "__main__":
    main()
