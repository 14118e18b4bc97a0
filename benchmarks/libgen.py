"""A synthetic video library written through vidq's own schema: the rows a library of
N videos x M clips would leave after ``vidq submit`` and the workers, generated with
numpy a chunk of videos at a time and loaded with COPY on PostgreSQL (executemany on
SQLite), so millions of rows load in minutes on a small machine.

What the rows look like:

- one batch (``library``) holding every job; 97% succeeded, 1% each failed, queued
  and running, finished over the last week (some in the last ten minutes);
- labels follow a Zipf law over ``labels`` classes: a few are on most videos, most
  are rare. A video's top-k labels are distinct; its clips mostly agree with its top
  label;
- ``segments`` label segments per succeeded video, durations exponential (mean 8 s);
- a video vector (``VIDQ_EMBEDDINGS=video``) per succeeded video when ``video_vectors``:
  its top label's centroid plus noise, as float16 bytes of ``dim`` values with its
  norm, as vidq/embeddings.py stores them; ``clip_vectors`` clip vectors over the
  first videos' clips.
"""

from __future__ import annotations

import binascii
import datetime as dt
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

BATCH = "library"
STATUS_BATCH = "library-status"
"""A batch of jobs only (``Library.status_jobs``), copies of the library's, for ``vidq
status --batch`` at a batch size apart from the library's."""
MODEL = "slow_r50"
WEIGHTS_ID = "sha256:" + "5" * 64
STRIDE_S = 2.0
CLIP_S = 64 / 30
TABLES = ("jobs", "video_labels", "clip_predictions", "label_segments", "video_embeddings",
          "clip_embeddings")


@dataclass(frozen=True)
class Library:
    videos: int
    clips: int
    """Clips per video."""
    top_k: int = 5
    labels: int = 400
    segments: int = 5
    """Segments per succeeded video."""
    video_vectors: bool = False
    clip_vectors: int = 0
    """Clip vectors in all (over the first videos' clips)."""
    dim: int = 2048
    zipf_s: float = 1.1
    seed: int = 0
    status_jobs: int = 0
    """Jobs of ``STATUS_BATCH``: the library's jobs copied in turn (the same statuses
    and times; another content hash, as queued jobs of one file are one job), without
    results of their own."""

    @property
    def clip_label_rows(self) -> int:
        return self.videos * self.clips * self.top_k

    def label(self, i: int) -> str:
        return f"class_{i:03d}"

    def label_shares(self) -> np.ndarray:
        p = 1.0 / np.arange(1, self.labels + 1) ** self.zipf_s
        return p / p.sum()


def _distinct_labels(rng: np.random.Generator, lib: Library, n: int,
                     first: np.ndarray | None = None) -> np.ndarray:
    """(n, top_k) labels, distinct in each row, each drawn from the Zipf shares."""
    p = lib.label_shares()
    out = rng.choice(lib.labels, size=(n, lib.top_k), p=p)
    if first is not None:
        out[:, 0] = first
    for r in range(1, lib.top_k):
        for _ in range(50):
            dup = (out[:, r:r + 1] == out[:, :r]).any(axis=1)
            if not dup.any():
                break
            out[dup, r] = rng.choice(lib.labels, size=int(dup.sum()), p=p)
        dup = (out[:, r:r + 1] == out[:, :r]).any(axis=1)
        out[dup, r] = (out[dup, 0] + 7 * r) % lib.labels  # Zipf tail exhausted: any other
    return out


