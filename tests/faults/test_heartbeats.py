"""Heartbeats that cannot die silently: a worker process's heartbeat thread survives
whatever its statement raises (here a read-only database, as after a failover to a
replica), says so on /healthz while it fails, and carries on once it can write again."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest

from tests.faults.harness import FaultCluster, FaultMedia, PostgresServer, free_port, healthz
from tests.faults.hosts import Fleet

LEASE_S = 3 * 1 + 5
"""The lease of a job claimed with the fault suite's VIDQ_HEARTBEAT_S=1."""

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]



def set_read_only(server: PostgresServer, on: bool) -> None:
    """Every new session of the database read-only (or not), and every open one ended,
    so the workers' pools reconnect to what a failover left them."""
    with psycopg.connect(server.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = off")  # this session may write
        conn.execute("alter database postgres set default_transaction_read_only = "
                     + ("on" if on else "off"))
        conn.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                     "where datname = 'postgres' and pid <> pg_backend_pid()")


def test_heartbeats_survive_a_read_only_database_and_healthz_says_so(
    private_postgres: PostgresServer, make_cluster: Callable[..., FaultCluster],
    redis_url: str, media: FaultMedia,
) -> None:
    cluster = make_cluster(broker_url=redis_url, database_url=private_postgres.url)
    port = free_port()
    hold = cluster.hold("before_commit")
    hold.engage()
    # A lease of 3 * 2 + 5 = 11 s: the read-only spell below is shorter, so the job
    # stays this worker's and commits once it may.
    worker = cluster.start_worker("--concurrency", "1", VIDQ_METRICS_PORT=str(port),
                                  VIDQ_HEARTBEAT_S="2", **hold.env())
    cluster.wait_for(lambda: healthz(port)[0] == 200, timeout=30, what="healthy")
    cluster.vidq("submit", str(media.good[0]), "--batch", "read-only")
    job_id = int(cluster.sql("select max(id) from jobs")[0][0])
    cluster.wait_held(hold)

    set_read_only(private_postgres, True)
    status, body = cluster.wait_for(lambda: (r := healthz(port))[0] == 503 and r, timeout=30,
                                    what="/healthz unhealthy while heartbeats fail")
    assert "1 unable to write heartbeats" in body, body
    log = cluster.log_text(worker)
    assert "heartbeats of 1 jobs not written" in log and "read-only transaction" in log, log

    set_read_only(private_postgres, False)
    cluster.wait_for(lambda: healthz(port)[0] == 200, timeout=30,
                     what="/healthz healthy again: the heartbeat thread lived on")
    assert "heartbeats written again" in cluster.log_text(worker)
    hold.release()
    cluster.wait_done(n=1, timeout=60)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1, job


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_delivery_that_gives_up_never_fails_a_job_another_holds(
    cluster: FaultCluster,
) -> None:
    """The give-up path (``VIDQ_MAX_RETRIES`` spent) holds no lease: it may fail a job
    nobody holds, never one that a live attempt is running."""
    from vidq.errors import TransientError
    from worker.jobs import JobStore

    store = JobStore(cluster.database_url, stale_after_s=60)
    job_id = cluster.insert_job("/media/held.mp4")
    claimed = store.claim(job_id, "a" * 32, "host-a:1")
    assert not isinstance(claimed, tuple) and getattr(claimed, "id", None) == job_id
    give_up = TransientError("gave up after 6 attempts: test", kind="retries_exhausted")
    assert store.fail(job_id, None, give_up) is False
    assert cluster.sql("select status, lease_token from jobs") == [("running", "a" * 32)]
    store.release(job_id, "a" * 32)  # the holder gives it back: nobody holds it now
    assert store.fail(job_id, None, give_up) is True
    assert cluster.sql("select status, error_kind from jobs") == [
        ("failed", "retries_exhausted")]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_job_whose_lease_could_not_be_renewed_is_abandoned_and_run_elsewhere(
    fleet: Fleet, media: FaultMedia,
) -> None:
    """Host a claims a job and loses the database for longer than the job's lease: by
    then host b may take the job over, so a drops its work on it and hands its message
    back, and b runs it. Nothing waits for reconcile (off here)."""
    cluster = fleet.cluster
    hold = cluster.hold("after_claim")
    hold.engage()
    a = fleet.add_host("a", "--concurrency", "1", isolate=True, **hold.env())
    assert a.log is not None
    cluster.vidq("submit", str(media.good[3]), "--batch", "abandoned")
    job_id = int(cluster.sql("select max(id) from jobs")[0][0])
    cluster.wait_held(hold)
    a.database.down()
    cut_at = time.monotonic()
    fleet.add_host("b", "--concurrency", "1", isolate=True)
    time.sleep(max(0.0, cut_at + LEASE_S + 3 - time.monotonic()))
    hold.release()  # a starts decoding a job that may no longer be its own
    cluster.wait_log(a.log, f"job {job_id} abandoned", timeout=30)
    cluster.wait_done(n=1, timeout=60)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 2 and job["worker_host"].startswith("b:"), job
    a.database.heal()
    cluster.wait_log(a.log, "taking messages again", timeout=30)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_heartbeat_the_database_never_answers_makes_healthz_unhealthy(
    fleet: Fleet,
) -> None:
    """A blackhole raises nothing: the heartbeat statement just waits. /healthz still
    goes unhealthy once no heartbeat was written for a lease, and healthy once the
    statement returns."""
    port = free_port()
    a = fleet.add_host("a", "--concurrency", "1", VIDQ_METRICS_PORT=str(port))
    cluster = fleet.cluster
    cluster.wait_for(lambda: healthz(port)[0] == 200, timeout=30, what="healthy")
    a.database.blackhole()
    cut_at = time.monotonic()
    status, body = cluster.wait_for(lambda: (r := healthz(port))[0] == 503 and r,
                                    timeout=LEASE_S + 20, what="unhealthy")
    assert time.monotonic() - cut_at > LEASE_S - 2, body  # not before a lease went by
    assert "1 unable to write heartbeats" in body, body
    a.database.heal()
    cluster.wait_for(lambda: healthz(port)[0] == 200, timeout=30, what="healthy again")
