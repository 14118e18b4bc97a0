"""``vidq worker``'s metrics endpoint: ``/metrics`` (the sum over this host's worker
processes, read from ``PROMETHEUS_MULTIPROC_DIR``) and ``/healthz``, which answers
200 only while every worker process is alive, has its model loaded, can write its
jobs' heartbeats and has its circuit breaker closed.

The supervisor records nothing itself, so it never imports vidq/metrics.py (in
multiprocess mode that would create metric files for its own pid).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry() -> CollectorRegistry:
    """The sum over this host's worker processes."""
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    return reg


def models_loaded() -> int:
    """Live worker processes that report a loaded model."""
    total = 0
    for metric in registry().collect():
        if metric.name == "vidq_model_loaded":
            total += sum(1 for s in metric.samples if s.value >= 1)
    return total


def heartbeats_failing(max_age_s: float) -> int:
    """Live worker processes whose heartbeats cannot be written now: their last write
    failed, or none succeeded for ``max_age_s`` (a statement the database never
    answers leaves the heartbeat thread waiting, not failing)."""
    failing: set[str] = set()
    stale_before = time.time() - max_age_s
    for metric in registry().collect():
        for sample in metric.samples:
            pid = sample.labels.get("pid", "")
            if metric.name == "vidq_heartbeats_failing" and sample.value >= 1:
                failing.add(pid)
            elif (metric.name == "vidq_heartbeat_ok_timestamp_seconds"
                  and 0 < sample.value < stale_before):
                failing.add(pid)
    return len(failing)


def circuits_open() -> int:
    """Live worker processes whose circuit breaker is open or half-open
    (worker/breaker.py): they stopped taking messages after host-local failures."""
    total = 0
    for metric in registry().collect():
        if metric.name == "vidq_circuit_open":
            total += sum(1 for s in metric.samples if s.value >= 1)
    return total


def mark_process_dead(pid: int) -> None:
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)


def serve(port: int, *, healthy: Callable[[], tuple[bool, str]],
          host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve /metrics and /healthz from a daemon thread, on ``host`` (``VIDQ_METRICS_HOST``:
    loopback unless an operator opens it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(registry()), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                ok, why = healthy()
                body, status, ctype = why.encode() + b"\n", 200 if ok else 503, "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # scrapes are not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="vidq-metrics", daemon=True).start()
    return server