def _scores(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """(n, k) descending softmax-like scores."""
    first = rng.uniform(0.25, 0.98, size=n)
    decay = rng.uniform(0.1, 0.9, size=(n, k - 1))
    out = np.empty((n, k))
    out[:, 0] = first
    for r in range(1, k):
        out[:, r] = out[:, r - 1] * decay[:, r - 1] * (1 - first) / max(1 - first.min(), 1e-9)
    return np.round(np.minimum(out, out[:, :1]), 6)


def centroids(lib: Library) -> np.ndarray:
    """One direction per label in feature space (ReLU'd like pooled activations)."""
    rng = np.random.default_rng(lib.seed + 1)
    return np.abs(rng.normal(size=(lib.labels, lib.dim))).astype(np.float32)


def chunks(lib: Library, *, chunk_videos: int = 5000) -> Iterator[dict[str, dict[str, Any]]]:
    """The library's rows, a chunk of videos at a time: table -> column -> array."""
    rng = np.random.default_rng(lib.seed)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    week = 7 * 86400.0
    cent = centroids(lib) if (lib.video_vectors or lib.clip_vectors) else None
    clip_vectors_left = lib.clip_vectors
    for start in range(0, lib.videos, chunk_videos):
        n = min(chunk_videos, lib.videos - start)
        ids = np.arange(start + 1, start + n + 1, dtype=np.int64)
        status = np.full(n, "succeeded", dtype=object)
        roll = (ids * 2654435761) % 100
        status[roll == 0] = "failed"
        status[roll == 1] = "queued"
        status[roll == 2] = "running"
        done = status == "succeeded"
        finished_ago = rng.exponential(week / 3, size=n)
        finished_ago[ids % 50 == 0] = rng.uniform(0, 500, size=int((ids % 50 == 0).sum()))
        finished = np.array([now - dt.timedelta(seconds=float(a)) for a in finished_ago],
                            dtype=object)
        submitted = np.array([f - dt.timedelta(hours=1) for f in finished], dtype=object)
        started = np.array([f - dt.timedelta(seconds=30) for f in finished], dtype=object)
        labels = _distinct_labels(rng, lib, n)
        scores = _scores(rng, n, lib.top_k)
        names = np.array([lib.label(i) for i in range(lib.labels)], dtype=object)
        finished_col = np.where(np.isin(status, ["queued", "running"]), None, finished)
        jobs = {
            "id": ids, "batch_id": np.ones(n, dtype=np.int64),
            "path": np.array([f"/library/{i // 1000:04d}/{i:08d}.mp4" for i in ids], dtype=object),
            "content_sha256": np.array([f"{i:064x}" for i in ids], dtype=object),
            "size_bytes": rng.integers(10**6, 10**9, size=n), "queue": np.full(n, "vidq",
                                                                               dtype=object),
            "status": status, "priority": np.full(n, 5), "attempts": np.where(done, 1, 0),
            "submitted_at": submitted,
            "started_at": np.where(status == "queued", None, started),
            "finished_at": finished_col,
            "model": np.full(n, MODEL, dtype=object),
            "weights": np.full(n, "pretrained", dtype=object),
            "weights_id": np.where(done, WEIGHTS_ID, None),
            "strategy": np.full(n, "sliding", dtype=object),
            "clips_requested": np.full(n, lib.clips), "stride_s": np.full(n, STRIDE_S),
            "start_sec": np.zeros(n), "crops": np.ones(n, dtype=np.int64),
            "config_key": np.full(n, f"{MODEL}:pretrained:sliding", dtype=object),
            "duration_s": np.where(done, lib.clips * STRIDE_S, None),
            "clips_done": np.where(done, lib.clips, None),
            "error_kind": np.where(status == "failed", "not_a_video", None),
            "top_class_id": np.where(done, labels[:, 0], None),
            "top_label": np.where(done, names[labels[:, 0]], None),
            "top_score": np.where(done, scores[:, 0], None),
        }
        d = ids[done]
        nd = len(d)
        k = lib.top_k
        vl = labels[done]
        video_labels = {
            "job_id": np.repeat(d, k), "rank": np.tile(np.arange(1, k + 1), nd),
            "class_id": vl.ravel(), "label": names[vl.ravel()],
            "score": scores[done].ravel(),
        }
        # Clips: every job's clips (results exist only for succeeded ones, but the
        # row count is what the library is sized by, so failed jobs get none and the
        # succeeded ones are what a reader sees).
        m = lib.clips
        n_clips = nd * m
        clip_first = np.where(rng.random(n_clips) < 0.7, np.repeat(vl[:, 0], m),
                              rng.choice(lib.labels, size=n_clips, p=lib.label_shares()))
        cl = _distinct_labels(rng, lib, n_clips, first=clip_first)
        cs = _scores(rng, n_clips, k)
        clip_index = np.tile(np.arange(m), nd)
        clip_predictions = {
            "job_id": np.repeat(d, m * k), "clip_index": np.repeat(clip_index, k),
            "rank": np.tile(np.arange(1, k + 1), n_clips),
            "start_sec": np.repeat(clip_index * STRIDE_S, k),
            "end_sec": np.repeat(clip_index * STRIDE_S + CLIP_S, k),
            "class_id": cl.ravel(), "label": names[cl.ravel()], "score": cs.ravel(),
        }
        s = lib.segments
        seg_label = vl[np.arange(nd).repeat(s), rng.integers(0, k, size=nd * s)]
        span = m * STRIDE_S
        seg_start = np.sort(rng.uniform(0, span * 0.9, size=(nd, s)), axis=1).ravel()
        seg_duration = np.round(np.minimum(rng.exponential(8.0, size=nd * s) + CLIP_S,
                                           span - seg_start + CLIP_S), 3)
        mean_score = np.round(rng.uniform(0.3, 0.95, size=nd * s), 6)
        label_segments = {
            "job_id": np.repeat(d, s), "segment_index": np.tile(np.arange(s), nd),
            "class_id": seg_label, "label": names[seg_label], "start_sec": seg_start,
            "end_sec": seg_start + seg_duration, "duration_s": seg_duration,
            "mean_score": mean_score,
            "peak_score": np.round(np.minimum(mean_score * 1.2, 0.999), 6),
            "clips": np.maximum(1, (seg_duration // STRIDE_S).astype(np.int64)),
        }
        out: dict[str, dict[str, Any]] = {
            "jobs": jobs, "video_labels": video_labels, "clip_predictions": clip_predictions,
            "label_segments": label_segments}
        if lib.video_vectors and cent is not None:
            vectors = video_vectors(rng, cent, vl[:, 0])
            out["video_embeddings"] = {
                "job_id": d, "model": np.full(nd, MODEL, dtype=object),
                "weights_id": np.full(nd, WEIGHTS_ID, dtype=object),
                "dim": np.full(nd, lib.dim),
                "norm": np.linalg.norm(vectors.astype(np.float64), axis=1),
                "vector": vectors, "written_at": finished[done]}
        if clip_vectors_left > 0 and cent is not None:
            take = min(clip_vectors_left, n_clips)
            clip_vectors_left -= take
            cv = video_vectors(rng, cent, cl[:take, 0])
            out["clip_embeddings"] = {
                "job_id": np.repeat(d, m)[:take], "clip_index": clip_index[:take],
                "start_sec": clip_index[:take] * STRIDE_S,
                "end_sec": clip_index[:take] * STRIDE_S + CLIP_S, "vector": cv}
        yield out


def video_vectors(rng: np.random.Generator, cent: np.ndarray, label: np.ndarray
                  ) -> np.ndarray:
    """(n, dim) float16: the label's centroid, a per-video direction and noise."""
    n, dim = len(label), cent.shape[1]
    own = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    mixed = 0.6 * cent[label] + 0.8 * own
    return mixed.astype("<f2")


# -- loading --------------------------------------------------------------------------
def _csv_field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _copy_text(columns: dict[str, Any]) -> bytes:
    """The columns as COPY ... FORMAT csv text; vectors as bytea hex."""
    names = list(columns)
    cols = []
    for name in names:
        values = columns[name]
        if isinstance(values, np.ndarray) and values.dtype == np.dtype("<f2"):
            cols.append(["\\x" + binascii.hexlify(row.tobytes()).decode("ascii")
                         for row in values])
        elif isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            cols.append(values.astype(str).tolist())
        elif isinstance(values, np.ndarray) and values.dtype.kind == "f":
            cols.append([repr(v) for v in values.tolist()])
        else:
            cols.append([_csv_field(v) for v in values])
    buf = io.StringIO()
    for row in zip(*cols):
        buf.write(",".join(row))
        buf.write("\n")
    return buf.getvalue().encode()


def _rows(columns: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(columns)
    cols = []
    for name in names:
        values = columns[name]
        if isinstance(values, np.ndarray) and values.dtype == np.dtype("<f2"):
            cols.append([row.tobytes() for row in values])
        elif isinstance(values, np.ndarray) and values.dtype != object:
            cols.append(values.tolist())
        else:
            cols.append([v.item() if isinstance(v, np.generic) else v for v in values])
    return [dict(zip(names, row)) for row in zip(*cols)]


def load(engine: Any, lib: Library, *, progress: Any = print) -> dict[str, int]:
    """Write ``lib`` into ``engine``'s database (already at vidq's schema, empty).
    Returns rows per table."""
    from sqlalchemy import insert, text

    from vidq.db import Base

    counts = dict.fromkeys(TABLES, 0)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO batches (id, name, created_at) VALUES (1, :n, :t)"),
                     {"n": BATCH, "t": dt.datetime.now(dt.timezone.utc)})
    for chunk in chunks(lib):
        if postgres:
            raw = engine.raw_connection()
            try:
                cur = raw.cursor()
                for table in TABLES:
                    if table not in chunk:
                        continue
                    cols = chunk[table]
                    with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN "
                                  "WITH (FORMAT csv)") as copy:
                        copy.write(_copy_text(cols))
                    counts[table] += len(next(iter(cols.values())))
                raw.commit()
            finally:
                raw.close()
        else:
            with engine.begin() as conn:
                for table in TABLES:
                    if table in chunk:
                        rows = _rows(chunk[table])
                        conn.execute(insert(Base.metadata.tables[table]), rows)
                        counts[table] += len(rows)
        progress(f"  loaded {counts['jobs']:,} videos, {counts['clip_predictions']:,} "
                 "clip-label rows")
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if postgres:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('jobs', 'id'), "
                              "(SELECT max(id) FROM jobs))"))
            conn.execute(text("SELECT setval(pg_get_serial_sequence('batches', 'id'), 1)"))
    if lib.status_jobs:
        counts["status_jobs"] = _copy_jobs(engine, lib)
        progress(f"  {counts['status_jobs']:,} jobs in batch {STATUS_BATCH}")
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        # PostgreSQL: the visibility map too, which index-only scans need.
        conn.execute(text("VACUUM ANALYZE" if postgres else "ANALYZE"))
    return counts


