"""Results at library scale: a synthetic library (benchmarks/libgen.py) of N videos x M
clips, loaded through vidq's schema, and the user-facing queries on it.

For each database and size:

* ``vidq results --label L --min-score S`` (first page of 100 rows, a common label and
  a rare one), ``vidq segments --label L --min-duration D`` (first page) and ``vidq
  status --batch`` on the library's batch (every video) and on a batch of
  ``--status-jobs`` jobs (200,000 by default, whatever the library's size): p95 of
  ``--repeat`` runs of the functions the commands call, on a warm connection, against
  the same queries after the indexes of migrations 0007 and 0010 are dropped (the 0006 schema),
  in the same run;
* ``vidq similar JOB --top 10`` through vidq/ann.py's index (warm process; the build
  is timed apart), its recall@10 against the exact answer computed with numpy over
  every vector, against the exact scan vidq falls back to (``VIDQ_ANN=off``);
* ``vidq export --batch library --format parquet`` in a fresh process: rows/s and its
  peak RSS, against ``COPY (SELECT ...) TO STDOUT`` of the same tables (PostgreSQL) or
  a bare cursor over them (SQLite): what the database alone delivers.

Then a growth table: each figure at every size against the smallest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import POSTGRES_URL, Report, child_env
from benchmarks.libgen import BATCH, STATUS_BATCH, Library, load
from benchmarks.services import MEASURED, p95, postgres_database

NEW_INDEXES = ("ix_video_labels_label_job", "ix_label_segments_label_job",
               "ix_jobs_batch_status_submitted", "ix_jobs_batch_finished")
"""The library-scale indexes (migrations 0007 and 0010), dropped for the baseline."""
EXPORT_TABLES = ("jobs", "video_labels", "clip_predictions", "label_segments",
                 "video_embeddings", "clip_embeddings")


def library_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", type=int, nargs="+", default=[10_000, 50_000],
                        help="library sizes in videos, PostgreSQL (default 10,000 and 50,000: "
                        "1M and 5M clip-label rows at 20 clips x top-5)")
    parser.add_argument("--clips", type=int, default=20, help="clips per video (default 20)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--segments", type=int, default=5, help="segments per video")
    parser.add_argument("--labels", type=int, default=400)
    parser.add_argument("--dim", type=int, default=2048, help="embedding size (slow_r50's)")
    parser.add_argument("--no-vectors", action="store_true",
                        help="no embeddings (and no similar figures)")
    parser.add_argument("--clip-vector-share", type=float, default=0.25,
                        help="share of clips with a clip vector (default 0.25: 1M of 4M)")
    parser.add_argument("--db", nargs="+", default=["postgresql", "sqlite"],
                        choices=["postgresql", "sqlite"])
    parser.add_argument("--sqlite-share", type=float, default=0.1,
                        help="SQLite sizes as a share of --videos (default 0.1)")
    parser.add_argument("--status-jobs", type=int, default=200_000,
                        help="jobs of a second batch, for `vidq status --batch` at that size "
                        "whatever the library's (default 200,000; SQLite: --sqlite-share)")
    parser.add_argument("--repeat", type=int, default=100, help="runs per query, indexed")
    parser.add_argument("--baseline-repeat", type=int, default=5,
                        help="runs per query without the 0007 and 0010 indexes")
    parser.add_argument("--similar-queries", type=int, default=30)
    parser.add_argument("--exact-queries", type=int, default=2,
                        help="queries through the exact scan (slow: every vector in Python)")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--explain", type=Path, default=None, metavar="DIR",
                        help="write EXPLAIN (ANALYZE) of each query per size into DIR")
    parser.add_argument("--pg", default=POSTGRES_URL)
    parser.add_argument("--quick", action="store_true", help="2,000 videos, few repeats")


def _ms(fn: Callable[[], Any], repeat: int) -> list[float]:
    fn()  # warm the cache, as a poller would
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def queries(lib: Library) -> dict[str, tuple[str, Callable[[Any], Any]]]:
    """The user-facing queries: short name -> (the command, a function of a Session)."""
    from producer.query import iter_results, iter_segments, status_summary

    common, rare = lib.label(0), lib.label(int(lib.labels * 0.75))
    named: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "results common": (f"results --label {common} --min-score 0.5", lambda s: list(
            iter_results(s, label=common, min_score=0.5, limit=100))),
        "results rare": (f"results --label {rare} --min-score 0.1", lambda s: list(
            iter_results(s, label=rare, min_score=0.1, limit=100))),
        "segments": (f"segments --label {common} --min-duration 10", lambda s: list(
            iter_segments(s, label=common, min_duration_s=10.0, limit=100))),
        "status": (f"status --batch {BATCH}", lambda s: status_summary(s, batch=BATCH)),
    }
    if lib.status_jobs:
        named["status jobs"] = (f"status --batch {STATUS_BATCH} ({lib.status_jobs:,} jobs)",
                                lambda s: status_summary(s, batch=STATUS_BATCH))
    return named


def explain(engine: Any, lib: Library, out: Path) -> None:
    """EXPLAIN (ANALYZE) of the SQL each query runs, as the database plans it."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "EXPLAIN" not in statement:
            statements.append((statement, parameters))

    lines: list[str] = []
    postgres = engine.dialect.name == "postgresql"
    for name, fn in queries(lib).values():
        statements.clear()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            with Session(engine) as session:
                fn(session)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        lines.append(f"### vidq {name}\n")
        for statement, parameters in statements:
            if "FROM batches" in statement and "batches.name =" in statement:
                continue  # the batch name lookup: a unique index, not shown
            prefix = "EXPLAIN (ANALYZE, BUFFERS) " if postgres else "EXPLAIN QUERY PLAN "
            raw = engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute(prefix + statement, parameters)
                plan = [" | ".join(str(c) for c in row) for row in cur.fetchall()]
            finally:
                raw.close()
            lines += ["```sql", statement.strip() + ";", "```", "```", *plan, "```", ""]
    out.write_text("\n".join(lines) + "\n")


