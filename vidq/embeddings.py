"""Embeddings: the model's pooled features, stored per video and per clip, and the
nearest videos by cosine similarity (``vidq similar``).

What is stored (``VIDQ_EMBEDDINGS``, worker side in worker/features.py):

- a clip's vector is the head's pooled features (the values its final linear layer
  projects to the logits: 2048 for slow_r50 and the X3D presets), averaged over the
  clip's crops exactly as its probabilities are;
- a video's vector is the mean of its clips' vectors. It is **not** L2-normalised: it
  stays the mean activation, comparable with the clip vectors; its L2 norm is stored
  beside it, so cosine similarity needs one dot product per candidate;
- every vector is little-endian IEEE float16 bytes (2 bytes a value, 4 KiB for 2048),
  written in the job's results transaction, so it is exactly-once like the rest.

Torch-free, like every module a producer host imports. At library scale ``nearest``
asks vidq/ann.py's approximate index (``pip install 'vidq[ann]'``: usearch and numpy)
for candidates and re-ranks them exactly from the stored rows; without it, or below
``VIDQ_ANN_MIN_ROWS`` vectors, it reads every vector with ``struct``'s half-float format and
compares in pure Python, a chunk of rows at a time, so memory stays flat however many
vectors the table holds.
"""

from __future__ import annotations

import heapq
import math
import operator
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from vidq.db import ClipEmbedding, Job, VideoEmbedding, db_now
from vidq.errors import InputError

CHUNK_ROWS = 2000
"""Vectors fetched per database round trip by ``nearest`` (8 MiB at 2048 x float16)."""


def floats_from_float16(blob: bytes) -> tuple[float, ...]:
    """Little-endian float16 bytes -> floats."""
    return struct.unpack(f"<{len(blob) // 2}e", blob)


def float16_from_floats(values: Sequence[float]) -> bytes:
    """Floats -> little-endian float16 bytes (rounded to nearest; the worker encodes
    with numpy, which rounds the same way)."""
    return struct.pack(f"<{len(values)}e", *values)


def norm(blob: bytes) -> float:
    """L2 norm of a stored vector, as decoded (so stored vectors compare exactly)."""
    return math.sqrt(math.fsum(v * v for v in floats_from_float16(blob)))


@dataclass(frozen=True)
class ClipVector:
    index: int
    start_sec: float
    end_sec: float
    vector: bytes


def write_embeddings(
    session: Session | Connection,
    job_id: int,
    *,
    model: str,
    weights_id: str,
    video: bytes | None,
    clips: Iterable[ClipVector] = (),
    replace: bool = True,
) -> int:
    """Replace the job's embeddings with these, inside the caller's transaction (the
    job's results transaction). ``video`` None (``VIDQ_EMBEDDINGS=off``) leaves none:
    a re-run without embeddings must not keep vectors of an earlier result.
    ``replace=False``: the job has none yet (worker/jobs.py). Returns the rows written."""
    if replace:
        session.execute(delete(ClipEmbedding).where(ClipEmbedding.job_id == job_id))
        session.execute(delete(VideoEmbedding).where(VideoEmbedding.job_id == job_id))
    if video is None:
        return 0
    # written_at: the database's clock, which vidq/ann.py's high-water mark compares.
    session.execute(insert(VideoEmbedding).values(written_at=db_now()), [{
        "job_id": job_id, "model": model, "weights_id": weights_id, "dim": len(video) // 2,
        "norm": norm(video), "vector": video,
    }])
    rows = [{"job_id": job_id, "clip_index": c.index, "start_sec": c.start_sec,
             "end_sec": c.end_sec, "vector": c.vector} for c in clips]
    if rows:
        session.execute(insert(ClipEmbedding), rows)
    return 1 + len(rows)


@dataclass(frozen=True)
class Neighbour:
    job_id: int
    similarity: float
    """Cosine similarity of the two videos' stored vectors, -1..1."""
    path: str
    top_label: str | None


@dataclass(frozen=True)
class Search:
    model: str
    weights_id: str
    compared: int
    """Vectors of the same model and weights compared with the query's."""
    neighbours: list[Neighbour]


