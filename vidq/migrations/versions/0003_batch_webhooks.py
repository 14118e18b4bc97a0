"""Batch completion webhooks (where to notify, the delivery record); the share of
packets each job decoded.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("notify_url", sa.Text()))
        batch.add_column(sa.Column("notify_status", sa.String(16)))
        batch.add_column(sa.Column("notify_attempts", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("notify_claimed_at", TS))
        batch.add_column(sa.Column("notify_sent_at", TS))
        batch.add_column(sa.Column("notify_response", sa.Integer()))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("decode_ratio", sa.Float()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("decode_ratio")
    with op.batch_alter_table("batches") as batch:
        for column in ("notify_response", "notify_sent_at", "notify_claimed_at",
                       "notify_attempts", "notify_status", "notify_url"):
            batch.drop_column(column)
