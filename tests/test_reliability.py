"""Reliability at fleet scale, on real Redis, SQLite and PostgreSQL: queues kept apart,
one clock for leases, database timeouts, duplicate-proof submits, names a table
cannot hold, files changed after submit, verified checkpoints, bounded messages.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

from producer.submit import JobRequest, submit
from tests.media import make_video
from vidq.db import dispose_engines, get_engine
from vidq.errors import TransientError
from vidq.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REQUEST = JobRequest(model="x3d_xs", weights="random", strategy="single")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("reliability-media")
    paths = [root / f"r{i}.mp4" for i in range(4)]
    for i, path in enumerate(paths):
        make_video(path, seconds=2.2, seed=900 + i)
    return paths


def sql(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def queued(client: redis.Redis, queue: str) -> int:
    """Messages waiting on ``queue`` (kombu keeps one Redis list per priority)."""
    from vidq.queue import PRIORITY_LEVELS

    return sum(client.llen(k) for k in [queue] + [f"{queue}:{p}" for p in range(PRIORITY_LEVELS)])


def vidq_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vidq.cli", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


# --- 1. queues ----------------------------------------------------------------------

def test_reconcile_and_retry_act_only_on_their_own_queue(
    database_url: str, redis_url: str, videos: list[Path]
) -> None:
    """Before: a job submitted to another model's queue was "found lost" by this queue's
    reconcile (its message is not in this queue) and copied here, where a worker fails
    it with wrong_model; `vidq retry` requeued every failed job into this queue."""
    from vidq.reconcile import reconcile

    mine = Settings(database_url=database_url, broker_url=redis_url, queue="vidq")
    theirs = mine.replace(queue="x3d-queue")
    report = submit([str(videos[0])], settings=theirs, request=REQUEST, batch="theirs")
    assert report.published == 1 and report.publish_error is None
    assert sql(database_url, "select queue from jobs") == [("x3d-queue",)]
    client = redis.Redis.from_url(redis_url)

    assert reconcile(mine, older_than_s=0).lost_queued == []
    assert reconcile(theirs, older_than_s=0).lost_queued == []  # its message is there
    assert (queued(client, "vidq"), queued(client, "x3d-queue")) == (0, 1)

    client.flushdb()  # Redis lost everything: the owner's reconcile sends it again, there
    assert reconcile(mine, older_than_s=0).lost_queued == []
    assert reconcile(theirs, older_than_s=0).lost_queued == [1]
    assert (queued(client, "vidq"), queued(client, "x3d-queue")) == (0, 1)

    sql(database_url, "update jobs set status = 'failed', error_kind = 'timeout'")
    env = {"VIDQ_DATABASE_URL": database_url, "VIDQ_BROKER_URL": redis_url}
    here = vidq_cli("retry", "--batch", "theirs", **env, VIDQ_QUEUE="vidq")
    assert here.returncode == 0, here.stderr
    assert "0 jobs queued again" in here.stdout
    assert sql(database_url, "select status from jobs") == [("failed",)]
    there = vidq_cli("retry", "--batch", "theirs", **env, VIDQ_QUEUE="x3d-queue")
    assert "1 jobs queued again" in there.stdout, there.stderr
    assert (queued(client, "vidq"), queued(client, "x3d-queue")) == (0, 2)


def test_existing_rows_are_backfilled_into_the_default_queue(database_url: str) -> None:
    """Rows inserted without a queue (as every row before revision 0002 was) read 'vidq'."""
    get_engine(database_url)
    sql(database_url, "insert into batches (name, created_at) values ('old', '2026-01-01')")
    sql(database_url, """insert into jobs (path, content_sha256, size_bytes, status, priority,
        attempts, submitted_at, model, weights, strategy, clips_requested, start_sec, crops,
        config_key) values ('/m/a.mp4', 'aa', 1, 'queued', 5, 0, '2026-01-01', 'x3d_xs',
        'random', 'single', 1, 0, 1, 'k')""")
    assert sql(database_url, "select queue from jobs") == [("vidq",)]


def test_a_0001_database_with_duplicate_active_jobs_upgrades(
    empty_database_url: str,
) -> None:
    """The unique index needs at most one active job per content and configuration;
    0.1.0's --force could make two. The oldest stays, the others are cancelled, named."""
    from vidq import migrate
    from vidq.db import make_engine

    engine = make_engine(empty_database_url)
    try:
        migrate.upgrade(engine, "0001")
        row = ("insert into jobs (path, content_sha256, size_bytes, status, priority, attempts,"
               " submitted_at, model, weights, strategy, clips_requested, start_sec, crops,"
               " config_key) values (:p, 'aa', 1, :s, 5, 0, '2026-01-01', 'x3d_xs', 'random',"
               " 'single', 1, 0, 1, 'k')")
        with engine.begin() as conn:
            for path, status in (("/m/1", "succeeded"), ("/m/2", "running"), ("/m/3", "queued")):
                conn.execute(text(row), {"p": path, "s": status})
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    assert sql(empty_database_url, "select path, status, error_kind, queue from jobs order by id") \
        == [("/m/1", "succeeded", None, "vidq"), ("/m/2", "running", None, "vidq"),
            ("/m/3", "cancelled", "duplicate", "vidq")]


