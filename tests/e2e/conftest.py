"""Real services for end-to-end tests: Redis, SQLite and PostgreSQL, and real
``vidq worker`` processes started as a user would start them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.media import make_video
from vidq.db import dispose_engines, make_engine
from vidq.migrate import upgrade

REDIS_URL = os.environ.get("VIDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get(
    "VIDQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
READY_LINE = "ready:"


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


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
        make_video(root / f"v{i}.mp4", seconds=3.0, seed=10 + i)
    (root / "sub").mkdir()
    for i in range(2):
        make_video(root / "sub" / f"w{i}.mkv", seconds=2.5, fps=25, seed=20 + i)
    (root / "notes.txt").write_text("not a video; skipped by extension")
    return root


class Cluster:
    """A user's view of vidq: environment, CLI calls and worker processes."""

    def __init__(self, *, broker_url: str, database_url: str, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {
            **os.environ,
            "VIDQ_BROKER_URL": broker_url,
            "VIDQ_DATABASE_URL": database_url,
            "VIDQ_MODEL": "x3d_xs",
            "VIDQ_WEIGHTS": "random",
            "VIDQ_HEARTBEAT_S": "1",
            # No periodic reconcile unless a test asks: on a loaded machine a heartbeat
            # late by 8 s would make a live job look stale and run it twice.
            "VIDQ_RECONCILE_EVERY_S": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.database_url = database_url
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def vidq(self, *args: str, check: bool = True, timeout: float = 120,
             **env: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "vidq.cli", *args], env={**self.env, **env},
            cwd=self.workdir, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"vidq {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc

    def start_worker(self, *args: str, ready: bool = True, **env: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"worker-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vidq.cli", "worker", "--loglevel", "INFO", *args],
            env={**self.env, **env}, cwd=self.workdir,
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers.append((proc, log))
        if ready:
            self.wait_log(log, READY_LINE, proc=proc)
        return proc

    def wait_log(self, log: Path, needle: str, *, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = 120, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = log.read_text(errors="replace") if log.exists() else ""
            if content.count(needle) >= count:
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"worker exited {proc.returncode}:\n{content[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {needle!r} in {log}:\n{content[-3000:]}")

    def stop_workers(self) -> None:
        for proc, _log in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _log in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()

    def sql(self, query: str, **params: object) -> list[tuple]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(query), params)]
        finally:
            engine.dispose()


@pytest.fixture
def cluster(redis_url: str, database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(broker_url=redis_url, database_url=database_url, workdir=tmp_path)
    yield c
    c.stop_workers()
