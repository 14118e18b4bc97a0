"""Frozen and vanished PostgreSQL sessions: a worker host that froze or died between
its UPDATE and its COMMIT keeps its row locks for as long as the server keeps its
session. Reconcile recovers every other job meanwhile, and the server ends such a
session by itself (``idle_in_transaction_session_timeout``), so the last job follows.

The session that holds the locks comes from a "host" behind its own fault proxy
(tests/faults/proxy.py): ``down`` is a host whose connection was reset, ``blackhole``
one that vanished without a word.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from tests.faults.harness import FaultCluster
from tests.faults.proxy import Proxy
from vidq.db import Job, make_engine, utcnow

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

PROMPT_S = 20.0
"""A reconcile that waited on no lock is done within this (a CLI start on a busy host)."""


def insert_stale_running(cluster: FaultCluster, n: int) -> list[int]:
    """Jobs whose worker stopped heartbeating an hour ago: reconcile's to recover."""
    an_hour_ago = utcnow() - dt.timedelta(hours=1)
    return [cluster.insert_job(f"/media/stale-{i}.mp4", status="running", attempts=1,
                               lease_token=uuid.uuid4().hex, worker_host="gone:1",
                               started_at=an_hour_ago, heartbeat_at=an_hour_ago)
            for i in range(n)]


def reconcile(cluster: FaultCluster) -> tuple[str, float]:
    """``vidq reconcile``: what it printed, and how long it took."""
    start = time.monotonic()
    out = cluster.vidq("reconcile", timeout=PROMPT_S * 2).stdout
    return out, time.monotonic() - start


def statuses(cluster: FaultCluster) -> dict[int, str]:
    return dict(cluster.sql("select id, status from jobs"))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_reconcile_skips_a_locked_job_and_recovers_every_other(
    cluster: FaultCluster, database_url: str,
) -> None:
    jobs = insert_stale_running(cluster, 5)
    frozen = jobs[2]
    with Proxy.to_url(database_url, name="frozen-host") as link:
        host = psycopg.connect(link.url(database_url).replace("+psycopg", ""))
        # A host that froze mid-transaction: its row lock taken, never committed.
        host.execute("select id from jobs where id = %s for update", (frozen,))

        out, took = reconcile(cluster)
        assert "re-enqueued 4 stale running and 0 lost queued jobs" in out, out
        assert took < PROMPT_S, took
        assert statuses(cluster) == {j: "running" if j == frozen else "queued" for j in jobs}
        assert cluster.sql("select count(*) from jobs where error_kind = 'crashed'") == [(4,)]

        link.down()  # the host's connection is reset: the server ends its session
        out, took = cluster.wait_for(
            lambda: (r := reconcile(cluster))[0].startswith("re-enqueued 1 ") and r,
            timeout=30, what="the frozen job recovered once its session went away")
        assert took < PROMPT_S, took
        assert set(statuses(cluster).values()) == {"queued"}
        host.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_vanished_hosts_transaction_is_ended_by_the_server(
    cluster: FaultCluster, database_url: str,
) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("show idle_in_transaction_session_timeout")
                                ).scalar_one() == "1min"
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore
            assert params.get("keepalives") == "1", params
            assert {"keepalives_idle", "keepalives_interval", "keepalives_count"} <= set(params)
    finally:
        engine.dispose()

    [job] = insert_stale_running(cluster, 1)
    with Proxy.to_url(database_url, name="vanishing-host") as link:
        engine = make_engine(link.url(database_url), idle_in_transaction_timeout_s=2)
        try:
            conn = engine.connect()
            conn.execute(select(Job.id).where(Job.id == job).with_for_update())
            link.blackhole()  # the host vanished between its UPDATE and its COMMIT
            out, took = reconcile(cluster)
            assert "re-enqueued 0 stale running" in out, out  # locked: left for later
            assert took < PROMPT_S, took

            out, _took = cluster.wait_for(
                lambda: (r := reconcile(cluster))[0].startswith("re-enqueued 1 ") and r,
                timeout=30, what="the server ending the idle transaction, and its lock")
            assert statuses(cluster) == {job: "queued"}

            link.heal()  # the host comes back: its session is gone for good
            with pytest.raises(DBAPIError, match="idle-in-transaction timeout") as ended:
                conn.execute(text("select 1"))
            # What a worker's JobStore reads as a transient database error.
            assert ended.value.connection_invalidated
            conn.close()
        finally:
            engine.dispose()


def test_the_schema_lock_outlives_the_idle_in_transaction_timeout() -> None:
    """``vidq db upgrade`` holds its advisory lock on a connection of its own while the
    migration runs on another: that connection must not sit in a transaction, or the
    server would end it (and free the lock) under a migration longer than the timeout."""
    from tests.services import PG_ADMIN_URL
    from vidq.migrate import _schema_lock

    engine = make_engine(PG_ADMIN_URL, idle_in_transaction_timeout_s=1)
    try:
        with _schema_lock(engine):
            time.sleep(2.5)  # a migration that takes longer than the timeout
            with engine.connect() as conn:  # another upgrader would wait: the lock is held
                assert conn.execute(text(
                    "select count(*) from pg_locks where locktype = 'advisory' and granted"
                )).scalar_one() >= 1
    finally:
        engine.dispose()
