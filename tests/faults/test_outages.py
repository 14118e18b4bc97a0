"""Connectivity faults of worker hosts (tests/faults/hosts.py): the database out of
reach of every host for longer than a lease, one host cut off from the database but
not from Redis, one cut off from Redis but not from the database, and hosts with
different lease lengths side by side.

What holds in each: finished work is committed once, with the attempt that did it; no
job is taken over only because nobody could write heartbeats; no message is dropped.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import FaultMedia
from tests.faults.hosts import Fleet

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300),
              pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)]

HEARTBEAT_S = 4
LEASE_S = 3 * HEARTBEAT_S + 5
"""Settings.stale_after_s for HEARTBEAT_S."""


def test_a_database_outage_longer_than_a_lease_takes_no_job_over(
    fleet: Fleet, media: FaultMedia,
) -> None:
    cluster = fleet.cluster
    hold = cluster.hold("before_commit")
    hold.engage()
    # Reconcile every second on both hosts: after the outage it runs long before any
    # heartbeat is written again (every HEARTBEAT_S).
    env = {"VIDQ_HEARTBEAT_S": str(HEARTBEAT_S), "VIDQ_RECONCILE_EVERY_S": "1",
           **hold.env()}
    hosts = [fleet.add_host(name, "--concurrency", "1", **env) for name in ("a", "b")]
    cluster.vidq("submit", str(media.good[0]), "--batch", "outage")
    job_id = int(cluster.sql("select max(id) from jobs")[0][0])
    cluster.wait_held(hold)  # classified; its commit is next

    for host in hosts:
        host.database.down()
    time.sleep(3)
    hold.release()  # the result is finished during the outage: its commit must wait
    time.sleep(LEASE_S + 8 - 3)  # well past the lease, by the database's clock too
    assert cluster.sql("select status, attempts from jobs") == [("running", 1)]
    for host in hosts:
        host.database.heal()

    cluster.wait_done(n=1, timeout=90)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1, job
    logs = cluster.all_logs()
    assert "re-enqueued" not in logs, logs[-3000:]


def test_a_host_cut_off_from_the_database_hands_its_messages_back(
    fleet: Fleet, media: FaultMedia,
) -> None:
    cluster = fleet.cluster
    # No transient retries: a message whose claim failed and was not handed back would
    # be failed and acked on the spot (dropped, the database being out of reach).
    env = {"VIDQ_MAX_RETRIES": "0"}
    a = fleet.add_host("a", "--concurrency", "1", isolate=True, **env)
    fleet.add_host("b", "--concurrency", "1", isolate=True, **env)
    assert a.log is not None
    a.database.down()
    started = time.monotonic()
    cluster.vidq("submit", *map(str, media.good), "--batch", "cut-off")
    cluster.wait_done(n=len(media.good), timeout=120)
    took = time.monotonic() - started
    for job in cluster.jobs():
        cluster.assert_succeeded_once(job["id"])
        assert job["attempts"] == 1 and job["worker_host"].startswith("b:"), job
    assert took < 120, took  # reconcile (off here) would have taken 600 s
    log = a.log.read_text(errors="replace")
    assert "takes no messages until it is back" in log, log[-3000:]
    # It stopped taking messages at once: one delivery handed back (and maybe one more
    # the consumer had already fetched), not one per job.
    assert log.count("its message goes back to the queue") <= 2, log[-3000:]

    a.database.heal()
    cluster.wait_log(a.log, "taking messages again", timeout=30)


def test_a_host_cut_off_from_redis_commits_what_it_holds(
    fleet: Fleet, media: FaultMedia,
) -> None:
    cluster = fleet.cluster
    hold = cluster.hold("before_commit")
    hold.engage()
    a = fleet.add_host("a", "--concurrency", "1", **hold.env())
    cluster.vidq("submit", str(media.good[1]), "--batch", "no-redis")
    job_id = int(cluster.sql("select max(id) from jobs")[0][0])
    cluster.wait_held(hold)
    a.broker.down()
    hold.release()
    cluster.wait_done(n=1, timeout=60)
    a.broker.heal()
    time.sleep(5)  # a redelivery of its unacked message, if any, finds the job done
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1, job


def test_hosts_with_different_leases_never_take_over_each_others_live_jobs(
    fleet: Fleet, media: FaultMedia,
) -> None:
    cluster = fleet.cluster
    hold = cluster.hold("before_commit")
    hold.engage()
    # Host slow beats every 60 s (its jobs' lease: 185 s), so not once in this test;
    # host quick's lease is 8 s.
    fleet.add_host("slow", "--concurrency", "1", isolate=True, VIDQ_HEARTBEAT_S="60",
                   **hold.env())
    cluster.vidq("submit", str(media.good[2]), "--batch", "leases")
    job_id = int(cluster.sql("select max(id) from jobs")[0][0])
    cluster.wait_held(hold)
    held_at = time.monotonic()
    fleet.add_host("quick", "--concurrency", "1", isolate=True, VIDQ_HEARTBEAT_S="1")
    time.sleep(max(0.0, held_at + 10 - time.monotonic()))  # older than quick's lease
    cluster.publish_duplicate(job_id)  # a second message: quick takes it
    time.sleep(10)  # quick claims it at once, and again after its own lease
    rows = cluster.sql("select status, attempts, worker_host, lease_seconds from jobs")
    assert [r[:2] for r in rows] == [("running", 1)], rows
    assert rows[0][2].startswith("slow:") and rows[0][3] == 185, rows
    hold.release()
    cluster.wait_done(n=1, timeout=60)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1, job
