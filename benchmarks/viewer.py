"""The viewer's speed (``vidq serve``, vidq/viewer/): a 2-hour video's page and the
library search, on PostgreSQL.

- **Video page.** One job of 7,200 s sampled by 3,600 clips (2 s windows), their top-5
  rows (18,000 clip rows) and the segments a worker derives from them. Measured: the
  whole response through the app (queries, assembly, template, JSON, middleware),
  against the page's SQL alone (the same four statements, rows fetched). With
  headless Chromium installed, also the time from navigation to the lanes drawn.
- **Search.** 1,000,000 segment rows over 10,000 videos and 400 labels. Measured: the
  search page (``/search?label=...&min_score=0.5&min_duration=2``, the label list
  included) against its SQL alone, and that SQL against itself with the segment
  indexes dropped.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import POSTGRES_URL, Report, alternate
from benchmarks.services import postgres_database

LABELS = [f"label{i:03d}" for i in range(400)]


def viewer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segments", type=int, default=1_000_000,
                        help="segment rows in the library (default 1,000,000)")
    parser.add_argument("--clips", type=int, default=3600, help="clips of the long video")
    parser.add_argument("--repeat", type=int, default=20, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default=POSTGRES_URL)
    parser.add_argument("--quick", action="store_true",
                        help="20,000 segment rows, 600 clips, 5 requests per round")


def long_video(engine: Any, clips: int) -> int:
    """A job of ``clips`` 2-second windows whose top-1 label changes every 20-60 clips."""
    from sqlalchemy.orm import Session

    from vidq.db import Batch, ClipPrediction, Job, VideoLabel
    from vidq.segments import ClipRow, ScoredLabel, SegmentRules, write_segments

    rng = random.Random(0)
    rows: list[ClipRow] = []
    current = rng.randrange(400)
    left = 0
    for i in range(clips):
        if left == 0:
            current, left = rng.randrange(400), rng.randrange(20, 60)
        left -= 1
        lead = rng.uniform(0.25, 0.9)
        others = rng.sample([c for c in range(400) if c != current], 4)
        rest = [(1 - lead) * w for w in (0.4, 0.3, 0.2, 0.1)]
        top = [ScoredLabel(current, LABELS[current], lead),
               *(ScoredLabel(c, LABELS[c], s) for c, s in zip(others, rest))]
        rows.append(ClipRow(index=i, start_sec=2.0 * i, end_sec=2.0 * i + 2, top=top))
    with Session(engine) as session, session.begin():
        batch = Batch(name="long")
        session.add(batch)
        session.flush()
        job = Job(batch_id=batch.id, path="/media/long.mp4", content_sha256="0" * 64,
                  size_bytes=1, status="succeeded", model="x3d_xs", weights="w",
                  weights_id="w", strategy="sliding", clips_requested=clips, config_key="k",
                  duration_s=2.0 * clips, clips_done=clips)
        session.add(job)
        session.flush()
        session.bulk_insert_mappings(ClipPrediction, [  # type: ignore[arg-type]
            dict(job_id=job.id, clip_index=c.index, rank=r + 1, start_sec=c.start_sec,
                 end_sec=c.end_sec, class_id=s.class_id, label=s.label, score=s.score)
            for c in rows for r, s in enumerate(c.top)])
        session.bulk_insert_mappings(VideoLabel, [  # type: ignore[arg-type]
            dict(job_id=job.id, rank=r + 1, class_id=r, label=LABELS[r], score=0.1)
            for r in range(5)])
        write_segments(session, job.id, rows, SegmentRules(), replace=False)
        return job.id


def library(engine: Any, segments: int) -> None:
    """``segments`` segment rows over ``segments / 100`` succeeded jobs (PostgreSQL SQL)."""
    from sqlalchemy import text

    jobs = max(1, segments // 100)
    with engine.begin() as conn:
        conn.execute(text(
            "insert into jobs (path, content_sha256, size_bytes, status, priority, attempts, "
            " submitted_at, model, weights, weights_id, strategy, clips_requested, start_sec, "
            " crops, config_key) "
            "select '/media/lib/' || i || '.mp4', 'sha' || i, 1, 'succeeded', 5, 1, now(), "
            " 'x3d_xs', 'w', 'w', 'sliding', 100, 0, 1, 'k' from generate_series(1, :n) i"),
            {"n": jobs})
        conn.execute(text(
            "insert into label_segments (job_id, segment_index, class_id, label, start_sec, "
            " end_sec, duration_s, mean_score, peak_score, clips) "
            "select j.id, s.i, c, 'label' || lpad(c::text, 3, '0'), s.i * 10.0, "
            " s.i * 10.0 + d, d, m, least(1.0, m + 0.1), greatest(1, d::int / 2) "
            "from (select id from jobs where path like '/media/lib/%') j "
            "cross join generate_series(0, 99) s(i) "
            "cross join lateral (select (random() * 399)::int as c, "
            " round((random() * 30)::numeric, 1)::float as d, "
            " (0.3 + random() * 0.7) as m) r"))
        conn.execute(text("analyze"))


def per_request(fn: Callable[[], Any], repeat: int) -> Callable[[], float]:
    def run() -> float:
        fn()  # warm
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
        return statistics.median(samples)
    return run


def viewer(args: argparse.Namespace) -> list[Report]:
    """A 2-hour video's page and the library search against their SQL alone: ms."""
    from sqlalchemy import text
    from starlette.testclient import TestClient

    from vidq.db import make_engine
    from vidq.migrate import upgrade
    from vidq.settings import Settings
    from vidq.viewer.app import create_app

    if args.quick:
        args.segments, args.clips, args.repeat = 20_000, 600, 5
    reports = []
    with postgres_database(args.pg, "vidq_viewer") as url, \
            tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(url)
        upgrade(engine)
        job_id = long_video(engine, args.clips)
        print(f"long video: job {job_id}, {args.clips} clips; filling {args.segments:,} "
              "segment rows...", flush=True)
        library(engine, args.segments)
        app = create_app(Settings(database_url=url, viewer_cache_dir=str(Path(tmp) / "t")))
        client = TestClient(app, base_url="http://127.0.0.1:8765")
        page_html = client.get(f"/video/{job_id}")
        assert page_html.status_code == 200, page_html.text[:500]
        with engine.connect() as conn:
            n_segments = conn.scalar(text(
                "select count(*) from label_segments where job_id = :j"), {"j": job_id})

        def page_sql() -> None:
            with engine.connect() as conn:
                for q in ("select j.*, b.name from jobs j left join batches b "
                          "on b.id = j.batch_id where j.id = :j",
                          "select * from video_labels where job_id = :j order by rank",
                          "select clip_index, start_sec, end_sec, class_id, label, score "
                          "from clip_predictions where job_id = :j order by clip_index, rank",
                          "select * from label_segments where job_id = :j "
                          "order by segment_index"):
                    conn.execute(text(q), {"j": job_id}).all()

        page = Report(f"A {args.clips * 2 / 3600:.1f}-hour video's page ({args.clips:,} clips, "
                      f"{args.clips * 5:,} clip rows, {n_segments} segments), PostgreSQL",
                      "ms", baseline="the page's SQL alone")
        values = alternate({
            "the page's SQL alone": per_request(page_sql, args.repeat),
            "GET /video/ID (whole response)": per_request(
                lambda: client.get(f"/video/{job_id}"), args.repeat),
        }, args.rounds)
        page.add("the page's SQL alone", values["the page's SQL alone"])
        page.add("GET /video/ID (whole response)", values["GET /video/ID (whole response)"])
        page.notes.append(f"page size {len(page_html.content) / 1024:.0f} KiB")
        browser_ms = interactive_ms(app, job_id)
        if browser_ms is not None:
            page.notes.append(f"headless Chromium, navigation to lanes drawn: "
                              f"{browser_ms:.0f} ms (median of 3)")
        reports.append(page)

        label = LABELS[7]
        params = {"label": label, "min_score": "0.5", "min_duration": "2"}
        search_sql = text(
            "select s.job_id, s.segment_index, s.label, s.start_sec, s.end_sec, s.duration_s, "
            " s.mean_score, s.peak_score, s.clips, j.path from label_segments s "
            "join jobs j on j.id = s.job_id where s.label = :l and s.mean_score >= 0.5 "
            "and s.duration_s >= 2 - 1e-6 and j.status = 'succeeded' "
            "order by s.mean_score desc, s.duration_s desc, s.job_id, s.segment_index "
            "limit 51 offset 0")

        def run_sql() -> None:
            with engine.connect() as conn:
                conn.execute(search_sql, {"l": label}).all()

        search = Report(f"Library search on {args.segments:,} segment rows, PostgreSQL",
                        "ms", baseline="the search's SQL alone")
        values = alternate({
            "the search's SQL alone": per_request(run_sql, args.repeat),
            "GET /search (whole response)": per_request(
                lambda: client.get("/search", params=params), args.repeat),
        }, args.rounds)
        search.add("the search's SQL alone", values["the search's SQL alone"])
        search.add("GET /search (whole response)", values["GET /search (whole response)"])
        with engine.begin() as conn:
            conn.execute(text("drop index ix_label_segments_label_mean_score"))
            conn.execute(text("drop index ix_label_segments_label_duration"))
        unindexed = alternate({"the search's SQL, segment indexes dropped":
                               per_request(run_sql, max(2, args.repeat // 4))}, args.rounds)
        search.add("the search's SQL, segment indexes dropped",
                   unindexed["the search's SQL, segment indexes dropped"])
        reports.append(search)
        engine.dispose()
        app.state.viewer.engine.dispose()
    return reports


def interactive_ms(app: Any, job_id: int) -> float | None:
    """Navigation to the lanes drawn in headless Chromium, or None without a browser."""
    import subprocess
    import threading

    try:
        import uvicorn
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    listed = subprocess.run(["dpkg", "-L", "chromium-headless-shell"], capture_output=True,
                            text=True, check=False).stdout.splitlines()
    binary = next((p for p in listed if p.endswith("/chromium/chromium-headless-shell")), None)
    if binary is None:
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=binary, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"])
            samples = []
            for _ in range(4):
                page = browser.new_page()
                t0 = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/video/{job_id}", wait_until="commit")
                page.wait_for_selector("#lanes button.seg")
                samples.append((time.perf_counter() - t0) * 1000)
                page.close()
            browser.close()
        return statistics.median(samples[1:])
    finally:
        server.should_exit = True
        thread.join(10)