# --- 2. one clock ---------------------------------------------------------------------

def test_db_now_is_the_database_clock_and_compares_with_stored_times(
    database_url: str,
) -> None:
    """Each ``ago_s`` is its own statement (not one cached SQL text for all), and the
    database's "now" sorts correctly against a timestamp SQLAlchemy stored."""
    from sqlalchemy import select

    from vidq.db import Batch, db_now, utcnow

    engine = get_engine(database_url)
    with engine.begin() as conn:
        now, hour_ago = conn.execute(select(db_now(), db_now(ago_s=3600))).one()
        assert 3599 < (now - hour_ago).total_seconds() < 3601
        conn.execute(Batch.__table__.insert().values(name="t", created_at=utcnow()))
        newer = conn.execute(select(Batch.id).where(Batch.created_at > db_now(ago_s=60)))
        older = conn.execute(select(Batch.id).where(Batch.created_at < db_now(ago_s=60)))
        assert (len(newer.all()), len(older.all())) == (1, 0)


CLOCK_USERS = ("vidq.db", "worker.jobs", "vidq.reconcile", "producer.submit", "producer.query")


def skew_clock(monkeypatch: pytest.MonkeyPatch, offset: dt.timedelta) -> None:
    """This host's clock, as vidq reads it, runs ``offset`` off the real time."""
    import importlib

    def skewed() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc) + offset

    for name in CLOCK_USERS:
        monkeypatch.setattr(importlib.import_module(name), "utcnow", skewed, raising=False)


def test_a_host_whose_clock_is_off_cannot_steal_a_live_job(
    database_url: str, videos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: claim and heartbeat wrote this host's time; a worker 10 minutes behind left
    heartbeats that looked stale to everyone else, and a worker 10 minutes ahead saw
    every live heartbeat as stale: either way the job was taken from a live worker."""
    from vidq.reconcile import reconcile
    from worker.jobs import JobStore, Outcome

    settings = Settings(database_url=database_url, heartbeat_s=15)
    job_id = submit([str(videos[1])], settings=settings, request=REQUEST, batch="clock",
                    publish=False).job_ids[0]

    with monkeypatch.context() as m:
        skew_clock(m, -dt.timedelta(minutes=10))  # the live worker's host runs behind
        behind = JobStore.from_settings(settings)
        claimed = behind.claim(job_id, "live-token", "behind:1")
        assert not isinstance(claimed, Outcome), claimed
        assert behind.heartbeat(job_id, "live-token")
    for offset in (dt.timedelta(0), dt.timedelta(minutes=10)):  # a fair host, a host ahead
        with monkeypatch.context() as m:
            skew_clock(m, offset)
            other = JobStore.from_settings(settings)
            outcome = other.claim(job_id, f"thief-{offset}", "other:2")
            assert isinstance(outcome, Outcome) and outcome.status == "busy", outcome
            assert reconcile(settings, dry_run=True).stale_running == []
    assert sql(database_url, "select lease_token from jobs") == [("live-token",)]


# --- 3. PostgreSQL timeouts and pool --------------------------------------------------

@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_statement_timeout_and_pool_come_from_settings(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: no statement_timeout (a stuck query held its connection for ever) and a
    fixed pool of 5 + 5."""
    from sqlalchemy.exc import OperationalError

    monkeypatch.setenv("VIDQ_DB_STATEMENT_TIMEOUT_S", "0.5")
    monkeypatch.setenv("VIDQ_DB_POOL_SIZE", "7")
    monkeypatch.setenv("VIDQ_DB_MAX_OVERFLOW", "3")
    dispose_engines()
    engine = get_engine(database_url)
    assert (engine.pool.size(), engine.pool._max_overflow) == (7, 3)  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert conn.execute(text("show statement_timeout")).scalar() == "500ms"
        with pytest.raises(OperationalError, match="statement timeout"):
            conn.execute(text("select pg_sleep(3)"))


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_an_unanswering_postgres_fails_in_one_line_within_the_connect_timeout(
    silent_server: int,
) -> None:
    """Before: no connect_timeout: `vidq status` waited for ever on a hung server."""
    url = f"postgresql+psycopg://vidq@127.0.0.1:{silent_server}/vidq"
    t0 = time.monotonic()
    try:
        done = vidq_cli("status", timeout=60, VIDQ_DATABASE_URL=url,
                        VIDQ_DB_CONNECT_TIMEOUT_S="2")
    except subprocess.TimeoutExpired:
        pytest.fail("vidq status still waiting after 60 s: no connect timeout")
    assert time.monotonic() - t0 < 30
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0], done.stderr


