"""The multi-host harness (tests/faults/hosts.py): each host's worker reaches PostgreSQL
and Redis only through its own proxies, and has its own name, mounts and clock."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.faults.harness import FaultMedia
from tests.faults.hosts import Fleet

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_hosts_run_jobs_through_their_own_proxies(
    fleet: Fleet, media: FaultMedia,  # noqa: F811
) -> None:
    a = fleet.add_host("host-a", "--concurrency", "1", isolate=True)
    b = fleet.add_host("host-b", "--concurrency", "1", isolate=True)
    for host in (a, b):
        assert host.database.open_connections and host.broker.open_connections, host.name
        assert f"@127.0.0.1:{host.database.port}/" in host.env["VIDQ_DATABASE_URL"]
        assert f"//127.0.0.1:{host.broker.port}/" in host.env["VIDQ_BROKER_URL"]
    cluster = fleet.cluster
    cluster.vidq("submit", *map(str, media.good[:4]), "--batch", "fleet")
    cluster.wait_done(n=4)
    jobs = cluster.jobs()
    for job in jobs:
        cluster.assert_succeeded_once(job["id"])
    assert {job["worker_host"].rsplit(":", 1)[0] for job in jobs} <= {"host-a", "host-b"}

    # host-a is cut off from both services for a moment; host-b is not. What host-a
    # was sent meanwhile is held, not lost: every job still finishes, once.
    a.set_mode("blackhole")
    assert a.database.mode == a.broker.mode == "blackhole" and b.database.mode == "pass"
    cluster.vidq("submit", *map(str, media.good[4:6]), "--batch", "partitioned")
    time.sleep(3)
    a.heal()
    cluster.wait_done(n=6)
    for job in cluster.jobs():
        cluster.assert_succeeded_once(job["id"])


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_host_has_its_own_name_mounts_and_clock(
    fleet: Fleet, media: FaultMedia,  # noqa: F811
) -> None:
    host = fleet.add_host("host-c", isolate=True, hidden=[media.root], clock_offset_s=3600,
                          ready=False)
    assert host.run("hostname").stdout.strip() == "host-c"
    assert host.run("ls", "-A", str(media.root)).stdout == ""  # its media mount is missing
    assert media.long.exists()  # everyone else's is not
    offset = float(host.run(sys.executable, "-c", "import time; print(time.time())").stdout)
    assert 3590 < offset - time.time() < 3610
    assert host.worker is not None
    environ = Path(f"/proc/{host.worker.pid}/environ").read_bytes().split(b"\0")
    assert b"FAKETIME=+3600s" in environ
