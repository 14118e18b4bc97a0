"""The mission end to end: vidq submit -> Redis/Celery -> vidq worker -> SQL table,
on SQLite and on PostgreSQL, with real worker processes."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "schema.md"
TOP_K = 5


def n_videos(corpus: Path) -> int:
    return len([p for p in corpus.rglob("*") if p.suffix in (".mp4", ".mkv")])


def test_submit_directory_classifies_every_video_once(cluster: Cluster, corpus: Path) -> None:
    cluster.start_worker()
    out = cluster.vidq("submit", str(corpus), "--recursive", "--batch", "nightly",
                       "--strategy", "uniform", "--clips", "3", "--wait")
    assert "6 jobs recorded" in out.stderr

    rows = cluster.sql(
        "select status, attempts, weights_id, precision, duration_s, fps, width, height, frames,"
        " top_label, top_score, clips_done, error_kind, path from jobs order by id"
    )
    assert len(rows) == n_videos(corpus) == 6
    for (status, attempts, weights_id, precision, duration, fps, w, h, frames, label, score,
         clips, err, path) in rows:
        assert (status, attempts, err) == ("succeeded", 1, None), path
        assert weights_id == "random-init"  # random weights say so in every job row
        assert precision in ("bf16", "fp32")
        assert (w, h) == (160, 96)
        if path.endswith(".mkv"):
            assert fps == pytest.approx(25) and duration == pytest.approx(2.5, abs=0.05)
            assert frames == pytest.approx(62, abs=1)
        else:
            assert fps == pytest.approx(30) and duration == pytest.approx(3.0, abs=0.05)
        assert clips == 3 and label and 0 < score <= 1
    # Per-clip rows: 3 clips x top-5 per job; video labels: top-5 per job, ranks 1..5.
    assert cluster.sql("select count(*) from clip_predictions") == [(6 * 3 * TOP_K,)]
    per_job = cluster.sql(
        "select job_id, count(*), min(rank), max(rank) from video_labels group by job_id"
    )
    assert sorted(r[1:] for r in per_job) == [(TOP_K, 1, TOP_K)] * 6
    # The quick-poll columns agree with rank 1 of the video labels.
    mismatched = cluster.sql(
        "select count(*) from jobs j join video_labels v on v.job_id = j.id and v.rank = 1"
        " where v.label <> j.top_label or abs(v.score - j.top_score) > 1e-9"
    )
    assert mismatched == [(0,)]
    status = json.loads(cluster.vidq("status", "--batch", "nightly", "--json").stdout)
    assert status["counts"]["succeeded"] == 6 and status["clips_done"] == 18


def test_resubmit_is_a_noop_and_force_reruns(cluster: Cluster, corpus: Path) -> None:
    cluster.start_worker()
    cluster.vidq("submit", str(corpus), "-r", "--batch", "a", "--wait")
    again = cluster.vidq("submit", str(corpus), "-r", "--batch", "b", "--wait")
    assert "0 jobs recorded, 6 already classified" in again.stderr
    # A copy under another name is the same content: still a no-op.
    copy = cluster.workdir / "copy.mp4"
    copy.write_bytes((corpus / "v0.mp4").read_bytes())
    assert "1 already classified" in cluster.vidq("submit", str(copy), "--batch", "c").stderr
    # Other sampling is another question: a new job.
    other = cluster.vidq("submit", str(corpus / "v0.mp4"), "--strategy", "sliding",
                         "--batch", "d", "--wait")
    assert "1 jobs recorded" in other.stderr
    forced = cluster.vidq("submit", str(corpus), "-r", "--batch", "e", "--force", "--wait")
    assert "6 jobs recorded" in forced.stderr
    assert cluster.sql("select count(*) from jobs where status = 'succeeded'") == [(13,)]
    # Each job has its own rows; nothing was duplicated or overwritten.
    assert cluster.sql(
        "select count(*) from (select job_id from video_labels group by job_id"
        " having count(*) <> 5) x"
    ) == [(0,)]


def test_bad_inputs_fail_with_their_kind_and_the_worker_goes_on(
    cluster: Cluster, corpus: Path, tmp_path: Path
) -> None:
    from tests.media import make_audio_only, make_random_bytes, make_truncated

    bad = tmp_path / "bad"
    bad.mkdir()
    make_random_bytes(bad / "noise.mp4")
    make_audio_only(bad / "voice.m4a")
    make_truncated(corpus / "v1.mp4", bad / "cut.mp4")
    good = bad / "good.mp4"
    good.write_bytes((corpus / "v2.mp4").read_bytes())
    cluster.start_worker()
    out = cluster.vidq("submit", str(bad / "noise.mp4"), str(bad / "voice.m4a"),
                       str(bad / "cut.mp4"), str(good), str(bad / "missing.mp4"),
                       "--batch", "bad", "--wait", check=False)
    assert out.returncode == 1
    assert "missing.mp4: no such file." in out.stderr  # reported; nothing enqueued for it
    kinds = dict(cluster.sql("select path, coalesce(error_kind, status) from jobs"))
    assert kinds == {
        str(bad / "noise.mp4"): "not_a_video",
        str(bad / "voice.m4a"): "no_video_stream",
        str(bad / "cut.mp4"): "not_a_video",
        str(good): "succeeded",
    }
    assert all(a == 1 for (a,) in cluster.sql("select attempts from jobs"))  # no retry


@pytest.mark.heavy_on_postgresql
def test_retry_reruns_failed_jobs(cluster: Cluster, corpus: Path) -> None:
    cluster.start_worker(VIDQ_MAX_DURATION_S="1")
    cluster.vidq("submit", str(corpus / "v0.mp4"), str(corpus / "v1.mp4"), "--batch", "r", "--wait")
    failed = cluster.sql("select error_kind, error_message from jobs")
    assert [k for k, _ in failed] == ["over_limit", "over_limit"]
    assert all("VIDQ_MAX_DURATION_S=1" in m for _, m in failed)
    cluster.stop_workers()
    cluster.start_worker()
    assert "2 jobs queued again" in cluster.vidq("retry", "--batch", "r").stdout
    _wait_for(cluster, "select count(*) from jobs where status = 'succeeded'", 2)
    # A retry asked for by a user starts a fresh VIDQ_MAX_ATTEMPTS budget.
    assert cluster.sql("select attempts, error_kind from jobs") == [(1, None), (1, None)]


def test_cancel_keeps_queued_jobs_from_running(cluster: Cluster, corpus: Path) -> None:
    cluster.vidq("submit", str(corpus), "-r", "--batch", "c")  # no worker yet
    assert "6 jobs cancelled" in cluster.vidq("cancel", "--batch", "c").stdout
    cluster.start_worker()
    cluster.vidq("submit", str(corpus / "v0.mp4"), "--batch", "after", "--force", "--wait")
    assert cluster.sql("select status, count(*) from jobs group by status order by status") == [
        ("cancelled", 6), ("succeeded", 1)
    ]
    assert cluster.sql(
        "select count(*) from clip_predictions c join jobs j on j.id = c.job_id"
        " where j.status = 'cancelled'"
    ) == [(0,)]


def test_two_workers_share_the_queue_and_each_job_runs_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    from tests.media import make_video

    media = tmp_path / "many"
    media.mkdir()
    for i in range(12):
        make_video(media / f"m{i:02d}.mp4", seconds=2.2, seed=300 + i)
    cluster.start_worker()
    cluster.start_worker()
    cluster.vidq("submit", str(media), "--batch", "split", "--strategy", "sliding", "--wait")
    rows = cluster.sql("select status, attempts, worker_host from jobs")
    assert len(rows) == 12
    assert all(status == "succeeded" and attempts == 1 for status, attempts, _ in rows)
    hosts = {host for _, _, host in rows}
    assert len(hosts) == 2, hosts  # both worker processes took work
    # Exactly one set of clip rows per job: primary key plus count per job.
    per_job = cluster.sql(
        "select job_id, count(distinct clip_index) from clip_predictions group by job_id")
    assert len(per_job) == 12 and all(n == 2 for _, n in per_job)


def test_results_formats_parse(cluster: Cluster, corpus: Path) -> None:
    cluster.start_worker()
    cluster.vidq("submit", str(corpus), "-r", "--batch", "fmt", "--wait")
    rows = list(csv.DictReader(io.StringIO(
        cluster.vidq("results", "--batch", "fmt", "--format", "csv").stdout)))
    assert len(rows) == 6 and {r["rank"] for r in rows} == {"1"}
    assert all(r["weights_id"] == "random-init" for r in rows)
    lines = cluster.vidq("results", "--batch", "fmt", "--format", "jsonl",
                         "--all-ranks").stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert len(parsed) == 30 and sorted({p["rank"] for p in parsed}) == [1, 2, 3, 4, 5]
    label = parsed[0]["label"]
    filtered = cluster.vidq("results", "--label", label, "--min-score", "0",
                            "--format", "jsonl").stdout
    assert filtered and all(json.loads(x)["label"] == label for x in filtered.splitlines())
    none = cluster.vidq("results", "--label", label, "--min-score", "1.01",
                        "--format", "jsonl").stdout
    assert none == ""
    table = cluster.vidq("results", "--batch", "fmt").stdout.splitlines()
    assert len(table) == 7 and table[0].split()[:3] == ["job", "#", "label"]
    show = json.loads(cluster.vidq("show", "1", "--json").stdout)
    assert show["status"] == "succeeded" and len(show["labels"]) == 5 and show["clips"]


def _known_results(database_url: str) -> None:
    """A results table whose poll answers are known: two batches, every status, two
    failure kinds, archery above and below 0.5, one job's clips inserted out of order."""
    import datetime as dt

    from sqlalchemy import insert

    from vidq.db import Batch, ClipPrediction, Job, VideoLabel, get_engine

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    asked = {"content_sha256": "0" * 64, "size_bytes": 1, "model": "slow_r50",
             "weights": "pretrained", "strategy": "uniform", "clips_requested": 3,
             "config_key": "k", "weights_id": None, "top_label": None, "top_score": None,
             "finished_at": None, "error_kind": None}
    jobs = [  # id, batch, path, status, top label/score, finished, error kind
        (1, 1, "/v/a.mp4", "succeeded", "archery", 0.9, 1, None),
        (2, 1, "/v/b.mp4", "succeeded", "bowling", 0.7, 2, None),
        (3, 1, "/v/c.mp4", "failed", None, None, 4, "not_a_video"),
        (4, 1, "/v/d.mp4", "queued", None, None, None, None),
        (5, 2, "/v/e.mp4", "succeeded", "archery", 0.6, 3, None),
        (6, 2, "/v/f.mp4", "failed", None, None, 5, "not_a_video"),
        (7, 2, "/v/g.mp4", "failed", None, None, 6, "over_limit"),
        (8, 1, "/v/h.mp4", "running", None, None, None, None),
    ]
    labels = [(1, 1, "archery", 0.9), (1, 2, "bowling", 0.05), (2, 1, "bowling", 0.7),
              (2, 2, "archery", 0.2), (5, 1, "archery", 0.6), (5, 2, "bowling", 0.3)]
    clips = [(1, 2, 1, 4.27, 6.4, "archery", 0.95), (1, 0, 1, 0.0, 2.13, "archery", 0.8),
             (1, 1, 2, 2.13, 4.27, "archery", 0.3), (1, 1, 1, 2.13, 4.27, "bowling", 0.6),
             (2, 0, 1, 0.0, 2.13, "bowling", 0.7)]
    engine = get_engine(database_url)
    with engine.begin() as conn:
        conn.execute(insert(Batch), [{"id": 1, "name": "nightly"}, {"id": 2, "name": "other"}])
        conn.execute(insert(Job), [
            {**asked, "id": i, "content_sha256": f"{i:064x}",  # one active job per content
             "batch_id": b, "path": p, "status": st, "top_label": lab,
             "top_score": sc, "weights_id": "sha256:w" if st == "succeeded" else None,
             "finished_at": None if fin is None else t0 + dt.timedelta(minutes=fin),
             "error_kind": kind}
            for i, b, p, st, lab, sc, fin, kind in jobs
        ])
        conn.execute(insert(VideoLabel), [
            {"job_id": j, "rank": r, "class_id": 0, "label": lab, "score": sc}
            for j, r, lab, sc in labels
        ])
        conn.execute(insert(ClipPrediction), [
            {"job_id": j, "clip_index": c, "rank": r, "start_sec": a, "end_sec": b,
             "class_id": 0, "label": lab, "score": sc}
            for j, c, r, a, b, lab, sc in clips
        ])


