"""Polling latency: the README's common queries on a results table with 1,000,000
clip rows, on SQLite and PostgreSQL. Each poll is compared with *the same poll*
without its indexes, in alternating rounds of the same run:

- PostgreSQL: the same statement, same database, in a session with
  ``enable_indexscan``, ``enable_bitmapscan`` and ``enable_indexonlyscan`` off;
- SQLite: the same statement on a copy of the database whose tables were rebuilt
  with ``CREATE TABLE ... AS SELECT`` (no index, no primary key).

Prints p50/p95 per poll, the indexed/unindexed ratio per round (median and spread)
and the worst p95 against the 50 ms target.

    python benchmarks/polling.py [--clip-rows 1000000] [--repeat 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from vidq.db import Base, Batch, ClipPrediction, Job, VideoLabel

README = Path(__file__).resolve().parents[1] / "README.md"
CLIPS_PER_JOB = 10
TOP_K = 5


def readme_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    return [q.strip() for b in blocks for q in b.split(";") if q.strip()]


def populate(engine, clip_rows: int, labels: list[str]) -> int:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    n_jobs = clip_rows // (CLIPS_PER_JOB * TOP_K)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Batch), [{"id": i + 1, "name": "nightly" if i == 0 else f"b{i}"}
                                     for i in range(50)])
    jobs, clips, vlabels = [], [], []
    flush_every = 2000

    def flush() -> None:
        with engine.begin() as conn:
            if jobs:
                conn.execute(insert(Job), jobs)
            if clips:
                conn.execute(insert(ClipPrediction), clips)
            if vlabels:
                conn.execute(insert(VideoLabel), vlabels)
        jobs.clear(), clips.clear(), vlabels.clear()

    for j in range(1, n_jobs + 1):
        status = "succeeded" if j % 20 else rng.choice(["queued", "running", "failed"])
        top = [rng.randrange(len(labels)) for _ in range(TOP_K)]
        scores = sorted((rng.random() for _ in range(TOP_K)), reverse=True)
        jobs.append({
            "id": j, "batch_id": (j % 50) + 1, "path": f"/media/v/{j:07d}.mp4",
            "content_sha256": uuid.UUID(int=rng.getrandbits(128)).hex * 2, "size_bytes": 1000,
            "status": status, "priority": 5, "attempts": 1, "model": "slow_r50",
            "weights": "pretrained", "strategy": "uniform", "clips_requested": CLIPS_PER_JOB,
            "crops": 1, "start_sec": 0.0, "config_key": "k", "weights_id": "sha256:x",
            "error_kind": "not_a_video" if status == "failed" else None,
            "top_label": labels[top[0]] if status == "succeeded" else None,
            "top_score": scores[0] if status == "succeeded" else None,
            "finished_at": None,
        })
        if status == "succeeded":
            vlabels.extend({"job_id": j, "rank": r + 1, "class_id": top[r], "label": labels[top[r]],
                            "score": scores[r]} for r in range(TOP_K))
        for c in range(CLIPS_PER_JOB):
            clips.extend({"job_id": j, "clip_index": c, "rank": r + 1, "start_sec": c * 2.13,
                          "end_sec": c * 2.13 + 2.13, "class_id": top[r], "label": labels[top[r]],
                          "score": scores[r]} for r in range(TOP_K))
        if j % flush_every == 0:
            flush()
    flush()
    with engine.begin() as conn:
        conn.execute(text("update jobs set finished_at = submitted_at where status = 'succeeded'"))
        conn.execute(text("analyze"))
    return n_jobs


NO_INDEX_PG = ("set enable_indexscan = off", "set enable_bitmapscan = off",
               "set enable_indexonlyscan = off")
TABLES = ("batches", "jobs", "clip_predictions", "video_labels")


def timed(engine, query: str, repeat: int, *, setup: tuple[str, ...] = ()) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    with engine.connect() as conn:
        for statement in setup:
            conn.execute(text(statement))
        conn.execute(text(query)).fetchall()  # warm the cache, as a poller would
        for _ in range(repeat):
            t = time.perf_counter()
            conn.execute(text(query)).fetchall()
            out.append((time.perf_counter() - t) * 1000)
    return out


def sqlite_copy_without_indexes(engine, path: Path):  # type: ignore[no-untyped-def]
    """The same rows in a copy whose tables have no index and no primary key."""
    with engine.connect() as conn:
        conn.exec_driver_sql(f"vacuum into '{path}'")
    copy = create_engine(f"sqlite:///{path}")
    with copy.begin() as conn:
        for table in TABLES:
            conn.exec_driver_sql(f"create table {table}_bare as select * from {table}")
            conn.exec_driver_sql(f"drop table {table}")
            conn.exec_driver_sql(f"alter table {table}_bare rename to {table}")
        left = conn.exec_driver_sql("select count(*) from sqlite_master where type = 'index'")
        assert left.scalar() == 0
        conn.exec_driver_sql("analyze")
    return copy


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) >= 2 else samples[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    try:
        from torchvision.models.video import R3D_18_Weights

        labels = list(R3D_18_Weights.KINETICS400_V1.meta["categories"])
    except ImportError:
        labels = [f"label{i}" for i in range(400)]
    if "archery" not in labels:
        labels[0] = "archery"
    queries = readme_queries()
    with tempfile.TemporaryDirectory() as tmp:
        pg_db = f"vidq_poll_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_db}"'))
        targets = {
            "sqlite": f"sqlite:///{tmp}/poll.db",
            "postgresql": args.pg.rsplit("/", 1)[0] + "/" + pg_db,
        }
        try:
            for name, url in targets.items():
                engine = create_engine(url)
                t = time.perf_counter()
                n_jobs = populate(engine, args.clip_rows, labels)
                print(f"\n{name}: {n_jobs:,} jobs, {n_jobs * CLIPS_PER_JOB * TOP_K:,} clip rows "
                      f"(filled in {time.perf_counter() - t:.0f}s)")
                if name == "sqlite":
                    bare, setup = sqlite_copy_without_indexes(engine, Path(tmp) / "bare.db"), ()
                else:
                    bare, setup = engine, NO_INDEX_PG
                worst = 0.0
                for q in queries:
                    indexed: list[float] = []
                    ratios: list[float] = []
                    for _round in range(args.rounds):  # indexed and unindexed take turns
                        fast = timed(engine, q, args.repeat)
                        slow = timed(bare, q, max(3, args.repeat // 10), setup=setup)
                        indexed += fast
                        ratios.append(statistics.median(slow) / statistics.median(fast))
                    worst = max(worst, p95(indexed))
                    lines = q.splitlines()
                    first = lines[0].lstrip("- ") if lines[0].startswith("--") else " ".join(q.split())[:60]
                    print(f"  p50 {statistics.median(indexed):7.2f} ms  p95 {p95(indexed):7.2f} ms  "
                          f"without its index: {statistics.median(ratios):,.1f}x slower "
                          f"(rounds {min(ratios):,.1f}-{max(ratios):,.1f}x)  {first}")
                print(f"  worst p95 {worst:.2f} ms: target < 50 ms: {'PASS' if worst < 50 else 'FAIL'}")
                if bare is not engine:
                    bare.dispose()
                engine.dispose()
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