def drop_new_indexes(engine: Any) -> None:
    """Back to the 0006 indexes (before 0007 and 0010), for the baseline."""
    from sqlalchemy import text

    with engine.begin() as conn:
        for name in NEW_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text("CREATE INDEX ix_jobs_batch_status ON jobs (batch_id, status)"))
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"))


def similar_figures(engine: Any, args: argparse.Namespace, report: Report,
                    ann_dir: str) -> dict[str, float]:
    """ANN p95 and recall@10 against numpy's exact answer; the exact scan's time."""
    import numpy as np
    from sqlalchemy import text

    from vidq import ann
    from vidq.embeddings import nearest

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT job_id, vector FROM video_embeddings")).all()
    ids = np.array([r[0] for r in rows])
    m = np.frombuffer(b"".join(r[1] for r in rows), "<f2").reshape(len(rows), -1)
    del rows
    m = m.astype(np.float32)
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(1)
    picks = rng.choice(len(ids), size=min(args.similar_queries, len(ids)), replace=False)
    truth = {}
    for i in picks:
        scores = m @ m[i]
        scores[i] = -9.0
        truth[int(ids[i])] = {int(j) for j in ids[np.argpartition(-scores, 10)[:10]]}
    del m
    env = {"VIDQ_ANN_DIR": ann_dir, "VIDQ_ANN_MIN_ROWS": "1", "VIDQ_ANN": "on"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with engine.connect() as conn:
            t = time.perf_counter()
            index = ann.open_index(conn, model="slow_r50", weights_id="sha256:" + "5" * 64,
                                   dim=args.dim)
            build_s = time.perf_counter() - t
            assert index is not None
            times, recalls = [], []
            for job in truth:
                t = time.perf_counter()
                got = nearest(conn, job, top=10)
                times.append((time.perf_counter() - t) * 1000)
                recalls.append(len({n.job_id for n in got.neighbours} & truth[job]) / 10)
            os.environ["VIDQ_ANN"] = "off"
            exact = []
            for job in list(truth)[: args.exact_queries]:
                t = time.perf_counter()
                nearest(conn, job, top=10)
                exact.append((time.perf_counter() - t) * 1000)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    report.add("similar --top 10: exact scan (VIDQ_ANN=off)", exact, baseline=True)
    report.add("similar --top 10: ANN + exact re-rank", p95(times),
               against="similar --top 10: exact scan (VIDQ_ANN=off)")
    recall = statistics.mean(recalls)
    report.notes.append(f"similar: {len(ids):,} video vectors; recall@10 {recall:.3f} "
                        f"(min {min(recalls):.1f}) over {len(recalls)} queries; index built "
                        f"in {build_s:.1f}s; p50 {statistics.median(times):.1f} ms")
    return {"similar p95 ms": p95(times), "similar recall@10": recall,
            "ann build s": build_s}


def export_figures(url: str, engine: Any, report: Report, tmp: Path) -> dict[str, float]:
    """vidq export in a fresh process (rows/s, peak RSS) against the database's own
    rows/s over the same tables."""
    from sqlalchemy import text

    # The library batch's rows only: jobs also holds STATUS_BATCH's, which the export
    # of the library batch does not write.
    rows_of = {t: t for t in EXPORT_TABLES}
    rows_of["jobs"] = f"jobs WHERE batch_id = (SELECT id FROM batches WHERE name = '{BATCH}')"
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {rows_of[t]}")).scalar() or 0
                  for t in EXPORT_TABLES}
    rows = sum(counts.values())
    out = tmp / "export"
    command = [sys.executable, "-m", "vidq.cli", "export", "--batch", BATCH, "--format",
               "parquet", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True,
                          text=True, check=False, env=child_env({"VIDQ_DATABASE_URL": url}))
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    wall, peak_kib = proc.stdout.split()
    export_rate = rows / float(wall)
    t = time.perf_counter()
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            for table in EXPORT_TABLES:
                with cur.copy(f"COPY (SELECT * FROM {rows_of[table]}) TO STDOUT") as copy:
                    for _block in copy:
                        pass
        finally:
            raw.close()
        floor_name = "COPY TO STDOUT of the same tables"
    else:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            for table in EXPORT_TABLES:
                for _row in cur.execute(f"SELECT * FROM {rows_of[table]}"):
                    pass
        finally:
            raw.close()
        floor_name = "sqlite3 cursor over the same tables"
    floor_rate = rows / (time.perf_counter() - t)
    size = sum(f.stat().st_size for f in out.glob("*.parquet"))
    report.add(f"export rows/s: {floor_name}", floor_rate, baseline=True)
    report.add("export rows/s: vidq export --format parquet", export_rate,
               against=f"export rows/s: {floor_name}")
    per_table = ", ".join(f"{t} {n:,}" for t, n in counts.items())
    report.notes.append(f"export: {rows:,} rows ({per_table}) in {float(wall):.1f}s, "
                        f"peak RSS {int(peak_kib) / 1024:.0f} MiB, "
                        f"{size / 2**20:.0f} MiB of Parquet")
    return {"export rows/s": export_rate, "export peak RSS MiB": int(peak_kib) / 1024}


