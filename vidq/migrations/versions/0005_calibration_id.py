"""jobs.calibration_id: which int8 calibration a result was computed with.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("calibration_id", sa.String(80)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("calibration_id")
