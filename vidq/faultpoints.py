"""Points where a fault-injection test can hold a process in a known state.

``pause_point(name)`` does nothing unless ``VIDQ_FAULT_PAUSE`` names it:

    VIDQ_FAULT_PAUSE=after_claim=/tmp/hold,before_commit=/tmp/hold2

Each time a named point is reached, one line ``<pid> held|passed`` is appended
to ``<file>.log``; while ``<file>`` exists the process blocks there. A test
creates the file, waits for a ``held`` line (a state, not a time), does what it
must to the held process (SIGKILL, SIGSTOP, SIGTERM), then deletes the file.
Torch-free and side-effect free unless the variable is set.

The points (keep them where the pipeline is rewritten):
- ``before_claim``: a worker has the job's message (unacked), the row is untouched;
- ``after_claim``: the job row is claimed (running, heartbeat live), nothing decoded;
- ``before_commit``: the job is classified (its heartbeat still beating), nothing written;
- ``reconcile``: ``vidq.reconcile.reconcile`` is about to look for lost jobs;
- ``purge_selected``: ``vidq purge`` has selected a chunk of finished jobs, nothing deleted;
- ``decode_clip``: a decoder (thread or process) has read a clip of the video it names
  (``subject``), before it hands it over: a decoder frozen mid-video.

A hold file with text in it holds only the points whose ``subject`` contains that text
(one video among many).
"""

from __future__ import annotations

import os
import time

ENV = "VIDQ_FAULT_PAUSE"


def _hold_file(name: str) -> str | None:
    for item in os.environ.get(ENV, "").split(","):
        point, sep, path = item.partition("=")
        if sep and point.strip() == name and path:
            return path
    return None


def pause_point(name: str, subject: str = "") -> None:
    """Record reaching ``name``, and block while its hold file exists (and, if it holds
    text, only where ``subject`` contains that text)."""
    path = _hold_file(name)
    if path is None:
        return
    try:
        with open(path, encoding="utf-8") as f:
            only = f.read().strip()
    except OSError:
        only = ""
    if only and only not in subject:
        return
    held = os.path.exists(path)
    with open(f"{path}.log", "a", encoding="utf-8") as log:
        log.write(f"{os.getpid()} {'held' if held else 'passed'}\n")
    while os.path.exists(path):
        time.sleep(0.05)
