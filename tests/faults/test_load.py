"""A thousand small jobs through two workers, one of them SIGKILLed part-way and
replaced: every job ends exactly once. Prints (and writes to JSON) the figures:

    python -m pytest tests/faults/test_load.py -m faults -s
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.faults.harness import TOP_K, FaultCluster
from tests.media import make_video

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(1200)]

N_JOBS = 1000
KILL_AFTER = N_JOBS // 3
STALL_S = 90


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_JOBS distinct (by content: the producer dedupes by hash) 2 s, 64x48 videos."""
    root = tmp_path_factory.mktemp("load-media")
    for i in range(N_JOBS):
        make_video(root / f"tiny_{i:04d}.mp4", seconds=2, fps=10, width=64, height=48,
                   seed=100_000 + i)
    return root


def count(cluster: FaultCluster, where: str) -> int:
    return int(cluster.sql(f"select count(*) from jobs where {where}")[0][0])


# PostgreSQL: the backend for many workers; SQLite serializes every write.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_thousand_jobs_with_a_worker_killed_and_replaced_each_run_once(
    cluster: FaultCluster, tiny_videos: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    # Reconcile every 2 s; a queued job whose message a dead worker took counts as
    # lost after 10 s (600 s by default).
    cluster.env.update(VIDQ_RECONCILE_EVERY_S="2", VIDQ_RECONCILE_AFTER_S="10")
    victim, survivor = cluster.start_workers(2, "--concurrency", "1")
    out = cluster.vidq("submit", str(tiny_videos), "--batch", "load", timeout=300)
    assert f"{N_JOBS} jobs recorded" in out.stderr, out.stderr

    cluster.wait_for(lambda: count(cluster, "status = 'succeeded'") >= KILL_AFTER,
                     timeout=300, what=f"{KILL_AFTER} jobs done", poll_s=1)
    running_at_kill = count(cluster, "status = 'running'")
    cluster.kill_group(victim)  # SIGKILL, whatever it is doing
    killed_at = count(cluster, "status in ('succeeded', 'failed')")
    cluster.start_worker("--concurrency", "1")

    # Until every job has ended, or none has for STALL_S: a stranded job is
    # re-enqueued well within that (running: stale after 8 s; queued: after 10 s).
    finished, last_progress = -1, time.monotonic()
    while count(cluster, "status in ('queued', 'running')"):
        now_finished = count(cluster, "status in ('succeeded', 'failed')")
        if now_finished != finished:
            finished, last_progress = now_finished, time.monotonic()
        elif time.monotonic() - last_progress > STALL_S:
            break
        time.sleep(1)
    elapsed = time.monotonic() - started

    results = cluster.result_sets()
    reenqueued = [tuple(map(int, m)) for m in re.findall(
        r"reconcile: re-enqueued (\d+) stale running and (\d+) lost queued", cluster.all_logs())]
    clips_done = dict(cluster.sql("select id, clips_done from jobs where status = 'succeeded'"))
    figures = {
        "jobs_submitted": count(cluster, "1 = 1"),
        "succeeded": count(cluster, "status = 'succeeded'"),
        "failed": count(cluster, "status = 'failed'"),
        "lost": count(cluster, "status in ('queued', 'running')"),
        "duplicated": sum(1 for labels, _rows, _clips in results.values() if labels > TOP_K),
        "wrong_result_rows": sum(
            1 for job_id, n in clips_done.items()
            if results.get(job_id, (0, 0, 0)) != (TOP_K, n * TOP_K, n)
        ),
        "attempts_gt_1": count(cluster, "attempts > 1"),
        "max_attempts": int(cluster.sql("select max(attempts) from jobs")[0][0]),
        "reenqueued_stale_running": sum(r for r, _q in reenqueued),
        "reenqueued_lost_queued": sum(q for _r, q in reenqueued),
        "finished_when_killed": killed_at,
        "running_when_killed": running_at_kill,
        "workers": 2,
        "worker_killed": 1,
        "worker_replaced": 1,
        "elapsed_s": round(elapsed, 1),
        "jobs_per_s": round(N_JOBS / elapsed, 2),
    }
    report = tmp_path / "load-figures.json"
    report.write_text(json.dumps(figures, indent=2))
    print(f"\nload run figures ({report}):\n{report.read_text()}")

    assert figures["jobs_submitted"] == N_JOBS
    assert figures["lost"] == 0, figures
    assert figures["duplicated"] == 0 and figures["wrong_result_rows"] == 0, figures
    assert figures["failed"] == 0 and figures["succeeded"] == N_JOBS, figures
    assert survivor.poll() is None
