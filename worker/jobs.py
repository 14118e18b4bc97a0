"""Running one job exactly once against the jobs table (no Celery here).

A delivery first *claims* the job row with a fresh lease token; its results are
written in one transaction that only commits while that token still holds. So
a redelivered or duplicated message can never add a second set of rows or
overwrite a succeeded job, whatever the broker does.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    DateTime,
    String,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from vidq import metrics
from vidq.contact import CONTACT
from vidq.db import (
    ClipPrediction,
    HostFailure,
    Job,
    JobStatus,
    VideoLabel,
    WorkerHost,
    aware,
    db_now,
    first_line,
    rowcount,
    sessions,
    takeover_due,
    utcnow,
)
from vidq.embeddings import write_embeddings
from vidq.errors import (
    STALLED,
    Cancelled,
    HostLocalError,
    InputError,
    OutsideRootsError,
    PermanentError,
    TransientError,
    VidqError,
)
from vidq.faultpoints import pause_point
from vidq.media import changed_since_submit, check_input
from vidq.sampling import Sampling
from vidq.segments import SegmentRules, write_segments
from vidq.settings import Settings
from vidq.storage import StorageConfig
from worker.results import VideoResult

if TYPE_CHECKING:
    from worker.pipeline import Pipeline

log = logging.getLogger("vidq.worker")
T = TypeVar("T")


HOST_LOCAL_KINDS = frozenset({
    "not_found",  # a file the producer saw: this host lacks the mount, or the object
    "unreadable",  # permission denied here, or bucket credentials that may not read it
    "no_credentials",  # no bucket credentials on this host
    "model_error",  # the device failed a forward pass
    STALLED,  # a decoder that made no progress (worker/watchdog.py)
})
"""Error kinds that say something about the host rather than the video."""


def host_local(error: VidqError) -> bool:
    """Whether ``error`` says more about this host than about the video: another host
    may well succeed (a path outside this host's media roots counts too)."""
    return (isinstance(error, (HostLocalError, OutsideRootsError))
            or error.kind in HOST_LOCAL_KINDS)


def host_name() -> str:
    """This host, as ``host_failures`` and ``workers`` name it."""
    return socket.gethostname()


def backoff_s(attempt: int) -> float:
    """Exponential backoff with jitter, capped at five minutes."""
    return min(300.0, 2.0 * 2**attempt) * random.uniform(0.5, 1.0)


class DatabaseUnavailable(TransientError):
    """The database could not be reached (or every pooled connection was stuck)."""

    kind = "database"


class LeaseExpired(TransientError):
    """This worker could not renew the job's lease for a whole lease period: another
    host may have taken it over, so the work in progress is dropped and the message
    handed back. A finished result still tries its commit, which only succeeds while
    the lease is ours."""

    kind = "lease_expired"


@dataclass(frozen=True)
class Outcome:
    job_id: int
    status: str
    """succeeded | failed | skipped (already done or cancelled) | busy (another live delivery)."""
    detail: str = ""
    fields: dict[str, Any] = field(default_factory=dict, compare=False)
    """For the job's log line: batch, attempt, error kind, timings."""


class JobStore:
    """The jobs-table operations a worker performs. Database trouble is transient."""

    def __init__(
        self, database_url: str, *, stale_after_s: float, auto_migrate: bool | None = None,
        max_attempts: int = 0, segment_rules: SegmentRules | None = None,
    ) -> None:
        self._sessions = sessions(database_url, auto_migrate=auto_migrate)
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        # Read once: the environment is not parsed again for every job's commit.
        self.segment_rules = segment_rules or SegmentRules.from_settings(Settings.from_env())
        self._beats: Heartbeats | None = None
        self._beats_lock = threading.Lock()
        self._take = self._take_statement()

    def _claim_terms(self) -> tuple[Any, Any, Any, Any]:
        """(now, a stale running attempt, claimable, what a crashed attempt's record says)."""
        # The database's clock, never this host's: a host whose clock runs ahead
        # would otherwise see every live heartbeat as stale and steal its job.
        # A job's own lease length (what its worker was told), not the taker's; and
        # not while this process's contact with the database is newer than that lease
        # (vidq/contact.py): heartbeats nobody could write are no sign of a dead worker.
        now = db_now()
        lease = func.coalesce(Job.lease_seconds, literal(self.stale_after_s))
        stale_running = (Job.status == JobStatus.RUNNING.value) & takeover_due(
            lease, bindparam("take_floor", type_=DateTime(timezone=True)))
        claimable = or_(Job.status == JobStatus.QUEUED.value, stale_running)
        # An attempt that stopped heartbeating died with its process (SIGKILL, the
        # OOM killer, a segfault): that is what its record says from now on.
        crashed_message = (literal("the worker running attempt ")
                           + cast(Job.attempts, String)
                           + literal(" stopped (killed, out of memory or crashed) on ")
                           + func.coalesce(Job.worker_host, literal("?")))
        return now, stale_running, claimable, crashed_message

    def _take_statement(self) -> Any:
        """The common case of a claim in one statement: take a claimable job with
        attempts left (SET reads the row as it was, so a taken-over attempt is recorded
        too). Built once: constructing it cost more Python than running it, on the
        GIL the decoders need (`python -m benchmarks feed`)."""
        now, stale_running, claimable, crashed_message = self._claim_terms()
        return (
            update(Job)
            .where(Job.id == bindparam("take_id"), claimable,
                   *([Job.attempts < self.max_attempts] if self.max_attempts else []))
            .values(
                status=JobStatus.RUNNING.value,
                lease_token=bindparam("take_token"),
                attempts=Job.attempts + 1,
                worker_host=bindparam("take_host"),
                started_at=now,
                heartbeat_at=now,
                lease_seconds=self.stale_after_s,
                error_kind=case((stale_running, literal("crashed")), else_=Job.error_kind),
                error_message=case((stale_running, crashed_message), else_=Job.error_message),
            )
            .returning(Job)
            .execution_options(synchronize_session=False)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls(settings.database_url, stale_after_s=settings.stale_after_s,
                   auto_migrate=settings.auto_migrate, max_attempts=settings.max_attempts,
                   segment_rules=SegmentRules.from_settings(settings))

    def _run(self, fn: Callable[[Session], T]) -> T:
        """``fn`` in one transaction. Losing the database is a DatabaseUnavailable, and
        recorded in CONTACT (vidq/contact.py), as is the first success after it."""
        try:
            with self._sessions() as session, session.begin():
                value = fn(session)
        except DBAPIError as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                error = DatabaseUnavailable(f"database unavailable ({first_line(exc)})")
                CONTACT.failed(error.message)
                raise error from None
            raise
        except PoolTimeout as exc:  # every pooled connection stuck: as good as down
            error = DatabaseUnavailable(f"database unavailable ({first_line(exc)})")
            CONTACT.failed(error.message)
            raise error from None
        if CONTACT.failing:
            self.ping()
        return value

    def ping(self) -> dt.datetime:
        """The database's clock, read in a statement of its own; records the contact."""
        try:
            with self._sessions() as session:
                now = session.scalar(select(db_now()))
        except (DBAPIError, PoolTimeout) as exc:
            error = DatabaseUnavailable(f"database unavailable ({first_line(exc)})")
            CONTACT.failed(error.message)
            raise error from None
        assert now is not None
        if isinstance(now, str):  # SQLite returns db_now's text
            now = dt.datetime.fromisoformat(now)
        CONTACT.reached(now)
        return now

    def claim(self, job_id: int, token: str, host: str) -> Job | Outcome:
        """Take the job if it is queued, or running with a stale heartbeat (its attempt
        died). A job that has used up ``max_attempts`` is failed instead, with what
        happened to its last attempt."""

        def op(s: Session) -> Job | Outcome:
            floor = {"take_floor": CONTACT.takeover_floor()}
            taken = s.scalars(self._take, {"take_id": job_id, "take_token": token,
                                           "take_host": host, **floor}).one_or_none()
            if taken is not None:
                s.expunge(taken)
                return taken
            if self.max_attempts:
                now, stale_running, claimable, crashed_message = self._claim_terms()
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, stale_running)
                    .values(error_kind="crashed", error_message=crashed_message),
                    floor,
                )
                gave_up = rowcount(s.execute(
                    update(Job)
                    .where(Job.id == job_id, claimable, Job.attempts >= self.max_attempts)
                    .values(
                        status=JobStatus.FAILED.value, lease_token=None, finished_at=now,
                        error_kind=func.coalesce(Job.error_kind, literal("crashed")),
                        error_message=literal(f"gave up after {self.max_attempts} attempts "
                                              "(VIDQ_MAX_ATTEMPTS); the last: ")
                        + func.coalesce(Job.error_message, literal("no error recorded")),
                    ),
                    floor,
                ))
                if gave_up:
                    return Outcome(job_id, "failed", "attempts exhausted")
            status = s.scalar(select(Job.status).where(Job.id == job_id))
            if status is None:
                return Outcome(job_id, "skipped", "no such job")
            if status == JobStatus.RUNNING.value:
                return Outcome(job_id, "busy", "running elsewhere with a live heartbeat")
            return Outcome(job_id, "skipped", f"job is {status}")

        return self._run(op)

    def heartbeat(self, job_id: int, token: str) -> bool:
        """Refresh the lease; False once the job is no longer ours to run (cancelled, or
        taken over after this worker stalled)."""
        return job_id in self.heartbeat_many({job_id: token})

    def heartbeat_many(self, leases: dict[int, str]) -> set[int]:
        """Refresh many leases (job id -> token) at once; returns the ids still ours.
        Tokens are unique to a claim, so a row matches only under its own token."""
        ours: set[int] = set()
        items = list(leases.items())
        for i in range(0, len(items), 500):
            chunk = dict(items[i : i + 500])

            def refresh(s: Session, chunk: dict[int, str] = chunk) -> set[int]:
                return set(s.scalars(
                    update(Job)
                    .where(Job.id.in_(list(chunk)), Job.lease_token.in_(list(chunk.values())),
                           Job.status == JobStatus.RUNNING.value)
                    .values(heartbeat_at=db_now())
                    .returning(Job.id)
                    .execution_options(synchronize_session=False)
                ))

            ours |= self._run(refresh)
        return ours

    def heartbeats(self, every_s: float) -> Heartbeats:
        """This store's heartbeat thread (one per process: the store is)."""
        with self._beats_lock:
            if self._beats is None:
                self._beats = Heartbeats(self, every_s)
            return self._beats

    def close(self) -> None:
        """Stop this store's heartbeat thread. A worker's store lives as long as its
        process; one made for a while (a test, a tool) is closed, or its thread would go
        on probing a database nobody uses, and record its failures in CONTACT."""
        with self._beats_lock:
            beats, self._beats = self._beats, None
        if beats is not None:
            beats.stop()

    def release(self, job_id: int, token: str, error: VidqError | None = None) -> None:
        """Give the job back to the queue (graceful shutdown, transient failure), with
        the error that ended this attempt on record."""
        values: dict[str, object] = dict(
            status=JobStatus.QUEUED.value, lease_token=None, heartbeat_at=None)
        if error is not None:
            values.update(error_kind=error.kind, error_message=error.message[:2000])
        self._run(
            lambda s: s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_token == token,
                       Job.status == JobStatus.RUNNING.value)
                .values(**values)
            )
        )

    def fail(self, job_id: int, token: str | None, error: VidqError) -> bool:
        """Fail the job for good while ``token`` holds its lease; with no token (a
        delivery that gave up without holding the job), only while nobody holds it: a
        running job is its lease holder's to end, never failed from under it."""

        def op(s: Session) -> bool:
            stmt = update(Job).where(Job.id == job_id)
            if token is not None:
                stmt = stmt.where(Job.lease_token == token,
                                  Job.status.in_((JobStatus.QUEUED.value,
                                                  JobStatus.RUNNING.value)))
            else:
                stmt = stmt.where(Job.status == JobStatus.QUEUED.value,
                                  Job.lease_token.is_(None))
            res = s.execute(
                stmt.values(
                    status=JobStatus.FAILED.value,
                    error_kind=error.kind,
                    error_message=error.message[:2000],
                    finished_at=db_now(),
                    lease_token=None,
                )
            )
            return rowcount(res) == 1

        return self._run(op)

    def host_failure(self, job_id: int, token: str, *, host: str, error: VidqError,
                     queue: str) -> tuple[bool, int]:
        """Record that ``host`` failed the job with a host-local ``error``, and judge it:
        (True when the job failed for good: a second host agrees, or no other live host
        of ``queue`` is left to ask, and a stall fails as ``timeout``; False when it went
        back to the queue with its attempt given back, and how many times this host has
        failed it so). Only while our lease holds."""
        stalled = error.kind == STALLED

        def op(s: Session) -> tuple[bool, int]:
            now = db_now()
            known = s.scalar(select(HostFailure.failures).where(
                HostFailure.job_id == job_id, HostFailure.host == host))
            values = dict(error_kind=error.kind[:32], error_message=error.message[:2000],
                          at=now)
            if known is None:
                s.execute(insert(HostFailure).values(job_id=job_id, host=host, failures=1,
                                                     **values))
            else:
                s.execute(update(HostFailure)
                          .where(HostFailure.job_id == job_id, HostFailure.host == host)
                          .values(failures=HostFailure.failures + 1, **values))
            same = (HostFailure.error_kind == STALLED) if stalled else (
                HostFailure.error_kind != STALLED)
            hosts = sorted(s.scalars(select(HostFailure.host).where(
                HostFailure.job_id == job_id, same)))
            others_live = s.scalar(select(func.count()).select_from(WorkerHost).where(
                WorkerHost.queue == queue, WorkerHost.host.not_in(hosts),
                WorkerHost.seen_at > db_now(ago_s=self.stale_after_s)))
            ours = (Job.id == job_id, Job.lease_token == token,
                    Job.status == JobStatus.RUNNING.value)
            if len(hosts) >= 2 or not others_live:
                # One host, or one left: its word is final, and the message as before.
                where = (f" (failed so on {len(hosts)} hosts: {', '.join(hosts)})"
                         if len(hosts) >= 2 else "")
                failed = rowcount(s.execute(update(Job).where(*ours).values(
                    status=JobStatus.FAILED.value,
                    error_kind="timeout" if stalled else error.kind,
                    error_message=f"{error.message[:1800]}{where}",
                    finished_at=now, lease_token=None))) == 1
                return failed, (known or 0) + 1
            s.execute(update(Job).where(*ours).values(
                status=JobStatus.QUEUED.value, lease_token=None, heartbeat_at=None,
                attempts=Job.attempts - 1, error_kind=error.kind[:32],
                error_message=error.message[:2000]))
            return False, (known or 0) + 1

        return self._run(op)

    def report_worker(self, *, host: str, queue: str, state: str, last_error: str | None,
                      changed: bool) -> None:
        """Write this host's breaker state to ``workers`` (``since`` moves only when the
        state ``changed``); its ``seen_at`` says the host is live."""

        def op(s: Session) -> None:
            values: dict[str, Any] = dict(queue=queue, state=state, seen_at=db_now(),
                                          last_error=None if last_error is None
                                          else last_error[:2000])
            if changed:
                values["since"] = db_now()
            if not rowcount(s.execute(update(WorkerHost).where(WorkerHost.host == host)
                                      .values(**values))):
                s.execute(insert(WorkerHost).values(host=host, **{**values, "since": db_now()}))

        try:
            self._run(op)
        except IntegrityError:  # another process of this host inserted it first
            self._run(op)

    def fail_if_changed(self, job: Job, path: str, token: str, *,
                        storage: StorageConfig | None = None,
                        read_sha256: str | None = None) -> InputError | None:
        """Fail the job (and return why) if the file or object at ``path`` is no longer
        the one submitted, or ``read_sha256`` (the hash of the bytes the decoder read)
        is not the submitted content's; None if all is well. A path this host cannot
        read any more is returned unfailed: a host-local error for the caller. Checked
        after decoding, just before results are written, so a file replaced at any
        point before the commit is caught, and no job's labels are stored under another
        file's hash."""
        changed = changed_since_submit(path, size_bytes=job.size_bytes, mtime_ns=job.mtime_ns,
                                       content_sha256=job.content_sha256,
                                       read_sha256=read_sha256, storage_config=storage)
        if changed is not None and not host_local(changed):  # that is the caller's to judge
            self.fail(job.id, token, changed)
        return changed

    def succeed(self, job_id: int, token: str, result: VideoResult) -> bool:
        """Write the job's results in one transaction, only while our lease holds.

        Rows of an earlier result of the same job are replaced. They exist only when a
        finished job was put back in the queue by hand (a forced re-run is a new job),
        and then the insert of its labels collides with them. So the results are first
        written without the five deletes, and again with them after such a collision:
        the common case saves five statements of Python per job."""
        info = result.info
        top = result.top[0]

        def op(s: Session, replace: bool) -> bool:
            # Core statements on the session's connection: the ORM's bulk-DML layer
            # adds nothing here and costs Python time on every job (the GIL the
            # decoder threads need).
            conn = s.connection()
            res = conn.execute(_SUCCEED, {
                "done_id": job_id,
                "done_token": token,
                "r_weights_id": result.weights_id,
                "r_precision": result.precision,
                "r_calibration_id": result.calibration_id,
                "r_device": result.device,
                "r_duration_s": info.duration_s,
                "r_fps": info.fps,
                "r_width": info.width,
                "r_height": info.height,
                "r_frames": info.frames,
                "r_codec": info.codec,
                "r_has_audio": info.has_audio,
                "r_clips_done": len(result.clips),
                "r_decode_s": result.timing.get("decode_s"),
                "r_model_s": result.timing.get("model_s"),
                "r_decode_ratio": (round(result.decode_stats.decoded
                                         / result.decode_stats.packets, 4)
                                   if result.decode_stats.packets else None),
                "r_top_class_id": top.class_id,
                "r_top_label": top.label,
                "r_top_score": top.score,
            })
            if res.rowcount != 1:
                return False  # another delivery finished it, or it was cancelled
            if replace:
                conn.execute(delete(ClipPrediction).where(ClipPrediction.job_id == job_id))
                conn.execute(delete(VideoLabel).where(VideoLabel.job_id == job_id))
            clip_rows = [
                {
                    "job_id": job_id, "clip_index": c.index, "rank": r,
                    "start_sec": c.start_sec, "end_sec": c.end_sec,
                    "class_id": t.class_id, "label": t.label, "score": t.score,
                }
                for c in result.clips
                for r, t in enumerate(c.top, start=1)
            ]
            if clip_rows:
                conn.execute(_INSERT_CLIPS, clip_rows)
            conn.execute(
                _INSERT_LABELS,
                [
                    {"job_id": job_id, "rank": r, "class_id": t.class_id,
                     "label": t.label, "score": t.score}
                    for r, t in enumerate(result.top, start=1)
                ],
            )
            write_segments(conn, job_id, result.clips, self.segment_rules, replace=replace)
            # Replaced like the rest, also by nothing: a re-run with VIDQ_EMBEDDINGS=off
            # leaves no vectors of the earlier result behind.
            write_embeddings(conn, job_id, model=result.model, weights_id=result.weights_id,
                             video=result.embedding, clips=result.clip_vectors(),
                             replace=replace)
            return True

        try:
            return self._run(lambda s: op(s, False))
        except IntegrityError:  # an earlier result's rows: replaced in a new transaction
            return self._run(lambda s: op(s, True))


