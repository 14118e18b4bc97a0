"""Batch-completion webhooks: ``vidq submit --notify URL``.

When a batch has no job left queued or running, vidq POSTs a JSON summary to its
URL. With ``VIDQ_WEBHOOK_SECRET`` set, each request is signed over the time it was
sent and its body, so a captured request cannot be replayed later
(``verify_signature`` is the receiver's check):

    X-Vidq-Timestamp: <Unix seconds>
    X-Vidq-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + the raw body>

Only http and https URLs are sent to, redirects are not followed (a 3xx is a failed
delivery), and an address that is not public (loopback, link-local with the cloud
metadata service, private, unspecified, multicast, reserved) is refused unless
``VIDQ_WEBHOOK_ALLOW_NETWORKS`` lists its network: at submit, and again at each
delivery after resolving the host, connecting to the very address that was checked
(a DNS answer that changes in between cannot redirect the request).

Exactly one process sends each completion: it first *claims* the batch's
notification with a conditional UPDATE that also checks no job is still active,
so many workers finishing the batch's last jobs at once send one request.
Deliveries are retried with backoff and recorded on the batch row
(``notify_status``, ``notify_attempts``, ``notify_sent_at``, ``notify_response``).
Workers and reconcile deliver from background sender threads, so a slow receiver
delays neither a job nor a reconcile. A sender that dies mid-delivery leaves a claim
that goes stale; reconcile sends it again. New jobs submitted to the batch make it
pending again, so each completion is announced once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import exists, func, select, update

from vidq.db import ACTIVE, Batch, Job, JobStatus, aware, db_now, sessions
from vidq.errors import VidqError
from vidq.settings import IPNetwork, Settings

log = logging.getLogger("vidq.notify")
SIGNATURE_HEADER = "X-Vidq-Signature"
TIMESTAMP_HEADER = "X-Vidq-Timestamp"
CLAIM_STALE_S = 300
SCHEMES = ("http", "https")
TIMEOUT_S = 10.0
"""Bound on connecting, and on each wait for the receiver's answer, per attempt."""
SENDERS = 4
"""Background sender threads per process; one batch is delivered by one at a time."""


class WebhookRefused(VidqError):
    """A webhook URL vidq will not call: not http(s), or an address not allowed."""

    kind = "webhook"


class WebhookUnresolved(VidqError):
    """A webhook's host name did not resolve: refused at submit, retried at delivery."""

    kind = "webhook"


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL and the addresses it may be sent to."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]


def check_url(url: str, *, allow_networks: Sequence[IPNetwork] = ()) -> WebhookTarget:
    """Resolve a webhook URL and check every address it resolves to. Raises
    WebhookRefused for a scheme other than http(s) or an address that is not public
    (unless in ``allow_networks``), WebhookUnresolved when the host does not resolve."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookRefused("the webhook URL cannot be parsed; give an http:// or "
                             "https:// URL.") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise WebhookRefused(f"webhook URLs must be http:// or https://, not "
                             f"{scheme + '://' if scheme else 'a URL without a scheme'}.")
    host = parts.hostname
    if not host:
        raise WebhookRefused("the webhook URL has no host; give http(s)://HOST/PATH.")
    port = port or (443 if scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise WebhookUnresolved(f"the webhook host {host} does not resolve ({exc}); "
                                "check the URL.") from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in found))
    if not addresses:
        raise WebhookUnresolved(f"the webhook host {host} does not resolve; check the URL.")
    for address in addresses:
        reason = refusal(address, allow_networks)
        if reason is not None:
            named = host if host == address else f"{host} ({address})"
            raise WebhookRefused(
                f"the webhook host {named} is not a public address ({reason}); webhooks go "
                "to public addresses only, unless an operator lists the network in "
                "VIDQ_WEBHOOK_ALLOW_NETWORKS.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(scheme=scheme, host=host, port=port, path=path, addresses=addresses)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal(address: str, allow_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why a webhook may not reach this address (``"loopback"``, ``"private"``...), or
    None when it may: a public address, or one in an allowed network. An IPv6 address
    that carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by both."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None,
                         ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None):
            if embedded is not None:
                candidates.append(embedded)
    if any(c.version == net.version and c in net
           for c in candidates for net in allow_networks):
        return None
    for c in candidates:
        for reason, hit in (("loopback", c.is_loopback), ("link-local", c.is_link_local),
                            ("unspecified", c.is_unspecified), ("multicast", c.is_multicast),
                            ("private", c.is_private), ("reserved", c.is_reserved),
                            ("non-public", not c.is_global)):
            if hit:
                return reason
    return None


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Vidq-Signature`` value of a body sent at ``timestamp`` (Unix seconds)."""
    signed = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify_signature(secret: str, timestamp: str | int, body: bytes, signature: str, *,
                     tolerance_s: float = 300, now: float | None = None) -> bool:
    """A receiver's check that vidq sent this request, and sent it lately.

    ``timestamp`` is the ``X-Vidq-Timestamp`` header, ``signature`` the
    ``X-Vidq-Signature`` header, ``body`` the raw request body (bytes, before any JSON
    parsing). True when the signature is the HMAC-SHA256, under the shared secret
    (``VIDQ_WEBHOOK_SECRET``), of ``b"<timestamp>." + body``, and the timestamp is
    within ``tolerance_s`` of now: a request captured and replayed later, or with its
    body or timestamp changed, is refused. Answer a refused request with 401 and do
    not act on it. Keep the receiver's clock in time (NTP). To refuse a replay inside
    the tolerance as well, remember the signatures seen in the last ``tolerance_s``.

    It needs only the standard library (``hashlib``, ``hmac``, ``time``): a receiver
    can copy it as it is.
    """
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    signed = str(sent).encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


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
    response: int | None = None
    for attempt in range(1, retries + 1):
        try:
            target = check_url(url, allow_networks=settings.webhook_networks)
        except WebhookRefused as exc:
            log.warning("batch %s: completion webhook refused, not sent: %s", batch_id,
                        exc.message)
            _record(make_session, batch_id, response=None, status="failed")
            return "failed"
        except WebhookUnresolved as exc:
            log.info("batch %s: completion webhook attempt %d: %s", batch_id, attempt,
                     exc.message)
            response = None
        else:
            response = _post(target, body, _headers(settings, body))
        ok = response is not None and 200 <= response < 300
        status = "sent" if ok else ("failed" if attempt == retries else "sending")
        if not _record(make_session, batch_id, response=response, status=status):
            # New jobs made the batch pending again meanwhile: its next completion is
            # announced by whoever sees it, with the counts as they will be then.
            return None
        if ok:
            log.info("batch %s: completion webhook delivered (HTTP %s)", batch_id, response)
            return "sent"
        if attempt < retries:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    log.warning("batch %s: completion webhook not delivered after %d attempts (last: %s)",
                batch_id, retries, response)
    return "failed"


