"""Many small jobs through two workers, one of them SIGKILLed part-way (held at a
claimed job, so exactly one job is in flight when it dies) and replaced: every
job ends exactly once. Prints (and writes to JSON) the figures.

CI runs 150 jobs. The README's figure is the full run of 1,000:

    VIDQ_TEST_LOAD_JOBS=1000 python -m pytest tests/faults/test_load.py -s
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from tests.faults.harness import TOP_K, FaultCluster
from tests.media import make_video
from vidq.reconcile import UNACKED_KEY

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(1200)]

N_JOBS = int(os.environ.get("VIDQ_TEST_LOAD_JOBS", "150"))
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


def unclaimed_deliveries(cluster: FaultCluster) -> dict[int, str]:
    """Queued jobs (id -> task id) whose message sits in Redis' unacked hash."""
    client = redis.Redis.from_url(cluster.env["VIDQ_BROKER_URL"])
    try:
        delivered = {_task_id(raw) for _tag, raw in client.hscan_iter(UNACKED_KEY)}
    finally:
        client.close()
    return {j: t for j, t in cluster.sql("select id, task_id from jobs where status = 'queued'")
            if t in delivered}


def _task_id(raw: bytes) -> str:
    return str(json.loads(raw)[0]["headers"]["id"])


def repeated(items: list[object]) -> int:
    """How many distinct items occur more than once."""
    return sum(1 for n in Counter(items).values() if n > 1)


# PostgreSQL: the backend for many workers; SQLite serializes every write.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_many_jobs_with_a_worker_killed_and_replaced_each_run_once(
    cluster: FaultCluster, tiny_videos: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    # Reconcile every 2 s; a queued job whose message a dead worker took counts as
    # lost after 10 s (600 s by default).
    cluster.env.update(VIDQ_RECONCILE_EVERY_S="2", VIDQ_RECONCILE_AFTER_S="10")
    hold = cluster.hold("after_claim", "-victim")
    victim = cluster.start_worker("--concurrency", "1", ready=False, **hold.env())
    survivor = cluster.start_worker("--concurrency", "1", ready=False)
    for proc in (victim, survivor):
        cluster.wait_log(cluster.log_of(proc), "ready:", proc=proc)
    out = cluster.vidq("submit", str(tiny_videos), "--batch", "load", timeout=300)
    assert f"{N_JOBS} jobs recorded" in out.stderr, out.stderr

    cluster.wait_for(lambda: count(cluster, "status = 'succeeded'") >= KILL_AFTER,
                     timeout=600, what=f"{KILL_AFTER} jobs done", poll_s=1)
    hold.engage()
    held_pid = cluster.wait_held(hold)  # the victim has claimed a job and holds it
    cluster.kill_group(victim)  # SIGKILL of the whole worker, mid-job
    hold.release()
    # What the dead process left running: the held job, and any other job it had in
    # flight (a pipeline may run several at once). Each must be re-enqueued once.
    stranded = int(cluster.sql("select count(*) from jobs where status = 'running'"
                               " and worker_host like :host", host=f"%:{held_pid}")[0][0])
    killed_at = count(cluster, "status in ('succeeded', 'failed')")
    # Messages delivered (unacked) but whose job is not claimed yet: the dead
    # pipeline's reserved ones, and any the survivor has just taken. Only these may
    # come back as "lost queued" (after VIDQ_RECONCILE_AFTER_S).
    delivered_unclaimed = unclaimed_deliveries(cluster)
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

    logs = cluster.all_logs()
    reenqueued = [tuple(map(int, m)) for m in re.findall(
        r"reconcile: re-enqueued (\d+) stale running and (\d+) lost queued", logs)]
    # Where a duplicate could appear: a job committed by two attempts (each commit
    # logs "job N succeeded"), a Celery task id that ran to success twice, clip rows
    # beyond the clips planned (x3d_xs, strategy single: 1 clip of a 2 s video), or
    # two jobs sharing a task id.
    commits = re.findall(r"job (\d+) succeeded", logs)
    task_runs = re.findall(r"Task vidq\.classify\[([^\]]+)\] succeeded in", logs)
    clip_rows = dict(cluster.sql("select job_id, count(*) from clip_predictions group by job_id"))
    label_rows = dict(cluster.sql("select job_id, count(*) from video_labels group by job_id"))
    succeeded = [j for (j,) in cluster.sql("select id from jobs where status = 'succeeded'")]
    task_ids = [t for (t,) in cluster.sql("select task_id from jobs")]
    # A re-enqueue gives the job a new task id: those of queued rows are the lost ones.
    requeued_queued = {j for j, t in cluster.sql("select id, task_id from jobs")
                       if j in delivered_unclaimed and t != delivered_unclaimed[j]}
    figures = {
        "jobs_submitted": count(cluster, "1 = 1"),
        "succeeded": len(succeeded),
        "failed": count(cluster, "status = 'failed'"),
        "lost": count(cluster, "status in ('queued', 'running')"),
        "duplicated_commits": repeated(commits),
        "duplicated_task_runs": repeated(task_runs),
        "duplicated_task_ids": repeated(task_ids),
        "jobs_with_wrong_result_rows": sum(
            1 for j in succeeded if (clip_rows.get(j), label_rows.get(j)) != (TOP_K, TOP_K)
        ),
        "commits_logged": len(commits),
        "attempts_gt_1": count(cluster, "attempts > 1"),
        "max_attempts": int(cluster.sql("select max(attempts) from jobs")[0][0]),
        "reenqueued_stale_running": sum(r for r, _q in reenqueued),
        "reenqueued_lost_queued": sum(q for _r, q in reenqueued),
        "finished_when_killed": killed_at,
        "stranded_when_killed": stranded,
        "delivered_unclaimed_when_killed": len(delivered_unclaimed),
        "workers": 2,
        "worker_killed": 1,
        "worker_replaced": 1,
        "elapsed_s": round(elapsed, 1),
        "jobs_per_s": round(N_JOBS / elapsed, 2),
    }
    report = tmp_path / "load-figures.json"
    report.write_text(json.dumps(figures, indent=2))
    print(f"\nload run figures ({report}):\n{report.read_text()}")

    # The README's line: N submitted, N succeeded, 0 failed, 0 lost, 0 duplicated;
    # the job(s) the killed worker held re-enqueued once each (attempts 2): 1 where a
    # worker process runs one job at a time.
    assert figures["jobs_submitted"] == N_JOBS
    assert figures["lost"] == 0, figures
    assert figures["failed"] == 0 and figures["succeeded"] == N_JOBS, figures
    # (A commit may land just before the SIGKILL, its log line not yet written.)
    assert figures["duplicated_commits"] == 0 and figures["commits_logged"] <= N_JOBS, figures
    assert figures["duplicated_task_runs"] == 0 and figures["duplicated_task_ids"] == 0, figures
    assert figures["jobs_with_wrong_result_rows"] == 0, figures
    assert stranded >= 1, figures
    assert figures["reenqueued_stale_running"] == stranded, figures
    # A message the dead process had taken but not claimed stays unacked in Redis for
    # the visibility timeout (hours): reconcile re-enqueues it, once, and nothing else.
    assert figures["reenqueued_lost_queued"] == len(requeued_queued), figures
    assert requeued_queued <= set(delivered_unclaimed), figures
    assert figures["attempts_gt_1"] == stranded and figures["max_attempts"] == 2, figures
    assert survivor.poll() is None