# --- 4. duplicate-proof submits ---------------------------------------------------------

def _producer(url: str, paths: list[str], barrier: Any) -> tuple[int, int, int]:
    settings = Settings(database_url=url)
    barrier.wait()
    report = submit(paths, settings=settings, request=REQUEST, batch="race", publish=False)
    dispose_engines()
    return len(report.job_ids), report.duplicates, len(report.rejected)


def test_concurrent_producers_record_each_file_once(
    database_url: str, tmp_path: Path
) -> None:
    """Before: dedupe and the batch row were check-then-insert. Producers started together
    all found nothing and all inserted (two active jobs for one file), or the second
    insert of the batch name hit the unique constraint: a traceback, nothing recorded."""
    get_engine(database_url)  # the schema, before the race
    dispose_engines()
    # Submit checks files, not content: enough distinct files that the producers'
    # transactions overlap (workers would refuse these; nothing runs them here).
    paths = []
    for i in range(300):
        path = tmp_path / f"clip{i:03d}.mp4"
        path.write_bytes(os.urandom(64) + str(i).encode())
        paths.append(str(path))
    n = 4
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            reports = pool.starmap(_producer, [(database_url, paths, barrier)] * n)
    assert all(new + dup == len(paths) and rejected == 0 for new, dup, rejected in reports), \
        reports
    assert sum(new for new, _dup, _rej in reports) == len(paths), reports
    assert sql(database_url, "select count(*) from batches") == [(1,)]
    per_content = sql(database_url, "select content_sha256, count(*) from jobs "
                                    "where status in ('queued', 'running') group by 1")
    assert len(per_content) == len(paths) and {c for _s, c in per_content} == {1}


def test_force_never_makes_a_second_active_job(
    database_url: str, videos: list[Path]
) -> None:
    settings = Settings(database_url=database_url)
    first = submit([str(videos[2])] * 2, settings=settings, request=REQUEST, batch="f",
                   publish=False, force=True)
    again = submit([str(videos[2])], settings=settings, request=REQUEST, batch="f",
                   publish=False, force=True)
    assert (len(first.job_ids), first.duplicates) == (1, 1)
    assert (len(again.job_ids), again.duplicates) == (0, 1)


# --- 5. names a table cannot hold -----------------------------------------------------------

