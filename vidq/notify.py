"""Batch-completion webhooks: ``vidq submit --notify URL``.

When a batch has no job left queued or running, vidq POSTs a JSON summary to its
URL, signed with an HMAC-SHA256 of the body under ``VIDQ_WEBHOOK_SECRET``:

    X-Vidq-Signature: sha256=<hex digest of the raw body>

Exactly one process sends each completion: it first *claims* the batch's
notification with a conditional UPDATE that also checks no job is still active,
so many workers finishing the batch's last jobs at once send one request.
Deliveries are retried with backoff and recorded on the batch row
(``notify_status``, ``notify_attempts``, ``notify_sent_at``, ``notify_response``).
A sender that dies mid-delivery leaves a claim that goes stale; reconcile sends it
again. New jobs submitted to the batch make it pending again, so each completion
is announced once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from sqlalchemy import exists, func, select, update

from vidq.db import ACTIVE, Batch, Job, JobStatus, aware, db_now, sessions
from vidq.errors import VidqError
from vidq.settings import Settings

log = logging.getLogger("vidq.notify")
SIGNATURE_HEADER = "X-Vidq-Signature"
CLAIM_STALE_S = 300


def signature(secret: str, body: bytes) -> str:
    """The header value a receiver recomputes to check that vidq sent the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def summary(session: Any, batch: Batch) -> dict[str, Any]:
    counts = {s.value: 0 for s in JobStatus}
    for status, n in session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)
    ):
        counts[status] = n
    clips, started, finished = session.execute(
        select(func.coalesce(func.sum(Job.clips_done), 0), func.min(Job.started_at),
               func.max(Job.finished_at)).where(Job.batch_id == batch.id)
    ).one()
    return {
        "event": "batch.completed",
        "batch": batch.name,
        "counts": counts,
        "jobs": sum(counts.values()),
        "clips": int(clips),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
    }


def _iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return aware(t).isoformat()


_SILENT_BATCHES: dict[tuple[str, int], float] = {}
"""(database, batch) seen without a webhook, with when to look again, oldest first.
Most batches notify nobody and this runs after every job: for a few seconds their
jobs cost no thread and no query. A later ``vidq submit --batch NAME --notify URL``
can still add a URL to the batch: seen at the next look, or sent by reconcile."""
_SILENT_FOR_S = 10.0
_SILENT_MAX = 4096
_SILENT_LOCK = threading.Lock()


def notify_if_done(settings: Settings, batch_id: int | None, *, retries: int = 5,
                   backoff_s: float = 2.0) -> str | None:
    """Send the batch's completion webhook if it is due and nobody else is sending it.
    Returns the final notify_status, or None if there was nothing to send."""
    if batch_id is None:
        return None
    make_session = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    with make_session() as session:
        # A read first: most batches notify nobody, and this runs after every job.
        row = session.execute(select(Batch.notify_url, Batch.notify_status).where(
            Batch.id == batch_id)).one_or_none()
    if row is not None and row.notify_url is None:
        with _SILENT_LOCK:
            _SILENT_BATCHES.pop((settings.database_url, batch_id), None)
            _SILENT_BATCHES[(settings.database_url, batch_id)] = time.monotonic() + _SILENT_FOR_S
            while len(_SILENT_BATCHES) > _SILENT_MAX:
                del _SILENT_BATCHES[next(iter(_SILENT_BATCHES))]
    if row is None or row.notify_url is None or row.notify_status not in ("pending", "sending"):
        return None
    with make_session() as session, session.begin():
        claimed = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.notify_url.is_not(None),
                (Batch.notify_status == "pending")
                | ((Batch.notify_status == "sending")
                   & (Batch.notify_claimed_at < db_now(ago_s=CLAIM_STALE_S))),
                ~exists().where(Job.batch_id == batch_id, Job.status.in_(ACTIVE)),
            )
            .values(notify_status="sending", notify_claimed_at=db_now())
        ).rowcount
        if not claimed:
            return None
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.notify_url is not None
        url, body = batch.notify_url, json.dumps(summary(session, batch)).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "vidq",
               "X-Vidq-Event": "batch.completed"}
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret, body)
    response: int | None = None
    for attempt in range(1, retries + 1):
        response = _post(url, body, headers)
        ok = response is not None and 200 <= response < 300
        with make_session() as session, session.begin():
            session.execute(
                update(Batch).where(Batch.id == batch_id).values(
                    notify_attempts=Batch.notify_attempts + 1, notify_response=response,
                    notify_sent_at=db_now() if ok else None,
                    notify_status="sent" if ok else ("failed" if attempt == retries
                                                     else "sending"),
                    notify_claimed_at=db_now(),
                )
            )
        if ok:
            log.info("batch %s: completion webhook delivered (HTTP %s)", batch_id, response)
            return "sent"
        if attempt < retries:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    log.warning("batch %s: completion webhook not delivered after %d attempts (last: %s)",
                batch_id, retries, response)
    return "failed"


def _post(url: str, body: bytes, headers: dict[str, str]) -> int | None:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def notify_soon(settings: Settings, batch_id: int | None) -> None:
    """From a worker's job thread: deliver in the background, never delaying the job."""
    if batch_id is None:
        return
    if _SILENT_BATCHES.get((settings.database_url, batch_id), 0.0) > time.monotonic():
        return

    def run() -> None:
        try:
            notify_if_done(settings, batch_id)
        except VidqError as exc:
            log.warning("batch %s: webhook check failed (%s)", batch_id, exc.message)
        except Exception as exc:  # noqa: BLE001  a webhook must never take a worker down
            log.warning("batch %s: webhook check failed (%s: %s)", batch_id,
                        type(exc).__name__, exc)

    threading.Thread(target=run, name=f"vidq-notify-{batch_id}", daemon=True).start()


def due_batches(settings: Settings) -> list[int]:
    """Batches whose webhook is due (complete, pending or stale): for reconcile."""
    make_session = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    stale = db_now(ago_s=CLAIM_STALE_S)
    with make_session() as session:
        return list(session.scalars(
            select(Batch.id).where(
                Batch.notify_url.is_not(None),
                (Batch.notify_status == "pending")
                | ((Batch.notify_status == "sending") & (Batch.notify_claimed_at < stale)),
                ~exists().where(Job.batch_id == Batch.id, Job.status.in_(ACTIVE)),
            )
        ))
