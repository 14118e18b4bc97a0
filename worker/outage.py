"""A worker cut off from the database, not from the broker: it stops taking messages.

Without this, such a worker keeps taking messages it cannot claim, and each one it
takes is retried and, its retries spent, failed and acked while the other workers sit
idle. Instead, the first delivery that cannot reach the database pauses the process's
consumer (Celery's ``cancel_task_queue``, run on the consumer's own loop) and hands its
message back to the queue unacked; so does every other delivery it already holds. A
probe reads the database's clock every ``PROBE_S`` seconds and, once it answers,
consumption resumes (``add_task_queue``). Jobs this worker had already claimed finish
and commit when the database is back, or, if their lease could not be renewed for a
lease period, are given back too (worker/jobs.py's LeaseExpired).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vidq.worker")
PROBE_S = 1.0
"""How often a paused worker asks whether the database is back."""


class ConsumerPause:
    """Pause and resume one worker process's consumption of its task queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consumer: Any = None
        self._queues: list[str] = []
        self.paused = False

    def attach(self, consumer: Any) -> None:
        """The Celery consumer of this process (``worker_ready``'s sender)."""
        with self._lock:
            self._consumer = consumer
            self._queues = list(consumer.app.amqp.queues.consume_from)

    def pause(self, why: str, *, probe: Callable[[], object]) -> bool:
        """Stop taking messages until ``probe`` succeeds; False if there is no consumer
        to pause (a worker made by ``in_process`` without a ``worker_ready``)."""
        with self._lock:
            consumer, queues = self._consumer, self._queues
            if consumer is None:
                return False
            if self.paused:
                return True
            self.paused = True
        log.warning("database unreachable (%s): this worker takes no messages until it "
                    "is back; what it holds goes back to the queue", why)
        for queue in queues:
            consumer.call_soon(consumer.cancel_task_queue, queue)
        threading.Thread(target=self._resume_when, args=(probe, consumer, queues),
                         name="vidq-database-probe", daemon=True).start()
        return True

    def _resume_when(self, probe: Callable[[], object], consumer: Any,
                     queues: list[str]) -> None:
        started = time.monotonic()
        while True:
            time.sleep(PROBE_S)
            try:
                probe()
                break
            except Exception:  # still unreachable (or any other failure): ask again
                continue
        for queue in queues:
            consumer.call_soon(consumer.add_task_queue, queue)
        with self._lock:
            self.paused = False
        log.warning("database reachable again after %.0fs: taking messages again",
                    time.monotonic() - started)


PAUSE = ConsumerPause()
"""This process's (worker/tasks.py attaches its consumer at ``worker_ready``)."""
