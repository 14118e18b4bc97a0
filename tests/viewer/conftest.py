"""Fixtures of the viewer's tests: a results library (tests/viewer/library.py) and the
settings that point the viewer at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import new_database
from tests.viewer.library import Library, build_library
from vidq.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def library(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Library]:
    with new_database(request.param, tmp_path) as url:
        yield build_library(url, tmp_path)


@pytest.fixture
def sqlite_library(tmp_path: Path) -> Iterator[Library]:
    with new_database("sqlite", tmp_path) as url:
        yield build_library(url, tmp_path)


def viewer_settings(lib: Library, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        database_url=lib.database_url, media_roots=(str(lib.root),),
        viewer_cache_dir=str(tmp_path / "thumbs"), viewer_token="")
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
