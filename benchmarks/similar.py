"""How long `vidq similar` takes over N stored video vectors, on SQLite and PostgreSQL.

Fills a fresh database with N succeeded jobs and one 2048 x float16 vector each
(random, non-negative like pooled activations), then runs `vidq similar JOB --top 10`
as a user would, ``--rounds`` times, and prints the median wall time and the
command's own peak RSS. Usage:

    python benchmarks/similar.py --n 10000 100000 --db sqlite postgresql
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidq.db import make_engine  # noqa: E402
from vidq.migrate import upgrade  # noqa: E402

PG_ADMIN_URL = os.environ.get("VIDQ_BENCH_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DIM = 2048
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def fill(url: str, n: int, *, chunk: int = 5000) -> None:
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    engine = create_engine(url)
    rng = np.random.default_rng(0)
    with engine.begin() as conn:
        conn.execute(text(
            "with recursive s(i) as (select 1 union all select i + 1 from s where i < :n) "
            "insert into jobs (path, content_sha256, size_bytes, status, priority, attempts, "
            " submitted_at, model, weights, weights_id, strategy, clips_requested, start_sec, "
            " crops, config_key, top_label) "
            "select '/media/' || i || '.mp4', 'sha' || i, 1, 'succeeded', 5, 1, "
            " current_timestamp, 'slow_r50', 'w', 'sha256:bench', 'single', 1, 0, 1, 'k', "
            " 'label' from s"), {"n": n})
        for start in range(1, n + 1, chunk):
            ids = range(start, min(n, start + chunk - 1) + 1)
            vectors = np.maximum(rng.normal(size=(len(ids), DIM)), 0).astype("<f2")
            norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
            conn.execute(text(
                "insert into video_embeddings (job_id, model, weights_id, dim, norm, vector) "
                "values (:j, 'slow_r50', 'sha256:bench', :d, :n, :v)"),
                [{"j": j, "d": DIM, "n": float(nv), "v": v.tobytes()}
                 for j, nv, v in zip(ids, norms, vectors)])
    engine.dispose()


def time_similar(url: str, rounds: int) -> tuple[float, float, int]:
    times, peaks = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "vidq.cli", "similar", "1",
             "--top", "10"], capture_output=True, text=True, check=False,
            env={**os.environ, "VIDQ_DATABASE_URL": url})
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        peaks.append(int(proc.stdout.strip()))
    return statistics.median(times), min(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for kind in args.db:
        for n in args.n:
            if kind == "sqlite":
                tmp = tempfile.mkdtemp(prefix="vidq-similar-")
                url, drop = f"sqlite:///{tmp}/bench.db", None
            else:
                name = f"vidq_similar_{uuid.uuid4().hex[:8]}"
                admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                url, drop = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", name
            try:
                t0 = time.perf_counter()
                fill(url, n)
                filled = time.perf_counter() - t0
                median, best, peak = time_similar(url, args.rounds)
                print(f"{kind:10s} N={n:>7,}: vidq similar median {median:.2f}s (best "
                      f"{best:.2f}s, {n / median:,.0f} vectors/s), peak RSS {peak / 1024:.0f} "
                      f"MiB; filled in {filled:.0f}s", flush=True)
            finally:
                if drop:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)'))
                    admin.dispose()


if __name__ == "__main__":
    main()
