"""A decoder that stops making progress (worker/watchdog.py): frozen for real, on two
hosts, while other videos go on.

A decoder process is frozen with SIGSTOP whenever it holds the long video open; a
decoder thread is held at the ``decode_clip`` fault point on that video alone (a read
blocked on a hung mount looks the same to the worker). Each time, the watchdog
replaces the decoder within ``VIDQ_DECODE_STALL_S`` and gives the video back to the
queue as that host's failure, attempt unspent; once it has stalled on both hosts it
fails for good with ``timeout``.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from tests.faults.harness import FaultMedia, submit_long_job
from tests.faults.hosts import Fleet, Host, decoder_processes

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

STALL_S = "3"


def holds_open(pid: int, name: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
                return True
        except OSError:
            continue
    return False


class Freezer:
    """SIGSTOPs, from a thread, every decoder process of ``hosts`` that opens ``name``."""

    def __init__(self, hosts: list[Host], name: str) -> None:
        self.hosts, self.name = hosts, name
        self.frozen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for host in self.hosts:
                for pid in decoder_processes(host):
                    if pid not in self.frozen and holds_open(pid, self.name):
                        os.kill(pid, signal.SIGSTOP)
                        self.frozen.append(pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for pid in self.frozen:  # any the watchdog left would hold the teardown up
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("decoders", ["processes", "threads"])
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_stalled_decoder_is_replaced_and_the_video_fails_only_on_a_second_host(
    fleet: Fleet, media: FaultMedia, decoders: str,
) -> None:
    cluster = fleet.cluster
    hold = cluster.hold("decode_clip")
    env = {"VIDQ_DECODE_STALL_S": STALL_S, **hold.env()}
    args = ("--concurrency", "1", "--decoders", decoders, "--decode-workers", "1")
    hosts = [fleet.add_host(name, *args, isolate=True, ready=False, **env)
             for name in ("host-a", "host-b")]
    for host in hosts:
        assert host.log is not None
        cluster.wait_log(host.log, "ready:", proc=host.worker)
    freezer = None
    if decoders == "processes":
        before = {host.name: decoder_processes(host) for host in hosts}
        assert all(len(pids) == 1 for pids in before.values()), before
        freezer = Freezer(hosts, media.long.name)
    else:
        hold.path.write_text(media.long.name)  # held there, and only that video
    try:
        long_id = submit_long_job(cluster, media, "stalls")
        # The first stall: noticed, the video given back with its attempt unspent.
        first = cluster.wait_for(
            lambda: cluster.sql("select host, error_kind from host_failures"
                                " where job_id = :id", id=long_id),
            timeout=120, what="the first stall recorded")
        assert first[0][1] == "stalled", first
        # Other videos keep flowing meanwhile, through the decoders that replaced it.
        cluster.vidq("submit", *map(str, media.good[:4]), "--batch", "flowing")
        cluster.wait_done(n=5, timeout=240)
    finally:
        if freezer is not None:
            freezer.stop()
        hold.release()

    jobs = {job["id"]: job for job in cluster.jobs()}
    stalled = jobs.pop(long_id)
    assert stalled["status"] == "failed" and stalled["error_kind"] == "timeout", stalled
    assert stalled["attempts"] == 1, stalled  # each stall gave its attempt back
    rows = cluster.sql("select host, error_kind, failures from host_failures"
                       " where job_id = :id order by host", id=long_id)
    assert [(h, k) for h, k, _n in rows] == [("host-a", "stalled"), ("host-b", "stalled")]
    assert "host-a" in stalled["error_message"] and "host-b" in stalled["error_message"]
    for job in jobs.values():
        cluster.assert_succeeded_once(job["id"])
        assert job["attempts"] == 1, job
    logs = cluster.all_logs()
    assert "made no progress" in logs or "stalled" in logs
    if freezer is not None:
        # Every frozen decoder was killed and replaced: each host has one, alive.
        assert freezer.frozen and not any(alive(pid) for pid in freezer.frozen)
        for host in hosts:
            now = [pid for pid in decoder_processes(host) if alive(pid)]
            assert len(now) == 1 and now[0] not in freezer.frozen, (host.name, now)
