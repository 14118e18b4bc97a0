"""The worker's policies, each seen in the results table: jobs for another model
are refused, GPU out-of-memory is retried and given up on after VIDQ_MAX_RETRIES,
a worker process over VIDQ_WORKER_MAX_MEMORY_MB is recycled, one host at a time
runs the periodic reconcile, and no password reaches a worker's log."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.harness import FaultCluster, FaultMedia, RedisServer, children_of

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

# Loaded by every worker process through PYTHONPATH: once worker.inference is
# imported, the model's forward raises torch's out-of-memory error for the first
# VIDQ_TEST_OOM_CALLS calls in each process (-1: always). A stand-in for a GPU,
# the one thing these machines do not have; whatever pool runs the jobs.
OOM_SITECUSTOMIZE = '''
import importlib.abc
import importlib.util
import os
import sys


def _run_out_of_memory(module):
    import torch

    # The one forward pass the model loop runs (logits and, when kept, features).
    real = module.Classifier.forward_with_features
    budget = [int(os.environ["VIDQ_TEST_OOM_CALLS"])]

    def forward(self, *args, **kwargs):
        if budget[0] != 0:
            budget[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    module.Classifier.forward_with_features = forward


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "worker.inference":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _run_out_of_memory(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("VIDQ_TEST_OOM_CALLS"):
    sys.meta_path.insert(0, _PatchOnImport())
'''


def oom_env(tmp_path: Path, calls: int) -> dict[str, str]:
    plugin = tmp_path / "oom-plugin"
    plugin.mkdir(exist_ok=True)
    (plugin / "sitecustomize.py").write_text(OOM_SITECUSTOMIZE)
    import os

    path = os.pathsep.join(p for p in (str(plugin), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "VIDQ_TEST_OOM_CALLS": str(calls)}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_for_another_model_is_refused_at_once(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    worker = cluster.start_worker("--concurrency", "1")  # serves x3d_xs
    job_id = cluster.insert_job(str(media.good[0]), model="slow_r50",
                                config_key="slow_r50|random|single:start=0:crops=1")
    cluster.publish_inserted(1)
    cluster.wait_done(n=1, timeout=60)
    (job,) = cluster.jobs()
    assert (job["id"], job["status"], job["error_kind"], job["attempts"]) == (
        job_id, "failed", "wrong_model", 1)
    assert "slow_r50" in job["error_message"] and "x3d_xs" in job["error_message"]
    assert cluster.sql("select count(*) from video_labels") == [(0,)]
    assert worker.poll() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_out_of_memory_is_retried_and_the_job_then_succeeds(
    cluster: FaultCluster, media: FaultMedia, tmp_path: Path
) -> None:
    cluster.start_worker("--concurrency", "1", **oom_env(tmp_path, calls=1))
    cluster.vidq("submit", str(media.good[0]), "--batch", "oom-once")
    cluster.wait_done(n=1, timeout=120)
    job = cluster.assert_succeeded_once(1)
    assert job["attempts"] == 2  # the first attempt ran out of memory, the retry did not
    assert "out of accelerator memory" in cluster.all_logs()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_that_always_runs_out_of_memory_gives_up_after_max_retries(
    cluster: FaultCluster, media: FaultMedia, tmp_path: Path
) -> None:
    worker = cluster.start_worker("--concurrency", "1", VIDQ_MAX_RETRIES="2",
                                  **oom_env(tmp_path, calls=-1))
    cluster.vidq("submit", str(media.good[0]), "--batch", "oom-always")
    cluster.wait_done(n=1, timeout=120)  # backoff: 1-2 s, then 2-4 s
    (job,) = cluster.jobs()
    assert (job["status"], job["error_kind"], job["attempts"]) == (
        "failed", "retries_exhausted", 3)  # the first attempt and VIDQ_MAX_RETRIES=2 more
    assert "gave up after 3 attempts" in job["error_message"]
    assert "out of accelerator memory" in job["error_message"]
    assert cluster.sql("select count(*) from clip_predictions") == [(0,)]
    # The worker goes on with the next job.
    cluster.vidq("submit", str(media.good[1]), "--batch", "after", VIDQ_TEST_OOM_CALLS="")
    assert worker.poll() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_more_retries_than_celerys_default_limit_are_all_taken(
    cluster: FaultCluster, media: FaultMedia, tmp_path: Path
) -> None:
    # Celery's own limit is 3 retries unless a call says otherwise: VIDQ_MAX_RETRIES=4
    # must take a fourth, not stop the task with MaxRetriesExceededError (the job
    # would then stay running until its lease went stale).
    cluster.start_worker("--concurrency", "1", VIDQ_MAX_RETRIES="4", VIDQ_MAX_ATTEMPTS="10",
                         **oom_env(tmp_path, calls=-1))
    cluster.vidq("submit", str(media.good[0]), "--batch", "oom-four")
    cluster.wait_done(n=1, timeout=150)  # backoff: 1-2, 2-4, 4-8, 8-16 s
    (job,) = cluster.jobs()
    assert (job["status"], job["error_kind"], job["attempts"]) == (
        "failed", "retries_exhausted", 5)
    assert "gave up after 5 attempts" in job["error_message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_process_over_its_memory_limit_is_replaced_and_jobs_go_on(
    cluster: FaultCluster, media: FaultMedia
) -> None:
    # 1 MiB: every pool child is over it after its first job.
    worker = cluster.start_worker("--concurrency", "1", VIDQ_WORKER_MAX_MEMORY_MB="1")
    for n, video in enumerate(media.good[:2], start=1):  # one after the other
        cluster.vidq("submit", str(video), "--batch", f"recycle-{n}")
        cluster.wait_done(n=n, timeout=240)
    pids = []
    for job in cluster.jobs():
        cluster.assert_succeeded_once(job["id"])
        assert job["attempts"] == 1
        pids.append(int(job["worker_host"].rsplit(":", 1)[1]))
    assert len(set(pids)) == 2, f"each job in a fresh process: {pids}"
    assert worker.poll() is None
    cluster.wait_for(lambda: len(children_of(worker.pid)) == 1, what="a fresh pool child")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_two_workers_run_the_periodic_reconcile_one_at_a_time(cluster: FaultCluster) -> None:
    period_s, window_s = 2, 12
    trace = cluster.hold("reconcile")  # never engaged: it only records each run
    cluster.start_workers(2, "--concurrency", "1", VIDQ_RECONCILE_EVERY_S=str(period_s),
                          **trace.env())
    cluster.wait_for(lambda: len({pid for pid, _ in trace.events()}) >= 1,
                     what="a first reconcile", timeout=60)
    before = len(trace.events())
    time.sleep(window_s)  # an observation window: counts runs, waits for no state
    runs = len(trace.events()) - before
    # With the lock: at most one run per period across both hosts (plus an edge);
    # without it each worker runs every period, about twice as many.
    assert window_s / period_s / 2 < runs <= window_s / period_s + 2, runs


@pytest.mark.parametrize("private_redis", ["redis-s3cret"], indirect=True)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_no_password_reaches_the_worker_log(
    make_cluster: Callable[..., FaultCluster], private_redis: RedisServer, database_url: str,
    media: FaultMedia,
) -> None:
    # PostgreSQL here trusts local connections: the password is accepted and unused.
    db_url = database_url.replace("postgres@", "postgres:db-s3cret@", 1)
    assert "db-s3cret" in db_url and "redis-s3cret" in private_redis.url
    cluster = make_cluster(broker_url=private_redis.url, database_url=db_url)
    worker = cluster.start_worker("--concurrency", "1", VIDQ_RECONCILE_EVERY_S="1")
    cluster.vidq("submit", str(media.good[0]), "--batch", "masked")
    cluster.wait_done(n=1, timeout=120)
    private_redis.stop()  # connection errors are logged with the broker URL
    cluster.wait_log(cluster.log_of(worker), "Cannot connect to", proc=worker, timeout=60)
    private_redis.start()
    cluster.wait_log(cluster.log_of(worker), "] Connected to ", count=2, proc=worker)
    log = cluster.log_text(worker)
    assert re.search(r"://:\*+@127\.0\.0\.1", log), log[-2000:]  # the URL is logged...
    assert "redis-s3cret" not in log and "db-s3cret" not in log  # ...masked
