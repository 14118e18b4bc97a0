"""Host-local failures: which hosts failed or stalled on a job, and each worker host's
circuit breaker (``vidq status``'s workers section).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "host_failures",
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("error_kind", sa.String(32), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("since", TS, nullable=False),
        sa.Column("seen_at", TS, nullable=False),
    )
    op.create_index("ix_workers_queue_seen", "workers", ["queue", "seen_at"])


def downgrade() -> None:
    op.drop_index("ix_workers_queue_seen", table_name="workers")
    op.drop_table("workers")
    op.drop_table("host_failures")
