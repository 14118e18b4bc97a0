"""Library scale: covering indexes for the first page of ``vidq results --label`` and
``vidq segments --label`` and for ``vidq status --batch``; ``video_embeddings.written_at``
for the approximate nearest-neighbour index of ``vidq similar``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_video_labels_label_job", "video_labels",
                    ["label", "job_id", "rank", "score"])
    op.create_index("ix_label_segments_label_job", "label_segments",
                    ["label", "job_id", "segment_index", "duration_s"])
    op.create_index("ix_jobs_batch_status_clips", "jobs", ["batch_id", "status", "clips_done"])
    op.drop_index("ix_jobs_batch_status", table_name="jobs")
    op.add_column("video_embeddings",
                  sa.Column("written_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_video_embeddings_model_weights_written", "video_embeddings",
                    ["model", "weights_id", "written_at"])
    op.drop_index("ix_video_embeddings_model_weights", table_name="video_embeddings")


def downgrade() -> None:
    op.create_index("ix_video_embeddings_model_weights", "video_embeddings",
                    ["model", "weights_id"])
    op.drop_index("ix_video_embeddings_model_weights_written", table_name="video_embeddings")
    with op.batch_alter_table("video_embeddings") as batch:
        batch.drop_column("written_at")
    op.create_index("ix_jobs_batch_status", "jobs", ["batch_id", "status"])
    op.drop_index("ix_jobs_batch_status_clips", table_name="jobs")
    op.drop_index("ix_label_segments_label_job", table_name="label_segments")
    op.drop_index("ix_video_labels_label_job", table_name="video_labels")