# A job's results, built once (see JobStore._take_statement): the row's own values
# are ``r_<column>`` parameters.
_RESULT_COLUMNS = (
    "weights_id", "precision", "calibration_id", "device", "duration_s", "fps", "width",
    "height", "frames", "codec", "has_audio", "clips_done", "decode_s", "model_s",
    "decode_ratio", "top_class_id", "top_label", "top_score",
)
_SUCCEED = (
    update(Job)
    .where(Job.id == bindparam("done_id"), Job.lease_token == bindparam("done_token"),
           Job.status == JobStatus.RUNNING.value)
    .values(status=JobStatus.SUCCEEDED.value, lease_token=None, finished_at=db_now(),
            error_kind=None, error_message=None,
            **{c: bindparam(f"r_{c}") for c in _RESULT_COLUMNS})
)
_INSERT_CLIPS = insert(ClipPrediction)
_INSERT_LABELS = insert(VideoLabel)


@dataclass(eq=False)
class Lease:
    """A running job this process holds: ``lost`` says why it stopped being ours."""

    job_id: int
    token: str
    lease_s: float = 0.0
    """How long the job stays ours without a renewal (the lease it was claimed with)."""
    renewed: float = field(default_factory=time.monotonic)
    """When its heartbeat was last written (this host's monotonic clock)."""
    lost: str | None = None
    expired: bool = False
    """Lost because it could not be renewed, not because someone else holds it."""


