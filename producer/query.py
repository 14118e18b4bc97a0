"""Polling and managing jobs: ``vidq status``, ``results``, ``show``, ``retry``, ``cancel``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import Select, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vidq.db import (
    ACTIVE,
    Batch,
    ClipPrediction,
    Job,
    JobStatus,
    LabelSegment,
    VideoLabel,
    WorkerHost,
    aware,
    db_now,
    reading_at_the_readers_pace,
    rowcount,
    utcnow,
)
from vidq.errors import InputError
from vidq.queue import new_task_id

if TYPE_CHECKING:
    from typing_extensions import Unpack

    Rows: TypeAlias = Select[Unpack[tuple[Any, ...]]]
    """A select of any columns (``Select`` is generic in each column's type)."""

RATE_WINDOW_S = 600


def batch_id(session: Session, name: str | None) -> int | None:
    if name is None:
        return None
    found = session.scalar(select(Batch.id).where(Batch.name == name))
    if found is None:
        raise InputError(f"no batch named {name!r}.", kind="not_found")
    return found


@dataclass
class StatusSummary:
    counts: dict[str, int]
    clips_done: int
    jobs_per_s: float
    clips_per_s: float
    eta_s: float | None
    oldest_queued_s: float | None = None
    """Age of the oldest queued job (seconds since it was submitted)."""
    queue_depth: dict[str, dict[str, int]] | None = None
    """Messages waiting in the broker, per queue and vidq priority (and ``unacked``)."""
    workers: list[dict[str, Any]] | None = None
    """Worker hosts that reported in the last hour (``worker_hosts``)."""

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def status_summary(session: Session, batch: str | None = None) -> StatusSummary:
    """Counts by status, recent throughput (last 10 minutes) and an ETA."""
    bid = batch_id(session, batch)
    scope = [Job.batch_id == bid] if bid is not None else []
    counts = {s.value: 0 for s in JobStatus}
    clips_done = 0
    # One pass for counts and clips: with a batch, an index-only scan of
    # ix_jobs_batch_status_submitted (no heap visit per job).
    for status, n, clips in session.execute(
        select(Job.status, func.count(), func.coalesce(func.sum(Job.clips_done), 0))
        .where(*scope).group_by(Job.status)
    ):
        counts[status] = n
        if status == JobStatus.SUCCEEDED.value:
            clips_done = clips or 0
    since = utcnow() - dt.timedelta(seconds=RATE_WINDOW_S)
    recent = select(
        func.count(), func.coalesce(func.sum(Job.clips_done), 0), func.min(Job.started_at)
    ).where(
        *scope, Job.finished_at >= since,
        Job.status.in_((JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)),
    )
    n_recent, clips_recent, first_start = session.execute(recent).one()
    jobs_per_s = clips_per_s = 0.0
    if n_recent and first_start is not None:
        span = max((utcnow() - max(aware(first_start), since)).total_seconds(), 1e-3)
        jobs_per_s, clips_per_s = int(n_recent) / span, int(clips_recent or 0) / span
    left = counts[JobStatus.QUEUED.value] + counts[JobStatus.RUNNING.value]
    eta = left / jobs_per_s if jobs_per_s > 0 else (0.0 if left == 0 else None)
    oldest = session.scalar(
        select(func.min(Job.submitted_at)).where(*scope, Job.status == JobStatus.QUEUED.value))
    oldest_s = None
    if oldest is not None:
        oldest_s = max(0.0, (utcnow() - aware(oldest)).total_seconds())
    return StatusSummary(counts, int(clips_done), jobs_per_s, clips_per_s, eta, oldest_s)


WORKERS_WINDOW_S = 3600


def worker_hosts(session: Session, *, queue: str | None = None) -> list[dict[str, Any]]:
    """Worker hosts that reported in the last hour, with their circuit breaker: host,
    queue, state (``closed``, ``open``, ``half-open``), last error, since (ISO time) and
    how many seconds ago it was last seen (by the database's clock)."""
    now = session.scalar(select(db_now()))
    stmt = select(WorkerHost).where(WorkerHost.seen_at > db_now(ago_s=WORKERS_WINDOW_S))
    if queue is not None:
        stmt = stmt.where(WorkerHost.queue == queue)
    hosts = []
    for w in session.scalars(stmt.order_by(WorkerHost.host)):
        seen = (aware(now) - aware(w.seen_at)).total_seconds() if now is not None else None
        hosts.append({"host": w.host, "queue": w.queue, "state": w.state,
                      "last_error": w.last_error, "since": aware(w.since).isoformat(),
                      "seen_s_ago": None if seen is None else max(0.0, seen)})
    return hosts


def succeeded_jobs(session: Session, stmt: Rows, *, batch: str | None) -> Rows:
    """The scope every results query shares: ``stmt`` (which selects from ``jobs``)
    limited to succeeded jobs, of ``batch`` when given, with the batch's name joinable."""
    stmt = stmt.outerjoin(Batch, Batch.id == Job.batch_id).where(
        Job.status == JobStatus.SUCCEEDED.value)
    bid = batch_id(session, batch)
    return stmt if bid is None else stmt.where(Job.batch_id == bid)


RESULT_COLUMNS = (
    "job_id", "path", "batch", "rank", "label", "score", "class_id",
    "model", "weights_id", "precision", "duration_s", "finished_at",
)


def iter_results(
    session: Session,
    *,
    batch: str | None = None,
    label: str | None = None,
    min_score: float | None = None,
    all_ranks: bool = False,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Video-level labels of succeeded jobs, streamed (constant memory for any size)."""
    stmt: Rows = (
        select(
            Job.id, Job.path, Batch.name, VideoLabel.rank, VideoLabel.label, VideoLabel.score,
            VideoLabel.class_id, Job.model, Job.weights_id, Job.precision, Job.duration_s,
            Job.finished_at,
        )
        .join(VideoLabel, VideoLabel.job_id == Job.id)
    )
    stmt = succeeded_jobs(session, stmt, batch=batch)
    if label is not None:
        stmt = stmt.where(VideoLabel.label == label)
    elif not all_ranks:
        stmt = stmt.where(VideoLabel.rank == 1)
    if min_score is not None:
        stmt = stmt.where(VideoLabel.score >= min_score)
    # Ordered by the label row's job id (equal to jobs.id through the join), so that
    # with --label the first page reads ix_video_labels_label_job in order and stops.
    stmt = stmt.order_by(VideoLabel.job_id, VideoLabel.rank)
    if limit:
        stmt = stmt.limit(limit)
    reading_at_the_readers_pace(session)
    for row in session.execute(stmt.execution_options(yield_per=1000)):
        out = dict(zip(RESULT_COLUMNS, row))
        if out["finished_at"] is not None:
            out["finished_at"] = out["finished_at"].isoformat()
        yield out


SEGMENT_COLUMNS = (
    "job_id", "path", "batch", "label", "class_id", "start_sec", "end_sec", "duration_s",
    "mean_score", "peak_score", "clips",
)


def iter_segments(
    session: Session,
    *,
    batch: str | None = None,
    label: str | None = None,
    min_score: float | None = None,
    min_duration_s: float | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Stored segments of succeeded jobs, streamed. ``min_score`` filters on the
    segment's mean score, ``min_duration_s`` on end - start."""
    stmt: Rows = (
        select(LabelSegment.job_id, Job.path, Batch.name, LabelSegment.label,
               LabelSegment.class_id, LabelSegment.start_sec, LabelSegment.end_sec,
               LabelSegment.duration_s, LabelSegment.mean_score, LabelSegment.peak_score,
               LabelSegment.clips)
        .join(Job, Job.id == LabelSegment.job_id)
    )
    stmt = succeeded_jobs(session, stmt, batch=batch)
    if label is not None:
        stmt = stmt.where(LabelSegment.label == label)
    if min_score is not None:
        stmt = stmt.where(LabelSegment.mean_score >= min_score)
    if min_duration_s is not None:
        stmt = stmt.where(LabelSegment.duration_s >= min_duration_s - 1e-6)
    stmt = stmt.order_by(LabelSegment.job_id, LabelSegment.segment_index)
    if limit:
        stmt = stmt.limit(limit)
    reading_at_the_readers_pace(session)
    for row in session.execute(stmt.execution_options(yield_per=1000)):
        yield dict(zip(SEGMENT_COLUMNS, row))


def show_job(session: Session, job_id: int) -> dict[str, Any]:
    job = session.get(Job, job_id)
    if job is None:
        raise InputError(f"no job {job_id}.", kind="not_found")
    fields = {c.key: getattr(job, c.key) for c in Job.__table__.columns if c.key != "lease_token"}
    fields["batch"] = session.scalar(select(Batch.name).where(Batch.id == job.batch_id))
    fields["labels"] = [
        {"rank": v.rank, "label": v.label, "score": v.score, "class_id": v.class_id}
        for v in session.scalars(
            select(VideoLabel).where(VideoLabel.job_id == job_id).order_by(VideoLabel.rank)
        )
    ]
    timeline: dict[int, dict[str, Any]] = {}
    for c in session.scalars(
        select(ClipPrediction)
        .where(ClipPrediction.job_id == job_id)
        .order_by(ClipPrediction.clip_index, ClipPrediction.rank)
    ):
        entry = timeline.setdefault(
            c.clip_index,
            {"clip_index": c.clip_index, "start_sec": c.start_sec, "end_sec": c.end_sec, "top": []},
        )
        entry["top"].append({"label": c.label, "score": c.score, "class_id": c.class_id})
    fields["clips"] = list(timeline.values())
    return fields


def requeue(
    session: Session, *, batch: str | None, statuses: tuple[str, ...], queue: str,
    job_ids: list[int] | None = None,
) -> list[tuple[int, int, str]]:
    """Put ``queue``'s jobs in ``statuses`` back to queued; returns (id, priority, task_id)
    to publish on that queue. Jobs of other queues (other models' workers) are left to
    a ``vidq retry`` run with their VIDQ_QUEUE. A job whose content already has an
    active job with the same configuration (submitted again since) stays as it is."""
    stmt = select(Job.id, Job.priority).where(Job.status.in_(statuses), Job.queue == queue)
    bid = batch_id(session, batch)
    if bid is not None:
        stmt = stmt.where(Job.batch_id == bid)
    if job_ids:
        stmt = stmt.where(Job.id.in_(job_ids))
    candidates = [(jid, prio, new_task_id()) for jid, prio in session.execute(stmt)]
    tasks = []
    for jid, prio, tid in candidates:
        try:
            with session.begin_nested():  # the unique index refuses a second active job
                done = rowcount(session.execute(
                    update(Job)
                    .where(Job.id == jid, Job.status.in_(statuses), Job.queue == queue)
                    .values(status=JobStatus.QUEUED.value, error_kind=None, error_message=None,
                            lease_token=None, heartbeat_at=None, finished_at=None,
                            task_id=tid, enqueued_at=db_now(),
                            attempts=0)  # asked again: a fresh VIDQ_MAX_ATTEMPTS budget
                ))
        except IntegrityError:
            continue
        if done:
            tasks.append((jid, prio, tid))
    if tasks:
        renotify(session, [jid for jid, _p, _t in tasks])
    return tasks


def renotify(session: Session, job_ids: list[int]) -> None:
    """Jobs of these ids became active again: their batches will complete again."""
    for i in range(0, len(job_ids), 1000):
        session.execute(
            update(Batch)
            .where(Batch.notify_url.is_not(None),
                   Batch.id.in_(select(Job.batch_id).where(Job.id.in_(job_ids[i:i + 1000]))))
            .values(notify_status="pending", notify_attempts=0, notify_sent_at=None)
        )


def batches_of(session: Session, *, batch: str | None, job_ids: list[int] | None) -> list[int]:
    if batch is not None:
        return [bid] if (bid := batch_id(session, batch)) is not None else []
    return [b for b in session.scalars(
        select(Job.batch_id).where(Job.id.in_(job_ids or [])).distinct()) if b is not None]


def cancel(session: Session, *, batch: str | None, job_ids: list[int] | None = None) -> int:
    """Cancel queued and running jobs. A worker skips a cancelled job it receives, and
    gives a running one up at its next clip once its heartbeat sees the change; the
    guarded commit never writes results for a cancelled job."""
    stmt = update(Job).where(Job.status.in_(ACTIVE))
    bid = batch_id(session, batch)
    if bid is not None:
        stmt = stmt.where(Job.batch_id == bid)
    if job_ids:
        stmt = stmt.where(Job.id.in_(job_ids))
    return rowcount(session.execute(stmt.values(
        status=JobStatus.CANCELLED.value, finished_at=db_now(), lease_token=None)))


def active_count(session: Session, batch: str | None) -> int:
    bid = batch_id(session, batch)
    stmt = select(func.count()).where(Job.status.in_(ACTIVE))
    if bid is not None:
        stmt = stmt.where(Job.batch_id == bid)
    return session.scalar(stmt) or 0
