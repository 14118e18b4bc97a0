"""``vidq reconcile``: find jobs that no live task will ever finish, and enqueue them again.

Two kinds are found:
- *running* jobs whose heartbeat went stale: their worker died (a SIGKILL, a lost
  host), and Redis would hold the unacked message back for the visibility timeout;
- *queued* jobs, recorded more than ``reconcile_after_s`` ago, whose task id is
  neither in the Redis queue nor delivered to a worker (unacked) within the last
  ``reconcile_after_s`` (of the database's clock, see ``broker_task_ids``): Redis
  restarted without persistence, the publish failed, or a worker died between taking
  the message and claiming the job (Redis keeps that message unacked until the
  visibility timeout, hours later).
Only the jobs of this reconciler's queue (``VIDQ_QUEUE``, recorded on each job at
submit) are looked at, and they go back to that queue: another model's jobs, on
another queue, are neither "lost" here nor sent to workers that cannot run them.
Ages are measured on the database's clock (``db_now``), never this host's. A running
job is stale after its own lease (``lease_seconds``, what its worker was told), and
only once this process has been in contact with the database for that long too
(vidq/contact.py): after an outage that stopped every heartbeat, the live workers get a
full lease to write theirs before anything is taken from them.
Each is re-queued with a conditional update, so two reconcilers (or a worker
finishing the job meanwhile) cannot both act on it, in small transactions that skip
a row another session holds locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL): one
frozen session never delays the recovery of the other jobs. A stray duplicate message is
harmless: the job's lease and its succeeded status stop a second run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Row, func, literal, select, update
from sqlalchemy.exc import DBAPIError

from vidq.contact import CONTACT
from vidq.db import Job, JobStatus, aware, db_now, first_line, sessions, takeover_due
from vidq.faultpoints import pause_point
from vidq.notify import deliver_later, due_batches
from vidq.queue import PRIORITY_LEVELS, make_celery, new_task_id, publish_jobs
from vidq.settings import Settings

log = logging.getLogger("vidq.reconcile")
UNACKED_KEY = "unacked"  # kombu's Redis transport defaults
UNACKED_SEEN_KEY = "vidq:unacked_seen"
"""Delivery tag -> the database's Unix time when a reconcile first saw it unacked."""
CHUNK_JOBS = 100
"""Jobs re-queued per transaction: row locks are held for moments, and a failure part
way through keeps what was done before it."""


# Kept on the row: if the job uses up VIDQ_MAX_ATTEMPTS, this is why it failed.
STALE_MESSAGE = ("the worker running it stopped heartbeating (killed, out of memory or "
                 "crashed)")


@dataclass
class ReconcileReport:
    stale_running: list[int] = field(default_factory=list)
    lost_queued: list[int] = field(default_factory=list)
    published: int = 0
    broker_checked: bool = False


