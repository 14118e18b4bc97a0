"""Schema migrations on real SQLite and PostgreSQL databases.

- A database made by vidq 0.1.0 (``create_all``, no version table), full of rows,
  is recognised, stamped at the baseline and upgraded: every row and every documented
  poll answers as before, and vidq's own commands work on it.
- The models and the migrations agree (Alembic's autogenerate comparison is empty),
  and the baseline equals the 0.1.0 schema.
- Every revision upgrades and downgrades, step by step.
- A schema behind or ahead is refused in one line naming both revisions and the
  command to run; auto-migration happens only where allowed.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.orm import Session

from tests import schema_0_1_0 as old
from tests.cli import run_vidq
from vidq import migrate
from vidq.db import Base, dispose_engines, get_engine, make_engine

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "reference" / "schema.md"
LEGACY_TABLES = {
    "batches": ("id", [c.name for c in old.Batch.__table__.columns]),
    "jobs": ("id", [c.name for c in old.Job.__table__.columns]),
    "clip_predictions": ("job_id, clip_index, rank",
                         [c.name for c in old.ClipPrediction.__table__.columns]),
    "video_labels": ("job_id, rank", [c.name for c in old.VideoLabel.__table__.columns]),
}


def readme_polls() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", SCHEMA_DOC.read_text(), flags=re.S)
    statements = [s.strip() for b in blocks for s in b.split(";") if s.strip()]
    # Comments out; keep only the statements of the "common polls" block and its kin.
    polls = [re.sub(r"--[^\n]*\n", "", s).strip() for s in statements]
    assert len(polls) >= 5, "docs/reference/schema.md should show the common polls as SQL"
    return polls


def fill_release_0_1_0(url: str) -> None:
    """The 0.1.0 schema, made the way 0.1.0 made it, with rows of every kind."""
    engine = create_engine(url)
    old.Base.metadata.create_all(engine)
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    common = dict(model="slow_r50", weights="pretrained", strategy="uniform",
                  clips_requested=3, start_sec=0.0, crops=1, size_bytes=1000,
                  config_key="slow_r50|pretrained|uniform:3", submitted_at=t0)
    with Session(engine) as s, s.begin():
        nightly = old.Batch(name="nightly", created_at=t0)
        other = old.Batch(name="other", created_at=t0)
        s.add_all([nightly, other])
        s.flush()
        labels = ["archery", "bowling", "juggling balls", "surfing water", "yoga"]
        for i in range(6):
            done = i < 4
            job = old.Job(
                batch_id=nightly.id if i < 5 else other.id, path=f"/media/v{i}.mp4",
                content_sha256=f"{i:064x}",
                status="succeeded" if done else ("failed" if i == 4 else "queued"),
                priority=5, attempts=1 if i < 5 else 0,
                error_kind="corrupt" if i == 4 else None,
                error_message="decoding failed" if i == 4 else None,
                finished_at=t0 + dt.timedelta(minutes=i) if i < 5 else None,
                weights_id="sha256:abc" if done else None, precision="fp32" if done else None,
                duration_s=10.0 if done else None, top_class_id=5 if done else None,
                top_label=labels[i] if done else None,
                top_score=0.9 - 0.2 * i if done else None, **common,
            )
            s.add(job)
            s.flush()
            if not done:
                continue
            for rank, label in enumerate(labels, start=1):
                s.add(old.VideoLabel(job_id=job.id, rank=rank, class_id=rank, label=label,
                                     score=(0.9 - 0.2 * i) / rank))
            for clip in range(3):
                for rank, label in enumerate(labels, start=1):
                    s.add(old.ClipPrediction(
                        job_id=job.id, clip_index=clip, rank=rank, start_sec=clip * 2.0,
                        end_sec=clip * 2.0 + 2.13, class_id=rank, label=label, score=0.5 / rank))
    engine.dispose()


def snapshot(url: str) -> dict[str, Any]:
    """Every 0.1.0 column of every row, and every documented poll's answer."""
    engine = create_engine(url)
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for table, (order, cols) in LEGACY_TABLES.items():
            out[table] = [tuple(r) for r in conn.execute(
                text(f"select {', '.join(cols)} from {table} order by {order}"))]
        for poll in readme_polls():
            out[poll] = [tuple(r) for r in conn.execute(text(poll))]
    engine.dispose()
    return out


def schema_diff(url: str, revision: str, metadata: MetaData) -> list[Any]:
    """Alembic's autogenerate comparison of the database at ``revision`` with ``metadata``."""
    engine = make_engine(url)
    try:
        migrate.upgrade(engine, revision)
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()
    # The version table is Alembic's own, not a model.
    return [d for d in diff if not (d[0] == "remove_table" and d[1].name == migrate.VERSION_TABLE)]