def test_readme_polls_answer_correctly_on_known_results(
    cluster: Cluster, database_url: str
) -> None:
    _known_results(database_url)
    blocks = re.findall(r"```sql\n(.*?)```", SCHEMA_DOC.read_text(), flags=re.S)
    statements = [s.strip() for b in blocks for s in b.split(";") if s.strip()]
    assert len(statements) == 5, "docs/reference/schema.md shows five polls; update this test"
    progress, archery, timeline, failures, newest = (cluster.sql(s) for s in statements)

    assert sorted(progress) == [("failed", 1), ("queued", 1), ("running", 1), ("succeeded", 2)]
    assert [(i, p) for i, p, _sc in archery] == [(1, "/v/a.mp4"), (5, "/v/e.mp4")]
    assert [sc for _i, _p, sc in archery] == pytest.approx([0.9, 0.6])
    assert [(c, lab) for c, _a, _b, lab, _sc in timeline] == [
        (0, "archery"), (1, "bowling"), (2, "archery")
    ]
    assert [(a, b) for _c, a, b, _lab, _sc in timeline] == [
        pytest.approx((0.0, 2.13)), pytest.approx((2.13, 4.27)), pytest.approx((4.27, 6.4))
    ]
    assert sorted(failures) == [("not_a_video", 2, "/v/c.mp4"), ("over_limit", 1, "/v/g.mp4")]
    assert [(i, p, lab) for i, p, lab, _sc, _w, _f in newest] == [
        (5, "/v/e.mp4", "archery"), (2, "/v/b.mp4", "bowling"), (1, "/v/a.mp4", "archery")
    ]
    assert all(w == "sha256:w" and f is not None for *_x, w, f in newest)


def _wait_for(cluster: Cluster, query: str, expected: int, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.sql(query) == [(expected,)]:
            return
        time.sleep(0.3)
    raise AssertionError(f"{query} never reached {expected}: {cluster.sql(query)}")
