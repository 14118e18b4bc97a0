"""The results schema (SQLAlchemy 2.0) and the engine. The table is the API:
users poll ``jobs`` and search ``video_labels`` / ``clip_predictions`` with SQL.

The producer writes a job row before it enqueues anything, so this database,
not Redis, is the record of what was asked.
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal

from vidq.errors import TransientError
from vidq.settings import Settings, mask_url

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer, "sqlite")


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
BATCH_NAME_MAX = 200
DEFAULT_QUEUE = "vidq"
_ACTIVE_SQL = "status IN ('queued', 'running')"


def utcnow() -> dt.datetime:
    """This host's clock, in UTC: for display and throughput only. Leases, heartbeats
    and stale checks use ``db_now()``, the one clock every host shares."""
    return dt.datetime.now(dt.timezone.utc)


def aware(t: dt.datetime) -> dt.datetime:
    """A timestamp read back from the database, in UTC: SQLite hands back naive
    datetimes (UTC, as vidq writes them), PostgreSQL aware ones."""
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


class db_now(FunctionElement[dt.datetime]):
    """The database server's clock (``now()`` on PostgreSQL), less ``ago_s`` seconds.

    Every lease and heartbeat timestamp is written and compared with this, so a
    worker host whose clock runs behind or ahead can neither steal a live job nor
    lose its own. SQLite (one host) gets its UTC clock in the very text format
    SQLAlchemy stores a DateTime there (``YYYY-MM-DD HH:MM:SS.ffffff``, no zone), so
    string comparison with stored values stays chronological."""

    type = DateTime(timezone=True)
    # ago_s is rendered into the SQL text, so it must be part of the statement cache key.
    _traverse_internals = [("ago_s", InternalTraversal.dp_plain_obj)]
    inherit_cache = True

    def __init__(self, ago_s: float = 0.0) -> None:
        self.ago_s = float(ago_s)
        super().__init__()


@compiles(db_now)
def _db_now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    if not element.ago_s:
        return "now()"
    return f"(now() - make_interval(secs => {element.ago_s!r}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    # %f is "SS.SSS"; three zeros make SQLAlchemy's six fractional digits.
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '{-element.ago_s!r} seconds')"


class db_now_less(FunctionElement[dt.datetime]):
    """``db_now()`` less a number of seconds that SQL computes (a column: a job's own
    lease length), in the same form as ``db_now``'s on each dialect."""

    type = DateTime(timezone=True)
    inherit_cache = True

    def __init__(self, seconds: Any) -> None:
        super().__init__(seconds)


@compiles(db_now_less)
def _db_now_less_default(element: db_now_less, compiler: Any, **kw: Any) -> str:
    return f"(now() - make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(db_now_less, "sqlite")
def _db_now_less_sqlite(element: db_now_less, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '-' || ({seconds}) || ' seconds')"


class db_started(FunctionElement[dt.datetime]):
    """When the database server started (``pg_postmaster_start_time()``): heartbeats
    older than that could not have been written by a live worker since. SQLite (one
    host, no server) gives the epoch."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(db_started)
def _db_started_default(element: db_started, compiler: Any, **kw: Any) -> str:
    return "pg_postmaster_start_time()"


@compiles(db_started, "sqlite")
def _db_started_sqlite(element: db_started, compiler: Any, **kw: Any) -> str:
    return "'1970-01-01 00:00:00.000000'"


def takeover_due(lease_s: Any, floor: Any) -> Any:
    """The stale-takeover rule (vidq/contact.py): a running job's heartbeat is older
    than its lease, and so are this process's unbroken contact with the database
    (``floor``, a bound database time) and the server's start."""
    cutoff = db_now_less(lease_s)
    return (Job.heartbeat_at.is_(None) | (Job.heartbeat_at < cutoff)) & (floor < cutoff) & (
        db_started() < cutoff)


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(BATCH_NAME_MAX), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Completion webhook (vidq/notify.py): where to, and what happened.
    notify_url: Mapped[str | None] = mapped_column(Text)
    notify_status: Mapped[str | None] = mapped_column(String(16))
    """pending (due when no job is active), sending, sent or failed."""
    notify_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    notify_claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    notify_sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    notify_response: Mapped[int | None] = mapped_column(Integer)


