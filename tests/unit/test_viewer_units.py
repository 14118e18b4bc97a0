"""The viewer's pieces that need no database: loopback names, the thumbnail cache's
size bound, the pages' helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tests.media import make_video
from vidq.viewer.pages import GALLERY_MAX, ReportLinks, ServerLinks, format_duration, gallery
from vidq.viewer.thumbs import ThumbnailCache, decode_jpeg, quantize_ms


def test_loopback_names() -> None:
    from vidq.viewer.app import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "example.com",
                                     "localhost.example.com", "127.0.0.1.nip.io"]))


def test_thumbnails_decode_and_the_cache_stays_under_its_bound(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, seconds=3, width=320, height=180)
    jpeg = decode_jpeg(str(video), 1.5)
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
    cache = ThumbnailCache(tmp_path / "cache", max_bytes=len(jpeg) * 4)
    opened: list[int] = []

    @contextlib.contextmanager
    def source() -> Iterator[str]:
        opened.append(1)
        yield str(video)

    identity = cache.identity(video)
    for i in range(12):
        assert cache.get(identity, quantize_ms(i * 0.25), source)[:2] == b"\xff\xd8"
    total = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.jpg"))
    assert 0 < total <= len(jpeg) * 4 * 1.1
    # The most recent survives the trims and is not decoded again.
    last = quantize_ms(11 * 0.25)
    assert (tmp_path / "cache" / f"{cache.key(identity, last)}.jpg").exists()
    decoded = len(opened)
    cache.get(identity, last, source)
    assert len(opened) == decoded
    # A replaced file gets new thumbnails.
    os.utime(video, ns=(1, 1))
    assert cache.key(cache.identity(video), 0) != cache.key(identity, 0)


def test_page_helpers() -> None:
    assert format_duration(None) == "-"
    assert format_duration(65.4) == "1:05"
    assert format_duration(7322) == "2:02:02"
    segments = [{"mean": (i % 7) / 7, "start": i} for i in range(200)]
    shown = gallery(segments)
    assert len(shown) == GALLERY_MAX
    assert [s["start"] for s in shown] == sorted(s["start"] for s in shown)
    assert ServerLinks().batch("a/b c") == "/batch/a%2Fb%20c"
    assert ServerLinks().search() == "/search"
    assert ReportLinks(media_uris={3: "file:///x.mp4"}).media(3) == "file:///x.mp4"
    assert ReportLinks(media_uris={}).thumb(3, 1.26) == "thumbs/3-1300.jpg"
