"""The schema of vidq 0.1.0, frozen: what its ``create_all`` made, before Alembic.

Copied verbatim from that release's vidq/db.py (models only). The migration
tests build a database with it, fill it with rows, and upgrade it with the
current vidq. Never edit this to follow later schema changes.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

BigId = BigInteger().with_variant(Integer, "sqlite")


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    """A registry of its own: these classes must not mix with vidq.db's."""


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One video to classify with one model, weights and sampling."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    path: Mapped[str] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(SmallInteger, default=5)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_kind: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    task_id: Mapped[str | None] = mapped_column(String(64))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # What was asked.
    model: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(Text)
    strategy: Mapped[str] = mapped_column(String(16))
    clips_requested: Mapped[int] = mapped_column(Integer)
    stride_s: Mapped[float | None] = mapped_column(Float)
    start_sec: Mapped[float] = mapped_column(Float, default=0.0)
    crops: Mapped[int] = mapped_column(SmallInteger, default=1)
    config_key: Mapped[str] = mapped_column(String(255))
    # What ran.
    weights_id: Mapped[str | None] = mapped_column(String(80))
    precision: Mapped[str | None] = mapped_column(String(8))
    device: Mapped[str | None] = mapped_column(String(16))
    num_frames: Mapped[int | None] = mapped_column(Integer)
    sampling_rate: Mapped[int | None] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int | None] = mapped_column(BigInteger)
    codec: Mapped[str | None] = mapped_column(String(32))
    has_audio: Mapped[bool | None] = mapped_column(Boolean)
    clips_done: Mapped[int | None] = mapped_column(Integer)
    decode_s: Mapped[float | None] = mapped_column(Float)
    model_s: Mapped[float | None] = mapped_column(Float)
    # The answer, for quick polling.
    top_class_id: Mapped[int | None] = mapped_column(SmallInteger)
    top_label: Mapped[str | None] = mapped_column(String(128))
    top_score: Mapped[float | None] = mapped_column(Float)

    clips: Mapped[list[ClipPrediction]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    labels: Mapped[list[VideoLabel]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        Index("ix_jobs_status_priority", "status", "priority"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_content_config", "content_sha256", "config_key"),
        Index("ix_jobs_top_label_score", "top_label", "top_score"),
        Index("ix_jobs_finished_at", "finished_at"),
    )


class ClipPrediction(Base):
    """Top-k labels of one clip (averaged over its crops)."""

    __tablename__ = "clip_predictions"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    clip_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_sec: Mapped[float] = mapped_column(Float)
    end_sec: Mapped[float] = mapped_column(Float)
    class_id: Mapped[int] = mapped_column(SmallInteger)
    label: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="clips")

    __table_args__ = (Index("ix_clip_predictions_label_score", "label", "score"),)


class VideoLabel(Base):
    """Top-k labels of a whole video: mean softmax over all its clips and crops."""

    __tablename__ = "video_labels"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    class_id: Mapped[int] = mapped_column(SmallInteger)
    label: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="labels")

    __table_args__ = (Index("ix_video_labels_label_score", "label", "score"),)
