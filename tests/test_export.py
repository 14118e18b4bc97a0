"""``vidq export`` on real SQLite and PostgreSQL databases filled with SQL.

- Memory stays flat: the export subprocess's peak RSS for a batch of 2,000,000
  clip rows is within 1.3x of its peak for 500,000 (SQLite), and likewise for
  200,000 and 800,000 rows on PostgreSQL, where only a server-side cursor keeps
  it flat (psycopg's default cursor holds the whole result).
- pyarrow reads the files back: row counts, row groups, and values recomputed
  from the formula that generated the rows; JSON lines and CSV hold the same rows.
- A missing batch and an unsupported URL are one line each (exports to object
  storage: tests/e2e/test_object_storage.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.services import new_database
from vidq.db import make_engine
from vidq.migrate import upgrade

pq = pytest.importorskip("pyarrow.parquet")

CLIPS_PER_JOB, RANKS = 100, 5
ROWS_PER_JOB = CLIPS_PER_JOB * RANKS

# Peak RSS of the child the launcher waits for (KiB on Linux), printed on stdout.
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], stdout=sys.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def fill_batch(url: str, name: str, jobs: int) -> None:
    """``jobs`` succeeded jobs with 100 clips x top-5 each, top-5 video labels and two
    segments, all made by SQL from a formula (portable between SQLite and PostgreSQL)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("insert into batches (name, created_at) values (:n, current_timestamp)"),
                     {"n": name})
        bid = conn.execute(text("select id from batches where name = :n"), {"n": name}).scalar()
        conn.execute(text(
            "with recursive n(i) as (select 1 union all select i + 1 from n where i < :jobs) "
            "insert into jobs (batch_id, path, content_sha256, size_bytes, status, priority, "
            " attempts, submitted_at, finished_at, model, weights, strategy, clips_requested, "
            " start_sec, crops, config_key, duration_s, clips_done, top_class_id, top_label, "
            " top_score) "
            "select :b, '/media/' || :name || '/' || i || '.mp4', 'sha' || i, 1000 + i, "
            " 'succeeded', 5, 1, current_timestamp, current_timestamp, 'x3d_xs', 'random', "
            " 'sliding', 1, 0, 1, 'k', 80.8, :clips, i % 400, 'label_' || (i % 400), 0.5 "
            "from n"), {"jobs": jobs, "b": bid, "name": name, "clips": CLIPS_PER_JOB})
        conn.execute(text(
            "with recursive c(i) as (select 0 union all select i + 1 from c where i < :last), "
            "r(i) as (select 1 union all select i + 1 from r where i < :ranks) "
            "insert into clip_predictions (job_id, clip_index, rank, start_sec, end_sec, "
            " class_id, label, score) "
            "select j.id, c.i, r.i, c.i * 0.8, c.i * 0.8 + 1.6, (j.id * 7 + c.i + r.i) % 400, "
            " 'label_' || ((j.id * 7 + c.i + r.i) % 400), 1.0 / (r.i + 1) "
            "from jobs j cross join c cross join r where j.batch_id = :b"),
            {"last": CLIPS_PER_JOB - 1, "ranks": RANKS, "b": bid})
        conn.execute(text(
            "with recursive r(i) as (select 1 union all select i + 1 from r where i < :ranks) "
            "insert into video_labels (job_id, rank, class_id, label, score) "
            "select j.id, r.i, (j.id + r.i) % 400, 'label_' || ((j.id + r.i) % 400), "
            " 1.0 / (r.i + 1) from jobs j cross join r where j.batch_id = :b"),
            {"ranks": RANKS, "b": bid})
        conn.execute(text(
            "with recursive s(i) as (select 0 union all select i + 1 from s where i < 1) "
            "insert into label_segments (job_id, segment_index, class_id, label, start_sec, "
            " end_sec, duration_s, mean_score, peak_score, clips) "
            "select j.id, s.i, 5, 'archery', s.i * 40.0, s.i * 40.0 + 12.5, 12.5, 0.6, 0.9, 15 "
            "from jobs j cross join s where j.batch_id = :b"), {"b": bid})
    engine.dispose()


