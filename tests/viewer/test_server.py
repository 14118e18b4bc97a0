"""``vidq serve``'s pages over a real library, on SQLite and PostgreSQL (through
Starlette's TestClient: the ASGI app in this process), and ``vidq segments --job``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient

from tests.cli import run_vidq
from tests.viewer.conftest import viewer_settings
from tests.viewer.library import Library, stored_segments
from vidq.viewer.app import create_app

LOCAL = "http://127.0.0.1:8765"


def client(lib: Library, tmp_path: Path, **overrides: object) -> TestClient:
    return TestClient(create_app(viewer_settings(lib, tmp_path, **overrides)), base_url=LOCAL)


def page_data(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="vidq-data">(.*?)</script>', html,
                      re.S)
    assert found, "the page embeds its data"
    return json.loads(found.group(1))


def test_pages_show_the_library(library: Library, tmp_path: Path) -> None:
    c = client(library, tmp_path)
    index = c.get("/")
    assert index.status_code == 200 and 'href="/batch/demo"' in index.text
    batch = c.get("/batch/demo")
    assert batch.status_code == 200
    # Failed jobs with their error kinds and (escaped) messages.
    assert "decode_error: 1" in batch.text
    assert "broken.mp4: &lt;i&gt;moov atom&lt;/i&gt; not found" in batch.text
    assert f'href="/video/{library.jobs["main"]}"' in batch.text

    main = c.get(f"/video/{library.jobs['main']}")
    assert main.status_code == 200
    data = page_data(main.text)
    stored = stored_segments(library.database_url, library.jobs["main"])
    assert [(data["labels"][s["label"]], s["start"], s["end"], s["clips"])
            for s in data["segments"]] == [(lb, s, e, n) for lb, s, e, _m, n in stored]
    assert len(data["clips"]) == 9 and all(len(c[3]) == 5 for c in data["clips"])
    assert [t["label"] for t in data["top"]][:1] == ["archery"]
    assert data["rules"] == {"min_score": 0.3, "min_s": 0.0, "max_gap_s": 1.0}
    # A thumbnail per shown segment, at its peak clip's middle (archery peaks in clip 0).
    assert f'src="/thumb/{library.jobs["main"]}/500.jpg"' in main.text
    assert 'href="/similar/' in main.text  # it has an embedding

    assert c.get("/video/999999").status_code == 404


def test_the_video_is_served_in_ranges_and_thumbnails_decode(sqlite_library: Library,
                                                             tmp_path: Path) -> None:
    lib = sqlite_library
    c = client(lib, tmp_path)
    whole = (lib.root / "main.mp4").read_bytes()
    part = c.get(f"/video/{lib.jobs['main']}/media", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-1099/{len(whole)}"
    assert part.content == whole[100:1100]
    assert part.headers["content-type"] == "video/mp4"

    thumb = c.get(f"/thumb/{lib.jobs['main']}/1500.jpg")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    cached = list((tmp_path / "thumbs").glob("*.jpg"))
    assert len(cached) == 1
    assert c.get(f"/thumb/{lib.jobs['main']}/1500.jpg").content == thumb.content


def test_search_ranks_segments_and_pages(library: Library, tmp_path: Path) -> None:
    c = client(library, tmp_path)
    page = c.get("/search", params={"label": "archery", "min_score": "0.5",
                                    "min_duration": "2"})
    assert page.status_code == 200
    scores = [float(m) for m in re.findall(r"mean (\d\.\d{3})", page.text)]
    assert scores and scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    durations = [float(m) for m in re.findall(r"\((\d+\.\d) s\)", page.text)]
    assert durations and min(durations) >= 2
    assert '<option value="&lt;b&gt;cooking&lt;/b&gt;">' in page.text  # labels, escaped
    # Two pages of one row each would need 50+ rows; the pager's absence is the check.
    assert "next</a>" not in page.text


def test_more_like_this_ranks_by_embedding(sqlite_library: Library, tmp_path: Path) -> None:
    c = client(sqlite_library, tmp_path)
    page = c.get(f"/similar/{sqlite_library.jobs['main']}")
    assert page.status_code == 200
    assert f'href="/video/{sqlite_library.jobs["xss"]}"' in page.text
    assert "1 compared" in page.text


def test_the_viewer_cannot_write(library: Library, tmp_path: Path) -> None:
    app = create_app(viewer_settings(library, tmp_path))
    engine = app.state.viewer.engine
    with pytest.raises(DBAPIError), engine.begin() as conn:
        conn.execute(text("update batches set name = 'changed'"))
    with engine.connect() as conn:
        assert conn.scalar(text("select name from batches")) == "demo"


def test_segments_job_and_threshold(sqlite_library: Library) -> None:
    lib = sqlite_library
    env = {"VIDQ_DATABASE_URL": lib.database_url, "PATH": "/usr/bin:/bin"}
    job = str(lib.jobs["main"])
    stored = run_vidq("segments", "--job", job, "--format", "jsonl", env=env, check=True)
    rows = [json.loads(line) for line in stored.stdout.splitlines()]
    assert [(r["label"], r["start_sec"], r["end_sec"]) for r in rows] == [
        (lb, s, e) for lb, s, e, _m, _n in stored_segments(lib.database_url, lib.jobs["main"])]
    same = run_vidq("segments", "--job", job, "--threshold", "0.3", "--format", "jsonl",
                    env=env, check=True)
    assert [json.loads(line) for line in same.stdout.splitlines()] == rows
    higher = run_vidq("segments", "--job", job, "--threshold", "0.4", "--format", "jsonl",
                      env=env, check=True)
    labels = {json.loads(line)["label"] for line in higher.stdout.splitlines()}
    assert "<b>cooking</b>" in {r["label"] for r in rows} and "<b>cooking</b>" not in labels
    alone = run_vidq("segments", "--threshold", "0.4", env=env)
    assert alone.returncode == 2 and "--threshold needs --job" in alone.stderr


def test_report_writes_pages_that_embed_their_data(sqlite_library: Library,
                                                   tmp_path: Path) -> None:
    lib = sqlite_library
    out = tmp_path / "report"
    env = {"VIDQ_DATABASE_URL": lib.database_url, "VIDQ_MEDIA_ROOTS": str(lib.root),
           "PATH": "/usr/bin:/bin"}
    done = run_vidq("report", "--batch", "demo", "--out", str(out), env=env, check=True)
    assert "wrote" in done.stderr
    # The three jobs whose files lie outside the media root get pages without a player.
    assert done.stderr.count("no player or thumbnails") == 3
    index = (out / "index.html").read_text()
    assert f'href="video-{lib.jobs["main"]}.html"' in index
    assert "<script>alert(1)</script>" not in index
    main = (out / f"video-{lib.jobs['main']}.html").read_text()
    data = page_data(main)
    assert len(data["segments"]) == len(stored_segments(lib.database_url, lib.jobs["main"]))
    assert (lib.root / "main.mp4").resolve().as_uri() in main
    assert 'src="static/viewer.js"' in main and (out / "static" / "viewer.js").is_file()
    thumbs = re.findall(r'src="(thumbs/[^"]+\.jpg)"', main)
    assert thumbs and all((out / t).stat().st_size > 0 for t in thumbs)
    assert "fetch(" not in (out / "static" / "viewer.js").read_text()
    missing = run_vidq("report", "--batch", "nope", "--out", str(out), env=env)
    assert missing.returncode == 2 and "no batch named 'nope'" in missing.stderr


def test_concurrent_requests_share_the_read_only_pool(sqlite_library: Library,
                                                      tmp_path: Path) -> None:
    """Many requests at once, as a page's thumbnails arrive: each request thread gets a
    whole SQLite connection of its own (a pool that closed one in use crashed)."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from tests.viewer.browser import serving

    lib = sqlite_library
    app = create_app(viewer_settings(lib, tmp_path))
    urls = [f"/video/{lib.jobs['main']}", f"/thumb/{lib.jobs['main']}/{{ms}}.jpg",
            "/batch/demo", "/search?label=archery"]

    with serving(app) as base:
        def fetch(i: int) -> int:
            with urllib.request.urlopen(base + urls[i % len(urls)].replace(
                    "{ms}", str(100 * (i % 40))), timeout=30) as response:
                return int(response.status)

        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = list(pool.map(fetch, range(240)))
    assert statuses == [200] * 240


