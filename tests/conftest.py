"""Fixtures every test directory shares.

- The test media (tests/media.py), written once into a tmp dir when a test first asks.
- The services: ``redis_url`` (flushed before and after), ``database_url`` and
  ``empty_database_url`` (each test on SQLite and on PostgreSQL; tests/services.py),
  ``corpus`` (small videos to submit) and ``cluster`` (tests/cluster.py), and the
  in-process S3 server ``s3_server`` (tests/objectstore.py). None connects to
  anything until a test asks for it: the tests in tests/unit ask for none.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests import media
from tests.cluster import Cluster
from tests.media import Media
from tests.objectstore import S3Server, running_s3_server
from tests.services import REDIS_URL, new_database
from vidq.contact import CONTACT
from vidq.db import make_engine
from vidq.migrate import upgrade

SPECS: dict[str, dict[str, object]] = {
    "h264_30.mp4": dict(seconds=3, fps=30),
    "h264_24.mp4": dict(seconds=3, fps=24),
    "h264_25_audio.mp4": dict(seconds=3, fps=25, width=128, audio=True),
    "h264_60.mkv": dict(seconds=2, fps=60, width=96, height=64),
    "ntsc.mp4": dict(seconds=2, fps=30000 / 1001),
    "vfr.mp4": dict(seconds=3, fps=30, vfr=True),
    "vfr.mkv": dict(seconds=3, fps=30, vfr=True),
    "portrait.mp4": dict(seconds=2, width=96, height=160),
    "mpeg4.avi": dict(seconds=2, codec="mpeg4"),
    "vp9.webm": dict(seconds=2, codec="libvpx-vp9", audio=True),
    "short.mp4": dict(seconds=1),
    "tiny.mp4": dict(seconds=0.2, fps=25),
    "long.mp4": dict(seconds=4),
    "long.mkv": dict(seconds=4),
}


@pytest.fixture(scope="session")
def media_files(tmp_path_factory: pytest.TempPathFactory) -> Media:
    root = tmp_path_factory.mktemp("media")
    for name, spec in SPECS.items():
        media.make_video(root / name, **spec)  # type: ignore[arg-type]
    media.make_video(root / "long_faststart.mp4", seconds=4, faststart=True)
    media.make_audio_only(root / "audio.m4a")
    media.make_audio_only(root / "audio.wav")
    media.make_corrupt(root / "long.mp4", root / "corrupt.mp4")
    media.make_truncated(root / "long.mp4", root / "truncated.mp4")
    media.make_truncated(root / "long_faststart.mp4", root / "truncated_faststart.mp4")
    media.make_truncated(root / "long.mkv", root / "truncated.mkv")
    media.make_random_bytes(root / "random.mp4")
    media.make_empty(root / "empty.mp4")
    return Media(
        h264_30=root / "h264_30.mp4",
        h264_24=root / "h264_24.mp4",
        h264_25_audio=root / "h264_25_audio.mp4",
        h264_60_mkv=root / "h264_60.mkv",
        ntsc=root / "ntsc.mp4",
        vfr=root / "vfr.mp4",
        vfr_mkv=root / "vfr.mkv",
        portrait=root / "portrait.mp4",
        mpeg4_avi=root / "mpeg4.avi",
        vp9_webm=root / "vp9.webm",
        short=root / "short.mp4",
        tiny=root / "tiny.mp4",
        audio_m4a=root / "audio.m4a",
        audio_wav=root / "audio.wav",
        corrupt=root / "corrupt.mp4",
        truncated_mp4=root / "truncated.mp4",
        truncated_faststart=root / "truncated_faststart.mp4",
        truncated_mkv=root / "truncated.mkv",
        random_bytes=root / "random.mp4",
        empty=root / "empty.mp4",
    )


@pytest.fixture(scope="session")
def seed_modules() -> None:
    """Make the seed's ``pytorchvideo.transforms`` importable, as seed_pipeline.py does:
    PyPI's pytorchvideo 0.1.5 imports a torchvision module renamed in 0.17."""
    import torchvision.transforms._functional_tensor as functional_tensor

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``heavy_on_postgresql``: the test runs on both databases, and its PostgreSQL run
    is among the slowest of the suite (real worker processes killed and restarted). That
    run is marked ``heavy``: the default run keeps the SQLite one, so the whole suite
    stays well inside CI's time on a slow host; ``pytest -m heavy`` runs them, and
    ``pytest -m ""`` everything."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (item.get_closest_marker("heavy_on_postgresql") is not None and callspec is not None
                and "postgresql" in callspec.params.values()):
            item.add_marker(pytest.mark.heavy)



# -- services ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def unbroken_database_contact() -> None:
    """Each test starts with this process's database contact unbroken (vidq/contact.py):
    an outage one test made is not the next test's."""
    CONTACT.reset()


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with new_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database at this vidq's schema, as an operator leaves it after `vidq db upgrade`
    (SQLite would also migrate itself on first use)."""
    with new_database(request.param, tmp_path) as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield url


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small distinct videos, two of them in a subdirectory."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        media.make_video(root / f"v{i}.mp4", seconds=3.0, seed=10 + i)
    (root / "sub").mkdir()
    for i in range(2):
        media.make_video(root / "sub" / f"w{i}.mkv", seconds=2.5, fps=25, seed=20 + i)
    (root / "notes.txt").write_text("not a video; skipped by extension")
    return root


@pytest.fixture
def cluster(redis_url: str, database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(broker_url=redis_url, database_url=database_url, workdir=tmp_path)
    yield c
    c.stop_workers()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server
