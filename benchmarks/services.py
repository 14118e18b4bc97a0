"""The services' side: the producer into Redis, the database's polls and vector
search, and a worker process's memory over many jobs.

``submit``: ``vidq submit`` of N real video files (one real H.264 MP4 made distinct
by a 16-byte trailer, so the producer hashes what a real video costs; it never
decodes) into Redis, with SQLite and with PostgreSQL, against a raw pipelined LPUSH
of the very messages vidq published (read back from Redis), 1,000 per pipeline as
vidq's publisher batches them: the floor for any producer. Rounds rotate the order.

``polling``: the SQL polls the documentation gives (README.md and docs/, ```sql
blocks) on a results table of ``--clip-rows`` clip rows, on SQLite and PostgreSQL,
each against *the same poll* without its indexes, in alternating rounds: on
PostgreSQL the same statement with index scans disabled in its session; on SQLite
the same statement on a copy whose tables were rebuilt with ``CREATE TABLE ... AS
SELECT`` (no index, no primary key). Target: every p95 under 50 ms.

``similar``: ``vidq similar JOB --top 10`` over N stored 2048 x float16 vectors
(random, non-negative like pooled activations), as a user runs it, against a
process that reads the same vectors with one SELECT and scores them with numpy:
the floor for an exhaustive search. Both in fresh processes; peak RSS reported.

``memory``: one ``vidq worker`` process working through N jobs (small videos,
slow_r50, random weights): its resident memory every ``--every`` jobs against its
memory after the first ``--every`` (the warmed-up baseline of the same run).

``revision``: what a user waits for end to end (``vidq worker`` and ``vidq submit`` on
PostgreSQL and Redis; many short jobs, then a few long sliding ones) with this
checkout against the same with another revision's code (``git archive``), in
alternating rounds with fresh databases: the happy path's cost of a change.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BROKER_URL,
    POSTGRES_URL,
    ROOT,
    Report,
    alternate,
    child_env,
    children,
    memory_mb,
    wait_for_jobs,
    worker_process,
)
from benchmarks.corpus import make_video


@contextmanager
def postgres_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database's URL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- submit ------------------------------------------------------------------------------
PIPELINE = 1000


def submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--broker", default=BROKER_URL, help="a Redis database it flushes")
    parser.add_argument("--pg", default=POSTGRES_URL)
    parser.add_argument("--quick", action="store_true", help="300 files")


def submit(args: argparse.Namespace) -> list[Report]:
    """vidq submit (SQLite, PostgreSQL) against a raw pipelined publish: jobs/s."""
    import redis

    from producer.submit import JobRequest, discover
    from producer.submit import submit as vidq_submit
    from vidq.db import dispose_engines
    from vidq.settings import Settings

    if args.quick:
        args.files = 300
    client = redis.Redis.from_url(args.broker)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "files"
        root.mkdir()
        video = make_video(root / "source.mp4", frames=args.frames, width=args.width,
                           height=args.height)
        data = video.read_bytes()
        video.unlink()
        for i in range(args.files):
            (root / f"f{i:06d}.mp4").write_bytes(data + uuid.UUID(int=i).bytes)
        size = len(data) + 16
        paths = list(discover([str(root)]))
        base = Settings.from_env(broker_url=args.broker, auto_migrate=True)
        print(f"{args.files} real H.264 files of {size / 1024:.1f} KiB ({args.width}x"
              f"{args.height}, {args.frames} frames)", flush=True)

        def queued() -> list[tuple[Any, Any]]:
            keys = [k for k in client.scan_iter(f"{base.queue}*") if client.type(k) == b"list"]
            return [(k, m) for k in keys for m in client.lrange(k, 0, -1)]

        def submit_rate(url: str) -> float:
            client.flushdb()
            t0 = time.perf_counter()
            report = vidq_submit(paths, settings=base.replace(database_url=url),
                                 request=JobRequest(), batch=f"bench-{uuid.uuid4().hex[:6]}")
            elapsed = time.perf_counter() - t0
            assert report.publish_error is None, report.publish_error
            assert report.published == len(paths) == len(queued())
            dispose_engines()
            return len(paths) / elapsed

        submit_rate(f"sqlite:///{tmp}/messages.db")
        messages = queued()  # what vidq publishes: the raw baseline sends the same

        def raw_rate() -> float:
            client.flushdb()
            t0 = time.perf_counter()
            for i in range(0, len(messages), PIPELINE):
                pipe = client.pipeline(transaction=False)
                for key, payload in messages[i : i + PIPELINE]:
                    pipe.lpush(key, payload)
                pipe.execute()
            return len(messages) / (time.perf_counter() - t0)

        def postgres_rate() -> float:
            with postgres_database(args.pg, "vidq_bench") as url:
                return submit_rate(url)

        try:
            rates = alternate({
                "raw": raw_rate,
                "sqlite": lambda: submit_rate(f"sqlite:///{tmp}/{uuid.uuid4().hex[:6]}.db"),
                "postgresql": postgres_rate}, args.rounds)
        finally:
            client.flushdb()
    report = Report(f"{args.files} files into Redis: vidq submit against a raw pipelined "
                    f"publish of the same {len(messages)} messages", "jobs/s")
    report.add("raw pipelined LPUSH", rates["raw"])
    report.add("vidq submit, SQLite", rates["sqlite"])
    report.add("vidq submit, PostgreSQL", rates["postgresql"])
    for name in ("sqlite", "postgresql"):
        rate = statistics.median(rates[name])
        report.notes.append(f"{name}: {rate * size / 1e6:,.0f} MB/s hashed; target >= 2,000 "
                            f"jobs/s: {'PASS' if rate >= 2000 else 'FAIL'}")
    return [report]


# -- polling ------------------------------------------------------------------------------
CLIPS_PER_JOB = 10
TOP_K = 5
NO_INDEX_PG = ("set enable_indexscan = off", "set enable_bitmapscan = off",
               "set enable_indexonlyscan = off")


def polling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default=POSTGRES_URL)
    parser.add_argument("--quick", action="store_true", help="20,000 clip rows, 5 repeats")


def documented_queries() -> list[str]:
    """Every statement of the ```sql blocks in README.md and docs/."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    blocks = [b for doc in docs if doc.exists()
              for b in re.findall(r"```sql\n(.*?)```", doc.read_text(), flags=re.S)]
    seen: dict[str, None] = {}
    for block in blocks:
        for q in block.split(";"):
            if q.strip():
                seen.setdefault(q.strip())
    return list(seen)


def populate(engine: Any, clip_rows: int, labels: list[str]) -> int:
    from sqlalchemy import insert, text

    from vidq.db import Base, Batch, ClipPrediction, Job, VideoLabel

    rng = random.Random(0)
    n_jobs = clip_rows // (CLIPS_PER_JOB * TOP_K)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Batch), [{"id": i + 1, "name": "nightly" if i == 0 else f"b{i}"}
                                     for i in range(50)])
    jobs: list[dict[str, Any]] = []
    clips: list[dict[str, Any]] = []
    vlabels: list[dict[str, Any]] = []

    def flush() -> None:
        with engine.begin() as conn:
            for table, rows in ((Job, jobs), (ClipPrediction, clips), (VideoLabel, vlabels)):
                if rows:
                    conn.execute(insert(table), rows)
                    rows.clear()

    for j in range(1, n_jobs + 1):
        status = "succeeded" if j % 20 else rng.choice(["queued", "running", "failed"])
        top = [rng.randrange(len(labels)) for _ in range(TOP_K)]
        scores = sorted((rng.random() for _ in range(TOP_K)), reverse=True)
        done = status == "succeeded"
        jobs.append({
            "id": j, "batch_id": (j % 50) + 1, "path": f"/media/v/{j:07d}.mp4",
            "content_sha256": uuid.UUID(int=rng.getrandbits(128)).hex * 2, "size_bytes": 1000,
            "status": status, "priority": 5, "attempts": 1, "model": "slow_r50",
            "weights": "pretrained", "strategy": "uniform", "clips_requested": CLIPS_PER_JOB,
            "crops": 1, "start_sec": 0.0, "config_key": "k", "weights_id": "sha256:x",
            "error_kind": "not_a_video" if status == "failed" else None,
            "top_label": labels[top[0]] if done else None,
            "top_score": scores[0] if done else None, "finished_at": None,
        })
        if done:
            vlabels.extend({"job_id": j, "rank": r + 1, "class_id": top[r],
                            "label": labels[top[r]], "score": scores[r]} for r in range(TOP_K))
        for c in range(CLIPS_PER_JOB):
            clips.extend({"job_id": j, "clip_index": c, "rank": r + 1, "start_sec": c * 2.13,
                          "end_sec": c * 2.13 + 2.13, "class_id": top[r],
                          "label": labels[top[r]], "score": scores[r]} for r in range(TOP_K))
        if j % 2000 == 0:
            flush()
    flush()
    with engine.begin() as conn:
        conn.execute(text("update jobs set finished_at = submitted_at "
                          "where status = 'succeeded'"))
        conn.execute(text("analyze"))
    return n_jobs


def timed_ms(engine: Any, query: str, repeat: int, *, setup: tuple[str, ...] = ()
             ) -> list[float]:
    from sqlalchemy import text

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


def sqlite_copy_without_indexes(engine: Any, path: Path) -> Any:
    """The same rows in a copy whose tables have no index and no primary key."""
    from sqlalchemy import create_engine

    with engine.connect() as conn:
        conn.exec_driver_sql(f"vacuum into '{path}'")
    copy = create_engine(f"sqlite:///{path}")
    with copy.begin() as conn:
        tables = [t for (t,) in conn.exec_driver_sql(
            "select name from sqlite_master where type = 'table' and name not like 'sqlite_%'")]
        for table in tables:
            conn.exec_driver_sql(f"create table {table}_bare as select * from {table}")
            conn.exec_driver_sql(f"drop table {table}")
            conn.exec_driver_sql(f"alter table {table}_bare rename to {table}")
        assert conn.exec_driver_sql(
            "select count(*) from sqlite_master where type = 'index'").scalar() == 0
        conn.exec_driver_sql("analyze")
    return copy


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) >= 2 else samples[0]


def poll_report(name: str, url: str, queries: list[str], args: argparse.Namespace,
                labels: list[str], tmp: Path) -> Report:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    n_jobs = populate(engine, args.clip_rows, labels)
    setup: tuple[str, ...] = ()
    if name == "sqlite":
        bare = sqlite_copy_without_indexes(engine, tmp / "bare.db")
    else:
        bare, setup = engine, NO_INDEX_PG
    report = Report(f"{name}, {n_jobs:,} jobs, {n_jobs * CLIPS_PER_JOB * TOP_K:,} clip rows: "
                    "median ms of each documented poll against it unindexed", "ms")
    worst = 0.0
    print(f"{name}:", flush=True)
    for i, q in enumerate(queries, 1):
        indexed: list[float] = []

        def fast(q: str = q, indexed: list[float] = indexed) -> float:
            samples = timed_ms(engine, q, args.repeat)
            indexed.extend(samples)
            return statistics.median(samples)

        def slow(q: str = q) -> float:
            return statistics.median(timed_ms(bare, q, max(3, args.repeat // 10), setup=setup))

        first = q.splitlines()[0]
        label = first.lstrip("- ") if first.startswith("--") else " ".join(q.split())[:50]
        print(f" {i}. {label}", flush=True)
        times = alternate({"indexed": fast, "unindexed": slow}, args.rounds)
        report.add(f"{i}. unindexed", times["unindexed"], baseline=True)
        report.add(f"{i}. {label}", times["indexed"], against=f"{i}. unindexed")
        worst = max(worst, p95(indexed))
    report.notes.append(f"worst p95 {worst:.2f} ms: target < 50 ms: "
                        f"{'PASS' if worst < 50 else 'FAIL'}")
    if bare is not engine:
        bare.dispose()
    engine.dispose()
    return report


def polling(args: argparse.Namespace) -> list[Report]:
    """The documented SQL polls against the same polls unindexed: ms."""
    if args.quick:
        args.clip_rows, args.repeat = 20_000, 5
    try:
        from torchvision.models.video import R3D_18_Weights

        labels = list(R3D_18_Weights.KINETICS400_V1.meta["categories"])
    except ImportError:
        labels = [f"label{i}" for i in range(400)]
    if "archery" not in labels:
        labels[0] = "archery"
    queries = documented_queries()
    if not queries:
        raise SystemExit("no ```sql blocks in README.md or docs/")
    with tempfile.TemporaryDirectory() as tmp:
        reports = [poll_report("sqlite", f"sqlite:///{tmp}/poll.db", queries, args, labels,
                               Path(tmp))]
        with postgres_database(args.pg, "vidq_poll") as url:
            reports.append(poll_report("postgresql", url, queries, args, labels, Path(tmp)))
    return reports


