"""A streamed read waits on its reader between pages (``vidq results | less``), so the
idle-in-transaction timeout that ends a vanished worker's transaction must not end it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from tests.services import new_database
from vidq.db import make_engine, reading_at_the_readers_pace


@pytest.mark.parametrize("lifted", [True, False], ids=["streamed-read", "plain-transaction"])
def test_a_streamed_read_outlives_the_idle_in_transaction_timeout(
        tmp_path: Path, lifted: bool) -> None:
    with new_database("postgresql", tmp_path) as url:
        engine = make_engine(url, idle_in_transaction_timeout_s=1.0)
        try:
            with Session(engine) as session:
                if lifted:
                    reading_at_the_readers_pace(session)
                assert session.execute(text("select 1")).scalar() == 1
                time.sleep(2.5)  # the reader looks at the first page
                if lifted:
                    assert session.execute(text("select 2")).scalar() == 2
                else:  # the guard is real: without it the server ends the session
                    with pytest.raises(DBAPIError, match="idle-in-transaction"):
                        session.execute(text("select 2"))
        finally:
            engine.dispose()