def broker_task_ids(settings: Settings, *, now_s: float, older_than_s: float
                    ) -> set[str] | None:
    """Task ids waiting in the queue, or delivered to a worker (unacked) less than
    ``older_than_s`` ago; None if the broker is not Redis.

    A message's age is measured on the database's clock (``now_s``, its Unix time), not
    by the time in kombu's unacked index: the worker that took the message wrote that
    with its own clock, and a host running an hour behind would make every message it
    holds look an hour old (its live jobs re-enqueued), one running ahead would make a
    dead worker's messages look fresh for ever. So the first reconcile that sees a
    message unacked records when it did, by the database's clock (``UNACKED_SEEN_KEY``),
    and a later one judges the message by that: a message is old once it has been
    unacked for ``older_than_s`` of the database's time (0: at once), which a reconcile
    finds one run later at most.

    A live worker claims its job moments after taking the message (a retry waits
    at most five minutes, under the default ``reconcile_after_s``), so a message
    unacked for longer, whose job is still queued, was left by a dead worker. Were
    it not, re-enqueueing costs one duplicate message, which the lease makes a no-op."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=30)
    try:
        ids: set[str] = set()
        # Queues first, then unacked: a message moving between them mid-scan is seen once.
        keys = [settings.queue] + [f"{settings.queue}:{p}" for p in range(1, PRIORITY_LEVELS)]
        for key in keys:
            length = client.llen(key)
            for start in range(0, length, 1000):
                for raw in client.lrange(key, start, start + 999):
                    ids.add(_task_id(raw))
        unacked = dict(client.hscan_iter(UNACKED_KEY, count=1000))
        seen = client.hgetall(UNACKED_SEEN_KEY)
        with client.pipeline(transaction=False) as pipe:
            for tag in unacked.keys() - seen.keys():
                pipe.hsetnx(UNACKED_SEEN_KEY, tag, repr(now_s))
            gone = list(seen.keys() - unacked.keys())  # acked since: forgotten
            for start in range(0, len(gone), 1000):
                pipe.hdel(UNACKED_SEEN_KEY, *gone[start:start + 1000])
            pipe.execute()
        for tag, raw in unacked.items():
            if float(seen.get(tag, now_s)) <= now_s - older_than_s:
                continue  # unacked for older_than_s of the database's time (0: any)
            try:
                ids.add(_task_id(json.dumps(json.loads(raw)[0])))
            except (ValueError, IndexError, TypeError):
                continue
        ids.discard("")
        return ids
    finally:
        client.close()


def _task_id(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw).get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""


def _chunks(rows: Sequence[Row[Any]]) -> Iterator[Sequence[Row[Any]]]:
    for start in range(0, len(rows), CHUNK_JOBS):
        yield rows[start:start + CHUNK_JOBS]


def _unless_locked(job_id: int, *still: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    """WHERE terms for an UPDATE of job ``job_id`` if it still matches ``still`` and no
    other transaction holds its row: a locked row (a frozen worker's, a session of a
    host that died mid-transaction) is skipped for the next run, never waited for.
    SQLite has no row locks (no FOR UPDATE is rendered): there the UPDATE is the plain
    conditional one, its one writer at a time making check and change one step."""
    lockable = (select(Job.id).where(Job.id == job_id, *still)
                .with_for_update(skip_locked=True))
    return [Job.id == job_id, *still, Job.id.in_(lockable)]


def reconcile(
    settings: Settings, *, older_than_s: float | None = None, dry_run: bool = False
) -> ReconcileReport:
    """Re-enqueue jobs with no live task. Safe to run anywhere, any time, concurrently."""
    pause_point("reconcile")
    older_than_s = settings.reconcile_after_s if older_than_s is None else older_than_s
    stale_after_s = settings.stale_after_s
    report = ReconcileReport()
    make_session = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    try:
        with make_session() as session:
            now = session.scalar(select(db_now()))
    except DBAPIError as exc:
        CONTACT.failed(first_line(exc))
        raise
    if now is not None:
        CONTACT.reached(now if not isinstance(now, str) else dt.datetime.fromisoformat(now))
    lease = func.coalesce(Job.lease_seconds, literal(float(stale_after_s)))
    stale_due = takeover_due(lease, literal(CONTACT.takeover_floor(), DateTime(timezone=True)))
    with make_session() as session:
        stale = session.execute(
            select(Job.id, Job.priority, Job.task_id).where(
                Job.queue == settings.queue,
                Job.status == JobStatus.RUNNING.value,
                stale_due,
            )
        ).all()
        queued = session.execute(
            select(Job.id, Job.priority, Job.task_id).where(
                Job.queue == settings.queue,
                Job.status == JobStatus.QUEUED.value,
                Job.task_id.is_not(None),
                Job.enqueued_at < db_now(ago_s=older_than_s),
            )
        ).all()
        # Rows of an interrupted `vidq run` (embedded: never published) that nobody
        # has picked up since: no message can exist for them, so they are lost too.
        unpublished = session.execute(
            select(Job.id, Job.priority, Job.task_id).where(
                Job.queue == settings.queue,
                Job.status == JobStatus.QUEUED.value,
                Job.task_id.is_(None),
                Job.submitted_at < db_now(ago_s=older_than_s),
            )
        ).all()
    live = (broker_task_ids(settings, now_s=aware(now).timestamp(), older_than_s=older_than_s)
            if queued else set())
    report.broker_checked = live is not None
    lost = [row for row in queued if live is not None and row.task_id not in live]
    lost += unpublished
    if dry_run:
        report.stale_running = [r.id for r in stale]
        report.lost_queued = [r.id for r in lost]
        return report
    tasks: list[tuple[int, int, str]] = []
    for chunk in _chunks(stale):
        with make_session() as session, session.begin():
            for row in chunk:
                task_id = new_task_id()
                done = session.execute(
                    update(Job)
                    .where(*_unless_locked(row.id, Job.status == JobStatus.RUNNING.value,
                                           stale_due))
                    .values(status=JobStatus.QUEUED.value, lease_token=None,
                            heartbeat_at=None, task_id=task_id, enqueued_at=db_now(),
                            error_kind="crashed", error_message=STALE_MESSAGE)
                ).rowcount
                if done:
                    report.stale_running.append(row.id)
                    tasks.append((row.id, row.priority, task_id))
    for chunk in _chunks(lost):
        with make_session() as session, session.begin():
            for row in chunk:
                task_id = new_task_id()
                done = session.execute(
                    update(Job)
                    .where(*_unless_locked(row.id, Job.status == JobStatus.QUEUED.value,
                                           Job.task_id.is_(None) if row.task_id is None
                                           else Job.task_id == row.task_id))
                    .values(task_id=task_id, enqueued_at=db_now())
                ).rowcount
                if done:
                    report.lost_queued.append(row.id)
                    tasks.append((row.id, row.priority, task_id))
    for batch_id in due_batches(settings):  # completions whose sender died or never came
        deliver_later(settings, batch_id)  # in the background: a receiver never delays this
    if tasks:
        report.published = publish_jobs(make_celery(settings), tasks, queue=settings.queue)
        log.warning("reconcile: re-enqueued %d stale running and %d lost queued jobs",
                    len(report.stale_running), len(report.lost_queued))
    return report
