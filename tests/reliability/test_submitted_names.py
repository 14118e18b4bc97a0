"""Names a table cannot hold: a file name that is not UTF-8 is rejected alone, and a
batch name over the column's length is refused in one line (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.cli import run_vidq
from tests.services import sql
from vidq.db import get_engine


def test_a_non_utf8_file_name_is_rejected_alone(
    database_url: str, redis_url: str, videos: list[Path], tmp_path: Path
) -> None:
    """Before: the name's bytes reached the database driver, which cannot encode them:
    a UnicodeEncodeError traceback, and not one job of the submission was recorded."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(videos[0], folder / "good.mp4")
    shutil.copy(videos[1], os.path.join(os.fsencode(folder), b"bad\xff.mp4"))
    env = {"VIDQ_DATABASE_URL": database_url, "VIDQ_BROKER_URL": redis_url}
    done = run_vidq("submit", str(folder), "--batch", "names", env={**os.environ, **env})
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1  # something was rejected
    errors = [line for line in done.stderr.splitlines() if line.startswith("vidq: error:")]
    assert len(errors) == 1 and "bad\\xff.mp4" in errors[0] and "not valid UTF-8" in errors[0]
    assert "1 jobs recorded" in done.stderr
    assert sql(database_url, "select path from jobs") == [(str(folder / "good.mp4"),)]


def test_an_over_long_batch_name_is_refused_in_one_line(
    database_url: str, redis_url: str, videos: list[Path]
) -> None:
    """Before: PostgreSQL raised StringDataRightTruncation (a traceback); SQLite, which
    does not enforce VARCHAR lengths, stored a name PostgreSQL could never hold."""
    env = {"VIDQ_DATABASE_URL": database_url, "VIDQ_BROKER_URL": redis_url}
    done = run_vidq("submit", str(videos[0]), "--batch", "n" * 201, env={**os.environ, **env})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "limit is 200" in done.stderr, done.stderr
    get_engine(database_url)
    assert sql(database_url, "select count(*) from jobs") == [(0,)]
    assert run_vidq("submit", str(videos[0]), "--batch", "n" * 200,
                    env={**os.environ, **env}).returncode == 0
