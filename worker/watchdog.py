"""The decoder watchdog: a decoder that makes no progress is replaced, and its video
goes back to the queue as this host's failure (``VIDQ_DECODE_STALL_S``).

A decoder makes progress when it reads a clip's packets and hands a clip over. It may
also wait for the model (every clip slot is full: backpressure); that is not a stall.
What is: a frozen process (SIGSTOP, a debugger), a read blocked on a hung network
mount, an FFmpeg call that never returns. Left alone, such a decoder holds its
videos' leases until the task time limit fails them for good, and once every decoder
is stuck the worker takes jobs it cannot run while reporting healthy.

- A decoder process (worker/decoder_process.py) is killed and a fresh one started;
  the video it was decoding fails with ``stall_error``, the one sent after it goes
  back to the pipeline's queue.
- A decoder thread cannot be killed: the watchdog abandons it (it exits whenever
  its blocked call returns, touching nothing) and starts a new thread in its place.

``stall_error`` is a HostLocalError: worker/jobs.py gives the job back without
spending an attempt, and fails it for good (``timeout``) only once it stalled on two
hosts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vidq.errors import STALLED, HostLocalError

if TYPE_CHECKING:
    from worker.messages import InFlight

log = logging.getLogger(__name__)


def stall_error(path: str, stall_s: float) -> HostLocalError:
    return HostLocalError(
        f"{path}: the decoder made no progress for {stall_s:g} s (VIDQ_DECODE_STALL_S) "
        "and was replaced.", kind=STALLED)


@dataclass(eq=False)
class Progress:
    """When a decoder last made progress (monotonic seconds), shared by the decoder
    and its watchdog."""

    at: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.at = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.at


@dataclass(eq=False)
class DecoderThreadState:
    """One decoder thread as its watchdog sees it."""

    index: int
    progress: Progress = field(default_factory=Progress)
    video: InFlight | None = None
    """The video in its hands, if any."""
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set by the watchdog: the thread exits at its next step, touching nothing."""


class WatchedProcess(Protocol):
    """What the watchdog needs of a decoder process (worker/decoder_process.py)."""

    name: str
    progress: Progress
    busy: bool

    @property
    def pid(self) -> int | None: ...

    def waiting_for_model(self) -> bool: ...

    def kill_stalled(self) -> None: ...


class Watchdog:
    """Watches a pipeline's decoders, each ``stall_s``/4 (at most 1 s).

    - A decoder thread whose video has made no progress for ``stall_s`` is abandoned,
      its video failed with ``stall_error`` and ``replace(index)`` called to start
      another thread in its place.
    - A decoder process with videos in its hands, not held back by the model, that
      sent nothing for ``stall_s`` is killed; its pipeline thread restarts it and gives
      the video back (worker/decoder_process.py)."""

    def __init__(self, *, stall_s: float, decoders: list[DecoderThreadState],
                 processes: Sequence[WatchedProcess], replace: Callable[[int], None],
                 closing: threading.Event) -> None:
        self.stall_s = stall_s
        self.decoders = decoders
        self.processes = processes
        self._replace = replace
        self._closing = closing
        self.replaced = 0
        self._thread = threading.Thread(target=self._loop, name="vidq-decode-watchdog",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        step = max(0.05, min(1.0, self.stall_s / 4))
        while not self._closing.wait(step):
            for proc in self.processes:
                if not proc.busy or proc.waiting_for_model():
                    proc.progress.touch()
                elif proc.progress.idle_s() > self.stall_s:
                    log.warning("decoder process %s (pid %s) made no progress for %.0f s: "
                                "killed and replaced", proc.name, proc.pid,
                                proc.progress.idle_s())
                    self.replaced += 1
                    proc.busy = False
                    proc.kill_stalled()
            for state in list(self.decoders):
                video = state.video
                if video is None or state.abandoned.is_set():
                    continue
                if video.done or state.progress.idle_s() <= self.stall_s:
                    continue
                state.abandoned.set()
                self.replaced += 1
                log.warning("decoder thread %d made no progress on %s for %.0f s: "
                            "abandoned, and a new one started", state.index, video.path,
                            state.progress.idle_s())
                video.finish(error=stall_error(video.path, self.stall_s))
                self._replace(state.index)
