"""Queues and constraints: each job's queue, its file's mtime, one active job per content.

- ``jobs.queue`` (NOT NULL): the Celery queue a job was submitted to, so reconcile
  and retry touch only their own queue's jobs. Existing rows get ``'vidq'``, the
  default queue, which every job used before this revision could record one.
- ``jobs.mtime_ns``: the file's modification time at submit, part of the fingerprint
  workers check before writing results; NULL on older rows (they are checked by size).
- ``ux_jobs_active_content_config``: a partial unique index, so at most one job per
  (content, configuration) is queued or running. Before it is created, older active
  duplicates (made with ``--force`` while one was in flight) are resolved: the oldest
  stays; the others are cancelled with ``error_kind = 'duplicate'``.
- ``ix_jobs_queue_status`` for reconcile's per-queue scans.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE = "status IN ('queued', 'running')"


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite does it in place): the server default backfills old rows.
    op.add_column("jobs", sa.Column("mtime_ns", sa.BigInteger()))
    op.add_column("jobs", sa.Column("queue", sa.String(64), nullable=False,
                                    server_default="vidq"))
    op.execute(
        "UPDATE jobs SET status = 'cancelled', lease_token = NULL, error_kind = 'duplicate', "
        "error_message = 'another job for the same content and configuration was already "
        "active (resolved by schema revision 0002)' "
        f"WHERE {ACTIVE} AND EXISTS (SELECT 1 FROM jobs AS older "
        "WHERE older.content_sha256 = jobs.content_sha256 "
        "AND older.config_key = jobs.config_key "
        "AND older.status IN ('queued', 'running') AND older.id < jobs.id)"
    )
    op.create_index("ix_jobs_queue_status", "jobs", ["queue", "status"])
    op.create_index(
        "ux_jobs_active_content_config", "jobs", ["content_sha256", "config_key"], unique=True,
        postgresql_where=sa.text(ACTIVE), sqlite_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_active_content_config", table_name="jobs")
    op.drop_index("ix_jobs_queue_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
        batch.drop_column("mtime_ns")
