"""Fixtures of the reliability tests: ``redis_url`` and ``database_url`` come from
tests/conftest.py; a test that needs only one backend narrows ``database_url`` with
``@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.media import make_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("reliability-media")
    paths = [root / f"r{i}.mp4" for i in range(4)]
    for i, path in enumerate(paths):
        make_video(path, seconds=2.2, seed=900 + i)
    return paths
