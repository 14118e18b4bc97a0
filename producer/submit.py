"""``vidq submit``: find videos, record one job row each, then enqueue their ids.

Rows are written before anything is published, so the table is the record of
what was asked; a publish that fails leaves queued rows that ``vidq reconcile``
enqueues later. Identity is by content: a video already classified (or in
flight) with the same model, weights and sampling is skipped unless forced.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from vidq import storage
from vidq.db import ACTIVE, BATCH_NAME_MAX, Batch, Job, JobStatus, db_now, sessions
from vidq.errors import InputError, VidqError
from vidq.formats import VIDEO_EXTENSIONS
from vidq.media import check_video_path, sha256_file
from vidq.notify import WebhookRefused, check_url
from vidq.queue import make_celery, new_task_id, publish_jobs
from vidq.sampling import Sampling
from vidq.settings import Settings

CHUNK = 1000
OBJECT_THREADS = 32
"""Object-store requests in flight at submit (metadata, or bytes to hash): waiting on
the network, not the CPU."""


@dataclass(frozen=True)
class JobRequest:
    """What to run on each video: model, weights and sampling."""

    model: str = "slow_r50"
    weights: str = "pretrained"
    strategy: str = "single"
    clips: int = 10
    stride_s: float | None = None
    start_sec: float = 0.0
    crops: int = 1
    priority: int = 5

    def sampling(self) -> Sampling:
        """The sampling this request asks for (validated: a bad value is an InputError)."""
        return Sampling(strategy=self.strategy, clips=self.clips, stride_s=self.stride_s,
                        start_sec=self.start_sec, crops=self.crops)

    def config_key(self) -> str:
        """Everything that changes a result, as one comparable string."""
        return f"{self.model}|{self.weights}|{self.sampling().key()}"


@dataclass
class SubmitReport:
    batch: str
    batch_id: int | None = None
    resumed: list[int] = field(default_factory=list)
    """Embedded only: jobs an interrupted ``vidq run`` left unfinished, to run now."""
    found: int = 0
    job_ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    published: int = 0
    publish_error: str | None = None


def _open_manifest(path: str, storage_config: storage.StorageConfig | None) -> Any:
    if not storage.is_uri(path):
        return open(path, newline="", encoding="utf-8")
    uri = storage.ObjectURI.parse(path)
    fs = (storage_config or storage.StorageConfig()).filesystem(uri.scheme)
    with storage.storage_errors(path):
        return fs.open(uri.fs_path, "rt", newline="", encoding="utf-8")


def read_manifest(path: str, *, storage_config: storage.StorageConfig | None = None
                  ) -> Iterator[str]:
    """Paths and URIs from a manifest (a local file or an object): CSV/JSONL with a
    ``path`` column, else one a line."""
    suffix = Path(path).suffix.lower()
    try:
        with _open_manifest(path, storage_config) as fh:
            if suffix == ".csv":
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise InputError(f"{path}: CSV manifest needs a 'path' column.",
                                     kind="manifest")
                yield from (row["path"] for row in reader if row.get("path"))
            elif suffix in (".jsonl", ".ndjson"):
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield str(json.loads(line)["path"])
                        except (ValueError, KeyError, TypeError):
                            raise InputError(
                                f"{path}:{n}: expected a JSON object with a 'path' key.",
                                kind="manifest",
                            ) from None
            else:
                for line in fh:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield line
    except OSError as exc:
        raise InputError(f"{path}: cannot read manifest ({exc.strerror}).",
                         kind="manifest") from None


def discover(
    inputs: Iterable[str],
    *,
    recursive: bool = False,
    pattern: str | None = None,
    manifests: Iterable[str] = (),
    media_roots: tuple[str, ...] = (),
    storage_config: storage.StorageConfig | None = None,
) -> Iterator[str]:
    """Expand files, directories, object-store prefixes and manifests into candidate
    paths and URIs, each once. A prefix outside the media roots is not listed: it is
    passed on as it is, for ``submit`` to refuse in one line."""
    seen: set[str] = set()

    def emit(p: str) -> Iterator[str]:
        if p not in seen:
            seen.add(p)
            yield p

    for raw in inputs:
        if storage.is_uri(raw):
            try:
                prefix = storage.ObjectURI.parse(raw, prefix=True)
                storage.check_roots(prefix, raw, media_roots)
            except InputError:
                yield from emit(raw)
                continue
            listed = storage.list_objects(raw, recursive=recursive, pattern=pattern,
                                          storage=storage_config or storage.StorageConfig())
            for uri in [raw] if listed is None else listed:
                yield from emit(uri)
            continue
        base = Path(raw).expanduser()
        if base.is_dir():
            walker = base.rglob(pattern or "*") if recursive else base.glob(pattern or "*")
            for p in sorted(walker):
                if p.is_file() and (pattern or p.suffix.lower() in VIDEO_EXTENSIONS):
                    yield from emit(str(p))
        else:
            yield from emit(raw)
    for manifest in manifests:
        for listed_path in read_manifest(manifest, storage_config=storage_config):
            yield from emit(listed_path)


def _digest(path: str) -> str | InputError:
    try:
        return sha256_file(path)
    except OSError as exc:  # removed or made unreadable since it was checked
        return InputError(f"{path}: cannot read ({exc.strerror}).", kind="unreadable")


def _object_fingerprint(
    raw: str, *, settings: Settings, storage_config: storage.StorageConfig
) -> tuple[str, int, int | None, str] | VidqError:
    """(canonical URI, size, LastModified ns, content hash) of an object, or the error:
    roots first (no request), then one HEAD; the bytes are read only when the metadata
    holds no content hash (multipart uploads, SSE-KMS, stores other than S3)."""
    try:
        meta = storage.check_object(raw, media_roots=settings.media_roots,
                                    max_file_bytes=settings.max_file_bytes,
                                    storage=storage_config)
        digest = storage.content_hash(meta, storage=storage_config,
                                      max_file_bytes=settings.max_file_bytes)
    except VidqError as exc:
        return exc
    return str(meta.uri), meta.size, meta.modified_ns, digest


def check_batch_name(name: str) -> None:
    """A batch name the ``batches`` table can hold, or one line saying why not."""
    if len(name) > BATCH_NAME_MAX:
        raise InputError(
            f"batch name is {len(name)} characters long; the limit is {BATCH_NAME_MAX}. "
            "Choose a shorter --batch.", kind="bad_batch")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("batch name is not valid UTF-8; choose another --batch.",
                         kind="bad_batch") from None


def _dialect_insert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    return None


def _batch_id(session: Session, name: str) -> int:
    """The batch's id, creating it if needed: an upsert, so producers naming the same
    new batch at once all get the one row (the loser of the race waits, then reads it)."""
    dialect_insert = _dialect_insert(session)
    if dialect_insert is None:
        found = session.scalar(select(Batch.id).where(Batch.name == name))
        if found is not None:
            return found
        batch = Batch(name=name)
        session.add(batch)
        session.flush()
        return batch.id
    session.execute(
        dialect_insert(Batch).values(name=name, created_at=db_now())
        .on_conflict_do_nothing(index_elements=["name"])
    )
    return session.scalars(select(Batch.id).where(Batch.name == name)).one()


def default_batch_name() -> str:
    return "batch-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def submit(
    paths: Iterable[str],
    *,
    settings: Settings,
    request: JobRequest,
    batch: str | None = None,
    force: bool = False,
    publish: bool = True,
    on_reject: Callable[[str], None] = lambda _msg: None,
    progress: Callable[[int], None] = lambda _n: None,
    notify: str | None = None,
) -> SubmitReport:
    """Record and enqueue one job per acceptable video. A video with an active job
    (queued or running) for the same content and configuration is a duplicate, even
    when another producer records it at the same moment: the database decides.
    ``notify``: a URL the batch's completion is POSTed to (vidq/notify.py): http(s) to a
    public address or an allowed network, and the batch's own URL if it has one already."""
    report = SubmitReport(batch=batch or default_batch_name())
    check_batch_name(report.batch)
    if notify:
        check_url(notify, allow_networks=settings.webhook_networks)
    candidates: list[tuple[str, int, int]] = []
    uris: list[str] = []
    for raw in paths:
        report.found += 1
        if storage.is_uri(raw):
            uris.append(raw)
            continue
        try:
            resolved = check_video_path(
                raw, media_roots=settings.media_roots, max_file_bytes=settings.max_file_bytes
            )
        except VidqError as exc:
            report.rejected.append(exc.message)
            on_reject(exc.message)
            continue
        st = resolved.stat()
        candidates.append((str(resolved), st.st_size, st.st_mtime_ns))

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        hashed = list(pool.map(_digest, [p for p, _, _ in candidates]))
    accepted: list[tuple[str, int, int | None]] = []
    digests: list[str] = []
    for candidate, digest in zip(candidates, hashed):
        if isinstance(digest, InputError):
            report.rejected.append(digest.message)
            on_reject(digest.message)
        else:
            accepted.append(candidate)
            digests.append(digest)
    if uris:
        storage_config = storage.StorageConfig.from_settings(settings)
        with ThreadPoolExecutor(max_workers=OBJECT_THREADS) as pool:
            found = list(pool.map(lambda raw: _object_fingerprint(
                raw, settings=settings, storage_config=storage_config), uris))
        for fingerprint in found:
            if isinstance(fingerprint, InputError):
                report.rejected.append(fingerprint.message)
                on_reject(fingerprint.message)
            elif isinstance(fingerprint, VidqError):
                # No credentials, a missing package, a store that does not answer: the
                # same for every object, so the submission stops here in one line.
                raise fingerprint
            else:
                accepted.append(fingerprint[:3])
                digests.append(fingerprint[3])

    key = request.config_key()
    make_session = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    to_publish: list[tuple[int, int, str]] = []
    with make_session() as session, session.begin():
        batch_id = _batch_id(session, report.batch)
        report.batch_id = batch_id
        if notify and not session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.notify_url.is_(None)
                                | (Batch.notify_url == notify)).values(
                notify_url=notify, notify_status="pending", notify_attempts=0,
                notify_sent_at=None)).rowcount:
            raise WebhookRefused(
                f"batch {report.batch} already sends its completion webhook to another URL; "
                "give the same --notify URL, none, or another --batch.")
        known: set[str] = set()
        if not force:
            unique = sorted(set(digests))
            for i in range(0, len(unique), CHUNK):
                known.update(
                    session.scalars(
                        select(Job.content_sha256).where(
                            Job.config_key == key,
                            Job.content_sha256.in_(unique[i : i + CHUNK]),
                            Job.status.in_(ACTIVE + (JobStatus.SUCCEEDED.value,)),
                        )
                    )
                )
        if not publish and known:
            # `vidq run` adopts the rows an interrupted `vidq run` left: queued or running
            # with no message (never published). A running one is claimed once its
            # heartbeat is stale (worker/embedded.py waits for that).
            unique = sorted(known)
            for i in range(0, len(unique), CHUNK):
                report.resumed.extend(session.scalars(
                    select(Job.id).where(
                        Job.config_key == key, Job.queue == settings.queue,
                        Job.content_sha256.in_(unique[i : i + CHUNK]),
                        Job.task_id.is_(None), Job.status.in_(ACTIVE),
                    )
                ))
        now = session.scalar(select(db_now()))  # the database's clock, as reconcile reads it
        rows = []
        for (path, size, mtime_ns), digest in zip(accepted, digests):
            if digest in known:
                report.duplicates += 1
                continue
            if not force:
                known.add(digest)  # the same content twice in one submission
            rows.append(
                {
                    "batch_id": batch_id, "path": path, "content_sha256": digest,
                    "size_bytes": size, "mtime_ns": mtime_ns, "queue": settings.queue,
                    "status": JobStatus.QUEUED.value,
                    "priority": request.priority, "attempts": 0, "submitted_at": now,
                    "model": request.model, "weights": request.weights,
                    "strategy": request.strategy, "clips_requested": request.clips,
                    "stride_s": request.stride_s, "start_sec": request.start_sec,
                    "crops": request.crops, "config_key": key,
                    # The task id is recorded before publishing: reconcile looks for it.
                    "task_id": new_task_id() if publish else None,
                    "enqueued_at": now if publish else None,
                }
            )
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i : i + CHUNK]
            ids = insert_jobs(session, chunk)
            for job_id, row in zip(ids, chunk):
                if job_id is None:  # another producer's active job for this content
                    report.duplicates += 1
                    continue
                report.job_ids.append(job_id)
                to_publish.append((job_id, request.priority, str(row["task_id"])))
            progress(len(chunk))
        if rows and not notify:  # more work in a batch that notifies: pending again
            session.execute(update(Batch).where(Batch.id == batch_id,
                                                Batch.notify_url.is_not(None)).values(
                notify_status="pending", notify_attempts=0, notify_sent_at=None))
    if publish and to_publish:
        report.published, report.publish_error = enqueue(settings, to_publish)
    return report


