"""Prometheus metrics of worker processes, and the endpoint that serves them.

A host's worker processes (one per GPU) each record into files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, safe across
processes); ``vidq worker``, their supervisor, sets that directory and serves the
sum on ``VIDQ_METRICS_PORT``: ``/metrics`` for Prometheus and ``/healthz``, which
answers 200 only while every worker process is alive and has its model loaded.
Without the directory (``vidq run``, tests) the metrics live in the process's
own registry and nothing is served.

Torch-free; importing it records nothing.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

JOBS = Counter("vidq_jobs", "Jobs ended by this worker, by outcome and error kind.",
               ["outcome", "error_kind"])
ATTEMPTS = Counter("vidq_attempts", "Job attempts started (claims).")
CLIPS = Counter("vidq_clips", "Clips classified in succeeded jobs.")
PACKETS = Counter("vidq_video_packets", "Video packets of succeeded jobs: decoded, or skipped "
                  "(unsampled and unreferenced).", ["fate"])
DECODE_SECONDS = Histogram("vidq_decode_seconds", "Decode and transform time of one video.",
                           buckets=SECONDS)
MODEL_SECONDS = Histogram("vidq_model_seconds", "Time of one forward pass (a batch).",
                          buckets=SECONDS)
BATCH_FILL = Histogram("vidq_batch_fill", "Views in a batch / VIDQ_BATCH_SIZE.",
                       buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0))
QUEUE_WAIT = Histogram("vidq_queue_wait_seconds", "From submit to the start of an attempt.",
                       buckets=(1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600))
IN_FLIGHT = Gauge("vidq_jobs_in_flight", "Videos in a worker's pipeline now.",
                  multiprocess_mode="livesum")
MODEL_LOAD_SECONDS = Gauge("vidq_model_load_seconds", "How long loading the model took.",
                           multiprocess_mode="liveall")
MODEL_LOADED = Gauge("vidq_model_loaded", "1 once this worker process has its model.",
                     multiprocess_mode="liveall")
DEVICE_MEMORY = Gauge("vidq_device_memory_bytes", "Accelerator memory allocated (CUDA).",
                      multiprocess_mode="liveall")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry() -> CollectorRegistry:
    """The sum over this host's worker processes (or this process's own registry)."""
    if multiprocess_dir() is None:
        from prometheus_client import REGISTRY

        return REGISTRY
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


def mark_process_dead(pid: int) -> None:
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)


def serve(port: int, *, healthy: Callable[[], tuple[bool, str]],
          host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics and /healthz from a daemon thread."""

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