def _record(make_session: Any, batch_id: int, *, response: int | None, status: str) -> bool:
    """One attempt on the batch row; False if the batch is no longer being sent."""
    with make_session() as session, session.begin():
        return bool(session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.notify_status == "sending").values(
                notify_attempts=Batch.notify_attempts + 1, notify_response=response,
                notify_sent_at=db_now() if status == "sent" else None,
                notify_status=status, notify_claimed_at=db_now(),
            )
        ).rowcount)


def _headers(settings: Settings, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "vidq",
               "X-Vidq-Event": "batch.completed"}
    if settings.webhook_secret:
        timestamp = int(time.time())
        headers[TIMESTAMP_HEADER] = str(timestamp)
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret, timestamp, body)
    return headers


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address already checked, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS: the certificate is checked against the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, address=address, timeout=timeout)
        self.context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


def _post(target: WebhookTarget, body: bytes, headers: dict[str, str]) -> int | None:
    """POST to the first checked address that accepts a connection: the HTTP status
    (a redirect is answered, not followed), or None if nothing answered in time."""
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    for address in target.addresses:
        connection = kind(target.host, target.port, address=address, timeout=TIMEOUT_S)
        try:
            try:
                connection.connect()
            except OSError:
                continue  # not sent: the next address may answer
            connection.request("POST", target.path, body=body, headers=headers)
            return int(connection.getresponse().status)
        except (OSError, ValueError, http.client.HTTPException):
            return None  # sent, perhaps: another address would make it twice
        finally:
            connection.close()
    return None


def notify_soon(settings: Settings, batch_id: int | None) -> None:
    """From a worker's job thread: deliver in the background, never delaying the job."""
    if batch_id is None:
        return
    if _SILENT_BATCHES.get((settings.database_url, batch_id), 0.0) > time.monotonic():
        return
    deliver_later(settings, batch_id)


_OUTBOX: queue.SimpleQueue[tuple[Settings, int]] = queue.SimpleQueue()
_DUE: dict[tuple[str, int], bool] = {}
"""(database, batch) in the outbox or being sent -> whether to look again once done
(the batch's last job may finish while an earlier look found it still active)."""
_SENDER_THREADS: list[threading.Thread] = []
_OUTBOX_LOCK = threading.Lock()


def deliver_later(settings: Settings, batch_id: int) -> None:
    """Hand a batch's completion check to a background sender thread and return at
    once. A batch already waiting or being sent is looked at again afterwards."""
    key = (settings.database_url, batch_id)
    with _OUTBOX_LOCK:
        if key in _DUE:
            _DUE[key] = True
            return
        _DUE[key] = False
        _OUTBOX.put((settings, batch_id))
        _SENDER_THREADS[:] = [t for t in _SENDER_THREADS if t.is_alive()]
        if len(_SENDER_THREADS) < SENDERS:
            sender = threading.Thread(target=_send_forever, name="vidq-notify", daemon=True)
            sender.start()
            _SENDER_THREADS.append(sender)


def wait_for_deliveries(timeout_s: float) -> bool:
    """Wait until the outbox is empty (for a process about to exit); False on timeout.
    Whatever is left is sent later by reconcile: a claim goes stale, a pending stays due."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _OUTBOX_LOCK:
            if not _DUE:
                return True
        time.sleep(0.05)
    return False


def _forget_outbox() -> None:
    """In a forked child: the parent's sender threads are not there to empty it."""
    global _OUTBOX, _OUTBOX_LOCK
    _OUTBOX, _OUTBOX_LOCK = queue.SimpleQueue(), threading.Lock()
    _DUE.clear()
    _SENDER_THREADS.clear()


os.register_at_fork(after_in_child=_forget_outbox)


def _send_forever() -> None:
    while True:
        settings, batch_id = _OUTBOX.get()
        key = (settings.database_url, batch_id)
        try:
            notify_if_done(settings, batch_id)
        except VidqError as exc:
            log.warning("batch %s: webhook check failed (%s)", batch_id, exc.message)
        except Exception as exc:  # noqa: BLE001  a webhook must never take a worker down
            log.warning("batch %s: webhook check failed (%s: %s)", batch_id,
                        type(exc).__name__, exc)
        with _OUTBOX_LOCK:
            if _DUE.get(key):
                _DUE[key] = False
                _OUTBOX.put((settings, batch_id))
            else:
                _DUE.pop(key, None)


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