def insert_jobs(session: Session, rows: list[dict[str, object]]) -> list[int | None]:
    """Insert job rows; returns their ids in row order, None for a row that would be a
    second active job for its content and configuration (the unique index refused it:
    skipped as a duplicate, the rest of the rows go in).

    PostgreSQL gets COPY into a temporary table, with ids drawn from the sequence
    first, then one INSERT ... SELECT ... ON CONFLICT DO NOTHING: several times faster
    than a multi-row INSERT, and rows go in content order, so concurrent producers
    take the index's locks in the same order and cannot deadlock.
    """
    dialect_insert = _dialect_insert(session)
    if session.get_bind().dialect.name != "postgresql":
        if dialect_insert is None:
            return list(session.scalars(
                insert(Job).returning(Job.id, sort_by_parameter_order=True), rows))
        stmt = dialect_insert(Job).on_conflict_do_nothing().returning(Job.id)
        return [session.execute(stmt, row).scalar() for row in rows]
    # A psycopg 3 connection (its cursor's COPY): more than the DB-API types describe.
    dbapi: Any = session.connection().connection.dbapi_connection
    assert dbapi is not None
    columns = ", ".join(["id", *rows[0]])
    with dbapi.cursor() as cur:
        cur.execute(
            "select nextval(pg_get_serial_sequence('jobs', 'id')) from generate_series(1, %s)",
            (len(rows),),
        )
        ids = [r[0] for r in cur.fetchall()]
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS vidq_new_jobs "
                    "(LIKE jobs INCLUDING DEFAULTS) ON COMMIT DROP")
        cur.execute("TRUNCATE vidq_new_jobs")
        with cur.copy(f"COPY vidq_new_jobs ({columns}) FROM STDIN") as copy:
            for job_id, row in zip(ids, rows):
                copy.write_row((job_id, *row.values()))
        cur.execute(f"INSERT INTO jobs ({columns}) SELECT {columns} FROM vidq_new_jobs "
                    "ORDER BY content_sha256, config_key, id ON CONFLICT DO NOTHING RETURNING id")
        inserted = {r[0] for r in cur.fetchall()}
    return [job_id if job_id in inserted else None for job_id in ids]


def enqueue(settings: Settings, tasks: list[tuple[int, int, str]]) -> tuple[int, str | None]:
    """Publish recorded (job id, priority, task id) triples over one connection.

    On broker failure, say so and lose nothing: the rows stay queued with their
    task ids, which ``vidq reconcile`` finds missing from the broker."""
    try:
        sent = publish_jobs(make_celery(settings), tasks, queue=settings.queue)
    except Exception as exc:  # kombu raises many connection error types
        first = str(exc).splitlines()[0] if str(exc) else ""
        return 0, (
            f"broker {settings.public()['broker_url']} unreachable ({type(exc).__name__}: "
            f"{first}); the jobs are recorded as queued: run `vidq reconcile` once it is back."
        )
    return sent, None