def test_an_object_plays_through_a_presigned_url_and_has_thumbnails(
        sqlite_library: Library, tmp_path: Path, s3_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from sqlalchemy.orm import Session

    from tests.objectstore import CREDENTIALS
    from tests.viewer.library import add_job
    from vidq.db import make_engine

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    lib = sqlite_library
    bucket = s3_server.new_bucket()
    s3_server.upload(bucket, "videos/main.mp4", lib.root / "main.mp4")
    s3_server.upload(bucket, "private/main.mp4", lib.root / "main.mp4")
    engine = make_engine(lib.database_url)
    with Session(engine) as session, session.begin():
        inside = add_job(session, batch_id=1, path=f"s3://{bucket}/videos/main.mp4", seconds=3)
        outside = add_job(session, batch_id=1, path=f"s3://{bucket}/private/main.mp4",
                          seconds=3)
    engine.dispose()
    c = client(lib, tmp_path, media_roots=(str(lib.root), f"s3://{bucket}/videos"),
               s3_endpoint_url=s3_server.endpoint)
    c.follow_redirects = False
    moved = c.get(f"/video/{inside}/media")
    assert moved.status_code == 307
    signed = moved.headers["location"]
    assert signed.startswith(s3_server.endpoint) and "Signature" in signed
    assert "Expires=" in signed or "X-Amz-Expires=300" in signed
    request = urllib.request.Request(signed, headers={"Range": "bytes=0-99"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 206
        assert response.read() == (lib.root / "main.mp4").read_bytes()[:100]
    assert c.get(f"/video/{outside}/media").status_code == 403
    # Thumbnails of an object decode from the store, by ranges.
    thumb = c.get(f"/thumb/{inside}/1500.jpg")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert c.get(f"/thumb/{outside}/1500.jpg").status_code == 403
    assert s3_server.endpoint in c.get(f"/video/{inside}").headers["content-security-policy"]


def test_pages_refresh_while_the_batch_runs(sqlite_library: Library, tmp_path: Path) -> None:
    from sqlalchemy.orm import Session

    from tests.viewer.library import add_job
    from vidq.db import make_engine

    lib = sqlite_library
    c = client(lib, tmp_path)
    refresh = '<meta http-equiv="refresh" content="5">'
    assert refresh not in c.get("/").text and refresh not in c.get("/batch/demo").text
    engine = make_engine(lib.database_url)
    with Session(engine) as session, session.begin():
        add_job(session, batch_id=1, path=lib.root / "other.mp4", seconds=3, status="running")
    engine.dispose()
    assert refresh in c.get("/").text
    batch = c.get("/batch/demo").text
    assert refresh in batch and "running 1" in batch and "ETA" in batch


def test_a_missing_database_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none" / "vidq.db"
    for args in (["serve", "--port", "8799"], ["report", "--batch", "b", "--out", str(tmp_path)]):
        proc = run_vidq(*args, env={"VIDQ_DATABASE_URL": f"sqlite:///{missing}",
                                    "PATH": "/usr/bin:/bin"}, timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.startswith("vidq: error: cannot open the database")
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not missing.parent.exists()  # nothing created
