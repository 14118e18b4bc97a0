"""Label segments: one row per stretch of a video where a label holds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "label_segments",
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("segment_index", sa.Integer(), primary_key=True),
        sa.Column("class_id", sa.SmallInteger(), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("start_sec", sa.Float(), nullable=False),
        sa.Column("end_sec", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("mean_score", sa.Float(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("clips", sa.Integer(), nullable=False),
    )
    op.create_index("ix_label_segments_label_duration", "label_segments",
                    ["label", "duration_s"])
    op.create_index("ix_label_segments_label_mean_score", "label_segments",
                    ["label", "mean_score"])


def downgrade() -> None:
    op.drop_index("ix_label_segments_label_mean_score", table_name="label_segments")
    op.drop_index("ix_label_segments_label_duration", table_name="label_segments")
    op.drop_table("label_segments")