class Heartbeats:
    """One thread refreshes the heartbeats of every job the process holds, in one
    statement per period, and notices a job that stopped being ours (``vidq cancel``,
    or another worker took it over). A GPU worker holds a hundred jobs at once: one
    thread and one UPDATE a period, not a thread and an UPDATE per job.

    The thread survives every exception (a pool timeout, a read-only transaction after
    a failover, a bug): it logs it and tries again next period. While it fails,
    ``failing`` says so (worker/metrics_server.py's /healthz reads it), and a job not
    renewed for a whole lease is given up as ``LeaseExpired``. With no job held it
    still reads the database's clock each period, so the process notices an outage
    (vidq/contact.py) whether or not it holds jobs."""

    def __init__(self, store: JobStore, every_s: float) -> None:
        self._store = store
        self.every_s = every_s
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.failing_since: float | None = None
        """Monotonic time of the first failed beat of the current run of failures."""
        self._logged = 0.0

    @contextmanager
    def hold(self, job_id: int, token: str) -> Iterator[Lease]:
        """Beat for the claimed job while the block runs."""
        lease = Lease(job_id, token, lease_s=self._store.stale_after_s)
        with self._lock:
            self._leases[job_id] = lease
        self.start()
        try:
            yield lease
        finally:
            with self._lock:
                if self._leases.get(job_id) is lease:
                    del self._leases[job_id]

    def start(self) -> None:
        """Start the thread (once); ``hold`` does, and a worker process at startup."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="vidq-heartbeats")
                self._thread.start()

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def stop(self) -> None:
        """End the thread after its current beat (JobStore.close)."""
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.wait(self.every_s):
            with self._lock:
                held = list(self._leases.values())
            try:
                self.beat(held)
            except Exception as exc:  # a bug in beat itself: no exception ends this thread
                self._failed(held, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])

    def beat(self, held: list[Lease]) -> None:
        """One refresh of these leases; the ones no longer ours are marked lost."""
        try:
            if held:
                ours = self._store.heartbeat_many(
                    {lease.job_id: lease.token for lease in held})
            else:
                self._store.ping()
                ours = set()
        except VidqError as exc:
            self._failed(held, exc.message)
            return
        metrics.HEARTBEAT_OK_AT.set(time.time())
        if self.failing_since is not None:
            log.warning("heartbeats written again after %.0fs",
                        time.monotonic() - self.failing_since)
            self.failing_since = None
            metrics.HEARTBEATS_FAILING.set(0)
        now = time.monotonic()
        for lease in held:
            if lease.job_id in ours:
                lease.renewed = now
            elif lease.lost is None:
                lease.lost = "the job was cancelled or taken over by another worker"

    def _failed(self, held: list[Lease], why: str) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = self._logged = now
            metrics.HEARTBEATS_FAILING.set(1)
        elif now - self._logged < 60:
            return self._expire(held, now)  # logged at most once a minute
        self._logged = now
        log.warning("heartbeats of %d jobs not written (%s); trying again every %ss",
                    len(held), why, self.every_s)
        self._expire(held, now)

    def _expire(self, held: list[Lease], now: float) -> None:
        for lease in held:
            if lease.lost is None and now - lease.renewed > lease.lease_s:
                lease.expired = True
                lease.lost = (f"its lease could not be renewed for {now - lease.renewed:.0f}s "
                              f"(> {lease.lease_s:.0f}s): it may be another worker's now")
                log.warning("job %s abandoned: %s", lease.job_id, lease.lost)


class TimeLimit(PermanentError):
    kind = "timeout"


def execute_job(
    job_id: int, *, pipeline: Pipeline, settings: Settings, store: JobStore
) -> Outcome:
    """Claim, classify (through the process's pipeline) and persist one job. Permanent
    errors fail the job at once; TransientError propagates for the caller to retry
    (the lease is released). Many calls run at once, one per job in flight."""
    pause_point("before_claim")
    token = uuid.uuid4().hex
    claimed = store.claim(job_id, token, f"{socket.gethostname()}:{os.getpid()}")
    if isinstance(claimed, Outcome):
        return claimed
    job = claimed
    fields: dict[str, Any] = {"job_id": job_id, "batch_id": job.batch_id,
                              "attempt": job.attempts, "path": job.path}
    metrics.ATTEMPTS.inc()
    metrics.QUEUE_WAIT.observe(max(0.0, (utcnow() - aware(job.submitted_at)).total_seconds()))
    preset = pipeline.model.preset.name
    limit_s = max(1.0, settings.task_time_limit_s - 60.0)
    deadline = time.monotonic() + limit_s
    try:
        with store.heartbeats(settings.heartbeat_s).hold(job_id, token) as beat:
            pause_point("after_claim")
            if job.model != preset:
                raise PermanentError(
                    f"job asks for model {job.model} but this worker serves {preset}; "
                    f"send it to a queue of {job.model} workers.",
                    kind="wrong_model",
                )
            # Refused here before any work; a URI against the roots only, as the
            # decoder's open_video reads its metadata (and sizes it) before a byte.
            storage = StorageConfig.from_settings(settings)
            path = check_input(job.path, media_roots=settings.media_roots,
                               max_file_bytes=settings.max_file_bytes, storage_config=storage,
                               read_metadata=False)
            sampling = Sampling(
                strategy=job.strategy, clips=job.clips_requested, stride_s=job.stride_s,
                start_sec=job.start_sec, crops=job.crops,
            )
            over = TimeLimit(f"{job.path}: not finished within VIDQ_TASK_TIME_LIMIT_S="
                             f"{settings.task_time_limit_s} (less 60 s of margin).")

            def should_stop() -> VidqError | None:
                if beat.lost is not None:
                    return LeaseExpired(beat.lost) if beat.expired else Cancelled(beat.lost)
                if time.monotonic() - beat.renewed > beat.lease_s:  # the beat itself is stuck
                    return LeaseExpired(f"its lease was not renewed for over {beat.lease_s:.0f}s "
                                        "(the database does not answer): it may be another "
                                        "worker's now")
                return over if time.monotonic() > deadline else None

            future = pipeline.submit(str(path), sampling, should_stop=should_stop)
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise over from None  # should_stop ends the video at its next clip
            pause_point("before_commit")
            changed = store.fail_if_changed(job, path, token, storage=storage,
                                            read_sha256=result.decode_stats.sha256)
            if changed is not None:  # failed in the table, or this host's trouble
                raise changed
            committed = commit_result(store, job_id, token, result,
                                      horizon_s=settings.commit_retry_s)
    except Cancelled as exc:
        log.info("job %s given up: %s", job_id, exc.message,
                 extra={"vidq": {**fields, "status": "cancelled"}})
        metrics.JOBS.labels("cancelled", "").inc()
        return Outcome(job_id, "skipped", exc.message, fields)
    except PermanentError as exc:
        if host_local(exc):
            return _host_failure(exc, store=store, job_id=job_id, token=token, fields=fields,
                                 queue=settings.queue)
        store.fail(job_id, token, exc)
        fields.update(status="failed", error_kind=exc.kind)
        log.info("job %s failed: %s: %s", job_id, exc.kind, exc.message, extra={"vidq": fields})
        metrics.JOBS.labels("failed", exc.kind).inc()
        return Outcome(job_id, "failed", f"{exc.kind}: {exc.message}", fields)
    except TransientError as exc:
        if host_local(exc):
            return _host_failure(exc, store=store, job_id=job_id, token=token, fields=fields,
                                 queue=settings.queue)
        _release(store, job_id, token, exc)
        metrics.JOBS.labels("retried", exc.kind).inc()
        raise
    except Exception as exc:  # a bug, or a library error vidq does not know: this attempt
        # counts (VIDQ_MAX_ATTEMPTS), and its record says what happened.
        log.exception("job %s: unexpected error", job_id)
        error = TransientError(f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                               kind="exception")
        _release(store, job_id, token, error)
        metrics.JOBS.labels("retried", error.kind).inc()
        raise error from None
    fields.update(clips=len(result.clips), **result.timing)
    if committed:
        metrics.JOBS.labels("succeeded", "").inc()
        metrics.CLIPS.inc(len(result.clips))
        metrics.PACKETS.labels("decoded").inc(result.decode_stats.decoded)
        metrics.PACKETS.labels("skipped").inc(result.decode_stats.skipped)
        return Outcome(job_id, "succeeded", result.top[0].label,
                       {**fields, "status": "succeeded"})
    return Outcome(job_id, "skipped", "lease lost: another delivery owns this job",
                   {**fields, "status": "skipped"})


def _host_failure(exc: VidqError, *, store: JobStore, job_id: int, token: str,
                  fields: dict[str, Any], queue: str) -> Outcome:
    """A host-local failure: the job goes back to the queue, its attempt given back
    (HostLocalError raised for the caller to re-send it), or fails for good once the
    fleet agrees."""
    host = host_name()
    failed, times = store.host_failure(job_id, token, host=host, error=exc, queue=queue)
    if failed:
        kind = "timeout" if exc.kind == STALLED else exc.kind
        fields.update(status="failed", error_kind=kind, host_local=True)
        log.info("job %s failed: %s: %s (hosts agree, or no other is live)", job_id, kind,
                 exc.message, extra={"vidq": fields})
        metrics.JOBS.labels("failed", kind).inc()
        return Outcome(job_id, "failed", f"{kind}: {exc.message}", fields)
    log.warning("job %s: host %s cannot run it (%s: %s); back to the queue, no attempt "
                "spent", job_id, host, exc.kind, exc.message)
    metrics.JOBS.labels("host_local", exc.kind).inc()
    raise HostLocalError(exc.message, kind=exc.kind, again=times > 1) from None


def _release(store: JobStore, job_id: int, token: str, error: VidqError) -> None:
    try:
        store.release(job_id, token, error)
    except TransientError:
        pass  # the heartbeat goes stale; the retry reclaims the job


def commit_result(store: JobStore, job_id: int, token: str, result: VideoResult, *,
                  horizon_s: float) -> bool:
    """Write a finished result, retrying with backoff while the database is down (up to
    ``horizon_s``): an outage must not throw away work already done. The heartbeat
    keeps the lease live meanwhile; if the job was taken over, the commit is refused."""
    deadline = time.monotonic() + horizon_s
    attempt = 0
    while True:
        try:
            return store.succeed(job_id, token, result)
        except TransientError as exc:
            if time.monotonic() >= deadline:
                raise
            delay = min(60.0, backoff_s(attempt))
            log.warning("job %s: result kept, commit failed (%s); again in %.0fs", job_id,
                        exc.message, delay)
            time.sleep(delay)
            attempt += 1
