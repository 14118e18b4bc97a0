"""A user's view of vidq for end-to-end tests: the environment, CLI calls and real
``vidq worker`` processes started as a user would start them (the ``cluster`` fixture
in tests/conftest.py)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tests.cli import run_vidq, vidq_command

READY_LINE = "ready:"


def flower_get(port: int, path: str, *, auth: tuple[str, str] | None,
               timeout: float = 10) -> tuple[int, Any]:
    """GET ``path`` from a Flower on 127.0.0.1 as a user behind its basic auth: (HTTP
    status, the answer's JSON for its /api, else None)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, json.loads(body) if path.startswith("/api") else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


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
        return run_vidq(*args, env={**self.env, **env}, cwd=self.workdir, check=check,
                        timeout=timeout)

    def start_worker(self, *args: str, ready: bool = True, **env: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"worker-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [*vidq_command(), "worker", "--loglevel", "INFO", *args],
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
