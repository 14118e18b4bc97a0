"""The approximate nearest-neighbour index behind ``vidq similar`` at library scale.

An HNSW graph (usearch, ``pip install 'vidq[ann]'``) over the ``video_embeddings`` of
one model and weights id, kept as a file on the host that asks (``VIDQ_ANN_DIR``), and
only ever a source of *candidates*: ``vidq.embeddings.nearest`` re-ranks them exactly
from the database's own vectors, so an answer never holds a vector the database no
longer has (a purged job, a re-run without embeddings) and its similarities are the
exact ones.

Kept current lazily, at query time, never rebuilt per query: every ``video_embeddings``
row carries ``written_at`` (the database's clock, set in the results transaction by
``write_embeddings``); the index file records the newest ``written_at`` it holds (its
high-water mark). A query reads the rows written since (less ``OVERLAP_S``, because a
transaction may commit after a later one with an earlier clock: rows read twice are
replaced, not doubled), scores them exactly beside the graph's answer, and once they
are more than ``MERGE_ROWS`` adds them to the graph and saves it (under a lock, to a
temporary file renamed into place). Rows a purge deleted are left in the graph until
it holds ``STALE_SHARE`` more keys than the table has rows, then it is rebuilt once.

With fewer than ``VIDQ_ANN_MIN_ROWS`` vectors, without usearch, or with ``VIDQ_ANN=off``,
``candidates`` answers None and the caller scans every vector exactly, as before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from vidq.db import VideoEmbedding, aware, reading_at_the_readers_pace
from vidq.settings import Settings

ANN_DIR = os.path.expanduser("~/.cache/vidq/ann")
"""Where index files are kept when ``VIDQ_ANN_DIR`` is empty."""
MERGE_ROWS = 2_000
"""Rows newer than the index scored exactly per query before they are added to it."""
OVERLAP_S = 600.0
"""Seconds behind the high-water mark read again: longer than any results transaction."""
STALE_SHARE = 0.25
"""Rebuild when the graph holds this share more keys than the table has rows (purges)."""
EXPANSION_SEARCH = 1024
CONNECTIVITY = 32
EXPANSION_ADD = 128
"""HNSW parameters, chosen by measurement on the library benchmark's 2048-d float16
vectors (docs/scale.md). What bounds recall@10 is how well the graph is built, then
how far a search walks, not how many candidates are re-ranked: at 48,500 vectors
expansion 64 on add left queries with no true neighbour found at any search expansion;
at 194,000 (the 20M-row library's) connectivity 16 with search expansion 512 did
(recall 0.855), connectivity 32 with 1024 reached 0.977."""
GRAPH = f"hnsw-cos-f16-c{CONNECTIVITY}-a{EXPANSION_ADD}"
"""The build parameters a saved graph records: a graph built with others is rebuilt
on its next use, so a change here reaches indexes already on disk."""
BUILD_CHUNK = 5_000


def enabled() -> bool:
    """Whether the index may be used: ``VIDQ_ANN`` not off and usearch installed (looked
    up, not imported: a producer host asking about a few vectors imports no numpy)."""
    if not Settings.from_env().ann:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("numpy", "usearch"))


def candidate_count(top: int) -> int:
    return max(10 * top, 100)


@dataclass
class Meta:
    database: str
    model: str
    weights_id: str
    dim: int
    high_water: str | None
    """ISO time of the newest ``written_at`` the graph holds (None: none had one)."""
    keys: int
    builds: int = 1
    merges: int = 0
    graph: str = ""
    """``GRAPH`` when it was built (empty: before build parameters were recorded)."""


def database_identity(conn: Connection) -> str:
    """This database, not just its URL: a database dropped and made again under the
    same name is another one, whose rows the old graph does not hold."""
    url = conn.engine.url
    if conn.dialect.name == "postgresql":
        oid = conn.exec_driver_sql(
            "SELECT oid FROM pg_database WHERE datname = current_database()").scalar()
        return f"postgresql://{url.host}:{url.port or 5432}/{url.database}#{oid}"
    path = url.database or ""
    try:
        return f"sqlite://{os.path.abspath(path)}#{os.stat(path).st_ino}"
    except OSError:
        return f"sqlite://{path}"


class VectorIndex:
    """One model's and weights' graph for one database, on disk under ``directory``."""

    def __init__(self, directory: str | Path, *, database: str, model: str, weights_id: str,
                 dim: int) -> None:
        self.database, self.model, self.weights_id, self.dim = database, model, weights_id, dim
        name = hashlib.sha256(f"{database}|{model}|{weights_id}".encode()).hexdigest()[:24]
        self.dir = Path(directory)
        self.path = self.dir / f"{name}.usearch"
        self.meta_path = self.dir / f"{name}.json"
        self.lock_path = self.dir / f"{name}.lock"
        self._graph: Any = None
        self._graph_mtime: int | None = None
        self.meta: Meta | None = None

    # -- files ------------------------------------------------------------------------
    def _new_graph(self) -> Any:
        from usearch.index import Index

        return Index(ndim=self.dim, metric="cos", dtype="f16", connectivity=CONNECTIVITY,
                     expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)

    def load(self) -> bool:
        """The graph on disk (memory-mapped), if there is one for this database."""
        try:
            meta = Meta(**json.loads(self.meta_path.read_text()))
            mtime = self.path.stat().st_mtime_ns
        except (OSError, ValueError, TypeError):
            return False
        if (meta.database, meta.model, meta.weights_id, meta.dim, meta.graph) != (
                self.database, self.model, self.weights_id, self.dim, GRAPH):
            return False
        if self._graph is None or self._graph_mtime != mtime:
            from usearch.index import Index

            # Memory-mapped: a process that only asks reads the pages its search visits.
            graph = Index.restore(str(self.path), view=True, expansion_search=EXPANSION_SEARCH)
            if graph is None:
                return False
            self._graph, self._graph_mtime = graph, mtime
        self.meta = meta
        return True

    def _save(self, graph: Any, meta: Meta) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".usearch.partial")
        graph.save(str(tmp))
        meta.keys = len(graph)
        tmp_meta = self.meta_path.with_suffix(".json.partial")
        tmp_meta.write_text(json.dumps(asdict(meta)))
        # The graph first: a reader pairing the new graph with the old meta re-reads a
        # few rows it already holds, which is harmless; the reverse could skip rows.
        os.replace(tmp, self.path)
        os.replace(tmp_meta, self.meta_path)
        self._graph = None
        self.load()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- rows -------------------------------------------------------------------------
    def _scope(self) -> list[Any]:
        return [VideoEmbedding.model == self.model,
                VideoEmbedding.weights_id == self.weights_id]

    def _rows(self, conn: Connection, newer: list[Any]
              ) -> Iterator[tuple[Any, Any, list[dt.datetime | None]]]:
        """(job ids, float16 matrix, written_at of each) per chunk of the scope's rows
        that also meet ``newer`` (all of them when empty)."""
        import numpy as np

        stmt = select(VideoEmbedding.job_id, VideoEmbedding.vector,
                      VideoEmbedding.written_at).where(*self._scope(), *newer)
        result = conn.execute(stmt.execution_options(yield_per=BUILD_CHUNK))
        width = 2 * self.dim
        for page in result.partitions():
            rows = [r for r in page if len(r[1]) == width]
            if not rows:
                continue
            ids = np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f2").reshape(
                len(rows), self.dim)
            yield ids, vectors, [aware(r[2]) if r[2] is not None else None for r in rows]

    def _newer(self) -> list[Any]:
        """The rows the graph may not hold: written since its high-water mark, less
        ``OVERLAP_S`` (rows from before 0007 have no ``written_at``: a build took them)."""
        assert self.meta is not None
        if self.meta.high_water is None:
            return [VideoEmbedding.written_at.is_not(None)]
        since = dt.datetime.fromisoformat(self.meta.high_water) - dt.timedelta(
            seconds=OVERLAP_S)
        return [VideoEmbedding.written_at > since]

    def build(self, conn: Connection) -> None:
        """Every row of the scope into a new graph (the first query, or after purges)."""
        # Adding a page to the graph takes seconds (minutes on a loaded host) while the
        # cursor waits: not an idle transaction to end.
        reading_at_the_readers_pace(conn)
        graph = self._new_graph()
        high: dt.datetime | None = None
        for ids, vectors, stamps in self._rows(conn, []):
            graph.add(ids, vectors, threads=os.cpu_count() or 1)
            high = _newest(high, stamps)
        builds = self.meta.builds + 1 if self.meta else 1
        self._save(graph, Meta(self.database, self.model, self.weights_id, self.dim,
                               high.isoformat() if high else None, len(graph), builds,
                               graph=GRAPH))

    def _merge(self, conn: Connection) -> None:
        from usearch.index import Index

        assert self.meta is not None
        graph = Index.restore(str(self.path), expansion_add=EXPANSION_ADD,
                              expansion_search=EXPANSION_SEARCH)
        if graph is None:
            self.build(conn)
            return
        high = dt.datetime.fromisoformat(self.meta.high_water) if self.meta.high_water \
            else None
        reading_at_the_readers_pace(conn)
        for ids, vectors, stamps in self._rows(conn, self._newer()):
            present = [k for k in ids.tolist() if graph.contains(k)]
            if present:
                graph.remove(present)  # a re-run's new vector replaces the old one
            graph.add(ids, vectors, threads=os.cpu_count() or 1)
            high = _newest(high, stamps)
        meta = Meta(**asdict(self.meta))
        meta.high_water, meta.merges = (high.isoformat() if high else None), meta.merges + 1
        self._save(graph, meta)

    def refresh(self, conn: Connection) -> None:
        """Build the graph, or add the rows written since, or rebuild it after purges:
        whatever makes it current. Queries call ``candidates``, which does this only
        when it is due."""
        with self._locked():
            if not self.load():
                self.build(conn)
                return
            rows = conn.scalar(select(func.count()).where(*self._scope())) or 0
            assert self.meta is not None
            if self.meta.keys > rows * (1 + STALE_SHARE):
                self.build(conn)
            else:
                self._merge(conn)

    # -- queries ----------------------------------------------------------------------
    def candidates(self, conn: Connection, query: bytes, *, top: int, exclude: int
                   ) -> list[int]:
        """Job ids among which the ``top`` nearest are (with high probability): the
        graph's nearest plus the best of the rows written since it was saved."""
        import numpy as np

        q = np.frombuffer(query, dtype="<f2")
        ids: list[int] = []
        high = dt.datetime.fromisoformat(self.meta.high_water) if (
            self.meta and self.meta.high_water) else None
        # The overlap's rows by id first (no vector read): those the graph already
        # holds as they are (written before its high-water mark) are skipped.
        recent = conn.execute(select(VideoEmbedding.job_id, VideoEmbedding.written_at)
                              .where(*self._scope(), *self._newer())).all()
        if recent:
            keys = np.fromiter((r[0] for r in recent), dtype=np.uint64, count=len(recent))
            held = np.asarray(self._graph.contains(keys), dtype=bool).reshape(-1)
            fresh = [int(k) for k, (_j, t), h in zip(keys, recent, held)
                     if not h or t is None or high is None or aware(t) > high]
            if len(fresh) > MERGE_ROWS:
                self.refresh(conn)
                return self.candidates(conn, query, top=top, exclude=exclude)
            for i in range(0, len(fresh), 1000):
                chunk = fresh[i:i + 1000]
                for chunk_ids, vectors, _stamps in self._rows(
                        conn, [VideoEmbedding.job_id.in_(chunk)]):
                    m = vectors.astype(np.float32)
                    norms = np.linalg.norm(m, axis=1)
                    norms[norms == 0] = 1.0
                    scores = (m @ q.astype(np.float32)) / norms
                    ids.extend(int(k) for k in chunk_ids[np.argsort(-scores)[: top + 1]])
        matches = self._graph.search(q, candidate_count(top) + 1)
        ids.extend(int(k) for k in matches.keys)
        seen: dict[int, None] = {}
        for k in ids:
            if k != exclude:
                seen.setdefault(k)
        return list(seen)


def _newest(high: dt.datetime | None, stamps: list[dt.datetime | None]
            ) -> dt.datetime | None:
    for t in stamps:
        if t is not None and (high is None or t > high):
            high = t
    return high


_OPEN: dict[tuple[str, str, str], VectorIndex] = {}


def index_dir() -> str:
    return Settings.from_env().ann_dir or ANN_DIR


def min_rows() -> int:
    return Settings.from_env().ann_min_rows


def open_index(conn: Connection, *, model: str, weights_id: str, dim: int,
               directory: str | None = None) -> VectorIndex | None:
    """The current index of this database's ``model``/``weights_id`` vectors, built on
    first use; None when an exact scan is the better answer (see the module's doc)."""
    if not enabled():
        return None
    database = database_identity(conn)
    key = (database, model, weights_id)
    index = _OPEN.get(key)
    if index is None or index.dim != dim:
        index = VectorIndex(directory or index_dir(), database=database, model=model,
                            weights_id=weights_id, dim=dim)
    if not (index.meta_path.exists() and index.load()):
        rows = conn.scalar(select(func.count()).where(
            VideoEmbedding.model == model, VideoEmbedding.weights_id == weights_id)) or 0
        if rows < min_rows():
            return None
        index.refresh(conn)
    _OPEN[key] = index
    return index
