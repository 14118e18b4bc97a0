"""Celery glue, thin like a web view: load the job, call worker/jobs.py, map
errors to retry or permanent failure. ``celery -A worker.tasks worker`` works.

Each worker *process* loads the model once and keeps it, with its pipeline
(worker/pipeline.py), for every job it takes: with the threads pool that
``vidq worker`` runs (worker/supervisor.py), before it takes a message; with
prefork, in each child after the fork (CUDA is never touched in a parent).
``in_process`` gives a Celery app whose task runs on a pipeline already built
(the benchmarks' worker, with no model load and no module state).

torch is imported only where a model is loaded: ``celery -A worker.tasks`` (what
flower runs) must import on a host without it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from billiard.process import current_process
from celery import Celery, signals
from celery.exceptions import InvalidTaskError, Reject
from celery.worker.request import Request

from vidq import metrics
from vidq.contact import CONTACT
from vidq.db import dispose_engines, wait_for_database
from vidq.errors import HostLocalError, TransientError, VidqError
from vidq.logs import use_json
from vidq.notify import notify_soon
from vidq.queue import TASK_CLASSIFY, make_celery
from vidq.reconcile import reconcile
from vidq.settings import Settings
from worker.breaker import Breaker
from worker.jobs import (
    DatabaseUnavailable,
    JobStore,
    LeaseExpired,
    backoff_s,
    execute_job,
    host_name,
)
from worker.outage import PAUSE
from worker.supervisor import CONFIG_EXIT

if TYPE_CHECKING:
    from worker.pipeline import Pipeline

log = logging.getLogger("vidq.worker")

settings = Settings.from_env()
app = make_celery(settings)


@dataclass(frozen=True)
class ProcessState:
    """What a worker process holds for every job: its pipeline (around its model) and
    its job store."""

    pipeline: Pipeline
    store: JobStore


_state: ProcessState | None = None
_state_lock = threading.Lock()


def _device_for_this_process(s: Settings) -> str:
    if s.device != "auto":
        return s.device
    import torch  # here, not at the top: see the module's docstring

    gpus = torch.cuda.device_count()  # in the child: CUDA is initialised only here
    if gpus == 0:
        return "cpu"
    index = getattr(current_process(), "index", None) or 0
    return f"cuda:{index % gpus}"


def load_process_state() -> ProcessState:
    """Build this process's model, pipeline and job store (once, thread-safe)."""
    global _state
    with _state_lock:
        if _state is None:
            # Here, not at the top: torch is imported only where a model is loaded.
            import torch

            from worker.inference import Classifier
            from worker.pipeline import Pipeline

            procs = int(os.environ.get("VIDQ_WORKER_PROCESSES", "1") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
            device = _device_for_this_process(settings)
            t = time.perf_counter()
            classifier = Classifier.from_settings(settings.replace(device=device))
            metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - t)
            wait_for_database(settings.database_url, auto_migrate=settings.auto_migrate,
                              on_wait=log.warning)
            _state = ProcessState(Pipeline.from_settings(classifier, settings),
                                  JobStore.from_settings(settings))
            # Beating (or probing, with no job held) from the start: an outage is
            # noticed by a process with no job too (vidq/contact.py).
            metrics.HEARTBEATS_FAILING.set(0)
            metrics.HEARTBEAT_OK_AT.set(time.time())
            _state.store.heartbeats(settings.heartbeat_s).start()
            metrics.MODEL_LOADED.set(1)
            if current_process().name != "MainProcess":  # a prefork child: logging is set up
                _log_ready(_state)
        return _state


def _log_ready(state: ProcessState) -> None:
    model, plan = state.pipeline.model, state.pipeline.plan
    weights_id = getattr(model, "weights_id", "?")
    log.info(
        "vidq worker process %s ready: %s weights %s, %s on %s, %d decoders, batches of %d",
        os.getpid(), model.preset.name, weights_id, getattr(model, "precision", "?"),
        model.device, plan.decoder_count, plan.batch_size,
    )
    if weights_id == "random-init":
        log.warning("RANDOM WEIGHTS: every result row will carry weights_id=random-init")


