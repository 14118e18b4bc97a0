"""Label segments (vidq/segments.py) on real SQLite and PostgreSQL databases (the rules
alone, on hand-made clip predictions: tests/unit/test_segment_rules.py):

- the segments are written in the job's results transaction: a forced re-run of the
  job replaces them, and a delivery whose lease was lost writes none;
- ``vidq segments`` and the README's "lasts at least 10 s" SQL find them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.cli import run_vidq
from vidq.segments import Segment, SegmentRules, derive_segments

# -- on real databases ---------------------------------------------------------------------------


def _result(scores: list[float], *, span: float = 2.0) -> object:
    """A VideoResult as a worker hands it to JobStore.succeed: archery at ``scores`` per
    window of ``span`` seconds, bowling at (1 - score) / 2 beside it."""
    from vidq.sampling import Sampling
    from worker.results import ClipScores, LabelScore, VideoInfo, VideoResult

    clips = [
        ClipScores(index=i, start_sec=i * span, end_sec=(i + 1) * span, source_frames=60,
                       top=sorted([LabelScore(5, "archery", s),
                                   LabelScore(31, "bowling", (1 - s) / 2)],
                                  key=lambda t: -t.score))
        for i, s in enumerate(scores)
    ]
    info = VideoInfo(duration_s=len(scores) * span, fps=30.0, width=160, height=96,
                     frames=int(len(scores) * span * 30), codec="h264", has_audio=False)
    return VideoResult(path="/v.mp4", model="x3d_xs", weights_id="random-init",
                       precision="fp32", device="cpu", info=info,
                       sampling=Sampling(strategy="sliding"), clips=clips,
                       top=[LabelScore(5, "archery", 0.6), LabelScore(31, "bowling", 0.4)])


def _segments(url: str, job_id: int) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(
                "select segment_index, label, start_sec, end_sec, duration_s, clips "
                "from label_segments where job_id = :j order by segment_index"), {"j": job_id})]
    finally:
        engine.dispose()


@pytest.fixture
def recorded_job(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[str, int]:
    from producer.submit import JobRequest, submit
    from tests.media import make_video
    from vidq.settings import Settings

    for name in ("VIDQ_SEGMENT_MIN_SCORE", "VIDQ_SEGMENT_MIN_S", "VIDQ_SEGMENT_MAX_GAP_S"):
        monkeypatch.delenv(name, raising=False)
    video = tmp_path / "v.mp4"
    make_video(video, seconds=1)
    settings = Settings.from_env({}, database_url=database_url)
    report = submit([str(video)], settings=settings, batch="seg", publish=False,
                    request=JobRequest(model="x3d_xs", weights="random"))
    return database_url, report.job_ids[0]


def test_a_forced_rerun_replaces_the_segments_and_a_lost_lease_writes_none(
    recorded_job: tuple[str, int],
) -> None:
    from producer.query import requeue
    from vidq.db import sessions
    from worker.jobs import JobStore

    url, job_id = recorded_job
    store = JobStore(url, stale_after_s=60)
    from vidq.db import Job

    assert isinstance(store.claim(job_id, "a" * 32, "h"), Job)
    # Archery 0-4 s and 6-12 s; bowling only where archery dips (4-6 s).
    assert store.succeed(job_id, "a" * 32, _result([0.9, 0.8, 0.1, 0.7, 0.8, 0.9]))
    first = _segments(url, job_id)
    assert [(r[1], r[2], r[3], r[5]) for r in first] == [
        ("archery", 0.0, 4.0, 2), ("bowling", 4.0, 6.0, 1), ("archery", 6.0, 12.0, 3)]
    assert [r[0] for r in first] == [0, 1, 2] and first[2][4] == pytest.approx(6.0)

    # The same delivery again, after it succeeded: refused, nothing written twice.
    assert not store.succeed(job_id, "a" * 32, _result([0.9] * 6))
    assert _segments(url, job_id) == first

    # Forced re-run of the same job (requeue a succeeded job) with other predictions.
    with sessions(url)() as session, session.begin():
        assert len(requeue(session, batch="seg", statuses=("succeeded",), queue="vidq")) == 1
    store.claim(job_id, "b" * 32, "h")
    # A stale delivery holding the old token cannot write over the new attempt.
    assert not store.succeed(job_id, "a" * 32, _result([0.9] * 6))
    assert store.succeed(job_id, "b" * 32, _result([0.2, 0.9, 0.9, 0.9]))
    assert [(r[1], r[2], r[3], r[5]) for r in _segments(url, job_id)] == [
        ("bowling", 0.0, 2.0, 1), ("archery", 2.0, 8.0, 3)]
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from label_segments")).scalar_one() == 2
    engine.dispose()


def test_segments_commit_or_roll_back_with_the_rest_of_the_result(
    recorded_job: tuple[str, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vidq.segments
    from worker.jobs import JobStore

    url, job_id = recorded_job
    store = JobStore(url, stale_after_s=60)
    store.claim(job_id, "a" * 32, "h")

    def broken(*_args: object) -> list[Segment]:
        raise RuntimeError("segments could not be derived")

    monkeypatch.setattr(vidq.segments, "derive_segments", broken)
    with pytest.raises(RuntimeError):
        store.succeed(job_id, "a" * 32, _result([0.9, 0.8]))
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("select status from jobs")).scalar_one() == "running"
        for table in ("clip_predictions", "video_labels", "label_segments"):
            assert conn.execute(text(f"select count(*) from {table}")).scalar_one() == 0
    engine.dispose()
    monkeypatch.undo()
    assert store.succeed(job_id, "a" * 32, _result([0.9, 0.8]))
    assert [r[1:4] for r in _segments(url, job_id)] == [("archery", 0.0, 4.0)]


def test_the_cli_and_the_readme_sql_find_long_segments(
    recorded_job: tuple[str, int],
) -> None:
    from worker.jobs import JobStore

    url, job_id = recorded_job
    store = JobStore(url, stale_after_s=60)
    store.claim(job_id, "a" * 32, "h")
    # archery 0-12 s (mean 0.8), then 14-18 s; bowling 12-14 s.
    assert store.succeed(job_id, "a" * 32, _result([0.7, 0.9, 0.8, 0.7, 0.9, 0.8, 0.1, 0.6, 0.6]))
    env = {**os.environ, "VIDQ_DATABASE_URL": url}
    out = run_vidq(
        "segments", "--batch", "seg", "--label", "archery", "--min-duration", "10",
        "--format", "jsonl", env=env, check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["label"], r["start_sec"], r["end_sec"], r["clips"]) for r in rows] == [
        ("archery", 0.0, 12.0, 6)]
    assert rows[0]["mean_score"] == pytest.approx(0.8) and rows[0]["path"].endswith("v.mp4")
    csv_out = run_vidq(
        "segments", "--batch", "seg", "--min-score", "0.5", "--format", "csv",
        env=env, check=True,
    ).stdout.splitlines()
    assert csv_out[0].startswith("job_id,path,batch,label,class_id,start_sec")
    assert len(csv_out) == 1 + 2  # the two archery segments; bowling's mean is 0.45
    engine = create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(text(README_SQL)).all()
    engine.dispose()
    assert [tuple(r) for r in found] == [(job_id, rows[0]["path"], 12.0)]


README_SQL = """
select j.id, j.path, max(s.duration_s) as longest
from label_segments s join jobs j on j.id = s.job_id
where s.label = 'archery' and s.duration_s >= 10 and j.status = 'succeeded'
group by j.id, j.path order by longest desc
"""


# -- end to end: `vidq run` writes them, a forced re-run through the worker path replaces them --


def _table_and_derived(url: str, job_id: int, rules: SegmentRules) -> tuple[list, list]:
    from vidq.segments import clip_rows_from_predictions

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            clip_rows = conn.execute(text(
                "select clip_index, start_sec, end_sec, class_id, label, score "
                "from clip_predictions where job_id = :j"), {"j": job_id}).all()
            stored = [tuple(r) for r in conn.execute(text(
                "select class_id, label, start_sec, end_sec, mean_score, peak_score, clips "
                "from label_segments where job_id = :j order by segment_index"), {"j": job_id})]
    finally:
        engine.dispose()
    derived = [(s.class_id, s.label, s.start_sec, s.end_sec, pytest.approx(s.mean_score),
                pytest.approx(s.peak_score), s.clips)
               for s in derive_segments(clip_rows_from_predictions(clip_rows), rules)]
    return stored, derived


@pytest.mark.timeout(600)
def test_vidq_run_writes_the_segments_of_its_clip_rows_and_a_rerun_replaces_them(
    database_url: str, tmp_path: Path,
) -> None:
    from tests.media import make_video

    video = tmp_path / "v.mp4"
    make_video(video, seconds=6)
    env = {**os.environ, "VIDQ_DATABASE_URL": database_url, "VIDQ_MODEL": "x3d_xs",
           "VIDQ_WEIGHTS": "random", "VIDQ_TOP_K": "3", "VIDQ_SEGMENT_MIN_SCORE": "0",
           "VIDQ_SEGMENT_MIN_S": "0", "VIDQ_SEGMENT_MAX_GAP_S": "1"}
    # x3d_xs windows span 1.6 s; a 0.8 s stride overlaps each with the next by half.
    run = run_vidq("run", str(video), "--batch", "e2e", "--strategy", "sliding",
                   "--stride", "0.8", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    engine = create_engine(database_url)
    with engine.connect() as conn:
        job_id, clips_done = conn.execute(text("select id, clips_done from jobs")).one()
        rank1 = sorted(r[0] for r in conn.execute(text(
            "select score from clip_predictions where rank = 1")))
    engine.dispose()
    assert clips_done >= 6

    # Threshold 0: every top-3 label counts, so segments follow top-k membership alone.
    stored, derived = _table_and_derived(
        database_url, job_id, SegmentRules(min_score=0.0, min_s=0.0, max_gap_s=1.0))
    assert stored == derived and len(stored) >= 3
    assert sum(s[6] for s in stored) == 3 * clips_done  # every (clip, rank) in one segment

    # A forced re-run of the same job through the worker's path, with a threshold at
    # the median top-1 score: segments split where the top label dips under it.
    median = rank1[len(rank1) // 2]
    with create_engine(database_url).begin() as conn:
        conn.execute(text("update jobs set status = 'queued', lease_token = null"))
    rerun = subprocess.run(
        [sys.executable, "-c", ("from worker.embedded import run_jobs\n"
                                "from vidq.settings import Settings\n"
                                f"print(run_jobs([{job_id}], settings=Settings.from_env())"
                                "[0].status)")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**env, "VIDQ_SEGMENT_MIN_SCORE": repr(median)})
    assert rerun.returncode == 0 and rerun.stdout.strip() == "succeeded", rerun.stderr
    rules = SegmentRules(min_score=median, min_s=0.0, max_gap_s=1.0)
    restored, rederived = _table_and_derived(database_url, job_id, rules)
    assert restored == rederived and restored != stored
    assert 0 < len(restored)
    assert all(s[4] >= median for s in restored)
    engine = create_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from label_segments")).scalar_one() == len(
            restored)
        assert conn.execute(text("select count(*) from clip_predictions")).scalar_one() == (
            3 * clips_done)
    engine.dispose()


