"""Worker processes die or stop mid-job, and messages arrive twice: every job still
ends with exactly one succeeded row and one set of result rows."""

from __future__ import annotations

import os
import re
import signal

import pytest
import redis

from tests.faults.harness import FaultCluster, FaultMedia, children_of

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.mark.heavy_on_postgresql
def test_sigkill_of_the_worker_process_mid_job_restarts_it_and_runs_once(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    hold = cluster.hold("after_claim")
    hold.engage()
    worker = cluster.start_worker("--concurrency", "1", VIDQ_RECONCILE_EVERY_S="2",
                                  **hold.env())
    cluster.vidq("submit", str(media.good[0]), "--batch", "kill-process")
    process = cluster.wait_held(hold)  # claimed, heartbeat live, nothing written
    assert process in children_of(worker.pid), "the job runs in a supervised worker process"
    os.kill(process, signal.SIGKILL)
    hold.release()

    # `vidq worker` starts a new worker process; the killed one's message stays
    # unacked in Redis (hours), so its periodic reconcile re-enqueues the stale job.
    cluster.wait_for(lambda: cluster.status_of(1) == "succeeded", what="job succeeded")
    job = cluster.assert_succeeded_once(1)
    assert job["attempts"] == 2
    assert int(job["worker_host"].rsplit(":", 1)[1]) != process
    assert worker.poll() is None, "the supervisor outlives its worker process"
    assert "exited with -9; restarting" in cluster.log_text(worker)
    assert cluster.sql("select count(*) from jobs") == [(1,)]


@pytest.mark.heavy_on_postgresql
def test_sigkill_of_the_whole_worker_mid_job_is_finished_by_a_new_worker(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    hold = cluster.hold("after_claim")
    hold.engage()
    worker = cluster.start_worker("--concurrency", "1", **hold.env())
    cluster.vidq("submit", str(media.good[0]), "--batch", "kill-worker")
    cluster.wait_held(hold)
    cluster.kill_group(worker)  # main process and child at once: nobody rejects the message
    hold.release()
    assert cluster.status_of(1) == "running"  # as the dead worker left it

    # Redis holds the unacked message back for the visibility timeout (hours); the
    # new worker's periodic reconcile re-enqueues the job once its heartbeat is stale.
    replacement = cluster.start_worker("--concurrency", "1", VIDQ_RECONCILE_EVERY_S="2")
    cluster.wait_for(lambda: cluster.status_of(1) == "succeeded", what="job succeeded")
    job = cluster.assert_succeeded_once(1)
    assert job["attempts"] == 2
    assert "re-enqueued 1 stale running and 0 lost queued jobs" in cluster.log_text(replacement)


def test_sigterm_mid_job_finishes_it_and_leaves_the_queue_for_the_next_worker(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    hold = cluster.hold("after_claim")
    hold.engage()
    worker = cluster.start_worker("--concurrency", "1", "--inflight", "1", **hold.env())
    cluster.vidq("submit", str(media.good[1]), "--batch", "term")
    cluster.wait_held(hold)
    running, waiting = 1, 2
    cluster.vidq("submit", str(media.good[0]), "--batch", "term-queued")
    os.kill(worker.pid, signal.SIGTERM)  # the supervisor only: a warm shutdown of its process
    cluster.wait_log(cluster.log_of(worker), "Warm shutdown", proc=worker)
    assert cluster.status_of(running) == "running"  # the signal landed mid-job
    hold.release()

    assert worker.wait(timeout=120) == 0
    rows = {j["id"]: (j["status"], j["attempts"]) for j in cluster.jobs()}
    assert rows == {running: ("succeeded", 1), waiting: ("queued", 0)}
    cluster.assert_succeeded_once(running)

    cluster.start_worker("--concurrency", "1")
    cluster.wait_for(lambda: cluster.status_of(waiting) == "succeeded", what="queued job ran")
    cluster.assert_succeeded_once(waiting)
    assert [(j["status"], j["attempts"]) for j in cluster.jobs()] == [("succeeded", 1)] * 2


def test_the_same_job_delivered_twice_at_once_runs_once(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    hold = cluster.hold("after_claim")
    hold.engage()
    first, second = cluster.start_workers(2, "--concurrency", "1", **hold.env())
    cluster.vidq("submit", str(media.good[0]), "--batch", "twice")
    job_id = 1
    cluster.wait_held(hold)  # one delivery holds the job, its lease live
    cluster.publish_duplicate(job_id)  # a second message, another task id, same job
    # The second delivery finds the live lease (busy) and retries after the lease
    # would be stale; then it finds the job succeeded.
    retry = re.compile(r"vidq\.classify\[\S+\] retry: Retry in \d+s")
    cluster.wait_for(lambda: retry.search(cluster.all_logs()), what="the duplicate's retry")
    hold.release()
    skipped = f"job {job_id} skipped job is succeeded"
    cluster.wait_for(lambda: skipped in cluster.all_logs(), what="the duplicate's skip",
                     timeout=150)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1
    logs = [cluster.log_text(first), cluster.log_text(second)]
    assert sum(log.count(f"job {job_id} succeeded") for log in logs) == 1
    assert len(hold.held_pids()) == 1


# PostgreSQL, the backend of many workers (SQLite passed too when this was written).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_stalled_worker_whose_job_was_finished_elsewhere_cannot_commit(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    """The lease-lost commit: a worker stopped (SIGSTOP) with its results in hand,
    past staleness; reconcile re-enqueues the job, another worker finishes it; the
    stopped worker is continued (SIGCONT) and tries to commit: refused."""
    hold = cluster.hold("before_commit")
    hold.engage()
    stalled = cluster.start_worker("--concurrency", "1", **hold.env())
    cluster.vidq("submit", str(media.good[0]), "--batch", "stall")
    job_id = 1
    stalled_pid = cluster.wait_held(hold)  # classified, heartbeat stopped, nothing written
    os.killpg(stalled.pid, signal.SIGSTOP)
    hold.release()  # it can only go on to its commit once continued
    assert cluster.status_of(job_id) == "running"

    cluster.wait_for(
        lambda: "re-enqueued 1 stale running" in cluster.vidq("reconcile").stdout,
        what="reconcile to find the stalled job stale", timeout=90, poll_s=1,
    )
    rescuer = cluster.start_worker("--concurrency", "1")
    cluster.wait_for(lambda: cluster.status_of(job_id) == "succeeded", what="the rescue")
    snapshot = _result_rows(cluster, job_id)

    os.killpg(stalled.pid, signal.SIGCONT)
    cluster.wait_log(cluster.log_of(stalled), f"job {job_id} skipped lease lost", proc=stalled)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 2
    assert int(job["worker_host"].rsplit(":", 1)[1]) in children_of(rescuer.pid)
    assert int(job["worker_host"].rsplit(":", 1)[1]) != stalled_pid
    assert _result_rows(cluster, job_id) == snapshot  # nothing of the stalled run written
    assert cluster.all_logs().count(f"job {job_id} succeeded") == 1


def _result_rows(cluster: FaultCluster, job_id: int) -> tuple[list[tuple], ...]:
    """Everything the commit writes for a job: its row's result columns and its rows."""
    return (
        cluster.sql("select status, finished_at, top_label, top_score, clips_done, worker_host"
                    " from jobs where id = :id", id=job_id),
        cluster.sql("select rank, class_id, score from video_labels where job_id = :id"
                    " order by rank", id=job_id),
        cluster.sql("select clip_index, rank, class_id, score from clip_predictions"
                    " where job_id = :id order by clip_index, rank", id=job_id),
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigkill_of_a_worker_holding_an_unclaimed_message_does_not_strand_the_job(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    hold = cluster.hold("before_claim")
    hold.engage()
    worker = cluster.start_worker("--concurrency", "1", "--inflight", "1", **hold.env())
    cluster.vidq("submit", str(media.good[3]), "--batch", "held")
    cluster.wait_held(hold)  # the message is delivered; the job is not claimed yet
    broker = redis.Redis.from_url(cluster.settings.broker_url)
    assert broker.hlen("unacked") == 1 and not broker.llen("vidq")
    cluster.kill_group(worker)
    hold.release()
    assert cluster.status_of(1) == "queued"
    # The message now sits in Redis's unacked set, under a dead worker, until the
    # visibility timeout (hours). Reconcile must not take it for a live task forever.
    replacement = cluster.start_worker("--concurrency", "1", VIDQ_RECONCILE_EVERY_S="2",
                                       VIDQ_RECONCILE_AFTER_S="5")
    cluster.wait_for(lambda: cluster.status_of(1) == "succeeded", what="job succeeded")
    job = cluster.assert_succeeded_once(1)
    assert job["attempts"] == 1
    assert "re-enqueued 0 stale running and 1 lost queued jobs" in cluster.log_text(replacement)
