"""What ``vidq submit``, ``vidq reconcile`` and ``vidq run`` promise, checked in the
results table and in Redis: manifests, content identity, publish batches, the
broker down at submit time, priorities, and the embedded mode's rows."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis

from tests.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
# Where the backend makes no difference to what is checked, SQLite only: the
# publish batches (COPY on PostgreSQL) and the broker-down path run on both.

QUEUE = "vidq"
DEAD_BROKER = "redis://:s3cret-pw@127.0.0.1:1/0"  # nothing listens on port 1


def queued_messages(cluster: Cluster) -> list[dict]:
    """Every message waiting in the vidq queue (all priority lists), decoded."""
    client = redis.Redis.from_url(cluster.env["VIDQ_BROKER_URL"])
    keys = [QUEUE] + [f"{QUEUE}:{p}" for p in range(1, 10)]
    return [json.loads(raw) for key in keys for raw in client.lrange(key, 0, -1)]


def queued_task_ids(cluster: Cluster) -> list[str]:
    return [m["headers"]["id"] for m in queued_messages(cluster)]


def job_task_ids(cluster: Cluster) -> list[str]:
    return [t for (t,) in cluster.sql("select task_id from jobs order by id")]


def fake_videos(root: Path, n: int, prefix: str = "f") -> list[Path]:
    """Distinct files the producer accepts (it hashes, never decodes them)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{prefix}{i:05d}.mp4" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes(f"{prefix}{i}".encode() + b"\0" * 64)
    return paths


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_csv_jsonl_and_plain_manifests_record_exactly_their_paths(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b, c, d = fake_videos(tmp_path / "media", 4)
    (tmp_path / "list.csv").write_text(f"path,note\n{a},x\n{b},y\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": str(c)}) + "\n\n")
    (tmp_path / "list.txt").write_text(f"# comment\n{d}\n{a}\n")  # a again: listed once
    out = cluster.vidq("submit", "--manifest", str(tmp_path / "list.csv"),
                       "--manifest", str(tmp_path / "list.jsonl"),
                       "--manifest", str(tmp_path / "list.txt"), "--batch", "m")
    assert "4 jobs recorded" in out.stderr, out.stderr
    paths = [p for (p,) in cluster.sql("select path from jobs order by path")]
    assert paths == sorted(str(p) for p in (a, b, c, d))
    assert sorted(queued_task_ids(cluster)) == sorted(job_task_ids(cluster))
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.mp4\n")
    out = cluster.vidq("submit", "--manifest", str(bad), check=False)
    assert out.returncode != 0 and "needs a 'path' column" in out.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_same_content_twice_in_one_submission_is_one_job(
    cluster: Cluster, tmp_path: Path
) -> None:
    (original,) = fake_videos(tmp_path, 1)
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(original.read_bytes())
    out = cluster.vidq("submit", str(original), str(copy), "--batch", "twice")
    assert "1 jobs recorded, 1 already classified" in out.stderr, out.stderr
    assert cluster.sql("select count(*) from jobs") == [(1,)]
    assert len(queued_task_ids(cluster)) == 1


def test_more_than_one_publish_batch_records_and_publishes_every_job_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    n = 2_150  # three publish batches of at most 1,000
    fake_videos(tmp_path / "many", n)
    out = cluster.vidq("submit", str(tmp_path / "many"), "--batch", "big")
    assert f"{n} jobs recorded" in out.stderr, out.stderr
    recorded = job_task_ids(cluster)
    published = queued_task_ids(cluster)
    assert len(recorded) == len(set(recorded)) == n
    assert len(published) == n and set(published) == set(recorded)
    args = sorted(json.loads(base64.b64decode(m["body"]))[0][0]
                  for m in queued_messages(cluster))
    assert args == [i for (i,) in cluster.sql("select id from jobs order by id")]