def test_a_non_utf8_file_name_is_rejected_alone(
    database_url: str, redis_url: str, videos: list[Path], tmp_path: Path
) -> None:
    """Before: the name's bytes reached the database driver, which cannot encode them:
    a UnicodeEncodeError traceback, and not one job of the submission was recorded."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(videos[0], folder / "good.mp4")
    shutil.copy(videos[1], os.path.join(os.fsencode(folder), b"bad\xff.mp4"))
    env = {"VIDQ_DATABASE_URL": database_url, "VIDQ_BROKER_URL": redis_url}
    done = vidq_cli("submit", str(folder), "--batch", "names", **env)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1  # something was rejected
    errors = [line for line in done.stderr.splitlines() if line.startswith("vidq: error:")]
    assert len(errors) == 1 and "bad\\xff.mp4" in errors[0] and "not valid UTF-8" in errors[0]
    assert "1 jobs recorded" in done.stderr
    assert sql(database_url, "select path from jobs") == [(str(folder / "good.mp4"),)]


def test_an_over_long_batch_name_is_refused_in_one_line(
    database_url: str, redis_url: str, videos: list[Path]
) -> None:
    """Before: PostgreSQL raised StringDataRightTruncation (a traceback); SQLite, which
    does not enforce VARCHAR lengths, stored a name PostgreSQL could never hold."""
    env = {"VIDQ_DATABASE_URL": database_url, "VIDQ_BROKER_URL": redis_url}
    done = vidq_cli("submit", str(videos[0]), "--batch", "n" * 201, **env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "limit is 200" in done.stderr, done.stderr
    get_engine(database_url)
    assert sql(database_url, "select count(*) from jobs") == [(0,)]
    assert vidq_cli("submit", str(videos[0]), "--batch", "n" * 200, **env).returncode == 0


# --- 6. the file a worker opens is the one submitted ----------------------------------------

@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_file_replaced_after_submit_fails_changed_since_submit(
    database_url: str, tmp_path: Path, videos: list[Path]
) -> None:
    """Before: the worker classified whatever was at the path when it got there, and
    recorded those labels against the content hash taken at submit."""
    from worker.embedded import run_jobs

    replaced, touched = tmp_path / "replaced.mp4", tmp_path / "touched.mp4"
    shutil.copy(videos[0], replaced)
    shutil.copy(videos[1], touched)
    settings = Settings(database_url=database_url, model="x3d_xs", weights="random",
                        device="cpu", precision="fp32")
    report = submit([str(replaced), str(touched)], settings=settings, request=REQUEST,
                    batch="changed", publish=False)
    assert len(report.job_ids) == 2
    make_video(tmp_path / "other.mp4", seconds=2.2, seed=4242)
    os.replace(tmp_path / "other.mp4", replaced)  # another video at the same path
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime

    outcomes = {o.job_id: o for o in run_jobs(report.job_ids, settings=settings)}
    rows = {p: (s, k) for p, s, k in sql(
        database_url, "select path, status, error_kind from jobs")}
    assert rows[str(replaced)] == ("failed", "changed_since_submit"), outcomes
    assert rows[str(touched)] == ("succeeded", None), outcomes
    assert sql(database_url, "select count(*) from video_labels v join jobs j on j.id = v.job_id"
                             " where j.status = 'failed'") == [(0,)]


# --- 7. the broker: library versions and bounded message values ----------------------------

def test_kombu_is_pinned_to_a_version_with_batched_publishing() -> None:
    import re
    from importlib.metadata import version

    from kombu import Producer

    pin = re.search(r'"kombu\[redis\]>=([\d.]+)', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin kombu: vidq/queue.py uses Producer.batch"
    assert tuple(map(int, pin.group(1).split("."))) >= (5, 7, 0)  # batch() is new in 5.7.0
    assert tuple(map(int, version("kombu").split(".")[:2])) >= (5, 7)
    assert callable(Producer.batch)


def test_a_crafted_retry_counter_is_bounded_by_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the ``transient`` kwarg was trusted: a message carrying -1000 made a job
    that keeps hitting a transient error retry more than a thousand times."""
    import worker.tasks as tasks

    calls: list[int] = []
    failed: list[Any] = []

    def always_transient(job_id: int, **_: Any) -> None:
        calls.append(job_id)
        if len(calls) > 50:
            raise RuntimeError("retried without bound")
        raise TransientError("database unavailable (test)")

    store = SimpleNamespace(fail=lambda job_id, token, error: failed.append(error))
    monkeypatch.setattr(tasks, "execute_job", always_transient)
    monkeypatch.setattr(tasks, "load_process_state",
                        lambda: SimpleNamespace(pipeline=None, store=store))

    class Redelivered(Exception):
        def __init__(self, kwargs: dict[str, Any]) -> None:
            self.kwargs = kwargs

    # What the broker does with a retry: deliver a message with the new kwargs.
    monkeypatch.setattr(tasks.classify, "retry",
                        lambda kwargs=None, **_: Redelivered(dict(kwargs or {})))
    message: dict[str, Any] = {"job_id": 7, "transient": -1000}  # the crafted message
    for _ in range(60):
        try:
            assert tasks.classify.run(**message) == "failed"
            break
        except Redelivered as again:
            message = again.kwargs
    assert len(calls) == tasks.settings.max_retries + 1
    assert [e.kind for e in failed] == ["retries_exhausted"]
