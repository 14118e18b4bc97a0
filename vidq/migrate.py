"""Schema migrations: one path from an empty (or 0.1.0) database to this vidq's schema.

Alembic owns the schema: every database, the embedded SQLite one included, is
created by running the revisions in ``vidq/migrations/versions``. A database
made by vidq 0.1.0 (``create_all``, no version table) is recognised by its
``jobs`` table and stamped at the baseline first, so its rows are kept.

Workers and producers check the revision when they first open the database.
A shared database is migrated only by ``vidq db upgrade``, or on start where
``VIDQ_AUTO_MIGRATE`` allows it (by default only SQLite, where the database
belongs to the one process tree using it). Concurrent upgrades are serialised
by a lock: a PostgreSQL advisory lock, or a lock file beside a SQLite file.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine, make_url

from vidq.errors import ConfigError

VERSION_TABLE = "vidq_alembic_version"
"""Our own name, so a database shared with another Alembic-managed app cannot clash."""

BASELINE = "0001"
"""The revision equal to vidq 0.1.0's ``create_all`` schema."""

_PG_LOCK_KEY = 0x76696471  # "vidq": one advisory lock id for schema changes
_MIGRATIONS = Path(__file__).with_name("migrations")


class SchemaError(ConfigError):
    """The database's schema revision is not the one this vidq was built for."""

    kind = "schema"


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    """The database's revision; None for an empty database."""
    head: str
    legacy: bool = False
    """Tables from vidq 0.1.0 with no version table (stamped at the baseline on upgrade)."""

    @property
    def known(self) -> bool:
        return self.current is None or self.current in _revisions()

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head and not self.legacy

    def describe(self) -> str:
        if self.legacy:
            return f"0.1.0 schema without a version table (baseline {BASELINE})"
        return "empty (no vidq schema)" if self.current is None else f"revision {self.current}"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


def schema_state(conn: Connection) -> SchemaState:
    """Where the database stands, read without changing anything."""
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    current = context.get_current_revision()
    legacy = current is None and inspect(conn).has_table("jobs")
    return SchemaState(current=current, head=head_revision(), legacy=legacy)


def upgrade(engine: Engine, revision: str = "head") -> tuple[SchemaState, SchemaState]:
    """Bring the database to ``revision`` (a legacy database is stamped first).
    Returns the state before and after. Safe to run from many processes at once."""
    with _schema_lock(engine), engine.connect() as conn, _migration_session(conn):
        before = schema_state(conn)
        _refuse_unknown(before, engine)
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        if before.legacy:
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, revision)
        conn.commit()
        after = schema_state(conn)
    return before, after


def downgrade(engine: Engine, revision: str) -> tuple[SchemaState, SchemaState]:
    with _schema_lock(engine), engine.connect() as conn, _migration_session(conn):
        before = schema_state(conn)
        _refuse_unknown(before, engine)
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()
        after = schema_state(conn)
    return before, after


def upgrade_sql(url: str, *, from_revision: str | None, revision: str = "head") -> str:
    """The SQL that ``upgrade`` would run from ``from_revision``, for a DBA to review."""
    cfg = alembic_config(url)
    out = io.StringIO()
    cfg.output_buffer = out
    command.upgrade(cfg, f"{from_revision}:{revision}" if from_revision else revision, sql=True)
    return out.getvalue()


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down_revision, first docstring line), oldest first."""
    revs = list(_script().walk_revisions())
    revs.reverse()
    return [
        (r.revision, r.down_revision if isinstance(r.down_revision, str) else None,
         (r.doc or "").strip().splitlines()[0] if r.doc else "")
        for r in revs
    ]


def ensure_schema(engine: Engine, *, auto_migrate: bool, display_url: str) -> SchemaState:
    """Check the revision on first use; migrate if allowed, else refuse in one line."""
    with engine.connect() as conn:
        state = schema_state(conn)
    if state.up_to_date:
        return state
    _refuse_unknown(state, engine)
    if auto_migrate:
        return upgrade(engine)[1]
    raise SchemaError(
        f"the database {display_url} is at {state.describe()}, but this vidq needs revision "
        f"{state.head}; run `vidq db upgrade` (or set VIDQ_AUTO_MIGRATE=true)."
    )


def _refuse_unknown(state: SchemaState, engine: Engine) -> None:
    if not state.known:
        raise SchemaError(
            f"the database is at revision {state.current}, newer than this vidq knows "
            f"(its newest is {state.head}); upgrade vidq on this host, never downgrade the "
            "database from an older release."
        )


@contextlib.contextmanager
def _migration_session(conn: Connection) -> Iterator[None]:
    """Session settings a migration needs, restored before the connection is pooled again.

    SQLite: batch mode rebuilds a table (copy, drop, rename); with foreign keys on,
    dropping ``jobs`` would cascade-delete every result row. The pragma only takes
    effect outside a transaction, so it is set before the first statement.
    PostgreSQL: no statement timeout: building an index on a big table takes long."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    elif dialect == "postgresql":
        conn.exec_driver_sql("SET statement_timeout = 0")
    try:
        yield
    finally:
        if dialect == "sqlite":
            conn.rollback()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        elif dialect == "postgresql":
            conn.rollback()
            conn.exec_driver_sql("RESET statement_timeout")
            conn.commit()


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("SET statement_timeout = 0")  # waiting for another upgrade
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            # The lock is the session's: end the transaction, or the server's
            # idle_in_transaction_session_timeout would end the session (and the lock)
            # under a migration that runs longer.
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.exec_driver_sql("RESET statement_timeout")
                conn.commit()
        return
    database = make_url(str(engine.url)).database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    # A lock file beside the database: SQLite's own locks are per transaction, and
    # Alembic runs SQLite DDL outside one.
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
