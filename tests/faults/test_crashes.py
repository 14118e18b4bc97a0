"""Worker processes die or stop mid-job, and messages arrive twice: every job still
ends with exactly one succeeded row and one set of result rows."""

from __future__ import annotations

import os
import re
import signal

import pytest
import redis

from tests.faults.conftest import LONG_JOB, FaultMedia
from tests.faults.harness import FaultCluster, children_of

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def submit_long_job(cluster: FaultCluster, media: FaultMedia, batch: str) -> int:
    cluster.vidq("submit", str(media.long), *LONG_JOB, "--batch", batch)
    return int(cluster.sql("select max(id) from jobs")[0][0])


def test_sigkill_of_the_pool_child_mid_inference_redelivers_and_runs_once(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    worker = cluster.start_worker("--concurrency", "1")
    job_id = submit_long_job(cluster, media, "kill-child")
    child = cluster.wait_running(job_id)
    assert child in children_of(worker.pid), "the job should run in a ForkPoolWorker child"
    os.kill(child, signal.SIGKILL)

    cluster.wait_for(lambda: cluster.status_of(job_id) == "succeeded", what="job succeeded")
    job = cluster.assert_succeeded_once(job_id)
    # The lost child's message was requeued (reject_on_worker_lost); its replacement
    # found the dead lease still fresh ("busy"), waited for it to go stale, then ran it.
    assert job["attempts"] == 2
    assert int(job["worker_host"].rsplit(":", 1)[1]) != child
    assert worker.poll() is None, "the main worker process outlives its child"
    assert cluster.sql("select count(*) from jobs") == [(1,)]


def test_sigkill_of_the_whole_worker_mid_job_is_finished_by_a_new_worker(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    worker = cluster.start_worker("--concurrency", "1")
    job_id = submit_long_job(cluster, media, "kill-worker")
    cluster.wait_running(job_id)
    cluster.kill_group(worker)  # main process and child at once: nobody rejects the message
    assert cluster.status_of(job_id) == "running"  # as the dead worker left it

    # Redis holds the unacked message back for the visibility timeout (hours); the
    # new worker's periodic reconcile re-enqueues the job once its heartbeat is stale.
    replacement = cluster.start_worker("--concurrency", "1", VIDQ_RECONCILE_EVERY_S="2")
    cluster.wait_for(lambda: cluster.status_of(job_id) == "succeeded", what="job succeeded")
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 2
    assert "re-enqueued 1 stale running and 0 lost queued jobs" in cluster.log_text(replacement)


def test_sigterm_mid_job_finishes_it_and_leaves_the_queue_for_the_next_worker(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    worker = cluster.start_worker("--concurrency", "1")
    running = submit_long_job(cluster, media, "term")
    cluster.vidq("submit", str(media.good[0]), "--batch", "term-queued")
    waiting = running + 1
    cluster.wait_running(running)
    os.kill(worker.pid, signal.SIGTERM)  # the main process only: a warm shutdown

    assert worker.wait(timeout=120) == 0
    assert "Warm shutdown" in cluster.log_text(worker)
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
    first, second = cluster.start_workers(2, "--concurrency", "1")
    job_id = submit_long_job(cluster, media, "twice")
    cluster.publish_duplicate(job_id)  # a second message, another task id, same job

    # The second delivery finds a live lease (busy), retries after the lease would
    # be stale, and then finds the job succeeded.
    skipped = f"job {job_id} skipped job is succeeded"
    cluster.wait_for(lambda: skipped in cluster.all_logs(), what="the duplicate's skip",
                     timeout=150)
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1
    logs = [cluster.log_text(first), cluster.log_text(second)]
    assert sum(log.count(f"job {job_id} succeeded") for log in logs) == 1
    assert any(re.search(r"vidq\.classify\[\S+\] retry: Retry in \d+s", log)
               for log in logs), "the duplicate should have met the live lease"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigkill_of_a_worker_holding_an_unclaimed_message_does_not_strand_the_job(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    worker = cluster.start_worker("--concurrency", "1")
    cluster.vidq("submit", str(media.good[2]), "--batch", "first")
    cluster.wait_for(lambda: cluster.status_of(1) == "succeeded", what="the child to be idle")
    (child,) = children_of(worker.pid)
    os.kill(child, signal.SIGSTOP)  # the parent takes the next message; the child cannot claim it
    cluster.vidq("submit", str(media.good[3]), "--batch", "held")
    broker = redis.Redis.from_url(cluster.settings.broker_url)
    cluster.wait_for(lambda: broker.hlen("unacked") == 1 and not broker.llen("vidq"),
                     what="the message to be delivered (unacked)")
    cluster.kill_group(worker)
    assert cluster.status_of(2) == "queued"
    # The message now sits in Redis's unacked set, under a dead worker, until the
    # visibility timeout (hours). Reconcile must not take it for a live task forever.
    replacement = cluster.start_worker("--concurrency", "1", VIDQ_RECONCILE_EVERY_S="2",
                                       VIDQ_RECONCILE_AFTER_S="5")
    cluster.wait_for(lambda: cluster.status_of(2) == "succeeded", what="job succeeded")
    job = cluster.assert_succeeded_once(2)
    assert job["attempts"] == 1
    assert "re-enqueued 0 stale running and 1 lost queued jobs" in cluster.log_text(replacement)
