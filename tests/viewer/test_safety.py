"""The viewer's guards (vidq/viewer/app.py's docstring), each refused here as a user
or a hostile page would try it. Every test fails when its guard is removed."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.cli import run_vidq
from tests.viewer.conftest import viewer_settings
from tests.viewer.library import Library
from vidq.errors import ConfigError
from vidq.viewer.app import check_bind, create_app

LOCAL = "http://127.0.0.1:8765"


def client(lib: Library, tmp_path: Path, *, base_url: str = LOCAL,
           **overrides: object) -> TestClient:
    return TestClient(create_app(viewer_settings(lib, tmp_path, **overrides)),
                      base_url=base_url, follow_redirects=False)


def test_without_a_token_it_binds_loopback_only(sqlite_library: Library, tmp_path: Path) -> None:
    settings = viewer_settings(sqlite_library, tmp_path)
    check_bind("127.0.0.1", settings)
    check_bind("::1", settings)
    with pytest.raises(ConfigError, match="VIDQ_VIEWER_TOKEN"):
        check_bind("0.0.0.0", settings)
    check_bind("0.0.0.0", viewer_settings(sqlite_library, tmp_path, viewer_token="s3cret"))
    proc = run_vidq("serve", "--host", "0.0.0.0", "--port", "1",
                    env={"VIDQ_DATABASE_URL": sqlite_library.database_url, "PATH": "/usr/bin"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("vidq: error: --host 0.0.0.0: listening beyond this machine")


def test_without_a_token_other_host_names_are_refused(sqlite_library: Library,
                                                     tmp_path: Path) -> None:
    # A page that rebinds its own name to 127.0.0.1 still sends its own Host header.
    rebound = client(sqlite_library, tmp_path, base_url="http://attacker.example:8765")
    assert rebound.get("/").status_code == 403
    assert client(sqlite_library, tmp_path, base_url="http://localhost:8765").get("/") \
        .status_code == 200


def test_with_a_token_every_request_carries_it(sqlite_library: Library, tmp_path: Path) -> None:
    lib = sqlite_library
    c = client(lib, tmp_path, base_url="http://10.1.2.3:8765", viewer_token="s3cret-token")
    for url in ("/", "/batch/demo", f"/video/{lib.jobs['main']}",
                f"/video/{lib.jobs['main']}/media", f"/thumb/{lib.jobs['main']}/500.jpg",
                "/static/viewer.js", "/search?label=archery"):
        assert c.get(url).status_code == 401, url
        assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401, url
    assert c.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert c.get("/?token=wrong").status_code == 401
    first = c.get("/batch/demo?token=s3cret-token&page=0")
    assert first.status_code == 303 and first.headers["location"] == "/batch/demo?page=0"
    cookie = first.headers["set-cookie"]
    assert "vidq_token=s3cret-token" in cookie and "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert c.get("/batch/demo").status_code == 200  # the cookie now carries it


def test_files_only_from_under_the_media_roots(sqlite_library: Library, tmp_path: Path) -> None:
    lib = sqlite_library
    c = client(lib, tmp_path)
    assert c.get(f"/video/{lib.jobs['main']}/media").status_code == 200
    # A symlink inside the root to a file outside it, and a recorded path with "..".
    for name in ("escape", "dotdot"):
        for url in (f"/video/{lib.jobs[name]}/media", f"/thumb/{lib.jobs[name]}/500.jpg"):
            refused = c.get(url)
            assert refused.status_code == 403, url
            assert "outside VIDQ_MEDIA_ROOTS" in refused.text
            assert lib.outside.read_bytes()[:64] not in refused.content
    # Paths in URLs never reach the disk: static files come from a fixed list.
    for url in ("/static/..%2f__init__.py", "/static/%2e%2e%2fapp.py", "/static/app.py",
                "/static/../../etc/passwd", "/video/..%2f..%2fetc%2fpasswd/media"):
        assert c.get(url).status_code == 404, url


def test_without_media_roots_only_video_files(sqlite_library: Library, tmp_path: Path) -> None:
    lib = sqlite_library
    c = client(lib, tmp_path, media_roots=())
    assert c.get(f"/video/{lib.jobs['main']}/media").status_code == 200
    refused = c.get(f"/video/{lib.jobs['notes']}/media")
    assert refused.status_code == 403 and "not a video file name" in refused.text
    assert "not a video" not in refused.text.replace("not a video file name", "")


def test_everything_is_escaped_and_headers_are_set(sqlite_library: Library,
                                                   tmp_path: Path) -> None:
    lib = sqlite_library
    c = client(lib, tmp_path)
    for url in ("/batch/demo", f"/video/{lib.jobs['xss']}", f"/video/{lib.jobs['main']}",
                "/search?label=%3Cb%3Ecooking%3C%2Fb%3E", f"/similar/{lib.jobs['main']}"):
        page = c.get(url)
        assert page.status_code == 200, url
        assert "<script>alert(1)" not in page.text, url
        assert "<b>cooking</b>" not in page.text, url
        assert page.headers["x-content-type-options"] == "nosniff"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
    video = c.get(f"/video/{lib.jobs['xss']}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.mp4" in video
    # The embedded JSON cannot close its script element.
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in video
    assert c.get(f"/video/{lib.jobs['main']}/media").headers["x-content-type-options"] == \
        "nosniff"