def export(url: str, batch: str, fmt: str, out: Path) -> tuple[int, float, str]:
    """Run ``vidq export`` as a user would; returns (peak RSS KiB, seconds, its stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "vidq.cli", "export",
         "--batch", batch, "--format", fmt, "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "VIDQ_DATABASE_URL": url})
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip()), time.perf_counter() - t0, proc.stderr


def check_parquet(out: Path, jobs: int) -> None:
    clips = pq.ParquetFile(out / "clips.parquet")
    assert clips.metadata.num_rows == jobs * ROWS_PER_JOB
    if jobs * ROWS_PER_JOB > 65_536:
        assert clips.metadata.num_row_groups == -(-jobs * ROWS_PER_JOB // 65_536)
    assert clips.schema_arrow.names == ["job_id", "clip_index", "rank", "start_sec", "end_sec",
                                        "class_id", "label", "score"]
    # The first and the last row group, checked against the generating formula.
    for group in (0, clips.metadata.num_row_groups - 1):
        for row in clips.read_row_group(group).to_pylist()[:: 997]:
            j, c, r = row["job_id"], row["clip_index"], row["rank"]
            assert row["class_id"] == (j * 7 + c + r) % 400
            assert row["label"] == f"label_{(j * 7 + c + r) % 400}"
            assert row["start_sec"] == pytest.approx(c * 0.8)
            assert row["end_sec"] == pytest.approx(c * 0.8 + 1.6)
            assert row["score"] == pytest.approx(1 / (r + 1))
    last = clips.read_row_group(clips.metadata.num_row_groups - 1).to_pylist()[-1]
    assert (last["clip_index"], last["rank"]) == (CLIPS_PER_JOB - 1, RANKS)

    videos = pq.read_table(out / "videos.parquet").to_pylist()
    assert len(videos) == jobs
    ids = [v["job_id"] for v in videos]
    assert ids == sorted(ids) and len(set(ids)) == jobs
    for v in videos[:: max(1, jobs // 50)]:
        n = int(v["path"].rsplit("/", 1)[1].split(".")[0])
        assert v["size_bytes"] == 1000 + n and v["top_label"] == f"label_{n % 400}"
        assert v["status"] == "succeeded" and v["clips_done"] == CLIPS_PER_JOB
        for rank in range(1, RANKS + 1):
            assert v[f"class_id_{rank}"] == (v["job_id"] + rank) % 400
            assert v[f"score_{rank}"] == pytest.approx(1 / (rank + 1))
        assert v["finished_at"] is not None and v["finished_at"].tzinfo is not None
    segments = pq.read_table(out / "segments.parquet")
    assert segments.num_rows == 2 * jobs
    assert set(segments.column("duration_s").to_pylist()) == {12.5}


def _peaks(url: str, tmp_path: Path, batches: list[tuple[str, int]]) -> list[int]:
    peaks = []
    for name, jobs in batches:
        out = tmp_path / name
        peak, seconds, _stderr = export(url, name, "parquet", out)
        check_parquet(out, jobs)
        rows = jobs * ROWS_PER_JOB
        print(f"{url.split(':')[0]}: {rows:,} clip rows exported in {seconds:.1f}s, "
              f"peak RSS {peak / 1024:.0f} MiB")
        peaks.append(peak)
    return peaks


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("kind", "small_jobs", "large_jobs"), [
    ("sqlite", 1_000, 4_000),  # 500,000 and 2,000,000 clip rows
    # PostgreSQL: only a server-side cursor keeps this flat (psycopg's default cursor
    # holds the whole result). 200,000 and 800,000 clip rows.
    ("postgresql", 400, 1_600),
])
def test_export_memory_stays_flat_as_the_rows_grow(
    kind: str, small_jobs: int, large_jobs: int, tmp_path: Path,
) -> None:
    with new_database(kind, tmp_path) as url:
        _upgrade(url)
        fill_batch(url, "small", small_jobs)
        fill_batch(url, "large", large_jobs)
        small, large = _peaks(url, tmp_path, [("small", small_jobs), ("large", large_jobs)])
    assert large < 1.3 * small, f"peak RSS grew with the rows: {small} KiB -> {large} KiB"


def test_jsonl_and_csv_hold_the_same_rows_as_parquet(database_url: str, tmp_path: Path
                                                     ) -> None:
    fill_batch(database_url, "b", 3)
    for fmt in ("parquet", "jsonl", "csv"):
        _peak, _s, stderr = export(database_url, "b", fmt, tmp_path / fmt)
        assert "exported" in stderr
    for table in ("videos", "clips", "segments"):
        expected = pq.read_table(tmp_path / "parquet" / f"{table}.parquet").to_pylist()
        lines = (tmp_path / "jsonl" / f"{table}.jsonl").read_text().splitlines()
        as_json = [json.loads(line) for line in lines]
        with open(tmp_path / "csv" / f"{table}.csv", newline="") as f:
            as_csv = list(csv.DictReader(f))
        assert len(expected) == len(as_json) == len(as_csv) > 0
        for want, got_json, got_csv in zip(expected, as_json, as_csv):
            assert list(got_json) == list(want) == list(got_csv)
            for key, value in want.items():
                if hasattr(value, "isoformat"):
                    assert got_json[key] == got_csv[key] == value.isoformat()
                elif isinstance(value, float):
                    assert got_json[key] == value and float(got_csv[key]) == value
                elif value is None:
                    assert got_json[key] is None and got_csv[key] == ""
                else:
                    assert got_json[key] == value and got_csv[key] == str(value)
    assert not list(tmp_path.glob("*/.*.partial"))  # temporary files renamed or removed


def test_a_missing_batch_or_an_unsupported_url_is_one_line(database_url: str, tmp_path: Path
                                                           ) -> None:
    env = {**os.environ, "VIDQ_DATABASE_URL": database_url}
    fill_batch(database_url, "b", 1)
    for args, needle in (
        (["--batch", "nope", "--out", str(tmp_path / "x")], "no batch named 'nope'"),
        (["--batch", "nope", "--out", "s3://bucket/x"], "no batch named 'nope'"),
        (["--batch", "b", "--out", "ftp://host/x"], "'ftp://' is not an object store"),
    ):
        proc = subprocess.run([sys.executable, "-m", "vidq.cli", "export", *args],
                              capture_output=True, text=True, timeout=120, check=False,
                              env=env)
        assert proc.returncode == 2 and needle in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def _upgrade(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