def vidq_cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_vidq(*args, env={**os.environ, "VIDQ_DATABASE_URL": url, **env})


def test_a_0_1_0_database_upgrades_with_every_row_and_poll(empty_database_url: str) -> None:
    url = empty_database_url
    fill_release_0_1_0(url)
    before = snapshot(url)
    assert len(before["jobs"]) == 6 and len(before["clip_predictions"]) == 4 * 3 * 5
    polls = readme_polls()
    assert all(before[p] for p in polls), "each documented poll should find rows in the sample data"

    if url.startswith("postgresql"):
        # A shared database is never migrated behind the operator's back.
        refused = vidq_cli(url, "status", "--batch", "nightly")
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "0.1.0 schema" in lines[0] and migrate.head_revision() in lines[0]
        assert "vidq db upgrade" in lines[0]
        assert not inspect(create_engine(url)).has_table(migrate.VERSION_TABLE)
        up = vidq_cli(url, "db", "upgrade")
        assert up.returncode == 0, up.stderr
        assert "0.1.0 schema" in up.stdout and migrate.head_revision() in up.stdout
    # SQLite, the embedded default, migrates itself on first use.
    status = vidq_cli(url, "status", "--batch", "nightly")
    assert status.returncode == 0, status.stderr
    assert "succeeded 4" in status.stdout and "failed 1" in status.stdout

    after = snapshot(url)
    assert after == before
    current = vidq_cli(url, "db", "current")
    assert current.returncode == 0 and "up to date" in current.stdout
    results = vidq_cli(url, "results", "--batch", "nightly", "--format", "csv")
    assert results.returncode == 0, results.stderr
    assert len(results.stdout.strip().splitlines()) == 1 + 4  # header + top label per video


def test_models_match_migrations(empty_database_url: str) -> None:
    """Fails when a model changes without a revision (or a revision without the model)."""
    assert schema_diff(empty_database_url, "head", Base.metadata) == []


def test_baseline_is_the_0_1_0_schema(empty_database_url: str) -> None:
    assert schema_diff(empty_database_url, migrate.BASELINE, old.Base.metadata) == []


def test_every_revision_upgrades_and_downgrades(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        revisions = migrate.history()
        previous = "base"
        for rev, down, _doc in revisions:
            assert (down or "base") == previous
            migrate.upgrade(engine, rev)
            migrate.downgrade(engine, previous)
            migrate.upgrade(engine, rev)
            with engine.connect() as conn:
                assert migrate.schema_state(conn).current == rev
            previous = rev
        migrate.downgrade(engine, "base")
        tables = set(inspect(engine).get_table_names()) - {migrate.VERSION_TABLE}
        assert tables == set()
        migrate.upgrade(engine)
        with engine.connect() as conn:
            assert migrate.schema_state(conn).up_to_date
    finally:
        engine.dispose()


def test_schema_behind_or_ahead_is_refused_in_one_line(empty_database_url: str) -> None:
    url = empty_database_url
    if url.startswith("sqlite"):
        # Off on purpose, even for SQLite: the same refusal.
        refused = vidq_cli(url, "status", VIDQ_AUTO_MIGRATE="false")
        assert refused.returncode == 2
        assert "empty (no vidq schema)" in refused.stderr
    else:
        with pytest.raises(migrate.SchemaError, match="run `vidq db upgrade`"):
            get_engine(url)
        dispose_engines()
        # Told to, a worker host may migrate a shared database itself.
        get_engine(url, auto_migrate=True)
        dispose_engines()
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text(f"update {migrate.VERSION_TABLE} set version_num = '9999'"))
    finally:
        engine.dispose()
    for auto in ("true", "false"):
        ahead = vidq_cli(url, "status", VIDQ_AUTO_MIGRATE=auto)
        assert ahead.returncode == 2
        line = ahead.stderr.strip()
        assert "\n" not in line and "9999" in line and migrate.head_revision() in line
        assert "upgrade vidq" in line
    worker = vidq_cli(url, "worker", VIDQ_AUTO_MIGRATE="true")
    assert worker.returncode == 2 and "9999" in worker.stderr
    assert "Traceback" not in worker.stderr


def test_upgrade_sql_prints_and_changes_nothing(empty_database_url: str) -> None:
    out = vidq_cli(empty_database_url, "db", "upgrade", "--sql")
    assert out.returncode == 0, out.stderr
    assert "CREATE TABLE jobs" in out.stdout and migrate.VERSION_TABLE in out.stdout
    engine = create_engine(empty_database_url)
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def _open(url: str) -> str | None:
    get_engine(url, auto_migrate=True)
    with make_engine(url).connect() as conn:
        return migrate.schema_state(conn).current


def test_processes_starting_together_migrate_once(empty_database_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        revisions = pool.map(_open, [empty_database_url] * 4)
    assert revisions == [migrate.head_revision()] * 4
