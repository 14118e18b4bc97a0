"""A small results library for the viewer's tests: real video files under a media
root, and jobs written through the ORM with clip rows designed so that segments exist
at the default threshold and change when it moves (the stored segments come from
``vidq.segments.write_segments``, as a worker writes them)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from tests.media import make_video
from vidq.db import Batch, ClipPrediction, Job, LabelSegment, VideoLabel, make_engine
from vidq.embeddings import float16_from_floats, norm
from vidq.migrate import upgrade
from vidq.segments import ClipRow, ScoredLabel, SegmentRules, write_segments

XSS_NAME = "<script>alert(1)</script>.mp4"
"""As a path under the media root: a directory ``<script>alert(1)<`` holding
``script>.mp4`` (a file name cannot hold the ``/``)."""
LABELS = {5: "archery", 31: "bowling", 77: "<b>cooking</b>", 12: "dancing", 40: "eating"}
"""class_id -> label; one label carries markup, which must show as text."""

# Per clip of one second, the scores of archery, bowling and cooking (the rest share
# what is left): archery holds clips 0-3 at 0.45-0.8 and 6-8; bowling 4-5; cooking
# appears at 0.35 on clips 2-3 (a segment at 0.3 that vanishes at 0.4).
PATTERN = [
    (0.80, 0.05, 0.05), (0.70, 0.10, 0.05), (0.45, 0.10, 0.35), (0.50, 0.05, 0.35),
    (0.10, 0.70, 0.05), (0.05, 0.85, 0.02), (0.60, 0.10, 0.10), (0.75, 0.05, 0.05),
    (0.40, 0.20, 0.20),
]


@dataclass
class Library:
    database_url: str
    root: Path
    """The media root (VIDQ_MEDIA_ROOTS)."""
    outside: Path
    """A video outside the media root."""
    jobs: dict[str, int]
    """Name -> job id: main, xss, other, failed, escape (a symlink out of the root),
    dotdot (a recorded path with ``..`` out of it), notes (a text file outside it)."""


def clip_rows(seconds: int) -> list[ClipRow]:
    rows = []
    for i in range(seconds):
        a, b, c = PATTERN[i % len(PATTERN)]
        rest = max(0.0, 1.0 - a - b - c)
        top = sorted([ScoredLabel(5, LABELS[5], a), ScoredLabel(31, LABELS[31], b),
                      ScoredLabel(77, LABELS[77], c), ScoredLabel(12, LABELS[12], rest * 0.6),
                      ScoredLabel(40, LABELS[40], rest * 0.4)], key=lambda s: -s.score)
        rows.append(ClipRow(index=i, start_sec=float(i), end_sec=float(i + 1), top=top))
    return rows


def add_job(session: Session, *, batch_id: int, path: Path | str, seconds: int,
            status: str = "succeeded", error: tuple[str, str] | None = None,
            embedding: list[float] | None = None) -> int:
    now = dt.datetime.now(dt.timezone.utc)
    job = Job(batch_id=batch_id, path=str(path), content_sha256=f"{hash(str(path)) & 0xffff:064x}",
              size_bytes=1, status=status, model="x3d_xs", weights="random",
              weights_id="random-init", strategy="sliding", clips_requested=seconds,
              stride_s=1.0, config_key=f"k-{path}", duration_s=float(seconds), fps=30.0,
              width=160, height=96, clips_done=seconds if status == "succeeded" else None,
              started_at=now, finished_at=now)
    if error is not None:
        job.error_kind, job.error_message = error
    session.add(job)
    session.flush()
    if status != "succeeded":
        return job.id
    clips = clip_rows(seconds)
    session.add_all(ClipPrediction(job_id=job.id, clip_index=c.index, rank=r + 1,
                                   start_sec=c.start_sec, end_sec=c.end_sec,
                                   class_id=s.class_id, label=s.label, score=s.score)
                    for c in clips for r, s in enumerate(c.top))
    means: dict[int, float] = {}
    for c in clips:
        for s in c.top:
            means[s.class_id] = means.get(s.class_id, 0.0) + s.score / len(clips)
    ranked = sorted(means.items(), key=lambda kv: -kv[1])
    session.add_all(VideoLabel(job_id=job.id, rank=r + 1, class_id=cid, label=LABELS[cid],
                               score=score) for r, (cid, score) in enumerate(ranked))
    best, best_score = ranked[0]
    job.top_class_id, job.top_label, job.top_score = best, LABELS[best], best_score
    write_segments(session, job.id, clips, SegmentRules(), replace=False)
    if embedding is not None:
        from vidq.db import VideoEmbedding

        blob = float16_from_floats(embedding)
        session.add(VideoEmbedding(job_id=job.id, model="x3d_xs", weights_id="random-init",
                                   dim=len(embedding), norm=norm(blob), vector=blob))
    return job.id


def build_library(database_url: str, base: Path) -> Library:
    root = base / "media"
    root.mkdir()
    outside_dir = base / "private"
    outside_dir.mkdir()
    make_video(root / "main.mp4", seconds=9, seed=1)
    (root / XSS_NAME).parent.mkdir()
    make_video(root / XSS_NAME, seconds=3, seed=2)
    make_video(root / "other.mp4", seconds=3, seed=3)
    outside = outside_dir / "secret.mp4"
    make_video(outside, seconds=2, seed=4)
    (root / "escape.mp4").symlink_to(outside)
    (outside_dir / "notes.txt").write_text("not a video")
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        with Session(engine) as session, session.begin():
            batch = Batch(name="demo")
            session.add(batch)
            session.flush()
            jobs = {
                "main": add_job(session, batch_id=batch.id, path=root / "main.mp4", seconds=9,
                                embedding=[1.0, 0.0, 0.5, 0.25]),
                "xss": add_job(session, batch_id=batch.id, path=root / XSS_NAME, seconds=3,
                               embedding=[0.9, 0.1, 0.5, 0.2]),
                "other": add_job(session, batch_id=batch.id, path=root / "other.mp4",
                                 seconds=3),
                "failed": add_job(session, batch_id=batch.id, path=root / "broken.mp4",
                                  seconds=1, status="failed",
                                  error=("decode_error", "broken.mp4: <i>moov atom</i> not found")),
                "escape": add_job(session, batch_id=batch.id, path=root / "escape.mp4",
                                  seconds=2),
                "dotdot": add_job(session, batch_id=batch.id,
                                  path=f"{root}/../private/secret.mp4", seconds=2),
                "notes": add_job(session, batch_id=batch.id, path=outside_dir / "notes.txt",
                                 seconds=1),
            }
    finally:
        engine.dispose()
    return Library(database_url=database_url, root=root, outside=outside, jobs=jobs)


def stored_segments(database_url: str, job_id: int) -> list[tuple[str, float, float, float, int]]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return [(s.label, s.start_sec, s.end_sec, s.mean_score, s.clips)
                    for s in session.query(LabelSegment).filter_by(job_id=job_id)
                    .order_by(LabelSegment.segment_index)]
    finally:
        engine.dispose()
