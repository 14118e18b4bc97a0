"""The Prometheus metrics worker processes record.

A host's worker processes (one per GPU) each record into files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, safe across
processes); ``vidq worker``, their supervisor, sets that directory and serves the
sum (worker/metrics_server.py). Without the directory (``vidq run``, tests) the
metrics live in the process's own registry. Only worker processes import this
module: in multiprocess mode, importing it creates that process's metric files.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
HEARTBEATS_FAILING = Gauge("vidq_heartbeats_failing", "1 while this worker process cannot "
                           "write its heartbeats (its /healthz is then unhealthy).",
                           multiprocess_mode="liveall")
HEARTBEAT_OK_AT = Gauge("vidq_heartbeat_ok_timestamp_seconds", "When this worker process last "
                        "wrote its heartbeats (or read the database's clock, holding no "
                        "job): Unix time.", multiprocess_mode="liveall")
CIRCUIT_OPEN = Gauge("vidq_circuit_open", "1 while this worker process's circuit breaker "
                     "is open or half-open (host-local failures in a row).",
                     multiprocess_mode="liveall")
