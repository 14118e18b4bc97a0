"""``celery -A worker.tasks worker`` keeps working with Celery's own pools: prefork
(a pipeline per child, one job at a time each) and threads (jobs in flight)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import READY_LINE, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_the_plain_celery_command_runs_jobs(cluster: Cluster, corpus: Path, pool: str) -> None:
    log = cluster.workdir / f"celery-{pool}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", f"--pool={pool}",
         "--concurrency=2", "--loglevel=INFO", "--without-mingle"],
        env=cluster.env, cwd=cluster.workdir, stdout=open(log, "wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        cluster.wait_log(log, READY_LINE, proc=proc)
        cluster.vidq("submit", str(corpus), "--recursive", "--batch", pool, "--wait",
                     timeout=240)
        rows = cluster.sql("select status, count(*) from jobs group by status")
        assert rows == [("succeeded", 6)]
        assert cluster.sql("select count(*) from video_labels") == [(6 * 5,)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
