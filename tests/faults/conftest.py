"""Fixtures of the fault-injection suite: the e2e services and cluster, made for faults.

``redis_url`` (Redis db 15, flushed) and ``database_url`` (SQLite and PostgreSQL)
come from tests/conftest.py; a test that needs only one backend narrows it with
``@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.harness import FaultCluster, FaultMedia, PostgresServer, RedisServer
from tests.faults.hosts import Fleet
from tests.media import make_video
from vidq.db import dispose_engines, make_engine
from vidq.migrate import upgrade


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> FaultMedia:
    root = tmp_path_factory.mktemp("fault-media")
    make_video(root / "long.mp4", seconds=12, seed=7)
    good = [root / f"good{i}.mp4" for i in range(6)]
    for i, path in enumerate(good):
        make_video(path, seconds=2, seed=500 + i)
    return FaultMedia(root=root, long=root / "long.mp4", good=good)


@pytest.fixture
def cluster(
    redis_url: str, database_url: str, tmp_path: Path
) -> Iterator[FaultCluster]:
    c = FaultCluster(broker_url=redis_url, database_url=database_url, workdir=tmp_path)
    yield c
    c.kill_all()


@pytest.fixture(params=[None], ids=["no-password"])
def private_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, free to be shut down; always stopped at the end.
    ``@pytest.mark.parametrize("private_redis", ["PASSWORD"], indirect=True)`` sets
    a password (``requirepass``)."""
    server = RedisServer(tmp_path, password=request.param)
    server.start()
    try:
        yield server
    finally:
        if _redis_up(server):
            server.stop()


def _redis_up(server: RedisServer) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=server.port, password=server.password,
                                socket_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own, free to be stopped; removed at the end."""
    server = PostgresServer()
    if server.bindir is None:
        pytest.skip("PostgreSQL server binaries (pg_ctl, initdb) are not installed")
    server.init()
    engine = make_engine(server.url)  # as an operator would: `vidq db upgrade` first
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    try:
        yield server
    finally:
        dispose_engines()
        server.destroy()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., FaultCluster]]:
    """Clusters on services other than the shared ones (private Redis or PostgreSQL)."""
    made: list[FaultCluster] = []

    def make(*, broker_url: str, database_url: str) -> FaultCluster:
        c = FaultCluster(broker_url=broker_url, database_url=database_url, workdir=tmp_path)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill_all()


@pytest.fixture
def fleet(cluster: FaultCluster) -> Iterator[Fleet]:
    """Worker hosts on the ``cluster``'s services, for a test
    with ``database_url`` narrowed to PostgreSQL (hosts share a database server)."""
    made = Fleet(cluster)
    try:
        yield made
    finally:
        cluster.kill_all()
        made.close()
