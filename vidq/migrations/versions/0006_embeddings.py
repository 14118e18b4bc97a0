"""Embeddings: pooled model features per video and per clip (VIDQ_EMBEDDINGS).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "video_embeddings",
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("weights_id", sa.String(80), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_video_embeddings_model_weights", "video_embeddings",
                    ["model", "weights_id"])
    op.create_table(
        "clip_embeddings",
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("clip_index", sa.Integer(), primary_key=True),
        sa.Column("start_sec", sa.Float(), nullable=False),
        sa.Column("end_sec", sa.Float(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("clip_embeddings")
    op.drop_index("ix_video_embeddings_model_weights", table_name="video_embeddings")
    op.drop_table("video_embeddings")