class Job(Base):
    """One video to classify with one model, weights and sampling."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    path: Mapped[str] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    """The file's modification time at submit; with size_bytes and content_sha256, the
    fingerprint a worker checks before writing results. NULL on rows older than 0002."""
    queue: Mapped[str] = mapped_column(String(64), default=DEFAULT_QUEUE,
                                       server_default=DEFAULT_QUEUE)
    """The Celery queue (VIDQ_QUEUE) the job was submitted to: its model's workers."""
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(SmallInteger, default=5)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_kind: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    task_id: Mapped[str | None] = mapped_column(String(64))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_seconds: Mapped[float | None] = mapped_column(Float)
    """The lease length of the attempt that holds the job (its worker's stale_after_s):
    the job is another's to take over only once its heartbeat is this much older. NULL
    on rows claimed before revision 0008 (the taker's own lease length applies)."""
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # What was asked.
    model: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(Text)
    strategy: Mapped[str] = mapped_column(String(16))
    clips_requested: Mapped[int] = mapped_column(Integer)
    stride_s: Mapped[float | None] = mapped_column(Float)
    start_sec: Mapped[float] = mapped_column(Float, default=0.0)
    crops: Mapped[int] = mapped_column(SmallInteger, default=1)
    config_key: Mapped[str] = mapped_column(String(255))
    # What ran.
    weights_id: Mapped[str | None] = mapped_column(String(80))
    precision: Mapped[str | None] = mapped_column(String(8))
    calibration_id: Mapped[str | None] = mapped_column(String(80))
    """int8 runs: the sha256 id of the activation calibration used (``vidq calibrate``)."""
    device: Mapped[str | None] = mapped_column(String(16))
    num_frames: Mapped[int | None] = mapped_column(Integer)
    sampling_rate: Mapped[int | None] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int | None] = mapped_column(BigInteger)
    codec: Mapped[str | None] = mapped_column(String(32))
    has_audio: Mapped[bool | None] = mapped_column(Boolean)
    clips_done: Mapped[int | None] = mapped_column(Integer)
    decode_s: Mapped[float | None] = mapped_column(Float)
    model_s: Mapped[float | None] = mapped_column(Float)
    decode_ratio: Mapped[float | None] = mapped_column(Float)
    """Video packets decoded / packets read: the rest were unsampled, unreferenced frames
    the decoder was spared (VIDQ_SKIP_UNUSED_FRAMES)."""
    # The answer, for quick polling.
    top_class_id: Mapped[int | None] = mapped_column(SmallInteger)
    top_label: Mapped[str | None] = mapped_column(String(128))
    top_score: Mapped[float | None] = mapped_column(Float)

    clips: Mapped[list[ClipPrediction]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    labels: Mapped[list[VideoLabel]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        Index("ix_jobs_status_priority", "status", "priority"),
        # Cover ``vidq status --batch``: its counts and clips sum, its oldest queued job
        # (the first entry of the batch's queued ones) and its recent throughput, each
        # an index-only read, no heap visit per job of a large batch (0007, 0010).
        Index("ix_jobs_batch_status_submitted", "batch_id", "status", "submitted_at",
              "clips_done"),
        Index("ix_jobs_batch_finished", "batch_id", "finished_at", "status", "clips_done",
              "started_at"),
        Index("ix_jobs_content_config", "content_sha256", "config_key"),
        Index("ix_jobs_top_label_score", "top_label", "top_score"),
        Index("ix_jobs_finished_at", "finished_at"),
        Index("ix_jobs_queue_status", "queue", "status"),
        # The database, not a check-then-insert, keeps one active job per content and
        # configuration: two producers submitting the same file at once insert one row.
        Index("ux_jobs_active_content_config", "content_sha256", "config_key", unique=True,
              postgresql_where=text(_ACTIVE_SQL), sqlite_where=text(_ACTIVE_SQL)),
    )


class ClipPrediction(Base):
    """Top-k labels of one clip (averaged over its crops)."""

    __tablename__ = "clip_predictions"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    clip_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_sec: Mapped[float] = mapped_column(Float)
    end_sec: Mapped[float] = mapped_column(Float)
    class_id: Mapped[int] = mapped_column(SmallInteger)
    label: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="clips")

    __table_args__ = (Index("ix_clip_predictions_label_score", "label", "score"),)


