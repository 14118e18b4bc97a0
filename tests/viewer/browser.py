"""Headless Chromium for the viewer's browser tests: Debian's ``chromium-headless-shell``
(installed by scripts/test.sh) driven by Playwright, and the viewer served by uvicorn
on a free loopback port in a thread of the test process."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("VIDQ_TEST_ARTIFACTS", "")) if os.environ.get(
    "VIDQ_TEST_ARTIFACTS") else None
"""Where screenshots go besides the test's tmp dir (``VIDQ_TEST_ARTIFACTS``)."""


def chromium_binary() -> tuple[str | None, str]:
    """The binary the apt package installs (the command on PATH is a wrapper script
    Playwright cannot drive), or None and why not."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None, "Playwright is not installed (pip install 'vidq[test]')"
    if shutil.which("dpkg") is None:
        return None, "no dpkg: Debian's chromium-headless-shell cannot be installed here"
    listed = subprocess.run(["dpkg", "-L", "chromium-headless-shell"], capture_output=True,
                            text=True, check=False)
    for line in listed.stdout.splitlines():
        if line.endswith("/chromium-headless-shell") and "/lib/" in line and os.access(
                line, os.X_OK):
            return line, ""
    return None, ("chromium-headless-shell is not installed (scripts/test.sh installs it as "
                  "root: apt-get install chromium-headless-shell)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app: object) -> Iterator[str]:
    """``app`` on http://127.0.0.1:PORT until the block ends."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,  # type: ignore[arg-type]
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the viewer did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