@contextlib.contextmanager
def database(kind: str, pg: str, tmp: Path) -> Iterator[str]:
    if kind == "postgresql":
        with postgres_database(pg, "lib") as url:
            yield url
    else:
        path = tmp / "library.db"
        yield f"sqlite:///{path}"
        path.unlink(missing_ok=True)


def one_size(kind: str, lib: Library, args: argparse.Namespace
             ) -> tuple[list[Report], dict[str, float]]:
    from sqlalchemy.orm import Session

    from vidq.db import make_engine
    from vidq.migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="vidq-library-") as tmp_name, \
            database(kind, args.pg, Path(tmp_name)) as url:
        tmp = Path(tmp_name)
        engine = make_engine(url)
        upgrade(engine)
        t = time.perf_counter()
        counts = load(engine, lib)
        load_s = time.perf_counter() - t
        title = (f"{'PostgreSQL' if kind == 'postgresql' else 'SQLite'}, "
                 f"{counts['clip_predictions']:,} clip-label rows ({lib.videos:,} videos x "
                 f"{lib.clips} clips x top-{lib.top_k}, {counts['label_segments']:,} segments, "
                 f"{counts['video_embeddings']:,} video and {counts['clip_embeddings']:,} "
                 "clip vectors)")
        print(f"{title}: loaded in {load_s:.0f}s", flush=True)
        figures: dict[str, float] = {"clip-label rows": counts["clip_predictions"]}
        report = Report(title + ": ms (p95) or rows/s; 0007+0010 against the 0006 schema", "")
        if args.explain:
            args.explain.mkdir(parents=True, exist_ok=True)
            explain(engine, lib, args.explain / f"{kind}-{lib.clip_label_rows // 10**5}e5.md")
        if not args.no_vectors:
            figures.update(similar_figures(engine, args, report, str(tmp / "ann")))
        if not args.no_export:
            figures.update(export_figures(url, engine, report, tmp))
        indexed: dict[str, list[float]] = {}
        for key, (_command, fn) in queries(lib).items():
            with Session(engine) as session:
                indexed[key] = _ms(lambda fn=fn, session=session: fn(session), args.repeat)
            figures[f"{key} p95 ms"] = p95(indexed[key])
        drop_new_indexes(engine)
        for key, (command, fn) in queries(lib).items():
            with Session(engine) as session:
                bare = _ms(lambda fn=fn, session=session: fn(session), args.baseline_repeat)
            report.add(f"{command}: 0006 indexes", p95(bare), baseline=True)
            report.add(f"{command}: 0007+0010 indexes", p95(indexed[key]),
                       against=f"{command}: 0006 indexes")
            report.notes.append(f"{command}: p50 {statistics.median(indexed[key]):.2f} ms "
                                f"(0007+0010), {statistics.median(bare):.2f} ms (0006)")
        report.notes.append(f"loaded in {load_s:.0f}s; p95 of {args.repeat} runs (0007+0010), "
                            f"{args.baseline_repeat} (0006)")
        engine.dispose()
    return [report], figures