# -- similar --------------------------------------------------------------------------------
DIM = 2048
MEASURED = (  # argv[1:] runs with stdout discarded; prints its wall time and peak RSS (KiB)
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)
NUMPY_FLOOR = (  # every vector read with one SELECT and scored against job 1's
    "import sys, numpy as np\n"
    "from sqlalchemy import create_engine, text\n"
    "engine = create_engine(sys.argv[1])\n"
    "with engine.connect() as conn:\n"
    "    rows = conn.execute(text('select job_id, vector from video_embeddings')).all()\n"
    "ids = np.array([r[0] for r in rows])\n"
    "m = np.frombuffer(b''.join(r[1] for r in rows), '<f2').reshape(len(rows), -1)\n"
    "m = m.astype(np.float32)\n"
    "q = m[ids == 1][0]\n"
    "scores = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))\n"
    "print(ids[np.argsort(-scores)[1:11]].tolist())\n"
)


def similar_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default=POSTGRES_URL)
    parser.add_argument("--quick", action="store_true", help="N = 2,000, two rounds")


def fill_vectors(url: str, n: int, *, chunk: int = 5000) -> None:
    import numpy as np
    from sqlalchemy import create_engine, text

    from vidq.db import make_engine
    from vidq.migrate import upgrade

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


def measured(command: list[str], url: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``command`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True,
                          text=True, check=False, env=child_env({"VIDQ_DATABASE_URL": url}))
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    wall, peak = proc.stdout.split()
    return float(wall), int(peak) / 1024


def similar(args: argparse.Namespace) -> list[Report]:
    """vidq similar against reading and scoring the vectors with numpy: seconds."""
    if args.quick:
        args.n, args.rounds = [2_000], 2
    reports = []
    for kind in args.db:
        for n in args.n:
            with fresh_database(kind, args.pg) as url:
                fill_vectors(url, n)
                peaks: dict[str, float] = {}

                def run(name: str, command: list[str], url: str = url,
                        peaks: dict[str, float] = peaks) -> float:
                    wall, peak = measured(command, url)
                    peaks[name] = max(peaks.get(name, 0.0), peak)
                    return wall

                print(f"{kind}, N={n:,}:", flush=True)
                times = alternate({
                    "numpy": partial(run, "numpy", [sys.executable, "-c", NUMPY_FLOOR, url]),
                    "vidq": partial(run, "vidq", [sys.executable, "-m", "vidq.cli", "similar",
                                                  "1", "--top", "10"])}, args.rounds)
            report = Report(f"{kind}, {n:,} vectors of 2048 x float16: seconds of a fresh "
                            "process, vidq similar --top 10 against numpy", "s")
            report.add("SELECT every vector + numpy", times["numpy"])
            report.add("vidq similar", times["vidq"])
            report.notes.append("peak RSS: " + ", ".join(f"{k} {v:.0f} MiB"
                                                          for k, v in peaks.items()))
            reports.append(report)
    return reports


@contextmanager
def fresh_database(kind: str, pg: str) -> Iterator[str]:
    """A fresh database of ``kind``."""
    if kind == "postgresql":
        with postgres_database(pg, "vidq_similar") as url:
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="vidq-similar-") as tmp:
            yield f"sqlite:///{tmp}/bench.db"


# -- memory ----------------------------------------------------------------------------------
def memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=20,
                        help="distinct videos (submitted again with --force)")
    parser.add_argument("--every", type=int, default=100,
                        help="jobs between samples (a multiple of --distinct)")
    parser.add_argument("--model", default="slow_r50")
    parser.add_argument("--broker", default=BROKER_URL, help="a Redis database it flushes")
    parser.add_argument("--quick", action="store_true", help="40 jobs, x3d_xs, a sample every 8")


def memory(args: argparse.Namespace) -> list[Report]:
    """A vidq worker's memory over many jobs against its memory after the first: MiB."""
    import redis
    from sqlalchemy import create_engine, func, select

    from producer.submit import JobRequest
    from producer.submit import submit as vidq_submit
    from vidq.db import Job
    from vidq.settings import Settings

    if args.quick:
        args.jobs, args.distinct, args.every, args.model = 40, 4, 8, "x3d_xs"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "v").mkdir()
        videos = [str(make_video(work / "v" / f"m{i:03d}.mp4", frames=70, width=320,
                                 height=180, seed=i)) for i in range(args.distinct)]
        env = {"VIDQ_BROKER_URL": args.broker, "VIDQ_DATABASE_URL": f"sqlite:///{work}/mem.db",
               "VIDQ_WEIGHTS": "random", "VIDQ_MODEL": args.model,
               "VIDQ_RECONCILE_EVERY_S": "0"}
        redis.Redis.from_url(args.broker).flushdb()
        samples: list[tuple[int, float]] = []
        try:
            with worker_process(env, work) as worker:
                child = children(worker.pid)[0]
                settings = Settings.from_env(child_env(env))
                request = JobRequest(model=args.model, weights="random")
                ids: list[int] = []
                t0 = time.perf_counter()
                # In waves of the distinct videos: an active job's content cannot be
                # queued twice, even with --force.
                for n in range(max(1, args.jobs // args.distinct)):
                    wave = vidq_submit(videos, settings=settings, request=request,
                                       batch=f"memory-{n}", force=True).job_ids
                    wait_for_jobs(settings.database_url, wave)
                    ids += wave
                    if len(ids) >= (len(samples) + 1) * args.every:
                        samples.append((len(ids), memory_mb(child)))
                        print(f"  after {len(ids):5d} jobs: worker RSS {samples[-1][1]:7.1f} "
                              "MiB", flush=True)
                elapsed = time.perf_counter() - t0
                if not samples or samples[-1][0] < len(ids):
                    samples.append((len(ids), memory_mb(child)))
                engine = create_engine(settings.database_url)
                with engine.connect() as conn:
                    failed = conn.execute(select(func.count()).where(
                        Job.status == "failed")).scalar()
                engine.dispose()
                assert child in children(worker.pid), "the worker child was replaced mid-run"
                peak = memory_mb(child, "VmHWM:")
        finally:
            redis.Redis.from_url(args.broker).flushdb()
    report = Report(f"one vidq worker process, {len(ids)} jobs ({args.model}, {failed} failed, "
                    f"{elapsed:.0f}s): resident memory against after {samples[0][0]} jobs",
                    "MiB")
    report.add(f"first sample, after {samples[0][0]} jobs", samples[0][1])
    # The allocator's pools settle over the first few hundred jobs; a leak keeps growing
    # after that, so the second half of the run is the test.
    mid = min(samples, key=lambda s: abs(s[0] - samples[-1][0] / 2))
    half = f"half way, after {mid[0]} jobs"
    report.add(half, mid[1])
    report.add(f"last, after {samples[-1][0]} jobs", samples[-1][1])
    report.add("last, against half way", samples[-1][1], against=half)
    report.add("peak (VmHWM)", peak)
    return [report]


# -- revision: this checkout's happy path against another revision's ---------------------
BEFORE_FLEET_WORK = "2057a25"
"""The last commit before the fleet's fault handling (webhook checks, reconcile in small
transactions, keepalives, hashing what is read, heartbeats that survive, leases stored
with jobs, the decoder watchdog, the circuit breaker, the outage pause)."""


def revision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rev", default=BEFORE_FLEET_WORK,
                        help=f"the git revision to compare with (default {BEFORE_FLEET_WORK}, "
                             "the last before the fleet's fault handling)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--short", type=int, default=40,
                        help="short videos, one job each: the per-job path")
    parser.add_argument("--long", type=int, default=2,
                        help="long videos, sliding clips: the per-clip feed")
    parser.add_argument("--model", default="x3d_xs")
    parser.add_argument("--broker", default=BROKER_URL, help="a Redis database it flushes")
    parser.add_argument("--pg", default=POSTGRES_URL)
    parser.add_argument("--quick", action="store_true", help="10 short, 1 long, 2 rounds")


def revision(args: argparse.Namespace) -> list[Report]:
    """End to end, as a user runs vidq (``vidq worker``, ``vidq submit``, PostgreSQL and
    Redis): this checkout against ``--rev``, each in fresh processes and databases,
    alternating round by round. Seconds from submit until every job has succeeded."""
    if args.quick:
        args.short, args.long, args.rounds = 10, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        other = work / "rev"
        other.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
        (work / "short").mkdir()
        (work / "long").mkdir()
        short = [make_video(work / "short" / f"s{i:03d}.mp4", frames=60, width=160,
                            height=120, seed=i) for i in range(args.short)]
        long = [make_video(work / "long" / f"l{i:03d}.mp4", frames=900, width=320,
                           height=240, seed=1000 + i) for i in range(args.long)]
        workloads = {
            f"{args.short} short videos, one clip each": (short, ("--strategy", "single")),
            f"{args.long} x 30 s videos, sliding clips every 0.5 s":
                (long, ("--strategy", "sliding", "--stride", "0.5")),
        }
        reports = []
        for title, (videos, options) in workloads.items():
            if not videos:  # --short 0 or --long 0: that workload left out
                continue
            sides = {
                f"{args.rev} (before)": partial(_end_to_end, other, videos, options, args, work),
                "this checkout": partial(_end_to_end, ROOT, videos, options, args, work),
            }
            values = alternate(sides, args.rounds)
            report = Report(f"vidq end to end, {title} ({args.model}, PostgreSQL): "
                            f"this checkout against {args.rev}", "s")
            for name, got in values.items():
                report.add(name, got)
            report.notes.append("a ratio above 1.00x is slower; the rounds' spread is the noise")
            reports.append(report)
    return reports


def _end_to_end(root: Path, videos: list[Path], options: tuple[str, ...],
                args: argparse.Namespace, work: Path) -> float:
    import redis

    run = work / f"run-{uuid.uuid4().hex[:8]}"
    run.mkdir()
    with postgres_database(args.pg, "vidq_rev") as url:
        env = {"VIDQ_BROKER_URL": args.broker, "VIDQ_DATABASE_URL": url,
               "VIDQ_WEIGHTS": "random", "VIDQ_MODEL": args.model,
               "VIDQ_RECONCILE_EVERY_S": "0"}
        subprocess.run([sys.executable, "-m", "vidq.cli", "db", "upgrade"], cwd=run,
                       env=child_env(env, root=root), capture_output=True, check=True)
        redis.Redis.from_url(args.broker).flushdb()
        try:
            with worker_process(env, run, root=root):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "vidq.cli", "submit", *map(str, videos),
                                "--batch", "rev", *options], cwd=run,
                               env=child_env(env, root=root), capture_output=True, check=True)
                ids = [int(i) for (i,) in _rows(url, "select id from jobs")]
                wait_for_jobs(url, ids, poll_s=0.05)
                elapsed = time.perf_counter() - started
            done = _rows(url, "select count(*) from jobs where status = 'succeeded'")[0][0]
            if done != len(videos):
                raise SystemExit(f"{root}: {done} of {len(videos)} jobs succeeded")
        finally:
            redis.Redis.from_url(args.broker).flushdb()
    return elapsed


def _rows(url: str, query: str) -> list[Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query)))
    finally:
        engine.dispose()