def _ours(sender: Any) -> bool:
    """Whether a worker signal comes from this module's app (not an ``in_process`` one)."""
    return getattr(sender, "app", app) is app


@signals.worker_init.connect
def _init_threaded_worker(sender: Any = None, **_: Any) -> None:
    """Pools without children (``--pool threads``, what ``vidq worker`` runs): load the
    model in this process before it takes any message. Prefork and solo load in
    ``worker_process_init`` instead (after the fork)."""
    from celery import concurrency

    if not _ours(sender):
        return
    pool = concurrency.get_implementation(getattr(sender, "pool_cls", None) or "prefork")
    if pool.__module__.endswith(".thread"):
        try:
            load_process_state()
        except VidqError as exc:  # missing weights, a schema mismatch: one line, no restart
            log.error("%s", exc.message)
            os._exit(CONFIG_EXIT)


@signals.after_setup_logger.connect
def _log_format(logger: Any = None, **_: Any) -> None:
    if settings.log_format == "json":
        use_json(logger)


@signals.worker_shutdown.connect
def _close_pipeline(sender: Any = None, **_: Any) -> None:
    if _state is not None and _ours(sender):
        _state.pipeline.close()


@signals.worker_ready.connect
def _attach_consumer(sender: Any = None, **_: Any) -> None:
    """worker/outage.py pauses this consumer while the database is out of reach."""
    if _ours(sender) and sender is not None:
        PAUSE.attach(sender)


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    if not _ours(sender):
        return
    if _state is not None and current_process().name == "MainProcess":
        _log_ready(_state)  # loaded in worker_init, before Celery set up logging
        # Reported from the start: a live host is one that a host-local failure's
        # verdict waits for (worker/jobs.py).
        breaker_for(app, getattr(sender, "hostname", None), settings, _state.store)
    if settings.reconcile_every_s > 0:
        threading.Thread(target=_reconcile_loop, name="vidq-reconcile", daemon=True).start()


def _reconcile_loop() -> None:
    """Every worker host offers; a Redis lock lets one reconcile per period."""
    lock = None
    if settings.broker_url.startswith(("redis://", "rediss://")):
        import redis

        lock = redis.Redis.from_url(settings.broker_url, socket_timeout=10)
    period = settings.reconcile_every_s
    while True:
        time.sleep(period)
        try:
            # One lock per queue: each model's workers reconcile their own queue's jobs.
            if lock is None or lock.set(f"vidq:reconcile-lock:{settings.queue}", os.getpid(),
                                        nx=True, ex=max(1, period - 1)):
                reconcile(settings)
        except Exception as exc:  # the broker or database is down: try next period
            log.warning("reconcile skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)


@signals.worker_process_init.connect
def _init_child(**_: Any) -> None:
    dispose_engines()  # never reuse the parent's pooled connections after fork
    load_process_state()


class ClassifyRequest(Request):
    """Celery's request, except that a message with our task name but a body or
    headers Celery cannot use is an invalid message (logged, dropped once), not an
    error that stops the whole worker ("Unrecoverable error")."""

    time_limit_s: int = settings.task_time_limit_s
    """The worker's hard limit (``VIDQ_TASK_TIME_LIMIT_S``), whatever the message says."""
    time_limits: Any
    """(hard, soft) seconds, as Celery reads them (its class leaves them untyped)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except InvalidTaskError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidTaskError(f"malformed vidq message ({exc!r})") from None
        # Read later, outside any handler: check them now.
        limits = self.time_limits
        if not (
            isinstance(self.id, str)
            and isinstance(self._args, (list, tuple))
            and isinstance(self._kwargs, dict)
            and isinstance(limits, (list, tuple)) and len(limits) == 2
            and all(v is None or isinstance(v, (int, float)) for v in limits)
        ):
            raise InvalidTaskError(
                f"malformed vidq message (id={self.id!r}, timelimit={limits!r})"
            )
        # Limits are the worker's, not the sender's: anyone who can write to the broker
        # could otherwise give a job one second, or no limit at all (prefork pools).
        hard = self.time_limit_s
        self.time_limits = (hard, max(hard - 60, 1))


# Not shared: a shared task would join every app made later (an ``in_process`` one).
@app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, Request=ClassifyRequest, shared=False)
def classify(self: Any, job_id: Any = None, transient: int = 0) -> str:
    return run_classify(self, job_id, transient, settings=settings,
                        state=load_process_state)


@contextmanager
def in_process(settings: Settings, pipeline: Pipeline) -> Iterator[Celery]:
    """A Celery app for ``settings`` whose classify task runs on ``pipeline``, already
    built (a real or a simulated model), in this process: for
    ``celery.contrib.testing.worker.start_worker(app, pool="threads", ...)``. Nothing
    of this module's own app or process state is touched; the pipeline stays the
    caller's to close."""
    state = ProcessState(pipeline, JobStore.from_settings(settings))
    request = type("ClassifyRequest", (ClassifyRequest,),
                   {"time_limit_s": settings.task_time_limit_s})
    celery_app = make_celery(settings)

    @celery_app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, Request=request,
                     shared=False)
    def classify_here(self: Any, job_id: Any = None, transient: int = 0) -> str:
        return run_classify(self, job_id, transient, settings=settings, state=lambda: state)

    try:
        yield celery_app
    finally:
        celery_app.close()