def growth(kind: str, sizes: list[dict[str, float]]) -> Report:
    report = Report(f"{'PostgreSQL' if kind == 'postgresql' else 'SQLite'} growth: each "
                    "figure by clip-label rows, against the smallest size", "")
    first = sizes[0]
    for name in first:
        if name == "clip-label rows":
            continue
        base = f"{name} @ {first['clip-label rows'] / 1e6:g}M"
        report.add(base, first[name], baseline=True)
        for later in sizes[1:]:
            report.add(f"{name} @ {later['clip-label rows'] / 1e6:g}M", later[name],
                       against=base)
    rows = ", ".join(f"{s['clip-label rows'] / first['clip-label rows']:.1f}x"
                     for s in sizes[1:])
    report.notes.append(f"rows grew {rows}")
    return report


def library(args: argparse.Namespace) -> list[Report]:
    """vidq results/segments/status/similar/export on a synthetic library: p95 ms, recall,
    rows/s, against the 0006 schema, the exact scan and the database's own COPY."""
    if args.quick:
        args.videos, args.repeat, args.baseline_repeat = [2_000], 10, 3
        args.similar_queries, args.exact_queries = 10, 1
    reports: list[Report] = []
    for kind in args.db:
        sizes = []
        for videos in args.videos:
            n = videos if kind == "postgresql" else max(100, int(videos * args.sqlite_share))
            lib = Library(videos=n, clips=args.clips, top_k=args.top_k, labels=args.labels,
                          segments=args.segments, video_vectors=not args.no_vectors,
                          clip_vectors=0 if args.no_vectors else
                          int(n * args.clips * args.clip_vector_share), dim=args.dim,
                          status_jobs=args.status_jobs if kind == "postgresql" else
                          int(args.status_jobs * args.sqlite_share))
            got, figures = one_size(kind, lib, args)
            print("  " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
            reports += got
            sizes.append(figures)
        if len(sizes) > 1:
            reports.append(growth(kind, sizes))
    return reports