def nearest(conn: Connection, job_id: int, *, top: int = 10) -> Search:
    """The ``top`` videos whose embeddings are nearest to job ``job_id``'s by cosine
    similarity, among those of the same model and weights id, most similar first
    (ties by job id). The query job itself is left out; other jobs of the same file
    are not (they are how duplicates show up)."""
    query = conn.execute(
        select(VideoEmbedding.model, VideoEmbedding.weights_id, VideoEmbedding.norm,
               VideoEmbedding.vector).where(VideoEmbedding.job_id == job_id)).first()
    if query is None:
        status = conn.scalar(select(Job.status).where(Job.id == job_id))
        if status is None:
            raise InputError(f"no job {job_id}.", kind="not_found")
        raise InputError(
            f"job {job_id} has no embedding (status {status}): it was classified with "
            "VIDQ_EMBEDDINGS=off or has not succeeded; run it again with "
            "VIDQ_EMBEDDINGS=video (or clip).", kind="not_found")
    model, weights_id, query_norm, blob = query
    ranked: list[tuple[float, int]] | None = None
    compared = 0
    index = _ann_index(conn, model=model, weights_id=weights_id, dim=len(blob) // 2)
    if index is not None:
        candidates = index.candidates(conn, blob, top=top, exclude=job_id)
        scored = _scores(conn, blob, query_norm, model=model, weights_id=weights_id,
                         job_ids=candidates)
        # Fewer than asked (the graph still holds purged jobs): the exact scan answers.
        if len(scored) >= top:
            ranked = sorted(scored, reverse=True)[:top]
            compared = len(scored)
    if ranked is None:
        ranked, compared = _exact(conn, job_id, blob, query_norm, model=model,
                                  weights_id=weights_id, top=top)
    about = {row[0]: row[1:] for row in conn.execute(
        select(Job.id, Job.path, Job.top_label).where(Job.id.in_([-j for _, j in ranked])))}
    return Search(model=model, weights_id=weights_id, compared=compared, neighbours=[
        Neighbour(job_id=-j, similarity=s, path=about[-j][0], top_label=about[-j][1])
        for s, j in ranked])


def _ann_index(conn: Connection, *, model: str, weights_id: str, dim: int) -> Any:
    """vidq/ann.py's index when it applies (usearch installed, enough vectors)."""
    from vidq import ann

    return ann.open_index(conn, model=model, weights_id=weights_id, dim=dim)


def _scores(conn: Connection, blob: bytes, query_norm: float, *, model: str,
            weights_id: str, job_ids: list[int]) -> list[tuple[float, int]]:
    """(cosine similarity, -job id) of each of ``job_ids`` that still has a vector of
    this model and weights: the exact re-rank of an index's candidates, from the
    database's own rows (a purged job has none and drops out)."""
    import numpy as np

    q = np.frombuffer(blob, dtype="<f2").astype(np.float64)
    out = []
    for i in range(0, len(job_ids), 1000):
        for other_id, other_norm, other in conn.execute(
                select(VideoEmbedding.job_id, VideoEmbedding.norm, VideoEmbedding.vector)
                .where(VideoEmbedding.job_id.in_(job_ids[i:i + 1000]),
                       VideoEmbedding.model == model, VideoEmbedding.weights_id == weights_id)):
            if len(other) != len(blob):
                continue
            denominator = query_norm * other_norm
            dot = float(np.frombuffer(other, dtype="<f2").astype(np.float64) @ q)
            out.append((dot / denominator if denominator else 0.0, -other_id))
    return out


def _exact(conn: Connection, job_id: int, blob: bytes, query_norm: float, *, model: str,
           weights_id: str, top: int) -> tuple[list[tuple[float, int]], int]:
    """Every vector of the model and weights compared, a chunk of rows at a time."""
    q = floats_from_float16(blob)
    best: list[tuple[float, int]] = []  # a min-heap of (similarity, -job_id)
    compared = 0
    rows = conn.execute(
        select(VideoEmbedding.job_id, VideoEmbedding.norm, VideoEmbedding.vector)
        .where(VideoEmbedding.model == model, VideoEmbedding.weights_id == weights_id,
               VideoEmbedding.job_id != job_id)
        .execution_options(yield_per=CHUNK_ROWS))
    unpack = struct.Struct(f"<{len(q)}e").unpack
    for page in rows.partitions():
        for other_id, other_norm, other in page:
            if len(other) != len(blob):
                continue  # another head size cannot share model and weights; be safe
            compared += 1
            denominator = query_norm * other_norm
            similarity = (sum(map(operator.mul, q, unpack(other))) / denominator
                          if denominator else 0.0)
            entry = (similarity, -other_id)
            if len(best) < top:
                heapq.heappush(best, entry)
            elif entry > best[0]:
                heapq.heapreplace(best, entry)
    return sorted(best, reverse=True), compared
