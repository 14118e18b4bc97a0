"""What the viewer's pages show, read from the results database, read-only.

A read-only engine (``readonly_engine``): SQLite opened with ``mode=ro``, PostgreSQL
sessions whose transactions are ``READ ONLY``, so no page can write, whatever its
query. Every function here returns plain dicts and lists that a template renders and
that embed as JSON in a page (the video page's script re-derives segments from them).
"""

from __future__ import annotations

import bisect
import datetime as dt
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import Connection, create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import QueuePool

from producer.query import StatusSummary, status_summary
from vidq.db import (
    Batch,
    ClipPrediction,
    Job,
    JobStatus,
    LabelSegment,
    VideoEmbedding,
    VideoLabel,
    first_line,
    make_engine,
    unreachable,
)
from vidq.errors import ConfigError, InputError
from vidq.migrate import ensure_schema
from vidq.segments import SegmentRules, clip_rows_from_predictions, derive_segments
from vidq.settings import Settings, mask_url

PAGE_SIZE = 50
"""Rows per page of search results, batch videos and failed jobs."""


def readonly_engine(url: str, *, settings: Settings | None = None) -> Engine:
    """An engine that cannot write: SQLite read-only (``mode=ro``), PostgreSQL with
    every transaction READ ONLY. The schema must be at this vidq's revision (the
    viewer never migrates)."""
    if url.startswith("sqlite"):
        path = unquote(urlsplit(url).path)
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        if not path or path == ":memory:":
            raise ConfigError(f"VIDQ_DATABASE_URL={url}: the viewer needs a database file.")

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30,
                                   check_same_thread=False)

        # A pool of whole connections, one per request thread at a time: the URL alone
        # ("sqlite://") would get SQLAlchemy's in-memory pool, which closes connections
        # other threads are still using.
        engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool,
                               pool_size=5, max_overflow=10)
    else:
        engine = make_engine(url, settings=settings)
        if engine.dialect.name == "postgresql":
            @event.listens_for(engine, "connect")
            def _read_only(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                cur.close()
                dbapi_conn.commit()
    try:
        ensure_schema(engine, auto_migrate=False, display_url=mask_url(url))
    except OperationalError as exc:
        engine.dispose()
        if url.startswith("sqlite"):
            raise ConfigError(f"cannot open the database {mask_url(url)} read-only "
                              f"({first_line(exc)}); check VIDQ_DATABASE_URL: the viewer "
                              "never creates a database.") from None
        raise unreachable(url, exc) from None
    except BaseException:
        engine.dispose()
        raise
    return engine


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None


def batches(conn: Connection) -> list[dict[str, Any]]:
    """Every batch, newest first, with its jobs counted by status."""
    counts: dict[int | None, dict[str, int]] = {}
    for bid, status, n in conn.execute(
            select(Job.batch_id, Job.status, func.count()).group_by(Job.batch_id, Job.status)):
        counts.setdefault(bid, {s.value: 0 for s in JobStatus})[status] = n
    out = []
    for bid, name, created in conn.execute(
            select(Batch.id, Batch.name, Batch.created_at).order_by(Batch.id.desc())):
        by_status = counts.get(bid, {s.value: 0 for s in JobStatus})
        out.append({"name": name, "created_at": _iso(created), "counts": by_status,
                    "total": sum(by_status.values()),
                    "active": by_status["queued"] + by_status["running"]})
    return out


def batch_page(conn: Connection, name: str, *, page: int = 0) -> dict[str, Any]:
    """One batch: its status summary (counts, clips/s, ETA), its failed jobs with their
    error kinds and messages, and a page of its videos."""
    from sqlalchemy.orm import Session

    with Session(bind=conn) as session:
        summary: StatusSummary = status_summary(session, name)
    bid = conn.scalar(select(Batch.id).where(Batch.name == name))
    failed = [dict(job_id=r[0], path=r[1], error_kind=r[2], error_message=r[3],
                   attempts=r[4], finished_at=_iso(r[5]))
              for r in conn.execute(
                  select(Job.id, Job.path, Job.error_kind, Job.error_message, Job.attempts,
                         Job.finished_at)
                  .where(Job.batch_id == bid, Job.status == JobStatus.FAILED.value)
                  .order_by(Job.id).limit(PAGE_SIZE * 4))]
    kinds: dict[str, int] = {}
    for kind, n in conn.execute(
            select(Job.error_kind, func.count())
            .where(Job.batch_id == bid, Job.status == JobStatus.FAILED.value)
            .group_by(Job.error_kind)):
        kinds[kind or "unknown"] = n
    videos = [dict(job_id=r[0], path=r[1], status=r[2], top_label=r[3], top_score=r[4],
                   duration_s=r[5], clips=r[6])
              for r in conn.execute(
                  select(Job.id, Job.path, Job.status, Job.top_label, Job.top_score,
                         Job.duration_s, Job.clips_done)
                  .where(Job.batch_id == bid).order_by(Job.id)
                  .offset(page * PAGE_SIZE).limit(PAGE_SIZE + 1))]
    return {"name": name, "summary": summary.to_json(), "failed": failed,
            "error_kinds": sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])),
            "videos": videos[:PAGE_SIZE], "page": page, "more": len(videos) > PAGE_SIZE,
            "active": summary.counts["queued"] + summary.counts["running"]}