_breakers: dict[int, Breaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(celery_app: Celery, nodename: str | None, settings: Settings,
                store: JobStore) -> Breaker:
    """This process's circuit breaker for ``celery_app`` (worker/breaker.py); it stops
    and restarts the consumer of worker ``nodename`` on the settings' queue."""
    with _breakers_lock:
        breaker = _breakers.get(id(celery_app))
        if breaker is None:
            where = {"destination": [nodename]} if nodename else {}

            def pause() -> None:
                celery_app.control.cancel_consumer(settings.queue, reply=False, **where)

            def resume() -> None:
                celery_app.control.add_consumer(settings.queue, reply=False, **where)

            breaker = _breakers[id(celery_app)] = Breaker(
                failures=settings.breaker_failures, store=store, host=host_name(),
                queue=settings.queue, pause=pause, resume=resume,
                report_every_s=settings.heartbeat_s)
        return breaker


def run_classify(task: Any, job_id: Any, transient: Any, *, settings: Settings,
                 state: Callable[[], ProcessState]) -> str:
    """The classify task's body: run the job, then retry, give up or report.
    ``state`` gives the process's pipeline and store (loaded on first use)."""
    if not isinstance(job_id, int) or isinstance(job_id, bool) or not isinstance(transient, int):
        # A foreign or malformed message: drop it once, never loop on it.
        log.error("rejecting malformed message %s: args=%r", task.request.id, task.request.args)
        raise Reject("malformed vidq message", requeue=False)
    # The retry counter rides in the message: bound it by this worker's settings, so a
    # crafted value can neither retry forever (negative) nor skip the retries.
    transient = min(max(transient, 0), settings.max_retries)
    held = state()
    breaker = breaker_for(task.app, task.request.hostname, settings, held.store)
    # vidq bounds its retries itself (VIDQ_MAX_RETRIES, the counter in the message):
    # Celery's own limit must never stop one first. Its max_retries=None would mean
    # its default of 3, not "no limit".
    no_celery_limit = {"max_retries": sys.maxsize}
    # Re-sent as it came (the retry counter untouched), however often.
    again = {"kwargs": {"job_id": job_id, "transient": transient}, "args": (),
             **no_celery_limit}
    if not breaker.admit():  # the circuit is open: back to the broker, for other hosts
        raise task.retry(countdown=1, **again)
    try:
        outcome = execute_job(job_id, pipeline=held.pipeline, settings=settings,
                              store=held.store)
    except (DatabaseUnavailable, LeaseExpired) as exc:
        # This host's trouble, not the job's: no retry is spent, and the message goes
        # back to the queue for a worker that can reach the database, while this one
        # stops taking more until it can (worker/outage.py).
        if CONTACT.failing and not PAUSE.pause(exc.message, probe=held.store.ping):
            time.sleep(1.0)  # nothing to pause: do not take the message straight back
        log.warning("job %s: %s; its message goes back to the queue", job_id, exc.message)
        raise Reject(exc.message, requeue=True) from None
    except HostLocalError as exc:  # given back, no attempt spent; not a retry either
        breaker.failed(exc)
        raise task.retry(countdown=1, **again) from None
    except TransientError as exc:
        breaker.settled()
        if transient >= settings.max_retries:
            give_up = TransientError(
                f"gave up after {transient + 1} attempts: {exc.message}", kind="retries_exhausted"
            )
            try:
                held.store.fail(job_id, None, give_up)
            except VidqError:
                log.error("job %s: %s (and the database is still unreachable)", job_id,
                          give_up.message)
            return "failed"
        delay = backoff_s(transient)
        log.warning("job %s: %s; retry %d in %.0fs", job_id, exc.message, transient + 1, delay)
        raise task.retry(kwargs={"job_id": job_id, "transient": transient + 1}, args=(),
                         countdown=delay, **no_celery_limit) from None
    if outcome.status in ("succeeded", "failed") and not outcome.fields.get("host_local"):
        breaker.succeeded()
    else:
        breaker.settled()
    if outcome.status == "busy":
        # Another delivery holds a live lease (a duplicate message, or a crashed
        # child's job whose heartbeat has not gone stale yet): look again later.
        raise task.retry(kwargs={"job_id": job_id, "transient": transient}, args=(),
                         countdown=settings.stale_after_s, **no_celery_limit)
    if outcome.status in ("succeeded", "failed", "skipped"):
        notify_soon(settings, outcome.fields.get("batch_id"))  # the batch may be complete
    log.info("job %s %s %s", job_id, outcome.status, outcome.detail,
             extra={"vidq": {"job_id": job_id, "status": outcome.status, **outcome.fields,
                             "task_id": task.request.id, "transient_retries": transient}})
    _recycle_if_over_memory(settings, held)
    return outcome.status


_recycling = threading.Event()


def _recycle_if_over_memory(settings: Settings, state: ProcessState) -> None:
    """``VIDQ_WORKER_MAX_MEMORY_MB`` for pools without children (prefork has Celery's own
    ``worker_max_memory_per_child``): a warm shutdown, after which the supervisor
    starts a fresh process."""
    limit = settings.worker_max_memory_mb
    if not limit or _recycling.is_set() or current_process().name != "MainProcess":
        return
    rss = resident_mb()
    if rss is not None:  # and its decoder processes', if any
        rss += sum(resident_mb(pid, shared=False) or 0.0
                   for pid in state.pipeline.decoder_pids())
    if rss is not None and rss > limit:
        _recycling.set()
        log.warning("worker process %s uses %.0f MiB > VIDQ_WORKER_MAX_MEMORY_MB=%d: "
                    "finishing its jobs, then restarting", os.getpid(), rss, limit)
        os.kill(os.getpid(), signal.SIGTERM)


def resident_mb(pid: int | str = "self", *, shared: bool = True) -> float | None:
    """Resident memory of a process in MiB; ``shared=False`` leaves out its shared
    memory (a decoder process's clip slots, which its worker process maps too)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in fh)
                  if k in ("VmRSS", "RssShmem")}
    except (OSError, ValueError, IndexError):
        return None
    if "VmRSS" not in kb:
        return None
    return (kb["VmRSS"] - (0 if shared else kb.get("RssShmem", 0))) / 1024

