"""Database timeouts: PostgreSQL's statement timeout and pool come from the settings, and
a server that never answers fails ``vidq status`` in one line within the connect timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from tests.cli import run_vidq
from vidq.db import dispose_engines, get_engine


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_statement_timeout_and_pool_come_from_settings(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: no statement_timeout (a stuck query held its connection for ever) and a
    fixed pool of 5 + 5."""
    from sqlalchemy.exc import OperationalError

    monkeypatch.setenv("VIDQ_DB_STATEMENT_TIMEOUT_S", "0.5")
    monkeypatch.setenv("VIDQ_DB_POOL_SIZE", "7")
    monkeypatch.setenv("VIDQ_DB_MAX_OVERFLOW", "3")
    dispose_engines()
    engine = get_engine(database_url)
    assert (engine.pool.size(), engine.pool._max_overflow) == (7, 3)  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert conn.execute(text("show statement_timeout")).scalar() == "500ms"
        with pytest.raises(OperationalError, match="statement timeout"):
            conn.execute(text("select pg_sleep(3)"))


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_an_unanswering_postgres_fails_in_one_line_within_the_connect_timeout(
    silent_server: int,
) -> None:
    """Before: no connect_timeout: `vidq status` waited for ever on a hung server."""
    url = f"postgresql+psycopg://vidq@127.0.0.1:{silent_server}/vidq"
    t0 = time.monotonic()
    try:
        done = run_vidq("status", timeout=60, env={
            **os.environ, "VIDQ_DATABASE_URL": url, "VIDQ_DB_CONNECT_TIMEOUT_S": "2"})
    except subprocess.TimeoutExpired:
        pytest.fail("vidq status still waiting after 60 s: no connect timeout")
    assert time.monotonic() - t0 < 30
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0], done.stderr
