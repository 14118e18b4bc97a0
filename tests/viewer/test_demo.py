"""``vidq serve`` on a database made as scripts/demo.sh makes it (``vidq run DIR --batch
demo --strategy uniform --clips 3``; x3d_xs with random weights here, whose near-even
scores need VIDQ_SEGMENT_MIN_SCORE=0.001 to make segments), in headless Chromium: the
demo's videos, with lanes, thumbnails and working seek."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cli import run_vidq
from tests.media import make_video
from tests.viewer.browser import ARTIFACTS, CHROMIUM_ARGS, chromium_binary, serving
from tests.viewer.library import stored_segments
from vidq.settings import Settings
from vidq.viewer.app import create_app

BINARY, WHY_NOT = chromium_binary()


@pytest.mark.skipif(BINARY is None, reason=WHY_NOT or "")
def test_serve_shows_the_demos_videos(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(2):
        make_video(samples / f"sample{i}.mp4", seconds=4, seed=30 + i)
    url = f"sqlite:///{tmp_path / 'vidq.db'}"
    env = {"VIDQ_DATABASE_URL": url, "VIDQ_WEIGHTS": "random", "VIDQ_MODEL": "x3d_xs",
           "VIDQ_SEGMENT_MIN_SCORE": "0.001", "PATH": "/usr/bin:/bin",
           "VIDQ_MEDIA_ROOTS": str(samples)}
    run_vidq("run", str(samples), "--recursive", "--batch", "demo", "--strategy", "uniform",
             "--clips", "3", env=env, check=True, timeout=300)
    settings = Settings.from_env(env, viewer_cache_dir=str(tmp_path / "thumbs"))
    with serving(create_app(settings)) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BINARY, args=CHROMIUM_ARGS)
        page: Any = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/batch/demo")
        links = page.locator("a[href^='/video/']")
        assert links.count() == 2
        assert {t.rsplit("/", 1)[-1] for t in links.all_inner_texts()} == {
            "sample0.mp4", "sample1.mp4"}
        links.first.click()
        page.wait_for_selector("#lanes button.seg")
        job = int(page.url.rsplit("/", 1)[-1])
        assert page.locator("#lanes button.seg").count() == len(stored_segments(url, job)) > 0
        assert page.locator("#strip button.clip").count() == 3
        assert page.inner_text("#command") == f"vidq segments --job {job}"
        page.wait_for_function("() => [...document.querySelectorAll('.thumbs img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.wait_for_function("() => document.getElementById('player').readyState >= 1")
        clip = page.locator("#strip button.clip").nth(2)
        clip.click()
        assert page.evaluate("document.getElementById('player').currentTime") == \
            pytest.approx(float(clip.get_attribute("data-start")), abs=0.05)
        path = tmp_path / "viewer-demo.png"
        page.screenshot(path=str(path), full_page=True)
        if ARTIFACTS is not None:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / path.name).write_bytes(path.read_bytes())
        browser.close()
