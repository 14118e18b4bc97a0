"""One clock for leases: claims, heartbeats and staleness are judged by the database's
clock, so a host whose own clock is off cannot take a live job (SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from producer.submit import JobRequest, submit
from tests.services import sql
from vidq.db import get_engine
from vidq.settings import Settings

REQUEST = JobRequest(model="x3d_xs", weights="random", strategy="single")


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
