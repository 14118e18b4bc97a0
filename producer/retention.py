"""``vidq purge``: delete old results in chunks, never a job that is still active.

Only finished jobs go (succeeded, failed, cancelled); a queued or running job is
kept and counted, so a purge never races a worker: a job's status is checked again as
each chunk is deleted, so one put back in the queue meanwhile stays. Each chunk of jobs is deleted,
with every row of its results (clips, labels, segments, embeddings), in a short
transaction of its own, so the tables are never locked for long and pollers keep
answering. A batch left with no jobs is deleted too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from vidq.db import (
    ACTIVE,
    Batch,
    ClipEmbedding,
    ClipPrediction,
    Job,
    LabelSegment,
    VideoEmbedding,
    VideoLabel,
    utcnow,
)
from vidq.errors import InputError
from vidq.faultpoints import pause_point

FINISHED = ("succeeded", "failed", "cancelled")


# A job's result rows, by the report field that counts them. Deleted explicitly, not
# left to ON DELETE CASCADE, so the report says what went.
RESULT_TABLES = (
    ("clip_rows", ClipPrediction),
    ("label_rows", VideoLabel),
    ("segment_rows", LabelSegment),
    ("embedding_rows", VideoEmbedding),
    ("embedding_rows", ClipEmbedding),
)


@dataclass
class PurgeReport:
    jobs: int = 0
    clip_rows: int = 0
    label_rows: int = 0
    segment_rows: int = 0
    embedding_rows: int = 0
    """Video and clip embedding rows together."""
    batches: list[str] = field(default_factory=list)
    """Batches deleted (or that would be) because no job is left in them."""
    kept_active: int = 0
    """Queued or running jobs in scope, left alone."""


def purge(
    make_session: sessionmaker,
    *,
    batch: str | None = None,
    older_than_days: float | None = None,
    dry_run: bool = False,
    chunk: int = 1000,
    progress: Callable[[int], None] = lambda _n: None,
) -> PurgeReport:
    if batch is None and older_than_days is None:
        raise InputError("say what to purge: --batch NAME and/or --older-than DAYS.",
                         kind="usage")
    report = PurgeReport()
    with make_session() as session:
        scope = []
        batch_id = None
        if batch is not None:
            batch_id = session.scalar(select(Batch.id).where(Batch.name == batch))
            if batch_id is None:
                raise InputError(f"no batch named {batch!r}.", kind="not_found")
            scope.append(Job.batch_id == batch_id)
        cutoff = None
        if older_than_days is not None:
            cutoff = utcnow() - dt.timedelta(days=older_than_days)
            scope.append(Job.finished_at < cutoff)
        active_scope: list[ColumnElement[bool]] = [Job.status.in_(ACTIVE)]
        if batch_id is not None:
            active_scope.append(Job.batch_id == batch_id)
        if cutoff is not None:
            active_scope.append(Job.submitted_at < cutoff)
        report.kept_active = session.scalar(
            select(func.count()).select_from(Job).where(*active_scope)) or 0
        doomed = select(Job.id).where(*scope, Job.status.in_(FINISHED))
        if dry_run:
            report.jobs = _count(session, select(func.count()).select_from(doomed.subquery()))
            for name, table in RESULT_TABLES:
                setattr(report, name, getattr(report, name) + _count(
                    session, select(func.count()).where(table.job_id.in_(doomed))))
            report.batches = _emptied(session, batch_id=batch_id, cutoff=cutoff, doomed=doomed)
            return report
    while True:
        with make_session() as session, session.begin():
            ids = list(session.scalars(doomed.order_by(Job.id).limit(chunk)))
            if not ids:
                break
            pause_point("purge_selected")
            # Checked again as the rows are locked, and again in every DELETE: a job put
            # back in the queue (and perhaps running again) since the select above is
            # not finished any more, and neither it nor its rows may go. On PostgreSQL
            # the lock holds the status until this transaction ends; on SQLite the first
            # DELETE takes the one write lock, and each statement re-checks.
            still = (Job.id.in_(ids), Job.status.in_(FINISHED))
            ids = list(session.scalars(select(Job.id).where(*still).with_for_update()))
            finished = select(Job.id).where(Job.id.in_(ids), Job.status.in_(FINISHED))
            for name, table in RESULT_TABLES:
                setattr(report, name, getattr(report, name) + session.execute(
                    delete(table).where(table.job_id.in_(finished))).rowcount)
            report.jobs += session.execute(
                delete(Job).where(Job.id.in_(ids), Job.status.in_(FINISHED))).rowcount
        progress(len(ids))
    with make_session() as session, session.begin():
        names = _emptied(session, batch_id=batch_id, cutoff=cutoff, doomed=None)
        if names:
            session.execute(delete(Batch).where(Batch.name.in_(names)))
        report.batches = names
    return report


def _count(session: Session, stmt: object) -> int:
    return int(session.scalar(stmt) or 0)  # type: ignore[call-overload]


def _emptied(session: Session, *, batch_id: int | None, cutoff: dt.datetime | None,
             doomed: object) -> list[str]:
    """Batches in scope that have (or will have) no job left."""
    stmt = select(Batch.name)
    if batch_id is not None:
        stmt = stmt.where(Batch.id == batch_id)
    elif cutoff is not None:
        stmt = stmt.where(Batch.created_at < cutoff)
    left = exists().where(Job.batch_id == Batch.id)
    if doomed is not None:
        left = exists().where(Job.batch_id == Batch.id, Job.id.not_in(doomed))  # type: ignore[arg-type]
    return list(session.scalars(stmt.where(~left)))
