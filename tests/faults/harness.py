"""What the fault-injection tests do to a running vidq: kill its processes, stop
its services, and read the results table afterwards.

Services that a test takes down (Redis, PostgreSQL) are private instances on
free ports, started here for that one test: other tests and other people's
workers on the shared 6379/5432 never see the outage.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from tests.cluster import Cluster
from vidq.db import Job, get_engine, utcnow
from vidq.settings import Settings

TOP_K = 5
FAULT_ENV = {
    # fp32: where torch's bf16 3D convolutions are slow on CPU (x3d_xs was >10x slower
    # than fp32 on an AMX Xeon), "auto" would make every job here take seconds.
    "VIDQ_PRECISION": "fp32",
    # Two workers on one small host: OpenMP threads that spin while waiting for a
    # core the other worker holds made two x3d_xs workers 4x slower on 2 cores.
    "OMP_WAIT_POLICY": "PASSIVE",
    "VIDQ_HEARTBEAT_S": "1",  # a lost worker's job is stale after 3 * 1 + 5 = 8 s
    "VIDQ_RECONCILE_EVERY_S": "0",  # tests that want the periodic reconcile say so
}


@dataclass(frozen=True)
class Hold:
    """A pause point of vidq/faultpoints.py, for the processes started with ``env()``:
    while engaged, a process that reaches the point blocks there until released."""

    point: str
    path: Path

    def env(self) -> dict[str, str]:
        return {"VIDQ_FAULT_PAUSE": f"{self.point}={self.path}"}

    def engage(self) -> None:
        self.path.touch()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def events(self) -> list[tuple[int, str]]:
        """(pid, "held" | "passed") for every time a process reached the point."""
        log = Path(f"{self.path}.log")
        lines = log.read_text().splitlines() if log.exists() else []
        return [(int(pid), what) for pid, what in (line.split() for line in lines if line)]

    def held_pids(self) -> list[int]:
        return [pid for pid, what in self.events() if what == "held"]


class FaultCluster(Cluster):
    """The e2e Cluster plus what a fault test needs: pids, direct rows, waits."""

    def __init__(self, *, broker_url: str, database_url: str, workdir: Path) -> None:
        super().__init__(broker_url=broker_url, database_url=database_url, workdir=workdir)
        self.env.update(FAULT_ENV)

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    # -- processes -------------------------------------------------------------------
    def hold(self, point: str, tag: str = "") -> Hold:
        """A hold on ``point`` for the workers started with its ``env()``."""
        return Hold(point, self.workdir / f"hold-{point}{tag}")

    def wait_held(self, hold: Hold, *, n: int = 1, timeout: float = 120) -> int:
        """Until ``n`` processes are held at the point (a state, not a time); the last pid."""
        pids = self.wait_for(lambda: hold.held_pids()[n - 1:], timeout=timeout,
                             what=f"a process held at {hold.point}", poll_s=0.05)
        return int(pids[-1])

    def start_workers(self, n: int, *args: str, **env: str) -> list[Any]:
        """Start ``n`` workers at once and wait until all are ready (saves a startup each)."""
        procs = [self.start_worker(*args, ready=False, **env) for _ in range(n)]
        for proc in procs:
            self.wait_log(self.log_of(proc), "ready:", proc=proc)
        return procs

    def log_of(self, proc: Any) -> Path:
        return next(log for p, log in self.workers if p is proc)

    def log_text(self, proc: Any) -> str:
        return self.log_of(proc).read_text(errors="replace")

    def all_logs(self) -> str:
        return "".join(log.read_text(errors="replace") for _p, log in self.workers if log.exists())

    def kill_group(self, proc: Any, sig: int = signal.SIGKILL) -> None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def kill_all(self) -> None:
        """Teardown: the tests are over, so no graceful shutdown to wait for."""
        for proc, _log in self.workers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.workers.clear()

    # -- the results table ----------------------------------------------------------
    def wait_for(self, check: Callable[[], Any], *, timeout: float = 120, what: str = "",
                 poll_s: float = 0.2) -> Any:
        """Poll ``check`` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what or check}\n"
                    f"jobs: {self.sql('select id, status, attempts, error_kind from jobs')}\n"
                    f"{self.all_logs()[-4000:]}"
                )
            time.sleep(poll_s)

    def status_of(self, job_id: int) -> str | None:
        rows = self.sql("select status from jobs where id = :id", id=job_id)
        return rows[0][0] if rows else None

    def wait_running(self, job_id: int, timeout: float = 120) -> int:
        """Wait until a worker process has claimed the job; return that process's pid."""
        def claimed() -> int | None:
            rows = self.sql("select status, worker_host from jobs where id = :id", id=job_id)
            if rows and rows[0][0] == "running":
                return int(rows[0][1].rsplit(":", 1)[1])
            return None
        return self.wait_for(claimed, timeout=timeout, what=f"job {job_id} running", poll_s=0.05)

    def wait_done(self, n: int | None = None, timeout: float = 180) -> None:
        """Until no job is queued or running (and, with ``n``, that many jobs exist)."""
        def done() -> bool:
            rows = self.sql("select status, count(*) from jobs group by status")
            counts = dict(rows)
            total = sum(counts.values())
            active = counts.get("queued", 0) + counts.get("running", 0)
            return (n is None or total == n) and not active
        self.wait_for(done, timeout=timeout, what="every job finished", poll_s=0.5)

    def jobs(self) -> list[dict[str, Any]]:
        cols = ("id", "status", "attempts", "error_kind", "error_message", "path", "clips_done",
                "top_label", "worker_host")
        return [dict(zip(cols, row)) for row in self.sql(
            f"select {', '.join(cols)} from jobs order by id")]

    def result_sets(self) -> dict[int, tuple[int, int, int]]:
        """job id -> (video_labels rows, clip_predictions rows, distinct clips)."""
        labels = dict(self.sql("select job_id, count(*) from video_labels group by job_id"))
        clips = {j: (n, d) for j, n, d in self.sql(
            "select job_id, count(*), count(distinct clip_index) from clip_predictions"
            " group by job_id")}
        return {j: (labels.get(j, 0), *clips.get(j, (0, 0))) for j in set(labels) | set(clips)}

    def assert_succeeded_once(self, job_id: int) -> dict[str, Any]:
        """The job succeeded and has exactly one set of result rows."""
        job = next(j for j in self.jobs() if j["id"] == job_id)
        assert job["status"] == "succeeded", job
        assert job["error_kind"] is None, job
        n_labels, n_clip_rows, n_clips = self.result_sets()[job_id]
        assert n_labels == TOP_K, (job, n_labels)
        ranks = self.sql("select rank from video_labels where job_id = :id order by rank",
                         id=job_id)
        assert [r for (r,) in ranks] == list(range(1, TOP_K + 1))
        assert n_clips == job["clips_done"] and n_clip_rows == job["clips_done"] * TOP_K, job
        top = self.sql("select label from video_labels where job_id = :id and rank = 1", id=job_id)
        assert top == [(job["top_label"],)]
        return job

    # -- rows and messages the producer would refuse to make -----------------------
    def insert_job(self, path: str, **fields: Any) -> int:
        """A queued job row written directly (no producer checks), as a hostile or buggy
        client with database access could write it. It has a task id that was never
        published: ``publish_inserted`` sends it the way ``vidq reconcile`` would."""
        engine = get_engine(self.database_url)  # creates the schema if no worker has yet
        values = {
            # A content hash of its own: the database allows one active job per content.
            "path": path, "content_sha256": uuid.uuid4().hex * 2, "size_bytes": 0,
            "status": "queued", "priority": 5, "attempts": 0, "model": "x3d_xs",
            "weights": "random", "strategy": "single", "clips_requested": 10,
            "start_sec": 0.0, "crops": 1, "config_key": "x3d_xs|random|single:start=0:crops=1",
            "task_id": f"never-published-{uuid.uuid4().hex}",
            "enqueued_at": utcnow() - dt.timedelta(seconds=5),
            **fields,
        }
        with engine.begin() as conn:
            return int(conn.execute(insert(Job).values(**values).returning(Job.id)).scalar_one())

    def publish_inserted(self, expected: int) -> None:
        """``vidq reconcile --older-than 0``: publishes queued rows the broker has no task for."""
        out = self.vidq("reconcile", "--older-than", "0").stdout
        assert f"re-enqueued 0 stale running and {expected} lost queued jobs" in out, out

    def publish_duplicate(self, job_id: int) -> None:
        """One more message for a job that already has one (another task id)."""
        from vidq.queue import make_celery, publish_jobs

        app = make_celery(self.settings)
        publish_jobs(app, [(job_id, 5, f"duplicate-{uuid.uuid4().hex}")],
                     queue=self.settings.queue)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server that keeps nothing (no RDB, no AOF), like the shared one."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"

    def cli(self) -> list[str]:
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        return ["redis-cli", "-p", str(self.port), *auth]

    def start(self) -> None:
        subprocess.run(
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--logfile", str(self.workdir / f"redis-{self.port}.log"),
             "--pidfile", str(self.workdir / f"redis-{self.port}.pid"),
             *(["--requirepass", self.password] if self.password else [])],
            check=True, capture_output=True,
        )
        self._cli_until("ping", "PONG")

    def stop(self) -> None:
        """``shutdown nosave``: everything in it is gone."""
        subprocess.run([*self.cli(), "shutdown", "nosave"],
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run([*self.cli(), "ping"],
                              capture_output=True).returncode != 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"redis on {self.port} did not stop")

    def _cli_until(self, command: str, expected: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run([*self.cli(), command],
                                 capture_output=True, text=True)
            if out.stdout.strip() == expected:
                return
            time.sleep(0.1)
        raise AssertionError(f"redis on {self.port} did not answer {command}")


class PostgresServer:
    """A private PostgreSQL cluster (initdb into a temp dir), so stopping it takes down
    nobody else's database. Run as the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        self.bindir = self._bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="vidq-pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def _bindir() -> Path | None:
        found = shutil.which("pg_ctl")
        if found:
            return Path(found).parent
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        return Path(candidates[-1]).parent if candidates else None

    def _run(self, *args: str) -> None:
        assert self.bindir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # postgres refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
                  "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def children_of(pid: int) -> list[int]:
    """Child pids of ``pid``, read from /proc (no psutil)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


LONG_JOB = ("--strategy", "sliding", "--stride", "0.2")
"""With ``media.long``: ~55 x3d_xs clips, several seconds of inference to interrupt."""


@dataclass(frozen=True)
class FaultMedia:
    root: Path
    long: Path
    """12 s, 160x96: with LONG_JOB a job that runs for seconds."""
    good: list[Path]
    """Distinct 2 s videos that classify quickly."""


def submit_long_job(cluster: FaultCluster, media: FaultMedia, batch: str) -> int:
    """Submit ``media.long`` with LONG_JOB; its job id."""
    cluster.vidq("submit", str(media.long), *LONG_JOB, "--batch", batch)
    return int(cluster.sql("select max(id) from jobs")[0][0])


def healthz(port: int) -> tuple[int, str]:
    """A worker host's /healthz on 127.0.0.1: (HTTP status, body), or (0, why) when
    nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)
