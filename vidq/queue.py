"""The Celery app's configuration, shared by producers and workers (no torch here).

Delivery is at least once and made exact by the jobs table (see worker/jobs.py):
late acks, requeue when a worker process is lost, prefetch one, JSON only, and
a Redis visibility timeout far above the hard time limit, so a message is never
redelivered while its task still runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from celery import Celery
from kombu import Queue

from vidq.settings import Settings

TASK_CLASSIFY = "vidq.classify"
PRIORITY_LEVELS = 10


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings. Creating it connects to nothing."""
    app = Celery("vidq", broker=settings.broker_url, set_as_current=False)
    hard = settings.task_time_limit_s
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,  # results go to SQL; there is no result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        task_soft_time_limit=max(hard - 60, 1),
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue, routing_key=settings.queue)],
        task_default_priority=5,
        task_create_missing_queues=False,
        # kombu's Redis transport, except that junk LPUSHed onto the queue is
        # dropped rather than stopping the worker (vidq/broker.py). rediss:// keeps
        # kombu's own transport: naming a class would bypass its TLS defaults.
        broker_transport=(
            "vidq.broker:Transport" if settings.broker_url.startswith("redis://") else None
        ),
        broker_transport_options={
            # Redelivery of unacked messages after this long: far above the hard limit.
            "visibility_timeout": 2 * hard + 600,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
        },
        broker_connection_retry_on_startup=True,
        # A short Redis blip must not throw running work away. With Redis, an unacked
        # message is redelivered only after the visibility timeout (hours), not on
        # reconnect, so cancelling the running jobs would only discard their progress;
        # the job's lease (worker/jobs.py) already stops a second copy from committing.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Loading a model can take a while; the default 4 s would kill the child.
        worker_proc_alive_timeout=600,
        worker_max_memory_per_child=(settings.worker_max_memory_mb * 1024) or None,
        # Task events cost each job three publishes on the worker's GIL: off unless
        # a monitor (Flower) is to show tasks (VIDQ_TASK_EVENTS), or turns them on.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=True,
        # Connections to the broker one process may hold at once (opened as needed).
        # Celery's control broadcasts hold two while they publish, and Flower sends
        # eight at once besides its event capture's: with fewer than ten, every one
        # of them waited for another forever, and Flower showed no task at all.
        broker_pool_limit=16,
    )
    return app


def celery_priority(priority: int) -> int:
    """vidq priority 0 (lowest) .. 9 (highest) -> Redis priority (0 is served first)."""
    return PRIORITY_LEVELS - 1 - max(0, min(PRIORITY_LEVELS - 1, priority))


def new_task_id() -> str:
    """A fresh Celery task id; recorded in ``jobs.task_id`` before publishing."""
    return f"vidq-{uuid.uuid4().hex}"


def publish_jobs(app: Celery, jobs: Iterable[tuple[int, int, str]], *, queue: str) -> int:
    """Publish (job_id, priority, task_id) messages over one broker connection."""
    sent = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        # Redis: one pipelined round trip per thousand messages instead of one each.
        for job_id, priority, task_id in jobs:
            app.send_task(
                TASK_CLASSIFY,
                args=[job_id],
                task_id=task_id,
                queue=queue,
                priority=celery_priority(priority),
                producer=producer,
            )
            sent += 1
    return sent


def queue_depths(settings: Settings, queues: Iterable[str]) -> dict[str, dict[str, int]] | None:
    """Messages waiting per queue and vidq priority (0-9), plus those delivered and not
    yet acknowledged (``unacked``, all queues); None if the broker is not Redis."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=10)
    try:
        out: dict[str, dict[str, int]] = {}
        for queue in queues:
            # kombu's priority lists: "queue" holds Redis priority 0, "queue:N" the others.
            depths = {}
            for redis_priority in range(PRIORITY_LEVELS):
                key = queue if redis_priority == 0 else f"{queue}:{redis_priority}"
                depths[str(PRIORITY_LEVELS - 1 - redis_priority)] = int(client.llen(key))
            out[queue] = depths
        out["unacked"] = {"all": int(client.hlen("unacked"))}
        return out
    finally:
        client.close()
