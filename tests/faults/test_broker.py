"""The broker misbehaves: a short Redis outage mid-job, and messages that carry
values meant to change a worker's limits."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import redis

from tests.faults.harness import FaultCluster, FaultMedia, RedisServer, submit_long_job
from vidq.queue import PRIORITY_LEVELS, TASK_CLASSIFY, make_celery

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def start_prefork_worker(cluster: FaultCluster) -> subprocess.Popen[bytes]:
    """`celery -A worker.tasks worker`, the README's alternative to `vidq worker`: a
    prefork pool, where Celery can cancel and time-limit a running job (a threads
    pool, what `vidq worker` runs, can do neither)."""
    log = cluster.workdir / f"celery-prefork-{len(cluster.workers)}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "-P", "prefork",
         "-c", "1", "-Q", cluster.settings.queue, "--loglevel", "INFO"],
        env=cluster.env, cwd=cluster.workdir, stdout=open(log, "wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    cluster.workers.append((proc, log))
    return proc


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("pool", ["vidq-worker", "prefork"])
def test_a_redis_blip_mid_job_does_not_throw_the_running_job_away(
    make_cluster: Callable[..., FaultCluster], private_redis: RedisServer, database_url: str,
    media: FaultMedia, pool: str,
) -> None:
    """Before: worker_cancel_long_running_tasks_on_connection_loss=True. On reconnect the
    running job was cancelled; Redis (which does not redeliver unacked messages before
    the visibility timeout) had nothing to give back, so the job sat 'running' until its
    heartbeat went stale and a reconcile ran it again from the start."""
    cluster = make_cluster(broker_url=private_redis.url, database_url=database_url)
    if pool == "prefork":
        worker = start_prefork_worker(cluster)
        cluster.wait_log(cluster.log_of(worker), "ready:", proc=worker)
    else:
        worker = cluster.start_worker("--concurrency", "1")
    job_id = submit_long_job(cluster, media, "blip")
    cluster.wait_running(job_id)

    private_redis.stop()
    private_redis.start()
    cluster.wait_log(cluster.log_of(worker), "] Connected to ", count=2, proc=worker)

    cluster.wait_for(lambda: cluster.status_of(job_id) == "succeeded", timeout=120,
                     what="the interrupted job to finish on its own (no reconcile runs)")
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1
    assert worker.poll() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_crafted_time_limit_header_does_not_bind_the_worker(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    """Before: Celery's ``timelimit`` header was taken from the message: anyone who can
    write to Redis could give a job one second (prefork pools enforce it: the child is
    killed mid-job). Now the worker's VIDQ_TASK_TIME_LIMIT_S applies."""
    job_id = submit_long_job(cluster, media, "crafted")
    settings = cluster.settings
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(settings.queue, *[f"{settings.queue}:{p}" for p in range(PRIORITY_LEVELS)])
    make_celery(settings).send_task(
        TASK_CLASSIFY, args=[job_id], kwargs={"transient": -1000000}, queue=settings.queue,
        task_id="crafted-limits", time_limit=1, soft_time_limit=1,
    )
    proc = start_prefork_worker(cluster)
    cluster.wait_for(lambda: cluster.status_of(job_id) in ("succeeded", "failed"), timeout=180,
                     what="the crafted job to end")
    text = cluster.log_text(proc)
    assert "Hard time limit" not in text and "SoftTimeLimitExceeded" not in text, text[-3000:]
    job = cluster.assert_succeeded_once(job_id)
    assert job["attempts"] == 1