COPY_JOBS = """
WITH RECURSIVE turn(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM turn WHERE i < :turns)
INSERT INTO jobs (batch_id, path, content_sha256, size_bytes, queue, status, priority,
    attempts, submitted_at, started_at, finished_at, model, weights, weights_id, strategy,
    clips_requested, stride_s, start_sec, crops, config_key, duration_s, clips_done,
    error_kind, top_class_id, top_label, top_score)
SELECT :batch, j.path || '#' || turn.i,
    CAST(turn.i + 1000000000000 AS TEXT) || substr(j.content_sha256, 14), j.size_bytes,
    j.queue, j.status, j.priority, j.attempts, j.submitted_at, j.started_at, j.finished_at,
    j.model, j.weights, j.weights_id, j.strategy, j.clips_requested, j.stride_s, j.start_sec,
    j.crops,
    j.config_key, j.duration_s, j.clips_done, j.error_kind, j.top_class_id, j.top_label,
    j.top_score
FROM turn CROSS JOIN jobs j WHERE j.batch_id = 1 ORDER BY turn.i, j.id LIMIT :n
"""


def _copy_jobs(engine: Any, lib: Library) -> int:
    """``lib.status_jobs`` jobs into ``STATUS_BATCH``, copied in SQL from the library's."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO batches (name, created_at) VALUES (:n, :t)"),
                     {"n": STATUS_BATCH, "t": dt.datetime.now(dt.timezone.utc)})
        batch = conn.execute(text("SELECT id FROM batches WHERE name = :n"),
                             {"n": STATUS_BATCH}).scalar_one()
        conn.execute(text(COPY_JOBS), {"batch": batch, "n": lib.status_jobs,
                                       "turns": lib.status_jobs // lib.videos + 1})
    return lib.status_jobs
