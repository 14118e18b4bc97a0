"""The host's circuit breaker: a worker process that fails jobs for reasons of its own
host stops taking messages (``VIDQ_BREAKER_FAILURES``).

One host without the media mount (or with other media roots, expired bucket
credentials, a broken GPU, stuck decoders) would otherwise fail every job it touches
in milliseconds and drain the queue. Each such host-local failure gives the job back
(worker/jobs.py); after ``failures`` of them in a row the circuit opens:

    closed ──(K host-local failures in a row)──▶ open ──(backoff: 10 s .. 5 min)──▶
    half-open: one message is taken as a probe ──success──▶ closed
                                                ──host-local failure──▶ open (longer)

While open, the process consumes nothing (Celery's cancel_consumer) and hands back
any message it still holds; /healthz says unhealthy (the ``vidq_circuit_open``
gauge), and the ``workers`` table (``vidq status``) says open, with the last error
and since when. The table is written on every change and every heartbeat period: a
fresh ``seen_at`` is what makes a host count as live when a host-local failure is
judged (a job fails for good on one only when two hosts agree, or no other live
host is left to ask).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from vidq import metrics
from vidq.errors import HostLocalError
from worker.jobs import JobStore

log = logging.getLogger("vidq.worker")

FIRST_PROBE_S = 10.0
LAST_PROBE_S = 300.0


class Circuit(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    """One worker process's breaker. ``pause`` and ``resume`` stop and restart its
    consumer; ``report_every_s`` is how often the ``workers`` row is refreshed."""

    def __init__(self, *, failures: int, store: JobStore, host: str, queue: str,
                 pause: Callable[[], None], resume: Callable[[], None],
                 report_every_s: float) -> None:
        self.failures = failures
        self._store, self.host, self.queue = store, host, queue
        self._pause, self._resume = pause, resume
        self.state = Circuit.CLOSED
        self.in_a_row = 0
        self.last_error: str | None = None
        self.probe_s = FIRST_PROBE_S
        self._probing = False
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._changed.set()  # the first report sets ``since``
        self.report_every_s = report_every_s
        threading.Thread(target=self._report_loop, name="vidq-breaker", daemon=True).start()

    # -- the task's side -----------------------------------------------------------
    def admit(self) -> bool:
        """Whether this process may run a message now: closed, or the one probe of a
        half-open circuit. False: hand the message back untouched."""
        with self._lock:
            if self.state is Circuit.CLOSED:
                return True
            if self.state is Circuit.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def failed(self, error: HostLocalError) -> None:
        """A host-local failure (one of a job this host had failed before counts only
        when it was the probe)."""
        with self._lock:
            if error.again and self.state is not Circuit.HALF_OPEN:
                return
            self.in_a_row += 1
            self.last_error = f"{error.kind}: {error.message}"
            probe_failed = self.state is Circuit.HALF_OPEN
            if probe_failed:
                self.probe_s = min(LAST_PROBE_S, self.probe_s * 2)
            elif (self.state is not Circuit.CLOSED or not self.failures
                  or self.in_a_row < self.failures):
                return
            self._set(Circuit.OPEN)
            delay = self.probe_s
        log.error("circuit open: %d host-local failures in a row on %s, the last %s; "
                  "taking no messages, probing again in %.0f s", self.in_a_row, self.host,
                  self.last_error, delay)
        self._pause()
        timer = threading.Timer(delay, self._half_open)
        timer.daemon = True
        timer.start()

    def succeeded(self) -> None:
        """An outcome that says nothing against this host (a success, or a failure of
        the video's own)."""
        with self._lock:
            self.in_a_row = 0
            if self.state is Circuit.CLOSED:
                return
            self._set(Circuit.CLOSED)
            self.probe_s = FIRST_PROBE_S
        log.info("circuit closed: %s runs jobs again", self.host)
        self._resume()

    def settled(self) -> None:
        """An outcome that says nothing either way (skipped, busy, a database error):
        a half-open circuit takes another probe."""
        with self._lock:
            if self.state is Circuit.HALF_OPEN:
                self._probing = False

    def _half_open(self) -> None:
        with self._lock:
            if self.state is not Circuit.OPEN:
                return
            self._set(Circuit.HALF_OPEN)
        log.info("circuit half-open: %s takes one message as a probe", self.host)
        self._resume()

    def _set(self, state: Circuit) -> None:
        self.state, self._probing = state, False
        metrics.CIRCUIT_OPEN.set(0 if state is Circuit.CLOSED else 1)
        self._changed.set()

    # -- the workers table ---------------------------------------------------------
    def _report_loop(self) -> None:
        while True:
            changed = self._changed.is_set()
            self._changed.clear()
            with self._lock:
                state, last_error = self.state, self.last_error
            try:
                self._store.report_worker(host=self.host, queue=self.queue,
                                          state=state.value, last_error=last_error,
                                          changed=changed)
            except Exception as exc:  # noqa: BLE001  the database is down: next period
                if changed:
                    self._changed.set()
                log.debug("worker state not written (%s)", exc)
            self._changed.wait(self.report_every_s)
            time.sleep(0.05)  # a burst of changes is one write
