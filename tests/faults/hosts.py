"""Several worker "hosts" on one PostgreSQL and one Redis, each reaching them through
fault proxies of its own (tests/faults/proxy.py), so a test can cut off, slow down or
partition one host while the others carry on.

A host is a ``vidq worker`` process tree started with the cluster's environment, except
that VIDQ_DATABASE_URL and VIDQ_BROKER_URL point at the host's proxies. Optionally:
- ``isolate``: its own mount and UTS namespaces (``unshare``, root only), so it has a
  hostname of its own (jobs' ``worker_host`` says which host ran them) and ``hidden``
  directories (a media mount this host lacks) are covered by an empty tmpfs there;
- ``clock_offset_s``: its clock set off by that much (libfaketime, from Debian's
  ``faketime``/``libfaketime`` packages). A test that asks for either where it cannot
  be had is skipped, saying why.

    def test_one_host_cut_off(fleet: Fleet) -> None:
        a, b = fleet.add_host("a"), fleet.add_host("b")
        a.database.blackhole()
        ...
"""

from __future__ import annotations

import glob
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import READY_LINE
from tests.faults.harness import FaultCluster, children_of
from tests.faults.proxy import Mode, Proxy


@dataclass
class Host:
    """One worker host: its worker process tree and the proxies it reaches services by."""

    name: str
    database: Proxy
    broker: Proxy
    env: dict[str, str]
    """The host's environment: the cluster's, with the proxied URLs and the clock offset."""
    isolated: bool = False
    worker_args: tuple[str, ...] = ()
    hidden: tuple[Path, ...] = ()
    worker: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def set_mode(self, mode: Mode | str, *, latency_ms: float = 0.0) -> None:
        """The same fault on the host's links to both services (a host-wide partition)."""
        for proxy in (self.database, self.broker):
            proxy.set_mode(mode, latency_ms=latency_ms)

    def heal(self) -> None:
        self.set_mode(Mode.PASS)

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command as this host sees the world: its namespaces, environment, clock."""
        prefix: list[str] = []
        if self.isolated:
            assert self.worker is not None, "an isolated host's namespaces live with its worker"
            prefix = ["nsenter", f"--target={self.worker.pid}", "--mount", "--uts", "--"]
        return subprocess.run([*prefix, *cmd], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def close(self) -> None:
        for proxy in (self.database, self.broker):
            proxy.close()


class Fleet:
    """Hosts of one FaultCluster. The cluster's teardown kills their workers; ``close``
    (the fixture's teardown) closes their proxies."""

    def __init__(self, cluster: FaultCluster) -> None:
        self.cluster = cluster
        self.hosts: list[Host] = []

    def add_host(
        self, name: str, *worker_args: str, isolate: bool = False,
        hidden: Sequence[Path] = (), clock_offset_s: float = 0.0, ready: bool = True,
        **env: str,
    ) -> Host:
        """Start host ``name``'s proxies and its ``vidq worker`` (with ``worker_args`` and
        ``env`` added), waiting until it is ready unless ``ready`` is False."""
        if hidden and not isolate:
            raise ValueError("hidden directories need an isolated host (isolate=True)")
        if isolate:
            require_namespaces()
        cluster = self.cluster
        database = Proxy.to_url(cluster.env["VIDQ_DATABASE_URL"], name=f"{name}-database")
        broker = Proxy.to_url(cluster.env["VIDQ_BROKER_URL"], name=f"{name}-broker")
        host_env = {**cluster.env, **env}
        if clock_offset_s:
            host_env.update(faketime_env(clock_offset_s))
        host = Host(name=name, database=database.start(), broker=broker.start(),
                    env=host_env, isolated=isolate, worker_args=worker_args,
                    hidden=tuple(hidden))
        self.hosts.append(host)
        host.env.update(VIDQ_DATABASE_URL=database.url(cluster.env["VIDQ_DATABASE_URL"]),
                        VIDQ_BROKER_URL=broker.url(cluster.env["VIDQ_BROKER_URL"]))
        worker = self.start_worker(host)
        if ready:
            assert host.log is not None
            cluster.wait_log(host.log, READY_LINE, proc=worker)
        return host

    def start_worker(self, host: Host) -> subprocess.Popen[bytes]:
        """Start the host's ``vidq worker`` (again, after a crash: a host reboots with the
        same name, environment and mounts), without waiting for it to be ready."""
        cluster = self.cluster
        command = [sys.executable, "-m", "vidq.cli", "worker", "--loglevel", "INFO",
                   *host.worker_args]
        if host.isolated:
            setup = "".join(f"mount -t tmpfs -o size=1m,mode=0755 vidq-hidden {shlex.quote(str(p))}"
                            " && " for p in host.hidden)
            # sh's $0 is the hostname; exec keeps the worker's pid the process's pid.
            command = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                       "sh", "-c", f'hostname "$0" && {setup}exec "$@"', host.name, *command]
        host.log = cluster.workdir / f"worker-{len(cluster.workers)}-{host.name}.log"
        host.worker = worker = subprocess.Popen(
            command, env=host.env, cwd=cluster.workdir, stdout=open(host.log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        cluster.workers.append((worker, host.log))
        if host.isolated:  # once python runs, the namespaces are made and set up
            cluster.wait_for(lambda: _running_python(worker), timeout=30,
                             what=f"host {host.name}'s namespaces", poll_s=0.05)
        return worker

    def close(self) -> None:
        for host in self.hosts:
            host.close()


def decoder_processes(host: Host) -> list[int]:
    """The host's decoder processes (grandchildren of its ``vidq worker``; not what they
    fork, which shows the same command line)."""
    assert host.worker is not None
    found, todo = [], [host.worker.pid]
    while todo:
        for pid in children_of(todo.pop()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"decoder_child" in cmdline:
                found.append(pid)
            else:
                todo.append(pid)
    return found


def _running_python(proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the worker exited {proc.returncode} while starting")
    try:
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[:3] == [sys.executable.encode(), b"-m", b"vidq.cli"]  # unshare and sh done


def namespaces_available() -> bool:
    """Whether this process may make mount and UTS namespaces (root, util-linux)."""
    try:
        return subprocess.run(["unshare", "--mount", "--uts", "--", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:
        return False


def require_namespaces() -> None:
    """Skip the test unless this process may make mount and UTS namespaces."""
    if not namespaces_available():
        pytest.skip("per-host namespaces need `unshare --mount --uts` (root, util-linux)")


def faketime_library() -> Path | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return Path(found[-1]) if found else None


def faketime_env(offset_s: float) -> dict[str, str]:
    """The environment that sets a process tree's wall clock off by ``offset_s``;
    monotonic clocks (timeouts, intervals) stay true. Skips the test without libfaketime.

    For what reads the clock, not for a worker's whole life: with libfaketime 0.9.10
    (Debian 12), Python's ``time.sleep`` fails with EINVAL under it, and with the
    monotonic clock faked too, timed waits (``threading.Event.wait``: sem_clockwait,
    which it does not intercept) overshoot by the offset."""
    library = faketime_library()
    if library is None:
        pytest.skip("a host clock offset needs libfaketime: "
                    "apt-get install -y faketime libfaketime")
    return {"LD_PRELOAD": str(library), "FAKETIME": f"{offset_s:+.0f}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