@dataclass(frozen=True)
class VideoPage:
    """What a video's page shows and embeds."""

    job: dict[str, Any]
    top: list[dict[str, Any]]
    labels: list[str]
    """Every label any clip holds, indexed by the clips' and segments' label numbers."""
    clips: list[list[Any]]
    """``[clip_index, start_sec, end_sec, [[label_no, class_id, score], ...]]`` by rank."""
    segments: list[dict[str, Any]]
    rules: SegmentRules
    has_embedding: bool

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "top": self.top, "labels": self.labels, "clips": self.clips,
                "segments": self.segments,
                "rules": {"min_score": self.rules.min_score, "min_s": self.rules.min_s,
                          "max_gap_s": self.rules.max_gap_s}}


def peak_time(clips: list[list[Any]], label_no: int, start: float, end: float, *,
              starts: list[float] | None = None) -> float:
    """The middle of the clip within [start, end] where ``label_no`` scores highest (the
    first such clip in time): where a segment's thumbnail is taken and its peak drawn.
    ``clips`` in time order; ``starts``, their start times, saves the search a pass."""
    starts = starts if starts is not None else [c[1] for c in clips]
    best, at = -1.0, start
    for i in range(bisect.bisect_left(starts, start - 1e-6), len(clips)):
        _index, s, e, top = clips[i]
        if s > end + 1e-6:
            break
        if e > end + 1e-6:
            continue
        for no, _class_id, score in top:
            if no == label_no and score > best:
                best, at = score, (s + e) / 2
    return at


def video_page(conn: Connection, job_id: int, rules: SegmentRules) -> VideoPage:
    """A job's page: the job, its top-k, clips (compact) and stored segments."""
    row = conn.execute(
        select(Job.id, Job.path, Job.status, Job.model, Job.weights_id, Job.duration_s,
               Job.fps, Job.width, Job.height, Job.strategy, Job.error_kind,
               Job.error_message, Batch.name)
        .outerjoin(Batch, Batch.id == Job.batch_id).where(Job.id == job_id)).first()
    if row is None:
        raise InputError(f"no job {job_id}.", kind="not_found")
    job = dict(zip(("id", "path", "status", "model", "weights_id", "duration_s", "fps",
                    "width", "height", "strategy", "error_kind", "error_message", "batch"),
                   row))
    top = [dict(rank=r[0], label=r[1], score=r[2], class_id=r[3]) for r in conn.execute(
        select(VideoLabel.rank, VideoLabel.label, VideoLabel.score, VideoLabel.class_id)
        .where(VideoLabel.job_id == job_id).order_by(VideoLabel.rank))]
    labels: list[str] = []
    label_no: dict[str, int] = {}

    def number(label: str) -> int:
        no = label_no.get(label)
        if no is None:
            no = label_no[label] = len(labels)
            labels.append(label)
        return no

    clips: list[list[Any]] = []
    last = None
    for index, start, end, class_id, label, score in conn.execute(
            select(ClipPrediction.clip_index, ClipPrediction.start_sec, ClipPrediction.end_sec,
                   ClipPrediction.class_id, ClipPrediction.label, ClipPrediction.score)
            .where(ClipPrediction.job_id == job_id)
            .order_by(ClipPrediction.clip_index, ClipPrediction.rank)).all():
        if index != last:
            clips.append([index, start, end, []])
            last = index
        clips[-1][3].append([number(label), class_id, score])
    clips.sort(key=lambda c: (c[1], c[0]))
    starts = [c[1] for c in clips]
    segments = []
    for seg in conn.execute(
            select(LabelSegment.segment_index, LabelSegment.class_id, LabelSegment.label,
                   LabelSegment.start_sec, LabelSegment.end_sec, LabelSegment.mean_score,
                   LabelSegment.peak_score, LabelSegment.clips)
            .where(LabelSegment.job_id == job_id).order_by(LabelSegment.segment_index)):
        no = number(seg.label)
        segments.append({"label": no, "class_id": seg.class_id, "start": seg.start_sec,
                         "end": seg.end_sec, "mean": seg.mean_score,
                         "peak": seg.peak_score, "clips": seg.clips,
                         "peak_at": round(peak_time(clips, no, seg.start_sec, seg.end_sec,
                                                    starts=starts), 3)})
    has_embedding = bool(conn.scalar(
        select(func.count()).select_from(VideoEmbedding).where(VideoEmbedding.job_id == job_id)))
    return VideoPage(job=job, top=top, labels=labels, clips=clips, segments=segments,
                     rules=rules, has_embedding=has_embedding)


