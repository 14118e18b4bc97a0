"""Least privilege between hosts: reconcile trusts no other host's clock, and purge
deletes only what is still finished when it deletes."""

from __future__ import annotations

import datetime as dt
import subprocess
import time

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.cli import vidq_command
from tests.faults.harness import FaultCluster, FaultMedia
from tests.faults.hosts import Fleet, faketime_library
from vidq.db import utcnow

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


# PostgreSQL: hosts share one database server (the fleet's narrowing).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_reconcile_judges_a_message_age_by_the_database_clock(
    cluster: FaultCluster, fleet: Fleet, media: FaultMedia
) -> None:
    """A worker on a host whose clock runs an hour ahead takes a message and dies before
    claiming its job. Before: kombu's unacked index held that host's time of delivery,
    an hour in the future on the reconciler's clock, so the dead worker's message
    looked freshly delivered to every reconcile (until the broker's visibility timeout,
    hours later) and the job was never sent again."""
    hold = cluster.hold("before_claim")
    hold.engage()
    library = faketime_library()
    if library is None:
        pytest.skip("a host clock offset needs libfaketime")
    # The whole clock an hour ahead, monotonic too (a constant offset keeps intervals
    # true): with FAKETIME_DONT_FAKE_MONOTONIC, libfaketime 0.9.10's sleeps fail EINVAL.
    ahead = fleet.add_host("ahead", "--concurrency", "1", "--inflight", "1",
                           LD_PRELOAD=str(library), FAKETIME="+3600s", **hold.env())
    cluster.vidq("submit", str(media.good[0]), "--batch", "clock")
    cluster.wait_held(hold)  # delivered (unacked), the job not claimed yet
    broker = redis.Redis.from_url(cluster.settings.broker_url)
    assert broker.hlen("unacked") == 1
    cluster.kill_group(ahead.worker)  # its message stays unacked, under a dead worker
    hold.release()
    time.sleep(3)  # the job was enqueued more than --older-than ago (the database's clock)

    out = cluster.vidq("reconcile", "--older-than", "2").stdout  # first seen unacked now
    assert "re-enqueued 0 stale running and 0 lost queued jobs" in out, out
    time.sleep(3)  # unacked for longer than --older-than, by the database's clock
    out = cluster.vidq("reconcile", "--older-than", "2").stdout
    assert "re-enqueued 0 stale running and 1 lost queued jobs" in out, out
    cluster.start_worker("--concurrency", "1")
    cluster.wait_for(lambda: cluster.status_of(1) == "succeeded", what="the job", timeout=90)
    assert cluster.assert_succeeded_once(1)["attempts"] == 1


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_purge_keeps_a_job_that_was_queued_again_after_it_was_selected(
    cluster: FaultCluster,
) -> None:
    """Before: purge deleted by the ids it had selected; a job put back in the queue
    and claimed since (running) was deleted under its worker."""
    long_ago = utcnow() - dt.timedelta(days=3)
    requeued = cluster.insert_job("/media/a.mp4", status="succeeded", finished_at=long_ago)
    finished = cluster.insert_job("/media/b.mp4", status="succeeded", finished_at=long_ago)
    hold = cluster.hold("purge_selected")
    hold.engage()
    purge = subprocess.Popen([*vidq_command(), "purge", "--older-than", "1"],
                             env={**cluster.env, **hold.env()}, cwd=cluster.workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.wait_held(hold, timeout=60)
        engine = create_engine(cluster.database_url)
        with engine.begin() as conn:  # re-queued by hand, and claimed by a worker since
            conn.execute(text("update jobs set status = 'running', finished_at = null"
                              " where id = :id"), {"id": requeued})
        engine.dispose()
        hold.release()
        out, _ = purge.communicate(timeout=60)
    finally:
        purge.kill()
    assert purge.returncode == 0, out
    assert cluster.status_of(requeued) == "running", out
    assert cluster.status_of(finished) is None, out
