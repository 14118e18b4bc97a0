"""The services go away: Redis restarts with nothing kept, PostgreSQL stops for a
while. Jobs are neither lost nor run twice, and none is marked failed.

Both services here are private instances (tests/faults/harness.py), so the outage
touches only this test, not the shared Redis/PostgreSQL other tests use.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from tests.faults.harness import (
    FaultCluster,
    FaultMedia,
    PostgresServer,
    RedisServer,
    submit_long_job,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redis_restart_with_jobs_queued_and_running_completes_each_once(
    make_cluster: Callable[..., FaultCluster], private_redis: RedisServer, database_url: str,
    media: FaultMedia,
) -> None:
    cluster = make_cluster(broker_url=private_redis.url, database_url=database_url)
    worker = cluster.start_worker("--concurrency", "1", "--inflight", "1")
    running = submit_long_job(cluster, media, "before-restart")
    cluster.vidq("submit", *map(str, media.good[:4]), "--batch", "behind-it")
    cluster.wait_running(running)
    assert cluster.sql("select count(*) from jobs where status = 'queued'") == [(4,)]

    private_redis.stop()  # shutdown nosave: the 4 queued messages and the unacked one are gone
    private_redis.start()
    # The worker reconnects by itself; no message will ever come for these jobs.
    cluster.wait_log(cluster.log_of(worker), "] Connected to ", count=2, proc=worker)

    # What an operator (or cron) runs: reconcile until nothing is left without a task.
    reports = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        reports.append(cluster.vidq("reconcile", VIDQ_RECONCILE_AFTER_S="1").stdout)
        if cluster.sql("select count(*) from jobs where status in ('queued', 'running')") == [(0,)]:
            break
        time.sleep(2)
    cluster.wait_done(n=5, timeout=60)
    for job in cluster.jobs():
        cluster.assert_succeeded_once(job["id"])
    counts = [tuple(map(int, m)) for r in reports
              for m in re.findall(r"re-enqueued (\d+) stale running and (\d+) lost queued", r)]
    lost_queued = sum(q for _s, q in counts)
    stale_running = sum(s for s, _q in counts)
    assert lost_queued >= 4, reports  # Redis kept nothing: reconcile found them missing
    # The interrupted job was either finished before the connection dropped, or its
    # lease went stale and reconcile sent it again: never both, never twice.
    attempts = dict(cluster.sql("select id, attempts from jobs"))
    assert stale_running == attempts[running] - 1, (reports, attempts)
    assert all(attempts[j] == 1 for j in attempts if j != running)


# PostgreSQL only. SQLite has no server to stop; as root a chmod cannot make its
# file unwritable, and a writer holding its lock only makes the others wait out
# busy_timeout (30 s) before the same transient-retry path this test covers.
def test_database_outage_jobs_retry_and_complete_none_failed(
    make_cluster: Callable[..., FaultCluster], private_postgres: PostgresServer, redis_url: str,
    media: FaultMedia,
) -> None:
    cluster = make_cluster(broker_url=redis_url, database_url=private_postgres.url)
    hold = cluster.hold("before_commit")
    hold.engage()
    worker = cluster.start_worker("--concurrency", "1", "--inflight", "1", **hold.env())
    cluster.vidq("submit", str(media.good[0]), "--batch", "outage")
    held = 1
    cluster.wait_held(hold)  # classified, about to write its rows
    cluster.vidq("submit", *map(str, media.good[1:4]), "--batch", "outage-queued")

    private_postgres.stop()
    try:
        hold.release()  # its commit meets the outage
        # Down for longer than one backoff step: the finished result is kept and its
        # commit tried again, twice, with the database still gone.
        kept = rf"job {held}: result kept, commit failed"
        cluster.wait_for(lambda: len(re.findall(kept, cluster.log_text(worker))) >= 2,
                         what="two commit retries during the outage", timeout=90)
    finally:
        private_postgres.start()

    cluster.wait_done(n=4, timeout=180)
    for job in cluster.jobs():
        assert job["status"] == "succeeded", job
        cluster.assert_succeeded_once(job["id"])
    assert cluster.sql("select count(*) from jobs where error_kind is not null") == [(0,)]
    # The work done before the outage was not thrown away: one attempt, committed late.
    assert cluster.sql("select attempts from jobs where id = :id", id=held) == [(1,)]
    assert "retries_exhausted" not in cluster.log_text(worker)
