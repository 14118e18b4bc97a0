"""The viewer in a real browser (headless Chromium, tests/viewer/browser.py), driven as
a person would: lanes, slider, seek, thumbnails, ranged video, keyboard, refusals,
and the static report from file://. Screenshots are saved as artifacts (the test's
tmp dir, and VIDQ_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli import run_vidq
from tests.viewer.browser import ARTIFACTS, CHROMIUM_ARGS, chromium_binary, serving
from tests.viewer.conftest import viewer_settings
from tests.viewer.library import Library, stored_segments
from vidq.segments import SegmentRules
from vidq.viewer.app import create_app
from vidq.viewer.data import readonly_engine, rederive

BINARY, WHY_NOT = chromium_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason=WHY_NOT)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=BINARY, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors
    yield pg
    context.close()


def shoot(pg: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    if ARTIFACTS is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
    assert path.stat().st_size > 1000
    return path


def lanes(pg: Any) -> list[tuple[str, float, float]]:
    return [(b["label"], float(b["start"]), float(b["end"])) for b in pg.eval_on_selector_all(
        "#lanes button.seg", "els => els.map(e => ({label: e.dataset.label, "
        "start: e.dataset.start, end: e.dataset.end}))")]


def test_video_page_in_chromium(page: Any, sqlite_library: Library, tmp_path: Path) -> None:
    lib = sqlite_library
    job = lib.jobs["main"]
    app = create_app(viewer_settings(lib, tmp_path))
    media_statuses: list[int] = []
    page.on("response", lambda r: media_statuses.append(r.status)
            if r.url.endswith(f"/video/{job}/media") else None)
    with serving(app) as base:
        page.goto(f"{base}/video/{job}")
        page.wait_for_selector("#lanes button.seg")

        # The lanes are the stored segment rows.
        stored = stored_segments(lib.database_url, job)
        assert sorted(lanes(page)) == sorted((lb, s, e) for lb, s, e, _m, _n in stored)
        # The page's own derivation at the stored threshold gives the table, exactly.
        derived = page.evaluate("""() => {
            const d = JSON.parse(document.getElementById('vidq-data').textContent);
            return vidq.derive(d.clips, d.rules, d.labels).map(s =>
                [d.labels[s.label], s.start, s.end, s.mean, s.clips]);
        }""")
        assert [tuple(r) for r in derived] == [
            (lb, s, e, pytest.approx(m, abs=1e-12), n) for lb, s, e, m, n in stored]
        shoot(page, tmp_path, "viewer-video")

        # The slider re-derives them, and names the command that lists the same.
        slider = page.locator("#threshold")
        slider.focus()
        slider.fill("0.4")
        assert page.inner_text("#command") == f"vidq segments --job {job} --threshold 0.40"
        engine = readonly_engine(lib.database_url)
        with engine.connect() as conn:
            expected = rederive(conn, job, SegmentRules(min_score=0.4))
        engine.dispose()
        assert sorted(lanes(page)) == sorted(
            (r["label"], r["start_sec"], r["end_sec"]) for r in expected)
        assert "<b>cooking</b>" not in {lb for lb, _s, _e in lanes(page)}
        shoot(page, tmp_path, "viewer-slider")
        slider.fill("0.3")
        assert page.inner_text("#command") == f"vidq segments --job {job}"

        # A click on a segment seeks the player to its start; a clip too.
        target = page.locator("#lanes button.seg[data-label='bowling']").first
        target.click()
        assert page.evaluate("document.getElementById('player').currentTime") == \
            pytest.approx(float(target.get_attribute("data-start")), abs=0.05)
        page.locator("#strip button.clip").nth(7).click()
        assert page.evaluate("document.getElementById('player').currentTime") == \
            pytest.approx(7.0, abs=0.05)
        # The top-5 of a clip is its title (shown on hover).
        title = page.locator("#strip button.clip").nth(0).get_attribute("title")
        assert "1. archery 0.800" in title and title.count("\n") == 5

        # Thumbnails load.
        page.locator(".thumbs img").first.scroll_into_view_if_needed()
        page.wait_for_function("() => [...document.querySelectorAll('.thumbs img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        # The video came in ranges.
        page.evaluate("document.getElementById('player').load()")
        page.wait_for_function("() => document.getElementById('player').readyState >= 1 || "
                               "document.getElementById('player').error !== null")
        assert 206 in media_statuses
        assert page.errors == []


def test_keyboard_reaches_every_control(page: Any, sqlite_library: Library,
                                        tmp_path: Path) -> None:
    lib = sqlite_library
    app = create_app(viewer_settings(lib, tmp_path))
    with serving(app) as base:
        page.goto(f"{base}/video/{lib.jobs['main']}")
        page.wait_for_selector("#lanes button.seg")
        wanted = page.evaluate("""() => {
            const all = [...document.querySelectorAll(
              'a[href], button, input, video[controls]')];
            // The clip strip is one tab stop (arrow keys move within it).
            return all.filter(e => !e.classList.contains('clip')).length + 1;
        }""")
        reached = set()
        for _ in range(wanted + 5):
            page.keyboard.press("Tab")
            reached.add(page.evaluate("""() => { const e = document.activeElement;
                return e.id || e.className + ':' + (e.dataset.start || e.getAttribute('href')
                || e.title || e.textContent); }"""))
        assert "threshold" in reached and "player" in reached
        segs = page.locator("#lanes button.seg").count()
        thumbs = page.locator("button.thumb").count()
        assert sum(1 for r in reached if r.startswith("seg:")) == segs
        assert sum(1 for r in reached if r.startswith("thumb")) == thumbs
        clip_stops = [r for r in reached if r.startswith("clip:")]
        assert clip_stops == ["clip:0"]
        # Inside the strip, arrow keys move; Enter seeks.
        page.locator("#strip button.clip").first.focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        assert page.evaluate("document.getElementById('player').currentTime") == \
            pytest.approx(2.0, abs=0.05)
        page.goto(f"{base}/search?label=archery&min_duration=2")
        mine = f"ol.results img[src^='/thumb/{lib.jobs['main']}/']"
        assert page.locator(mine).count() == 2
        for img in page.locator(mine).all():
            img.scroll_into_view_if_needed()
        page.wait_for_function(f"() => [...document.querySelectorAll(\"{mine}\")]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.evaluate("window.scrollTo(0, 0)")
        shoot(page, tmp_path, "viewer-search")
        page.errors.clear()  # the refused files' thumbnails (403) are console errors
        assert page.errors == []


def test_refusals_and_escaping_in_chromium(page: Any, sqlite_library: Library,
                                           tmp_path: Path) -> None:
    lib = sqlite_library
    app = create_app(viewer_settings(lib, tmp_path))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    with serving(app) as base:
        for url in (f"{base}/static/..%2f..%2fdata.py", f"{base}/video/{lib.jobs['escape']}/media",
                    f"{base}/video/{lib.jobs['dotdot']}/media"):
            response = page.goto(url)
            assert response.status in (403, 404), url
        page.goto(f"{base}/video/{lib.jobs['xss']}")
        page.wait_for_selector("#strip button.clip")
        assert page.inner_text("h1").endswith("<script>alert(1)</script>.mp4")
        assert page.locator("h1 script").count() == 0
        page.goto(f"{base}/batch/demo")
        assert "<script>alert(1)</script>.mp4" in page.inner_text("main")
        shoot(page, tmp_path, "viewer-batch")
        assert dialogs == []


def test_report_opens_from_file(page: Any, sqlite_library: Library, tmp_path: Path) -> None:
    lib = sqlite_library
    out = tmp_path / "report"
    run_vidq("report", "--batch", "demo", "--out", str(out), check=True,
             env={"VIDQ_DATABASE_URL": lib.database_url, "VIDQ_MEDIA_ROOTS": str(lib.root),
                  "PATH": "/usr/bin:/bin"})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "index.html").as_uri())
    page.click(f"a[href='video-{lib.jobs['main']}.html']")
    page.wait_for_selector("#lanes button.seg")
    stored = stored_segments(lib.database_url, lib.jobs["main"])
    assert sorted(lanes(page)) == sorted((lb, s, e) for lb, s, e, _m, _n in stored)
    page.wait_for_function("() => [...document.querySelectorAll('.thumbs img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.locator("#lanes button.seg[data-label='bowling']").first.click()
    assert page.evaluate("document.getElementById('player').currentTime") == \
        pytest.approx(4.0, abs=0.05)
    assert all(u.startswith("file://") for u in requests), requests
    shoot(page, tmp_path, "viewer-report")
    assert page.errors == []


def test_the_pages_derivation_is_vidq_segments(page: Any) -> None:
    """The script's derive() against vidq/segments.py on random videos: sliding windows
    that overlap, touch or leave gaps, at several thresholds and rules."""
    import json
    import random

    from vidq.segments import ClipRow, ScoredLabel, derive_segments
    from vidq.viewer.pages import static_text

    page.set_content("<!doctype html><p>derive</p>")
    page.add_script_tag(content=static_text("viewer.js"))
    rng = random.Random(7)
    labels = ["a", "b", "c", "d", "e", "f"]
    checked = 0
    for _ in range(40):
        span, stride = rng.choice([(2.0, 2.0), (2.0, 1.0), (2.0, 3.5), (1.0, 0.5)])
        clips, compact = [], []
        for i in range(rng.randrange(1, 60)):
            start = i * stride + rng.choice([0.0, 0.0, 0.0, rng.uniform(0, 2)])
            scores = sorted(((c, rng.random() ** 2) for c in rng.sample(range(6), 3)),
                            key=lambda t: -t[1])
            top = [ScoredLabel(c, labels[c], s) for c, s in scores]
            clips.append(ClipRow(index=i, start_sec=start, end_sec=start + span, top=top))
            compact.append([i, start, start + span, [[c, c, s] for c, s in scores]])
        for min_score in (0.05, 0.3, 0.5):
            rules = SegmentRules(min_score=min_score, min_s=rng.choice([0.0, 2.0]),
                                 max_gap_s=rng.choice([0.0, 1.0]))
            want = [(s.label, s.start_sec, s.end_sec, s.mean_score, s.peak_score, s.clips)
                    for s in derive_segments(clips, rules)]
            got = page.evaluate(
                "([clips, rules, labels]) => vidq.derive(clips, rules, labels).map(s => "
                "[labels[s.label], s.start, s.end, s.mean, s.peak, s.clips])",
                [compact, {"min_score": rules.min_score, "min_s": rules.min_s,
                           "max_gap_s": rules.max_gap_s}, labels])
            assert [tuple(g) for g in got] == want, json.dumps([compact, rules.__dict__])
            checked += len(want)
    assert checked > 100


def test_a_token_carried_by_the_cookie_reaches_every_request(
        page: Any, sqlite_library: Library, tmp_path: Path) -> None:
    lib = sqlite_library
    job = lib.jobs["main"]
    app = create_app(viewer_settings(lib, tmp_path, viewer_token="tok-3f9a"))
    statuses: list[tuple[str, int]] = []
    page.on("response", lambda r: statuses.append((r.url, r.status)))
    with serving(app) as base:
        assert page.goto(f"{base}/video/{job}").status == 401
        page.goto(f"{base}/video/{job}?token=tok-3f9a")
        assert page.url == f"{base}/video/{job}"  # the token left the address bar
        page.wait_for_selector("#lanes button.seg")
        page.wait_for_function("() => [...document.querySelectorAll('.thumbs img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.evaluate("document.getElementById('player').load()")
        page.wait_for_function("() => document.getElementById('player').readyState >= 1")
    after = statuses[statuses.index((f"{base}/video/{job}", 200)):]
    assert {s for _u, s in after} <= {200, 206}, after
    assert any(u.endswith("/media") and s == 206 for u, s in after)
    assert any("/thumb/" in u for u, _s in after) and any("/static/" in u for u, _s in after)
