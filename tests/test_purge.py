"""`vidq purge` on real SQLite and PostgreSQL: finished jobs go with their rows, in
chunks; active jobs stay; --dry-run changes nothing; emptied batches go too."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

from sqlalchemy import create_engine, text

from tests.cli import run_vidq


def fill(url: str) -> None:
    engine = create_engine(url)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    new = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    with engine.begin() as conn:
        for bid, name in ((1, "old"), (2, "new")):
            conn.execute(text("insert into batches (id, name, created_at, notify_attempts) "
                              "values (:i, :n, :t, 0)"),
                         {"i": bid, "n": name, "t": old if bid == 1 else new})
        jid = 0
        for bid, finished, statuses in ((1, old, ["succeeded"] * 5 + ["failed", "running"]),
                                        (2, new, ["succeeded"] * 3 + ["queued"])):
            for status in statuses:
                jid += 1
                conn.execute(text(
                    "insert into jobs (id, batch_id, path, content_sha256, size_bytes, status, "
                    "priority, attempts, submitted_at, finished_at, model, weights, strategy, "
                    "clips_requested, start_sec, crops, config_key) values (:id, :b, :p, :h, 1, "
                    ":s, 5, 1, :t, :f, 'x3d_xs', 'random', 'single', 1, 0, 1, 'k')"),
                    {"id": jid, "b": bid, "p": f"/v{jid}.mp4", "h": f"{jid:064x}", "s": status,
                     "t": finished - dt.timedelta(hours=1),
                     "f": finished if status in ("succeeded", "failed") else None})
                if status == "succeeded":
                    conn.execute(text(
                        "insert into label_segments (job_id, segment_index, class_id, label, "
                        "start_sec, end_sec, duration_s, mean_score, peak_score, clips) "
                        "values (:j, 0, 1, 'a', 0, 2, 2, .5, .5, 2)"), {"j": jid})
                    conn.execute(text(
                        "insert into video_embeddings (job_id, model, weights_id, dim, norm, "
                        "vector) values (:j, 'x3d_xs', 'random-init', 2, 1, :v)"),
                        {"j": jid, "v": b"\0\0\0\0"})
                    for clip in range(2):
                        conn.execute(text(
                            "insert into clip_embeddings (job_id, clip_index, start_sec, "
                            "end_sec, vector) values (:j, :c, 0, 1, :v)"),
                            {"j": jid, "c": clip, "v": b"\0\0\0\0"})
                    for rank in range(1, 6):
                        conn.execute(text("insert into video_labels values (:j, :r, 1, 'a', .5)"),
                                     {"j": jid, "r": rank})
                        for clip in range(2):
                            conn.execute(text("insert into clip_predictions values "
                                              "(:j, :c, :r, 0, 1, 1, 'a', .5)"),
                                         {"j": jid, "c": clip, "r": rank})
    engine.dispose()


def vidq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_vidq(*args, env={**os.environ, "VIDQ_DATABASE_URL": url})


TABLES = ("jobs", "clip_predictions", "video_labels", "batches", "label_segments",
          "video_embeddings", "clip_embeddings")


def counts(url: str) -> tuple[int, ...]:
    """Rows in each of TABLES."""
    engine = create_engine(url)
    with engine.connect() as conn:
        out = tuple(conn.execute(text(f"select count(*) from {t}")).scalar_one() for t in TABLES)
    engine.dispose()
    return out


def test_purge_older_than_keeps_active_and_recent_jobs(database_url: str) -> None:
    fill(database_url)
    before = counts(database_url)
    dry = vidq(database_url, "purge", "--older-than", "30", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # 5 succeeded jobs, each with 1 segment, 1 video and 2 clip embeddings; 1 failed.
    assert ("would delete 6 jobs, 50 clip rows, 25 label rows and 0 empty batches; "
            "with the jobs 5 segment rows and 15 embedding rows") in dry.stdout
    assert counts(database_url) == before
    done = vidq(database_url, "purge", "--older-than", "30", "--chunk", "2")
    assert done.returncode == 0, done.stderr
    assert ("deleted 6 jobs, 50 clip rows, 25 label rows and 0 empty batches; "
            "with the jobs 5 segment rows and 15 embedding rows") in done.stdout
    assert "kept 1 queued or running jobs" in done.stderr
    assert counts(database_url) == (before[0] - 6, before[1] - 50, before[2] - 25, 2,
                                    before[4] - 5, before[5] - 5, before[6] - 10)


def test_purge_a_batch_removes_it_once_empty(database_url: str) -> None:
    fill(database_url)
    out = vidq(database_url, "purge", "--batch", "new")
    assert "deleted 3 jobs" in out.stdout and "kept 1 queued" in out.stderr
    assert counts(database_url)[3] == 2  # the queued job keeps its batch
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("update jobs set status = 'cancelled' where status = 'queued'"))
    engine.dispose()
    out = vidq(database_url, "purge", "--batch", "new")
    assert "deleted 1 jobs" in out.stdout and "1 empty batches (new)" in out.stdout
    assert counts(database_url)[3] == 1
    missing = vidq(database_url, "purge", "--batch", "nope")
    assert missing.returncode == 2 and "no batch named 'nope'" in missing.stderr
