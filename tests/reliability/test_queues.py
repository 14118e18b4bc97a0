"""Queues kept apart, on real Redis, SQLite and PostgreSQL: reconcile and ``vidq retry``
act only on their own queue (``VIDQ_QUEUE``), and rows from before queues read 'vidq'."""

from __future__ import annotations

import os
from pathlib import Path

import redis

from producer.submit import JobRequest, submit
from tests.cli import run_vidq
from tests.services import sql
from vidq.db import get_engine
from vidq.settings import Settings

REQUEST = JobRequest(model="x3d_xs", weights="random", strategy="single")


def queued(client: redis.Redis, queue: str) -> int:
    """Messages waiting on ``queue`` (kombu keeps one Redis list per priority)."""
    from vidq.queue import PRIORITY_LEVELS

    return sum(client.llen(k) for k in [queue] + [f"{queue}:{p}" for p in range(PRIORITY_LEVELS)])


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
    here = run_vidq("retry", "--batch", "theirs", env={**os.environ, **env, "VIDQ_QUEUE": "vidq"})
    assert here.returncode == 0, here.stderr
    assert "0 jobs queued again" in here.stdout
    assert sql(database_url, "select status from jobs") == [("failed",)]
    there = run_vidq("retry", "--batch", "theirs",
                     env={**os.environ, **env, "VIDQ_QUEUE": "x3d-queue"})
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