def rederive(conn: Connection, job_id: int, rules: SegmentRules) -> list[dict[str, Any]]:
    """A job's segments derived again from its stored clip rows under ``rules``: what
    the video page's slider shows, and ``vidq segments --job ID --threshold X``."""
    rows = conn.execute(
        select(ClipPrediction.clip_index, ClipPrediction.start_sec, ClipPrediction.end_sec,
               ClipPrediction.class_id, ClipPrediction.label, ClipPrediction.score)
        .where(ClipPrediction.job_id == job_id))
    return [{"job_id": job_id, "label": s.label, "class_id": s.class_id,
             "start_sec": s.start_sec, "end_sec": s.end_sec, "duration_s": s.duration_s,
             "mean_score": s.mean_score, "peak_score": s.peak_score, "clips": s.clips}
            for s in derive_segments(clip_rows_from_predictions(rows), rules)]


def job_segments(conn: Connection, job_id: int, *,
                 rules: SegmentRules | None = None) -> list[dict[str, Any]]:
    """One job's segments as ``vidq segments`` prints them: the stored rows, or with
    ``rules`` the rows derived again from its clips (``rederive``)."""
    about = conn.execute(select(Job.path, Batch.name).outerjoin(Batch, Batch.id == Job.batch_id)
                         .where(Job.id == job_id)).first()
    if about is None:
        raise InputError(f"no job {job_id}.", kind="not_found")
    if rules is not None:
        rows = rederive(conn, job_id, rules)
    else:
        rows = [dict(job_id=job_id, label=r[0], class_id=r[1], start_sec=r[2], end_sec=r[3],
                     duration_s=r[4], mean_score=r[5], peak_score=r[6], clips=r[7])
                for r in conn.execute(
                    select(LabelSegment.label, LabelSegment.class_id, LabelSegment.start_sec,
                           LabelSegment.end_sec, LabelSegment.duration_s,
                           LabelSegment.mean_score, LabelSegment.peak_score, LabelSegment.clips)
                    .where(LabelSegment.job_id == job_id).order_by(LabelSegment.segment_index))]
    for row in rows:
        row["path"], row["batch"] = about
    return rows


def labels(conn: Connection) -> list[str]:
    """The distinct segment labels, by a skip scan of the (label, duration) index:
    one index probe per label, not a pass over every segment row."""
    return [r[0] for r in conn.execute(text(
        "WITH RECURSIVE t(label) AS ("
        " SELECT min(label) FROM label_segments"
        " UNION ALL"
        " SELECT (SELECT min(s.label) FROM label_segments s WHERE s.label > t.label)"
        " FROM t WHERE t.label IS NOT NULL)"
        " SELECT label FROM t WHERE label IS NOT NULL"))]


def search(conn: Connection, *, label: str, min_score: float = 0.0,
           min_duration_s: float = 0.0, page: int = 0) -> dict[str, Any]:
    """Segments of ``label`` across the library (succeeded jobs), best mean score first
    (then longest, then job), a page at a time."""
    stmt = (
        select(LabelSegment.job_id, LabelSegment.segment_index, LabelSegment.label,
               LabelSegment.start_sec, LabelSegment.end_sec, LabelSegment.duration_s,
               LabelSegment.mean_score, LabelSegment.peak_score, LabelSegment.clips, Job.path)
        .join(Job, Job.id == LabelSegment.job_id)
        .where(LabelSegment.label == label, LabelSegment.mean_score >= min_score,
               LabelSegment.duration_s >= min_duration_s - 1e-6,
               Job.status == JobStatus.SUCCEEDED.value)
        .order_by(LabelSegment.mean_score.desc(), LabelSegment.duration_s.desc(),
                  LabelSegment.job_id, LabelSegment.segment_index)
        .offset(page * PAGE_SIZE).limit(PAGE_SIZE + 1))
    rows = [dict(job_id=r[0], segment_index=r[1], label=r[2], start_sec=r[3], end_sec=r[4],
                 duration_s=r[5], mean_score=r[6], peak_score=r[7], clips=r[8], path=r[9],
                 peak_at=round((r[3] + r[4]) / 2, 3))
            for r in conn.execute(stmt)]
    return {"label": label, "min_score": min_score, "min_duration_s": min_duration_s,
            "page": page, "rows": rows[:PAGE_SIZE], "more": len(rows) > PAGE_SIZE}


def filter_segments(rows: list[dict[str, Any]], *, batch: str | None, label: str | None,
                    min_score: float | None, min_duration_s: float | None,
                    limit: int | None) -> list[dict[str, Any]]:
    """``vidq segments``'s filters on one job's rows (``job_segments``)."""
    out = [r for r in rows
           if (batch is None or r["batch"] == batch) and (label is None or r["label"] == label)
           and (min_score is None or r["mean_score"] >= min_score)
           and (min_duration_s is None or r["duration_s"] >= min_duration_s - 1e-6)]
    return out[:limit] if limit else out
