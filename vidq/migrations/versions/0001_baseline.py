"""Baseline: the schema vidq 0.1.0 created with ``create_all``.

A database made by that release (no version table) is recognised by its
``jobs`` table and stamped here before it is upgraded; see vidq/migrate.py.
Constraint names are left to the database, exactly as ``create_all`` left them.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("batch_id", BigId, sa.ForeignKey("batches.id")),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_kind", sa.String(32)),
        sa.Column("error_message", sa.Text()),
        sa.Column("worker_host", sa.String(255)),
        sa.Column("task_id", sa.String(64)),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("submitted_at", TS, nullable=False),
        sa.Column("enqueued_at", TS),
        sa.Column("started_at", TS),
        sa.Column("heartbeat_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("weights", sa.Text(), nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("clips_requested", sa.Integer(), nullable=False),
        sa.Column("stride_s", sa.Float()),
        sa.Column("start_sec", sa.Float(), nullable=False),
        sa.Column("crops", sa.SmallInteger(), nullable=False),
        sa.Column("config_key", sa.String(255), nullable=False),
        sa.Column("weights_id", sa.String(80)),
        sa.Column("precision", sa.String(8)),
        sa.Column("device", sa.String(16)),
        sa.Column("num_frames", sa.Integer()),
        sa.Column("sampling_rate", sa.Integer()),
        sa.Column("duration_s", sa.Float()),
        sa.Column("fps", sa.Float()),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("frames", sa.BigInteger()),
        sa.Column("codec", sa.String(32)),
        sa.Column("has_audio", sa.Boolean()),
        sa.Column("clips_done", sa.Integer()),
        sa.Column("decode_s", sa.Float()),
        sa.Column("model_s", sa.Float()),
        sa.Column("top_class_id", sa.SmallInteger()),
        sa.Column("top_label", sa.String(128)),
        sa.Column("top_score", sa.Float()),
    )
    op.create_index("ix_jobs_status_priority", "jobs", ["status", "priority"])
    op.create_index("ix_jobs_batch_status", "jobs", ["batch_id", "status"])
    op.create_index("ix_jobs_content_config", "jobs", ["content_sha256", "config_key"])
    op.create_index("ix_jobs_top_label_score", "jobs", ["top_label", "top_score"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_table(
        "clip_predictions",
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("clip_index", sa.Integer(), primary_key=True),
        sa.Column("rank", sa.SmallInteger(), primary_key=True),
        sa.Column("start_sec", sa.Float(), nullable=False),
        sa.Column("end_sec", sa.Float(), nullable=False),
        sa.Column("class_id", sa.SmallInteger(), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
    )
    op.create_index("ix_clip_predictions_label_score", "clip_predictions", ["label", "score"])
    op.create_table(
        "video_labels",
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("rank", sa.SmallInteger(), primary_key=True),
        sa.Column("class_id", sa.SmallInteger(), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
    )
    op.create_index("ix_video_labels_label_score", "video_labels", ["label", "score"])


def downgrade() -> None:
    op.drop_table("video_labels")
    op.drop_table("clip_predictions")
    op.drop_table("jobs")
    op.drop_table("batches")
