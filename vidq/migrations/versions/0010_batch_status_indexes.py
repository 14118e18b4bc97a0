"""``vidq status --batch`` on a batch of 200,000 jobs: every statement it runs answered
from an index alone. The counts' index also orders each status's jobs by submit time
(the oldest queued job is its first entry, not a heap visit per queued job), and the
recent-throughput read finds the batch's jobs finished in the last minutes, with the
columns it sums, in one range of a new index instead of every recent job's row.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_batch_status_submitted", "jobs",
                    ["batch_id", "status", "submitted_at", "clips_done"])
    op.drop_index("ix_jobs_batch_status_clips", table_name="jobs")
    op.create_index("ix_jobs_batch_finished", "jobs",
                    ["batch_id", "finished_at", "status", "clips_done", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_finished", table_name="jobs")
    op.create_index("ix_jobs_batch_status_clips", "jobs", ["batch_id", "status", "clips_done"])
    op.drop_index("ix_jobs_batch_status_submitted", table_name="jobs")