class VideoLabel(Base):
    """Top-k labels of a whole video: mean softmax over all its clips and crops."""

    __tablename__ = "video_labels"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    class_id: Mapped[int] = mapped_column(SmallInteger)
    label: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="labels")

    __table_args__ = (
        Index("ix_video_labels_label_score", "label", "score"),
        # ``vidq results --label``'s first page: a label's rows in job order with their
        # score, read from the index until the page is full (0007).
        Index("ix_video_labels_label_job", "label", "job_id", "rank", "score"),
    )


class LabelSegment(Base):
    """A stretch of a video where one label holds over consecutive clips (rules in
    ``vidq/segments.py``), written with the job's other results."""

    __tablename__ = "label_segments"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    segment_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    """Order within the job: by start, then label."""
    class_id: Mapped[int] = mapped_column(SmallInteger)
    label: Mapped[str] = mapped_column(String(128))
    start_sec: Mapped[float] = mapped_column(Float)
    end_sec: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    """end_sec - start_sec, stored so "lasts at least N s" is an index range."""
    mean_score: Mapped[float] = mapped_column(Float)
    peak_score: Mapped[float] = mapped_column(Float)
    clips: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_label_segments_label_duration", "label", "duration_s"),
        Index("ix_label_segments_label_mean_score", "label", "mean_score"),
        # ``vidq segments --label``'s first page, in job order (0007).
        Index("ix_label_segments_label_job", "label", "job_id", "segment_index", "duration_s"),
    )


class VideoEmbedding(Base):
    """A video's pooled features: the mean of its clips' (``VIDQ_EMBEDDINGS=video|clip``),
    as float16 bytes, written with the job's other results (vidq/embeddings.py)."""

    __tablename__ = "video_embeddings"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(64))
    weights_id: Mapped[str] = mapped_column(String(80))
    """Vectors compare only within one model and one set of weights."""
    dim: Mapped[int] = mapped_column(Integer)
    norm: Mapped[float] = mapped_column(Float)
    """L2 norm of the stored (float16) vector: cosine similarity without a second pass."""
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    """``dim`` little-endian IEEE float16 values, not normalised."""
    written_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    """When the row was written (the database's clock): the approximate index of
    ``vidq similar`` (vidq/ann.py) takes in the rows newer than what it holds. NULL on
    rows older than 0007."""

    __table_args__ = (
        Index("ix_video_embeddings_model_weights_written", "model", "weights_id", "written_at"),
    )


class ClipEmbedding(Base):
    """One clip's pooled features (mean over its crops), ``VIDQ_EMBEDDINGS=clip``. The
    model and weights id are those of the job's ``video_embeddings`` row."""

    __tablename__ = "clip_embeddings"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    clip_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_sec: Mapped[float] = mapped_column(Float)
    end_sec: Mapped[float] = mapped_column(Float)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    """Little-endian IEEE float16 values, as many as the video row's ``dim``."""


class HostFailure(Base):
    """A failure that says something about the host rather than the video (the file
    not found there, a refused path, permission denied, a decoder that stalled): the
    job went back to the queue without spending an attempt. It fails for good only
    when two distinct hosts agree (worker/breaker.py)."""

    __tablename__ = "host_failures"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    error_kind: Mapped[str] = mapped_column(String(32))
    """``stalled`` for a decoder that made no progress, else the input error's kind."""
    error_message: Mapped[str | None] = mapped_column(Text)
    failures: Mapped[int] = mapped_column(Integer)
    """Times this host failed the job so."""
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class WorkerHost(Base):
    """A worker host's circuit breaker as it last reported it (``vidq status``)."""

    __tablename__ = "workers"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    queue: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    """``closed`` (consuming), ``open`` (stopped after host-local failures in a row) or
    ``half-open`` (probing with one message)."""
    last_error: Mapped[str | None] = mapped_column(Text)
    since: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    """When it entered ``state``."""
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    """Its last report, by the database's clock: a host is live while this is fresh."""

    __table_args__ = (Index("ix_workers_queue_seen", "queue", "seen_at"),)


