"""One frozen, typed settings object, built from ``VIDQ_*`` variables and CLI flags.

Every default is documented beside the field; docs/reference/settings.md is generated
from these docstrings (scripts/settings_doc.py).
Nothing here connects to anything: building settings has no side effects.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from vidq.errors import ConfigError

ENV_PREFIX = "VIDQ_"
EMBEDDING_MODES = ("off", "video", "clip")
"""``VIDQ_EMBEDDINGS``: keep nothing, one vector per video, or per video and per clip."""
DECODER_KINDS = ("auto", "threads", "processes")
"""``VIDQ_DECODERS``: see ``Settings.decoders``."""
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Settings:
    """Everything a producer, a worker or ``vidq classify`` can be told."""

    broker_url: str = "redis://localhost:6379/0"
    """Celery broker. ``redis://:password@host:6379/0`` or ``rediss://`` for TLS."""

    database_url: str = "sqlite:///vidq.db"
    """Results database (SQLAlchemy URL). The SQLite file is the embedded default;
    ``postgresql+psycopg://user:pass@host/db`` at scale."""

    auto_migrate: bool | None = None
    """Migrate the database schema on start when it is empty or behind. Unset (``auto``):
    only for SQLite, the embedded default; a shared PostgreSQL is upgraded by an operator
    with ``vidq db upgrade``, and workers refuse to run against a schema that differs."""

    db_connect_timeout_s: int = 10
    """PostgreSQL: seconds to wait for a connection (libpq ``connect_timeout``) before the
    attempt fails as a transient database error; 0 = wait forever (libpq's default)."""

    db_statement_timeout_s: float = 300.0
    """PostgreSQL: longest a single statement may run (``statement_timeout``) before the
    server cancels it, so a stuck query cannot hold a worker or a lock forever; 0 = no
    limit. ``vidq db upgrade`` lifts it for the migration itself."""

    db_pool_size: int = 5
    """PostgreSQL connections each process keeps open. A worker host opens up to
    processes x (db_pool_size + db_max_overflow); size max_connections for the fleet."""

    db_max_overflow: int = 5
    """PostgreSQL connections a process may open beyond ``db_pool_size`` at a peak."""

    db_pool_timeout_s: float = 30.0
    """Seconds a thread waits for a free pooled connection before a transient error."""

    queue: str = "vidq"
    """Celery queue that jobs go to and workers consume. Recorded on each job: reconcile
    and retry act only on the jobs of their own queue, and re-enqueue them there."""

    model: str = "slow_r50"
    """Model preset (``vidq models`` lists them)."""

    weights: str = "pretrained"
    """``pretrained`` (the hub checkpoint through the torch hub cache), a local
    checkpoint path, or ``random`` (untrained; every result row says so)."""

    weights_sha256: str = ""
    """sha256 the checkpoint must have (``pretrained`` or a file); any other file is
    refused before it is loaded. Empty: ``pretrained`` is checked against the preset's
    built-in pin where it has one, and loaded with a warning where it has none."""

    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""

    precision: str = "auto"
    """``auto`` (bf16 on AMX CPUs and CUDA, fp32 elsewhere), ``fp32``, ``bf16``, ``fp16``,
    or ``int8`` (CPU only, slow_r50 only, needs ``int8_calibration``; auto never picks it)."""

    int8_calibration: str = ""
    """Calibration file for ``precision=int8``, written by ``vidq calibrate``; it must
    match the model and weights. Empty: int8 is refused (it never calibrates silently)."""

    batch_size: int = 0
    """Clips per forward pass; 0 picks 1 on CPU (fastest per clip there) and 16 on CUDA."""

    inflight: int = 0
    """Jobs one worker process holds at once (its Celery thread pool). 0 = twice the batch
    size plus twice the decode workers: a batch of one-clip videos in the model, the next
    one ready, and a video in each decoder's hands. 1 = one job at a time."""

    decode_workers: int = 0
    """Videos decoded and transformed at the same time in one worker process (threads or
    processes: ``decoders``). 0 = the CPU cores the process may use, less one for the
    model (at least 1)."""

    decoders: str = "auto"
    """Where the decode workers run: ``threads`` of the worker process, or ``processes``
    of their own (each with its own GIL; clips come back in shared memory). ``auto``:
    processes when there are several decode workers (one-clip jobs 1.1x faster with
    two, `python -m benchmarks feed`), a thread for one (as fast, and no extra process).
    See worker/decoder_process.py; resolved in worker/plan.py."""

    batch_wait_ms: float = 5.0
    """How long the model loop waits for a fuller batch before it runs what it has."""

    compile: bool = False
    """Wrap the model in ``torch.compile`` (slower start, can be faster on GPU)."""

    top_k: int = 5
    """Labels kept per clip and per video."""

    media_roots: tuple[str, ...] = ()
    """Directories and object-store prefixes (``s3://bucket/videos/``) workers may open
    videos under (``os.pathsep``-separated; a URI's ``://`` does not split). Empty means
    no restriction (fine on a laptop, not on a shared worker)."""

    s3_endpoint_url: str = ""
    """Endpoint of an S3-compatible store (MinIO, Ceph, R2...) for ``s3://`` URIs. Empty:
    botocore's own choice, which honours ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL``.
    Credentials always come from the standard AWS environment, never from vidq."""

    storage_options: str = ""
    """Extra fsspec options per scheme, as JSON: ``{"s3": {"requester_pays": true}}``
    (see the s3fs/gcsfs/adlfs docs). Empty: each filesystem's defaults."""

    max_file_bytes: int = 20 * 1024**3
    """Videos larger than this are refused (bytes)."""

    max_duration_s: float = 6 * 3600.0
    """Videos longer than this are refused (seconds)."""

    max_pixels: int = 4096 * 2304
    """Videos with more pixels per frame than this are refused (width x height)."""

    max_frames: int = 2_000_000
    """Videos whose stream declares more frames than this, or carries more when
    decoded, are refused. ``max_pixels`` applies to every decoded frame too: headers
    can understate both."""

    max_window_frames: int = 2000
    """Clip windows holding more frames than this are refused: a slow_r50 window is
    2.13 s, so 2000 allows ~940 fps. Only the sampled frames of a window are kept in
    memory; this bounds the look-ahead of compressed packets and the work per clip."""

    max_decode_s: float = 1800.0
    """Decoding one video for longer than this (wall seconds) refuses it."""

    skip_unused_frames: bool = True
    """Leave out of the decoder the packets of frames that no clip samples and no
    other frame references (most H.264/HEVC B-frames). Decoded frames and results
    are the same either way; ``false`` decodes every frame."""

    task_time_limit_s: int = 3600
    """Hard time limit of one job; the soft limit is 60 s earlier."""

    max_retries: int = 5
    """Transient failures (database, broker, GPU memory) retried this many times."""

    max_attempts: int = 3
    """Attempts a job may start, however each ended (a crash, an out-of-memory kill, an
    unexpected exception); then it is failed with what happened to the last one."""

    commit_retry_s: float = 3600.0
    """How long a finished result keeps retrying its commit while the database is down."""

    worker_concurrency: int = 0
    """Worker processes per host; 0 means one per GPU, or one on CPU."""

    worker_max_memory_mb: int = 0
    """Restart a worker child once its RSS passes this (MiB); 0 disables."""

    task_events: bool = False
    """Workers send Celery's task events (received, started, succeeded, failed) and
    producers the task-sent event, for a monitor such as Flower. Flower's own
    enable_events broadcast also turns them on in each running worker it sees (within
    5 s, until that worker restarts); with this setting they are on from a worker's
    first job. docker-compose.yml turns them on; each job then costs its worker three
    small publishes to the broker (docs/deploy.md)."""

    reconcile_after_s: int = 600
    """``vidq reconcile`` re-enqueues jobs queued or running this long with no live task."""

    reconcile_every_s: int = 60
    """How often a worker host runs reconcile (one host at a time, via a Redis lock); 0 = never."""

    webhook_secret: str = ""
    """Shared secret that signs batch-completion webhooks (``X-Vidq-Signature``, an
    HMAC-SHA256 of ``X-Vidq-Timestamp`` and the body; ``vidq.notify.verify_signature``
    checks it). Empty: webhooks are sent unsigned."""

    webhook_allow_networks: str = ""
    """Comma-separated networks (CIDRs: ``10.20.0.0/16,fd00:1::/64``) a webhook may
    reach besides public addresses. Empty: loopback, link-local (cloud metadata at
    169.254.169.254), private, multicast and reserved addresses are refused, at submit
    and again at delivery, whatever a webhook's host name resolves to."""

    metrics_port: int = 0
    """``vidq worker`` serves Prometheus metrics (/metrics) and a health check (/healthz)
    of its worker processes on this port; 0 = off."""

    metrics_host: str = "127.0.0.1"
    """The address /metrics and /healthz listen on: this host only by default. Set
    ``0.0.0.0`` (or one interface's address) where Prometheus scrapes from another host
    or container (docker-compose.yml does); the endpoint has no authentication."""

    log_format: str = "text"
    """``text``, or ``json``: one JSON object per log line, with the job id, batch,
    attempt and timings on every job line."""

    heartbeat_s: int = 15
    """How often a running job's heartbeat is written."""

    decode_stall_s: float = 120.0
    """A decoder that has made no progress on a video (no packet read, no clip out,
    while the model was not holding it back) for this long is stalled: a frozen process
    or a read blocked on a hung mount. The watchdog replaces it (a decoder process is
    killed; a decoder thread is abandoned for a new one) and the video goes back to the
    queue as this host's failure, no attempt spent. It fails for good (``timeout``) only
    once it stalled on two hosts. Keep it well under ``task_time_limit_s``."""

    breaker_failures: int = 3
    """Host-local failures in a row (a file the producer saw is not found here, a path
    outside this host's media roots, permission denied, bucket credentials, device
    errors, a stalled decoder) after which a worker process stops taking messages
    (circuit open, /healthz unhealthy, ``vidq status`` shows it) and then probes again
    with one message at a time, backing off from 10 s to 5 minutes. Such a failure
    gives the job back without spending an attempt; it fails for good only once two
    hosts agree (or no other live host is left to ask). 0 = never stop consuming."""

    segment_min_score: float = 0.3
    """A clip counts towards a label's segment when the label is in its top-k with at
    least this score (softmax, 0..1). Rules in ``vidq/segments.py``."""

    segment_min_s: float = 0.0
    """Segments shorter than this (seconds, end - start) are not stored. 0 keeps every
    one: a dropped segment cannot be brought back without re-running the job, while a
    query can always ask for a minimum duration."""

    segment_max_gap_s: float = 1.0
    """The most time (seconds) between two consecutive supporting clips that no clip
    looked at, for one segment to span both (uniform clips, strides over one clip span).
    A clip that looked and did not see the label always ends the segment."""

    embeddings: str = "off"
    """Keep the model's pooled features (the vector its last layer projects to the
    labels: 2048 values for slow_r50 and the X3D presets), stored as float16 with the
    model and weights id: ``video`` keeps one per video (the mean of its clips'),
    ``clip`` one per clip as well, ``off`` none. Off by default: each vector is 4 KiB
    (2048 x float16), more than all of a clip's label rows. See vidq/embeddings.py."""

    ann: bool = True
    """``vidq similar`` through an approximate nearest-neighbour index (usearch: ``pip
    install 'vidq[ann]'``) once a model's vectors number ``ann_min_rows``, its
    candidates re-ranked exactly from the database; ``off``: always the exact scan.
    See vidq/ann.py."""

    ann_dir: str = ""
    """Where the index files are kept, one per database, model and weights (empty:
    ``~/.cache/vidq/ann``). Each host that asks keeps its own."""

    ann_min_rows: int = 20000
    """Below this many vectors of a model the exact scan is fast enough, and no index
    is built."""

    viewer_token: str = ""
    """``vidq serve``: a secret every request must carry (``Authorization: Bearer``, or
    the cookie a first visit to ``/?token=...`` sets). Required to listen on any
    address other than loopback; empty: the viewer binds 127.0.0.1 only."""

    viewer_cache_dir: str = ""
    """``vidq serve``: where keyframe thumbnails are cached. Empty:
    ``$XDG_CACHE_HOME/vidq/thumbs`` (``~/.cache/vidq/thumbs``)."""

    viewer_cache_mb: int = 256
    """``vidq serve``: the most the thumbnail cache may hold (MiB); the least recently
    used thumbnails are removed beyond it."""

    def __post_init__(self) -> None:
        if self.decoders not in DECODER_KINDS:
            raise ConfigError(f"VIDQ_DECODERS={self.decoders!r} is not one of "
                              f"{', '.join(DECODER_KINDS)}.")
        if self.embeddings not in EMBEDDING_MODES:
            raise ConfigError(f"VIDQ_EMBEDDINGS={self.embeddings!r} is not one of "
                              f"{', '.join(EMBEDDING_MODES)}.")
        parse_networks(self.webhook_allow_networks)

    @property
    def webhook_networks(self) -> tuple[IPNetwork, ...]:
        """``webhook_allow_networks`` parsed."""
        return parse_networks(self.webhook_allow_networks)

    @property
    def stale_after_s(self) -> float:
        """A running job whose heartbeat is older than this has lost its worker."""
        return 3 * self.heartbeat_s + 5

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then ``VIDQ_*`` variables, then explicit overrides (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("media_roots"), str):
            values["media_roots"] = _split_roots(values["media_roots"])
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def public(self) -> dict[str, Any]:
        """Settings as a dict safe to print: passwords in URLs are masked."""
        out = dataclasses.asdict(self)
        out["broker_url"] = mask_url(self.broker_url)
        out["database_url"] = mask_url(self.database_url)
        out["webhook_secret"] = "***" if self.webhook_secret else ""
        out["viewer_token"] = "***" if self.viewer_token else ""
        out["storage_options"] = "***" if self.storage_options else ""
        return out


def parse_networks(raw: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8, ::1/128"`` -> its networks; a bare address is its own network."""
    networks: list[IPNetwork] = []
    for part in raw.split(","):
        if not part.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"VIDQ_WEBHOOK_ALLOW_NETWORKS: {part.strip()!r} is not a network; give CIDRs "
                "separated by commas, such as 10.0.0.0/8,fd00::/8.") from None
    return tuple(networks)


def _split_roots(raw: str) -> tuple[str, ...]:
    # "/data:s3://bucket/videos/": the ":" of a URI's "://" is not a separator.
    sep = re.escape(os.pathsep)
    parts = re.split(f"{sep}(?!//)", raw) if os.pathsep == ":" else raw.split(os.pathsep)
    return tuple(p for p in parts if p)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    name = ENV_PREFIX + f.name.upper()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind.startswith("bool"):
            if raw.lower() == "auto" and "None" in kind:
                return None
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return _split_roots(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}.") from None


def mask_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``; other URLs unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, colon, _password = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"
