"""Library scale, at small sizes: the indexed first pages answer exactly what a full
read of the tables answers; ``vidq similar`` through the approximate index keeps its
recall bound (also on a library large enough that a search walks part of the graph),
takes in rows written after the index was saved, survives a new process, is rebuilt
when it was built with other parameters and never returns a purged job.

The library is benchmarks/libgen.py's synthetic one (Zipf labels, segments, vectors),
the same the library benchmark loads at millions of rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

pytest.importorskip("usearch")

from benchmarks.libgen import BATCH, MODEL, WEIGHTS_ID, Library, load  # noqa: E402
from producer.query import iter_results, iter_segments, status_summary  # noqa: E402
from producer.retention import purge  # noqa: E402
from vidq import ann  # noqa: E402
from vidq.db import dispose_engines, make_engine  # noqa: E402
from vidq.embeddings import float16_from_floats, nearest, write_embeddings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIB = Library(videos=400, clips=6, labels=40, segments=4, video_vectors=True, dim=64,
              clip_vectors=100)
WIDE = Library(videos=12_000, clips=1, top_k=3, labels=400, segments=1, video_vectors=True,
               dim=256)
"""Enough vectors that a search does not visit the whole graph (``ann.EXPANSION_SEARCH``
is 1024; LIB's 390 vectors are all reached), with the benchmark's 400 Zipf clusters."""


@pytest.fixture
def library_url(database_url: str) -> Iterator[str]:
    engine = make_engine(database_url)
    load(engine, LIB, progress=lambda _m: None)
    engine.dispose()
    yield database_url
    dispose_engines()


@pytest.fixture
def wide_library_url(database_url: str) -> Iterator[str]:
    engine = make_engine(database_url)
    load(engine, WIDE, progress=lambda _m: None)
    engine.dispose()
    yield database_url
    dispose_engines()


@pytest.fixture
def ann_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"VIDQ_ANN": "on", "VIDQ_ANN_DIR": str(tmp_path / "ann"), "VIDQ_ANN_MIN_ROWS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ann._OPEN.clear()
    return env


def all_rows(url: str, query: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query)))
    finally:
        engine.dispose()


@pytest.mark.parametrize("label,min_score", [("class_000", 0.5), ("class_030", 0.05),
                                             ("class_001", None)])
def test_results_first_page_equals_the_full_read(library_url: str, label: str,
                                                 min_score: float | None) -> None:
    rows = all_rows(library_url, "SELECT v.job_id, v.rank, v.score FROM video_labels v "
                    "JOIN jobs j ON j.id = v.job_id WHERE j.status = 'succeeded' "
                    f"AND v.label = '{label}'")
    expected = sorted((j, r) for j, r, s in rows if min_score is None or s >= min_score)[:100]
    assert len(expected) >= 3
    engine = make_engine(library_url)
    with Session(engine) as session:
        got = [(r["job_id"], r["rank"]) for r in iter_results(
            session, label=label, min_score=min_score, limit=100)]
    engine.dispose()
    assert got == expected


@pytest.mark.parametrize("label,min_duration", [("class_000", 10.0), ("class_020", 2.0)])
def test_segments_first_page_equals_the_full_read(library_url: str, label: str,
                                                  min_duration: float) -> None:
    rows = all_rows(library_url, "SELECT s.job_id, s.segment_index, s.start_sec, s.duration_s "
                    "FROM label_segments s JOIN jobs j ON j.id = s.job_id "
                    f"WHERE j.status = 'succeeded' AND s.label = '{label}'")
    expected = [(j, start) for j, _i, start, d in sorted(rows)
                if d >= min_duration - 1e-6][:100]
    assert len(expected) >= 3
    engine = make_engine(library_url)
    with Session(engine) as session:
        got = [(r["job_id"], r["start_sec"]) for r in iter_segments(
            session, label=label, min_duration_s=min_duration, limit=100)]
    engine.dispose()
    assert got == expected


def test_batch_status_counts_equal_the_full_read(library_url: str) -> None:
    jobs = all_rows(library_url, "SELECT status, clips_done FROM jobs")
    engine = make_engine(library_url)
    with Session(engine) as session:
        summary = status_summary(session, batch=BATCH)
    engine.dispose()
    for status in ("succeeded", "failed", "queued", "running"):
        assert summary.counts[status] == sum(1 for s, _c in jobs if s == status)
    assert summary.clips_done == sum(c for s, c in jobs if s == "succeeded")


def test_the_sqlite_plans_read_the_library_indexes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plans.db'}"
    engine = make_engine(url)
    from vidq.migrate import upgrade

    upgrade(engine)
    load(engine, LIB, progress=lambda _m: None)
    plans = {}
    with engine.connect() as conn:
        for name, sql in {
            "results": "SELECT v.job_id FROM jobs JOIN video_labels v ON v.job_id = jobs.id "
                       "WHERE jobs.status = 'succeeded' AND v.label = 'class_000' "
                       "AND v.score >= 0.5 ORDER BY v.job_id, v.rank LIMIT 100",
            "segments": "SELECT s.job_id FROM label_segments s JOIN jobs ON jobs.id = s.job_id "
                        "WHERE jobs.status = 'succeeded' AND s.label = 'class_000' AND "
                        "s.duration_s >= 10 ORDER BY s.job_id, s.segment_index LIMIT 100",
            "status": "SELECT status, count(*), sum(clips_done) FROM jobs WHERE batch_id = 1 "
                      "GROUP BY status",
        }.items():
            plans[name] = " ".join(str(r[-1]) for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + sql))
    engine.dispose()
    assert "ix_video_labels_label_job" in plans["results"], plans["results"]
    assert "ix_label_segments_label_job" in plans["segments"], plans["segments"]
    assert "COVERING INDEX ix_jobs_batch_status_submitted" in plans["status"], plans["status"]


def exact_neighbours(url: str, job_ids: list[int]) -> dict[int, list[int]]:
    os.environ["VIDQ_ANN"] = "off"
    try:
        engine = make_engine(url)
        with engine.connect() as conn:
            return {j: [n.job_id for n in nearest(conn, j, top=10).neighbours] for j in job_ids}
    finally:
        os.environ["VIDQ_ANN"] = "on"
        engine.dispose()


def some_jobs(url: str, n: int) -> list[int]:
    return [r[0] for r in all_rows(url, "SELECT job_id FROM video_embeddings ORDER BY job_id")
            ][:: 7][:n]


def check_recall(url: str, queries: list[int], vectors: int) -> float:
    """recall@10 of ``nearest`` through the index against the exact scan's answers."""
    exact = exact_neighbours(url, queries)
    engine = make_engine(url)
    recalls = []
    with engine.connect() as conn:
        for j in queries:
            got = nearest(conn, j, top=10)
            assert got.compared < min(vectors - 1, 200)  # candidates, not every vector
            recalls.append(len({n.job_id for n in got.neighbours} & set(exact[j])) / 10)
            # The similarities are the exact ones, re-ranked from the stored vectors.
            sims = [n.similarity for n in got.neighbours]
            assert sims == sorted(sims, reverse=True)
    engine.dispose()
    return sum(recalls) / len(recalls)


def test_similar_through_the_index_meets_the_recall_bound(library_url: str,
                                                          ann_env: dict[str, str]) -> None:
    assert check_recall(library_url, some_jobs(library_url, 30), 390) >= 0.95
    assert list(Path(ann_env["VIDQ_ANN_DIR"]).glob("*.usearch"))


def test_similar_meets_the_recall_bound_where_a_search_visits_part_of_the_graph(
        wide_library_url: str, ann_env: dict[str, str]) -> None:
    vectors = all_rows(wide_library_url, "SELECT count(*) FROM video_embeddings")[0][0]
    assert vectors > 10 * ann.EXPANSION_SEARCH
    queries = [r[0] for r in all_rows(
        wide_library_url, "SELECT job_id FROM video_embeddings ORDER BY job_id")][::197][:40]
    assert check_recall(wide_library_url, queries, vectors) >= 0.95


ASK = """
import json, sys
from vidq import ann
from vidq.db import make_engine
from vidq.embeddings import nearest
engine = make_engine(sys.argv[1])
with engine.connect() as conn:
    out = {j: [n.job_id for n in nearest(conn, int(j), top=10).neighbours]
           for j in sys.argv[2:]}
meta = json.loads(next(__import__("pathlib").Path(ann.index_dir()).glob("*.json")).read_text())
print(json.dumps({"answers": out, "meta": meta}))
"""


def ask_in_a_new_process(url: str, env: dict[str, str], job_ids: list[int]) -> dict[str, Any]:
    """``nearest`` in a fresh Python process, as a restarted host would run it."""
    proc = subprocess.run([sys.executable, "-c", ASK, url, *map(str, job_ids)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_video(url: str, vector: np.ndarray, path: str) -> int:
    """A new succeeded job with this vector, written as a worker writes it."""
    engine = make_engine(url)
    sessions = sessionmaker(engine)
    with sessions() as session, session.begin():
        job_id = session.execute(text(
            "INSERT INTO jobs (batch_id, path, content_sha256, size_bytes, queue, status, "
            "priority, attempts, submitted_at, model, weights, weights_id, strategy, "
            "clips_requested, start_sec, crops, config_key) VALUES (1, :p, :sha, 1, 'vidq', "
            "'succeeded', 5, 1, CURRENT_TIMESTAMP, :m, 'pretrained', :w, 'sliding', 1, 0, 1, "
            "'k') RETURNING id"),
            {"p": path, "sha": path, "m": MODEL, "w": WEIGHTS_ID}).scalar_one()
        write_embeddings(session, job_id, model=MODEL, weights_id=WEIGHTS_ID,
                         video=float16_from_floats(vector.tolist()), replace=False)
    engine.dispose()
    return int(job_id)


def stored_vector(url: str, job_id: int) -> np.ndarray:
    blob = all_rows(url, f"SELECT vector FROM video_embeddings WHERE job_id = {job_id}")[0][0]
    return np.frombuffer(blob, dtype="<f2").astype(np.float64)


def test_the_index_survives_a_new_process_and_takes_in_new_rows(
        library_url: str, ann_env: dict[str, str]) -> None:
    queries = some_jobs(library_url, 5)
    first = ask_in_a_new_process(library_url, ann_env, queries)
    assert first["meta"]["builds"] == 1
    # Results land after the index was saved: a near copy of the first query's video.
    twin = add_video(library_url, stored_vector(library_url, queries[0]) * 1.01, "/twin.mp4")
    second = ask_in_a_new_process(library_url, ann_env, queries)
    assert second["meta"]["builds"] == 1, "a new process must reuse the saved index"
    assert second["answers"][str(queries[0])][0] == twin
    exact = exact_neighbours(library_url, queries)
    for j in queries:
        assert len(set(second["answers"][str(j)]) & set(exact[j])) >= 9


def test_the_index_merges_new_rows_without_a_rebuild(library_url: str, ann_env: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    queries = some_jobs(library_url, 3)
    ask_in_a_new_process(library_url, ann_env, queries)
    monkeypatch.setattr(ann, "MERGE_ROWS", 3)
    base = stored_vector(library_url, queries[1])
    added = [add_video(library_url, base * (1.0 + i / 100), f"/new{i}.mp4") for i in range(5)]
    engine = make_engine(library_url)
    with engine.connect() as conn:
        got = [n.job_id for n in nearest(conn, queries[1], top=10).neighbours]
    engine.dispose()
    assert set(added) <= set(got)
    meta = json.loads(next(Path(ann_env["VIDQ_ANN_DIR"]).glob("*.json")).read_text())
    assert (meta["builds"], meta["merges"]) == (1, 1)
    assert meta["keys"] == len(all_rows(library_url, "SELECT job_id FROM video_embeddings"))


def test_an_index_built_with_other_parameters_is_rebuilt(library_url: str,
                                                        ann_env: dict[str, str]) -> None:
    queries = some_jobs(library_url, 5)
    ask_in_a_new_process(library_url, ann_env, queries)
    directory = Path(ann_env["VIDQ_ANN_DIR"])
    meta_path, graph = next(directory.glob("*.json")), next(directory.glob("*.usearch"))
    assert json.loads(meta_path.read_text())["graph"] == ann.GRAPH
    # As an index saved before the build parameters were recorded (or with others).
    meta = json.loads(meta_path.read_text())
    del meta["graph"]
    meta_path.write_text(json.dumps(meta))
    saved = graph.stat().st_mtime_ns
    after = ask_in_a_new_process(library_url, ann_env, queries)
    assert after["meta"]["graph"] == ann.GRAPH
    assert graph.stat().st_mtime_ns != saved, "the old graph must be rebuilt, not reused"
    exact = exact_neighbours(library_url, queries)
    for j in queries:
        assert len(set(after["answers"][str(j)]) & set(exact[j])) >= 9


class SlowGraph:
    """usearch's graph, with each page's add taking longer than the idle timeout."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph

    def add(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5)
        return self.graph.add(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.graph)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)


def test_a_build_slower_than_the_idle_transaction_timeout_completes(
        library_url: str, ann_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    if not library_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's idle-in-transaction timeout")
    monkeypatch.setattr(ann, "BUILD_CHUNK", 100)  # four pages of LIB's vectors
    new_graph = ann.VectorIndex._new_graph
    monkeypatch.setattr(ann.VectorIndex, "_new_graph", lambda self: SlowGraph(new_graph(self)))
    engine = make_engine(library_url, idle_in_transaction_timeout_s=1)
    with engine.connect() as conn:
        got = nearest(conn, some_jobs(library_url, 1)[0], top=10)
    engine.dispose()
    assert len(got.neighbours) == 10
    assert json.loads(next(Path(ann_env["VIDQ_ANN_DIR"]).glob("*.json")).read_text())[
        "keys"] == len(all_rows(library_url, "SELECT job_id FROM video_embeddings"))


def test_a_purge_leaves_no_purged_job_in_the_answers(library_url: str,
                                                     ann_env: dict[str, str]) -> None:
    queries = some_jobs(library_url, 40)
    before = ask_in_a_new_process(library_url, ann_env, queries)["answers"]
    keep, doomed = queries[:10], sorted({n for j in queries[:10] for n in before[str(j)]})
    engine = make_engine(library_url)
    with engine.begin() as conn:  # a batch of its own for the jobs to purge
        conn.execute(text("INSERT INTO batches (id, name, created_at) "
                          "VALUES (2, 'doomed', CURRENT_TIMESTAMP)"))
        conn.execute(text("UPDATE jobs SET batch_id = 2 WHERE id IN ("
                          + ",".join(str(j) for j in doomed if j not in keep) + ")"))
    report = purge(sessionmaker(engine), batch="doomed")
    engine.dispose()
    assert report.jobs > 10
    purged = {j for j in doomed if j not in keep}
    after = ask_in_a_new_process(library_url, ann_env, keep)
    exact = exact_neighbours(library_url, keep)
    for j in keep:
        got = after["answers"][str(j)]
        assert not purged & set(got)
        assert len(got) == 10
        assert len(set(got) & set(exact[j])) >= 9
