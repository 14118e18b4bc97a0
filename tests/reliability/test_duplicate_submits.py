"""Duplicate-proof submits: producers racing on the same files record each once, --force
never makes a second active job, and a 0.1.0-era database holding duplicates upgrades."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

from sqlalchemy import text

from producer.submit import JobRequest, submit
from tests.services import sql
from vidq.db import dispose_engines, get_engine
from vidq.settings import Settings

REQUEST = JobRequest(model="x3d_xs", weights="random", strategy="single")


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
