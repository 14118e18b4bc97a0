"""The shared Redis and PostgreSQL the service tests use, and new databases on them.

``VIDQ_TEST_REDIS_URL`` (default Redis db 15, flushed by the ``redis_url`` fixture)
and ``VIDQ_TEST_PG_URL`` (a PostgreSQL database whose user may create databases)
point the tests elsewhere. Nothing here connects at import: the fixtures in
tests/conftest.py connect when a test asks for them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from vidq.db import dispose_engines

REDIS_URL = os.environ.get("VIDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get(
    "VIDQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def new_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A new, empty database: a SQLite file, or a fresh PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'vidq.db'}"
        dispose_engines()
        return
    name = f"vidq_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def sql(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run one statement in its own transaction; the rows it returns, if any."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()
