"""Batch-completion webhooks against a real HTTP receiver on 127.0.0.1: one signed
POST per completion even with two workers, retried with backoff, recorded on the batch.
Loopback is refused unless an operator allows it: these tests allow it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
SECRET = "s3cret-for-tests"
LOOPBACK = "127.0.0.0/8,::1/128"
"""VIDQ_WEBHOOK_ALLOW_NETWORKS for a receiver on this host."""


class Receiver:
    """Records every POST; answers the statuses in ``replies`` in turn, then 200."""

    def __init__(self, replies: list[int] | None = None) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.replies = list(replies or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((dict(self.headers), body))
                self.send_response(receiver.replies.pop(0) if receiver.replies else 200)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.posts) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.posts) >= n, self.posts


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def verify(headers: dict[str, str], body: bytes) -> dict[str, object]:
    from vidq.notify import verify_signature

    assert verify_signature(SECRET, headers["X-Vidq-Timestamp"], body,
                            headers["X-Vidq-Signature"])
    return json.loads(body)


def notify_row(cluster: Cluster, batch: str) -> tuple:
    return cluster.sql("select notify_status, notify_attempts, notify_response, "
                       "notify_sent_at is not null from batches where name = :b", b=batch)[0]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_workers_send_one_signed_webhook_per_completion(
    cluster: Cluster, corpus: Path, receiver: Receiver
) -> None:
    cluster.env["VIDQ_WEBHOOK_SECRET"] = SECRET
    cluster.env["VIDQ_WEBHOOK_ALLOW_NETWORKS"] = LOOPBACK
    cluster.start_worker("--inflight", "2")
    cluster.start_worker("--inflight", "2")
    cluster.vidq("submit", str(corpus), "--recursive", "--batch", "hooked", "--notify",
                 receiver.url)
    receiver.wait(1)
    time.sleep(3)  # a second sender would have posted by now
    assert len(receiver.posts) == 1
    payload = verify(*receiver.posts[0])
    assert payload["batch"] == "hooked" and payload["event"] == "batch.completed"
    assert payload["counts"]["succeeded"] == 6 and payload["jobs"] == 6
    assert payload["clips"] == 6 and payload["finished_at"]
    assert notify_row(cluster, "hooked") == ("sent", 1, 200, True)

    # More work in the batch: it completes again, and says so once more.
    extra = cluster.workdir / "extra.mp4"
    extra.write_bytes((corpus / "v0.mp4").read_bytes())
    cluster.vidq("submit", str(extra), "--batch", "hooked", "--force")
    receiver.wait(2)
    time.sleep(2)
    assert len(receiver.posts) == 2
    assert verify(*receiver.posts[1])["counts"]["succeeded"] == 7


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failed_delivery_is_retried_and_recorded(cluster: Cluster, corpus: Path) -> None:
    receiver = Receiver(replies=[503])
    try:
        cluster.env["VIDQ_WEBHOOK_SECRET"] = SECRET
        cluster.env["VIDQ_WEBHOOK_ALLOW_NETWORKS"] = LOOPBACK
        cluster.vidq("run", str(corpus / "v1.mp4"), "--batch", "flaky", "--notify", receiver.url)
        assert len(receiver.posts) == 2  # 503, then 200 after a backoff
        assert receiver.posts[0][1] == receiver.posts[1][1]
        verify(*receiver.posts[1])
        assert notify_row(cluster, "flaky") == ("sent", 2, 200, True)
    finally:
        receiver.server.shutdown()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cancelling_the_last_jobs_completes_the_batch(cluster: Cluster, corpus: Path,
                                                      receiver: Receiver) -> None:
    cluster.env["VIDQ_WEBHOOK_ALLOW_NETWORKS"] = LOOPBACK
    cluster.vidq("submit", str(corpus), "--recursive", "--batch", "dropped", "--notify",
                 receiver.url)
    assert receiver.posts == []  # no worker: still queued
    cluster.vidq("cancel", "--batch", "dropped")
    receiver.wait(1)
    payload = json.loads(receiver.posts[0][1])
    assert payload["counts"]["cancelled"] == 6
    assert "X-Vidq-Signature" not in receiver.posts[0][0]  # no secret set: unsigned


def test_a_webhook_added_to_a_batch_seen_without_one_is_still_sent(
    database_url: str, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker remembers for a few seconds that a batch has no webhook (so its jobs
    cost no query); a later `submit --batch NAME --notify URL` adds one all the same,
    and the batch's completion is sent once the worker looks again."""
    from producer.submit import JobRequest, submit
    from tests.media import make_video
    from vidq import notify
    from vidq.db import sessions
    from vidq.settings import Settings

    settings = Settings.from_env({}, database_url=database_url,
                                 webhook_allow_networks=LOOPBACK)
    request = JobRequest(model="x3d_xs", weights="random")
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    make_video(first, seconds=1)
    make_video(second, seconds=1, seed=1)
    report = submit([str(first)], settings=settings, request=request, batch="late",
                    publish=False)
    bid = report.batch_id
    with sessions(database_url)() as session, session.begin():
        session.execute(text("update jobs set status = 'succeeded'"))
    assert notify.notify_if_done(settings, bid) is None  # no webhook: nothing to send
    assert notify._SILENT_BATCHES[(database_url, bid)] > time.monotonic()
    submit([str(second)], settings=settings, request=request, batch="late", publish=False,
           notify=receiver.url)
    with sessions(database_url)() as session, session.begin():
        session.execute(text("update jobs set status = 'succeeded'"))
    notify.notify_soon(settings, bid)  # within the memory: no look, no thread
    time.sleep(0.3)
    assert receiver.posts == []
    monkeypatch.setitem(notify._SILENT_BATCHES, (database_url, bid), 0.0)  # memory expired
    notify.notify_soon(settings, bid)
    receiver.wait(1, timeout=30)
    assert json.loads(receiver.posts[0][1])["counts"]["succeeded"] == 2
