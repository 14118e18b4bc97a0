"""Many jobs in flight in one worker process (VIDQ_INFLIGHT): each keeps its own claim,
heartbeat and one-transaction commit; a bad video fails alone; a SIGKILL or a SIGTERM
of the process leaves every job finished exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.faults.harness import LONG_JOB, FaultCluster, FaultMedia, children_of

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]
INFLIGHT = 4


def watch_concurrency(cluster: FaultCluster, stop: threading.Event, seen: list[set[str]]) -> None:
    """Record which jobs run at the same time, and on which process."""
    while not stop.is_set():
        rows = cluster.sql("select id, worker_host from jobs where status = 'running'")
        seen.append({f"{job_id}@{host}" for job_id, host in rows})
        time.sleep(0.05)


def test_jobs_in_flight_in_one_process_with_a_bad_video_among_them(
    cluster: FaultCluster, media: FaultMedia, tmp_path: os.PathLike[str]
) -> None:
    bad = media.root / "inflight-bad.mp4"
    bad.write_bytes(media.good[0].read_bytes()[:4096])  # cut short: the index is lost
    cluster.start_worker("--concurrency", "1", "--inflight", str(INFLIGHT))
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_concurrency, args=(cluster, stop, seen))
    watcher.start()
    try:
        cluster.vidq("submit", str(media.long), *LONG_JOB, "--batch", "long")
        cluster.vidq("submit", *map(str, media.good[1:4]), str(bad), "--batch", "mixed",
                     "--strategy", "uniform", "--clips", "3")
        cluster.wait_done(5)
    finally:
        stop.set()
        watcher.join()
    jobs = {j["path"]: j for j in cluster.jobs()}
    assert jobs[str(bad)]["status"] == "failed" and jobs[str(bad)]["attempts"] == 1
    assert jobs[str(bad)]["error_kind"] in ("not_a_video", "undecodable", "corrupt")
    for path in [media.long, *media.good[1:4]]:
        job = cluster.assert_succeeded_once(jobs[str(path)]["id"])
        assert job["attempts"] == 1
    # Several jobs were running at once, all in the one worker process.
    busiest = max(seen, key=len)
    assert len(busiest) >= 2, seen[-20:]
    assert len({entry.split("@", 1)[1] for entry in busiest}) == 1


@pytest.mark.heavy_on_postgresql
@pytest.mark.parametrize("decoders", ["threads", "processes"])
def test_sigkill_of_a_process_holding_several_jobs_finishes_each_once(
    cluster: FaultCluster, media: FaultMedia, decoders: str
) -> None:
    worker = cluster.start_worker("--concurrency", "1", "--inflight", str(INFLIGHT),
                                  "--decode-workers", "2", "--decoders", decoders,
                                  VIDQ_RECONCILE_EVERY_S="2")
    cluster.vidq("submit", str(media.long), *LONG_JOB, "--batch", "kill")
    cluster.vidq("submit", *map(str, media.good[:3]), "--batch", "kill-short",
                 "--strategy", "sliding", "--stride", "0.2")
    cluster.wait_for(
        lambda: cluster.sql("select count(*) from jobs where status = 'running'")[0][0] >= 2,
        what="two jobs in flight at once")
    (process,) = children_of(worker.pid)
    decoder_processes = children_of(process)
    assert len(decoder_processes) == (2 if decoders == "processes" else 0), decoder_processes
    running = {job_id for (job_id,) in cluster.sql("select id from jobs where status = 'running'")}
    os.kill(process, signal.SIGKILL)  # the worker process: every job in flight dies with it
    # Its decoder processes die with it, whatever they were doing.
    cluster.wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in decoder_processes),
                     what="the decoder processes gone with their worker", timeout=30)

    # The supervisor starts a new process; its periodic reconcile re-enqueues the jobs
    # whose heartbeat went stale (Redis would hold their messages back for hours).
    cluster.wait_done(4, timeout=240)
    assert worker.poll() is None, "the supervisor outlives its worker process"
    for job in cluster.jobs():
        cluster.assert_succeeded_once(job["id"])
        assert job["attempts"] == (2 if job["id"] in running else 1), job
        assert int(job["worker_host"].rsplit(":", 1)[1]) != process
    duplicates = cluster.sql(
        "select job_id, clip_index, rank, count(*) from clip_predictions "
        "group by job_id, clip_index, rank having count(*) > 1")
    assert duplicates == []


@pytest.mark.parametrize("decoders", ["threads", "processes"])
def test_sigterm_finishes_every_job_in_flight(
    cluster: FaultCluster, media: FaultMedia, decoders: str
) -> None:
    worker = cluster.start_worker("--concurrency", "1", "--inflight", "3",
                                  "--decode-workers", "2", "--decoders", decoders)
    cluster.vidq("submit", str(media.long), *LONG_JOB, "--batch", "term")
    cluster.vidq("submit", *map(str, media.good[:2]), "--batch", "term-short",
                 "--strategy", "sliding", "--stride", "0.3")
    cluster.vidq("submit", *map(str, media.good[2:5]), "--batch", "term-queued")
    cluster.wait_for(
        lambda: cluster.sql("select count(*) from jobs where status = 'running'")[0][0] >= 2,
        what="jobs in flight")
    in_flight = {j for (j,) in cluster.sql("select id from jobs where status = 'running'")}
    os.kill(worker.pid, signal.SIGTERM)  # the supervisor: a warm shutdown of its process

    assert worker.wait(timeout=180) == 0
    assert "Warm shutdown" in cluster.log_text(worker)
    rows = {j["id"]: j for j in cluster.jobs()}
    for job_id in in_flight:
        assert rows[job_id]["status"] == "succeeded", rows[job_id]
        cluster.assert_succeeded_once(job_id)
    assert all(j["status"] in ("succeeded", "queued") for j in rows.values()), rows
    assert all(j["attempts"] <= 1 for j in rows.values()), rows


@pytest.mark.heavy_on_postgresql
def test_a_video_that_kills_its_worker_every_time_ends_failed_crashed(
    cluster: FaultCluster, media: FaultMedia, tmp_path: os.PathLike[str]
) -> None:
    """A poison video (here: the process is SIGKILLed whenever it holds the job, as an
    out-of-memory kill or a decoder segfault would) cannot take a worker for ever."""
    hold = Path(tmp_path) / "hold"
    hold.touch()
    log = Path(f"{hold}.log")
    worker = cluster.start_worker("--concurrency", "1", VIDQ_MAX_ATTEMPTS="2",
                                  VIDQ_RECONCILE_EVERY_S="2",
                                  VIDQ_FAULT_PAUSE=f"after_claim={hold}")
    cluster.vidq("submit", str(media.good[5]), "--batch", "poison")
    for attempt in (1, 2):
        cluster.wait_for(lambda n=attempt: log.exists() and log.read_text().count("held") >= n,
                         what=f"attempt {attempt} running")
        (process,) = children_of(worker.pid)
        os.kill(process, signal.SIGKILL)
    cluster.wait_for(lambda: cluster.status_of(1) == "failed", what="the job given up",
                     timeout=180)
    (job,) = cluster.jobs()
    assert job["attempts"] == 2 and job["error_kind"] == "crashed", job
    assert "gave up after 2 attempts" in job["error_message"]
    assert "stopped" in job["error_message"]
    assert log.read_text().count("held") == 2  # no third run
    assert worker.poll() is None