def test_broker_down_at_submit_records_rows_and_reconcile_publishes_them_later(
    cluster: Cluster, tmp_path: Path
) -> None:
    fake_videos(tmp_path / "media", 3)
    out = cluster.vidq("submit", str(tmp_path / "media"), "--batch", "offline", check=False,
                       VIDQ_BROKER_URL=DEAD_BROKER)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("vidq: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "unreachable" in errors[0] and "vidq reconcile" in errors[0]
    assert "s3cret-pw" not in out.stderr and "redis://:***@127.0.0.1:1/0" in errors[0]
    before = cluster.sql("select id, status, task_id, enqueued_at from jobs order by id")
    assert [r[1] for r in before] == ["queued"] * 3 and all(r[2] for r in before)
    assert queued_task_ids(cluster) == []

    # --dry-run says what it would do and changes nothing, in the table or in Redis.
    dry = cluster.vidq("reconcile", "--older-than", "0", "--dry-run").stdout
    assert "would re-enqueue 0 stale running and 3 lost queued jobs" in dry, dry
    assert cluster.sql("select id, status, task_id, enqueued_at from jobs order by id") == before
    assert queued_task_ids(cluster) == []

    done = cluster.vidq("reconcile", "--older-than", "0").stdout
    assert "re-enqueued 0 stale running and 3 lost queued jobs" in done, done
    assert sorted(queued_task_ids(cluster)) == sorted(job_task_ids(cluster))
    assert [s for (s,) in cluster.sql("select status from jobs")] == ["queued"] * 3
    again = cluster.vidq("reconcile", "--older-than", "0").stdout
    assert "re-enqueued 0 stale running and 0 lost queued jobs" in again  # all accounted for


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_masks_the_database_password(cluster: Cluster) -> None:
    url = "postgresql+psycopg://vidq:db-s3cret@127.0.0.1:1/vidq"  # nothing listens there
    out = cluster.vidq("status", check=False, VIDQ_DATABASE_URL=url)
    assert out.returncode != 0
    assert "db-s3cret" not in out.stdout + out.stderr
    assert "postgresql+psycopg://vidq:***@127.0.0.1:1/vidq" in out.stderr, out.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_higher_priority_jobs_run_first(cluster: Cluster, tmp_path: Path) -> None:
    from tests.media import make_video

    for i in range(6):
        make_video(tmp_path / f"p{i}.mp4", seconds=1.0, width=64, height=48, seed=900 + i)
    low = [str(tmp_path / f"p{i}.mp4") for i in range(3)]
    high = [str(tmp_path / f"p{i}.mp4") for i in range(3, 6)]
    cluster.vidq("submit", *low, "--batch", "low", "--priority", "1")  # queued first
    cluster.vidq("submit", *high, "--batch", "high", "--priority", "9")
    # One job at a time: the order the queue delivers in, not how jobs in flight overlap.
    cluster.start_worker("--concurrency", "1", "--inflight", "1")
    _wait_all_finished(cluster, 6)
    order = [p for (p,) in cluster.sql("select path from jobs order by started_at, id")]
    assert sorted(order[:3]) == sorted(high) and sorted(order[3:]) == sorted(low), order


def _wait_all_finished(cluster: Cluster, n: int, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.sql("select count(*) from jobs where status in ('succeeded', 'failed')") \
                == [(n,)]:
            return
        time.sleep(0.3)
    raise AssertionError(cluster.sql("select id, status from jobs"))


JOB_COLUMNS = (
    "path, content_sha256, size_bytes, status, priority, attempts, error_kind, error_message,"
    " model, weights, weights_id, precision, device, strategy, clips_requested, stride_s,"
    " start_sec, crops, config_key, duration_s, fps, width, height, frames, codec, has_audio,"
    " clips_done, top_class_id, top_label, top_score"
)


def result_table(database_url: str) -> dict[str, list[tuple]]:
    """The results, keyed by path instead of ids; no timestamps, hosts or timings."""
    def sql(query: str) -> list[tuple]:
        return sorted(_sql(database_url, query))
    return {
        "jobs": sql(f"select {JOB_COLUMNS} from jobs"),
        "video_labels": sql("select j.path, v.rank, v.class_id, v.label, v.score"
                            " from video_labels v join jobs j on j.id = v.job_id"),
        "clip_predictions": sql(
            "select j.path, c.clip_index, c.rank, c.start_sec, c.end_sec, c.class_id, c.label,"
            " c.score from clip_predictions c join jobs j on j.id = c.job_id"),
    }


def _sql(database_url: str, query: str) -> list[tuple]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query))]
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_vidq_run_writes_the_same_rows_as_a_celery_worker(
    cluster: Cluster, corpus: Path, tmp_path: Path
) -> None:
    from tests.media import make_random_bytes

    media = tmp_path / "media"
    media.mkdir()
    for name in ("v0.mp4", "v1.mp4", "sub/w0.mkv"):
        (media / Path(name).name).write_bytes((corpus / name).read_bytes())
    make_random_bytes(media / "noise.mp4")  # a failed row too
    args = (str(media), "--strategy", "uniform", "--clips", "2", "--batch", "same")
    cluster.start_worker("--concurrency", "1")
    cluster.vidq("submit", *args, "--wait")
    embedded_db = f"sqlite:///{tmp_path / 'embedded.db'}"
    run = cluster.vidq("run", *args, check=False, VIDQ_DATABASE_URL=embedded_db)
    assert run.returncode == 1 and "3 succeeded, 1 failed" in run.stderr, run.stderr

    via_worker = result_table(cluster.database_url)
    embedded = result_table(embedded_db)
    assert len(via_worker["jobs"]) == 4 and len(via_worker["clip_predictions"]) == 3 * 2 * 5
    for table in ("jobs", "video_labels", "clip_predictions"):
        assert embedded[table] == via_worker[table], table
