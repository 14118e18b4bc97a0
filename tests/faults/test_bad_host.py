"""One bad host among good ones (worker/breaker.py, worker/jobs.py's host-local
failures): a host without the media mount gives every job back without spending an
attempt, opens its circuit after VIDQ_BREAKER_FAILURES in a row (unhealthy on
/healthz, ``open`` in ``vidq status``), and a file missing on every host fails for
good only once two hosts agree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.harness import FaultMedia, free_port, healthz
from tests.faults.hosts import Fleet
from tests.media import make_video

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]



@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_one_host_without_the_media_mount_fails_nothing_and_opens_its_circuit(
    fleet: Fleet, media: FaultMedia, tmp_path: Path,
) -> None:
    mount = tmp_path / "mount"  # the media mount: the bad host lacks it
    mount.mkdir()
    videos = [mount / f"v{i:02d}.mp4" for i in range(16)]
    for i, path in enumerate(videos):
        make_video(path, seconds=1, seed=900 + i)
    gone = mount / "gone.mp4"  # submitted, then deleted everywhere
    make_video(gone, seconds=1, seed=999)
    cluster = fleet.cluster
    port = free_port()
    args = ("--concurrency", "1")
    hold = cluster.hold("before_claim")  # until gone.mp4 is gone
    good = fleet.add_host("good-host", *args, isolate=True, ready=False, **hold.env())
    bad = fleet.add_host("bad-host", *args, isolate=True, hidden=[mount], ready=False,
                         VIDQ_METRICS_PORT=str(port), **hold.env())
    for host in (good, bad):
        assert host.log is not None
        cluster.wait_log(host.log, "ready:", proc=host.worker)
    assert bad.run("ls", "-A", str(mount)).stdout == ""
    cluster.wait_for(lambda: healthz(port)[0] == 200, timeout=60, what="bad host healthy")

    hold.engage()
    cluster.vidq("submit", *map(str, videos), str(gone), "--batch", "fleet")
    os.unlink(gone)
    hold.release()

    # The bad host fails three jobs in a row in milliseconds: its circuit opens.
    def bad_open() -> list[tuple]:
        return cluster.sql("select state, last_error from workers where host = 'bad-host'"
                           " and state != 'closed'")
    state, last_error = cluster.wait_for(bad_open, timeout=120, what="bad host's circuit")[0]
    assert "not_found" in last_error or "refused_path" in last_error, last_error
    code, why = healthz(port)
    assert code == 503 and "1 with the circuit open" in why, (code, why)
    status = cluster.vidq("status").stdout
    lines = {line.split()[0]: line for line in status.splitlines()[1:]
             if line.startswith("  ") and "-host" in line}
    assert "open" in lines["bad-host"] and "closed" not in lines["bad-host"], status
    assert "closed" in lines["good-host"], status

    cluster.wait_done(n=17, timeout=300)
    jobs = {job["path"]: job for job in cluster.jobs()}
    missing = jobs.pop(str(gone))
    # 16 succeed, each once, no attempt spent on the bad host; 0 fail.
    assert len(jobs) == 16
    for job in jobs.values():
        cluster.assert_succeeded_once(job["id"])
        assert job["attempts"] == 1 and job["worker_host"].startswith("good-host"), job
    # The file missing everywhere fails for good, once both hosts agree.
    assert missing["status"] == "failed" and missing["error_kind"] == "not_found", missing
    assert missing["attempts"] == 1, missing
    agreed = cluster.sql("select host from host_failures where job_id = :id order by host",
                         id=missing["id"])
    assert agreed == [("bad-host",), ("good-host",)], agreed
    assert "on 2 hosts: bad-host, good-host" in missing["error_message"], missing
    # The bad host's failures were all of its own: recorded against it, not the videos.
    blamed = cluster.sql("select distinct host from host_failures")
    assert set(blamed) == {("bad-host",), ("good-host",)}
    assert len(cluster.sql("select job_id from host_failures where host = 'good-host'")) == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_mount_gone_between_decode_and_commit_keeps_what_was_read(
    fleet: Fleet, tmp_path: Path,
) -> None:
    """Found by the chaos run (tests/chaos.py). Before: the commit's check could not open
    the path any more and failed the job for good with ``changed_since_submit``, though
    the decoder had hashed the submitted bytes. Now the decoder's hash is the proof:
    the result is committed, once, attempt 1."""
    mount = tmp_path / "mount"
    mount.mkdir()
    video = mount / "v.mp4"
    make_video(video, seconds=2, seed=1201)
    cluster = fleet.cluster
    hold = cluster.hold("before_commit")
    hold.engage()
    host = fleet.add_host("flaky-host", "--concurrency", "1", isolate=True, **hold.env())
    cluster.vidq("submit", str(video), "--batch", "gone")
    cluster.wait_held(hold)  # decoded and classified, not committed yet
    hidden = host.run("mount", "-t", "tmpfs", "-o", "size=1m", "gone", str(mount))
    assert hidden.returncode == 0, hidden.stderr
    assert host.run("ls", "-A", str(mount)).stdout == ""  # the mount went away
    hold.release()
    cluster.wait_done(n=1, timeout=120)
    (job,) = cluster.jobs()
    cluster.assert_succeeded_once(job["id"])
    assert job["attempts"] == 1, job