_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets pollers read while workers write; busy_timeout waits out writer locks.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def get_engine(url: str, *, auto_migrate: bool | None = None) -> Engine:
    """One engine per URL per process. On first use the schema revision is checked:
    an empty or older database is migrated when ``auto_migrate`` allows it (None:
    only SQLite, see ``Settings.auto_migrate``), otherwise refused in one line."""
    engine = _ENGINES.get(url)
    if engine is not None:
        return engine
    # Here, not at the top: alembic is loaded only by a process that opens a database.
    from vidq.migrate import ensure_schema

    engine = make_engine(url)
    try:
        ensure_schema(
            engine,
            auto_migrate=url.startswith("sqlite") if auto_migrate is None else auto_migrate,
            display_url=mask_url(url),
        )
    except OperationalError as exc:
        engine.dispose()
        raise unreachable(url, exc) from None
    except BaseException:
        engine.dispose()
        raise
    _ENGINES[url] = engine
    return engine


def wait_for_database(
    url: str, *, auto_migrate: bool | None, on_wait: Callable[[str], None]
) -> Engine:
    """``get_engine``, waiting with backoff while the database is unreachable: a worker
    that starts during an outage waits for it instead of failing its messages."""
    attempt = 0
    while True:
        try:
            return get_engine(url, auto_migrate=auto_migrate)
        except TransientError as exc:
            delay = min(30.0, 2.0**attempt)
            on_wait(f"{exc.message} Waiting {delay:.0f}s.")
            time.sleep(delay)
            attempt += 1


PG_KEEPALIVES: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}
"""libpq TCP keepalives: a connection to a database host that vanished (no FIN, no RST:
powered off, partitioned) fails after about 25 s without an answer, instead of the
kernel's two hours, so a worker's query or heartbeat does not hang on it."""

IDLE_IN_TRANSACTION_TIMEOUT_S = 60.0
"""PostgreSQL ends a session that sits this long in an open transaction without sending
a statement (``idle_in_transaction_session_timeout``). vidq's transactions last
milliseconds; one left open is a worker host that froze or vanished between its UPDATE
and its COMMIT, and its row locks would otherwise stop reconcile and other workers for
as long as the server keeps the dead connection (hours)."""



def reading_at_the_readers_pace(conn: Session | Connection) -> None:
    """Lift the idle-in-transaction timeout for this transaction only: a streamed read
    (``vidq results | less``, an export to a slow store) waits on its reader between
    pages, holding no row lock, and must not be ended after a minute."""
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    if bind.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))

def make_engine(
    url: str, *, settings: Settings | None = None,
    idle_in_transaction_timeout_s: float = IDLE_IN_TRANSACTION_TIMEOUT_S,
) -> Engine:
    """An engine with vidq's connection settings, and no schema check (``vidq db``).
    Pool size and timeouts come from ``settings`` (default: the ``VIDQ_DB_*`` variables);
    on PostgreSQL every connection has TCP keepalives and the idle-in-transaction
    timeout (0: none)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    s = settings or Settings.from_env()
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        in_url = make_url(url).query  # an operator's own keepalive settings win
        connect_args.update({k: v for k, v in PG_KEEPALIVES.items() if k not in in_url})
        if s.db_connect_timeout_s > 0:
            connect_args["connect_timeout"] = s.db_connect_timeout_s
        options = []
        if s.db_statement_timeout_s > 0:
            options.append(f"-c statement_timeout={int(s.db_statement_timeout_s * 1000)}")
        if idle_in_transaction_timeout_s > 0:
            options.append("-c idle_in_transaction_session_timeout="
                           f"{int(idle_in_transaction_timeout_s * 1000)}")
        if options:
            connect_args["options"] = " ".join(options)
    return create_engine(url, pool_pre_ping=True, pool_size=s.db_pool_size,
                         max_overflow=s.db_max_overflow, pool_timeout=s.db_pool_timeout_s,
                         connect_args=connect_args)


def unreachable(url: str, exc: BaseException) -> TransientError:
    return TransientError(
        f"Database {mask_url(url)} is unreachable ({first_line(exc)}); "
        "check VIDQ_DATABASE_URL and that the server is up."
    )


def dispose_engines() -> None:
    """Drop pooled connections (after fork: a child must not share its parent's)."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()


def sessions(url: str, *, auto_migrate: bool | None = None) -> sessionmaker:
    return sessionmaker(get_engine(url, auto_migrate=auto_migrate), expire_on_commit=False)


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched. ``Session.execute`` types its result as a
    plain ``Result``; for such a statement it is a ``CursorResult``."""
    return cast(CursorResult[Any], result).rowcount
