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

Torch-free and numpy-free, like every module a producer host imports: the bytes are
read with ``struct``'s half-float format and compared in pure Python, a chunk of rows
at a time, so memory stays flat however many vectors the table holds.
"""

from __future__ import annotations

import heapq
import math
import operator
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from vidq.db import ClipEmbedding, Job, VideoEmbedding
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
    session.execute(insert(VideoEmbedding), [{
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
    ranked = sorted(best, reverse=True)
    about = {row[0]: row[1:] for row in conn.execute(
        select(Job.id, Job.path, Job.top_label).where(Job.id.in_([-j for _, j in ranked])))}
    return Search(model=model, weights_id=weights_id, compared=compared, neighbours=[
        Neighbour(job_id=-j, similarity=s, path=about[-j][0], top_label=about[-j][1])
        for s, j in ranked])
