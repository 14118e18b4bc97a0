"""Malformed and foreign messages on the vidq queue: each is dropped once (never
redelivered in a loop, never deserialized with pickle), and the worker goes on."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import redis

from tests.faults.harness import FaultCluster, FaultMedia
from vidq.queue import PRIORITY_LEVELS, make_celery

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(300),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


class MakesADirectory:
    """Unpickling this creates a directory: proof that pickle was (not) trusted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.path,)


def kombu_envelope(body: object, headers: dict[str, object], tag: str) -> str:
    """A message in kombu's Redis envelope, with whatever body and headers we like."""
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "headers": headers, "content-type": "application/json", "content-encoding": "utf-8",
        "properties": {"delivery_tag": tag, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "vidq"}},
    })


def queue_lengths(client: redis.Redis, queue: str) -> dict[str, int]:
    keys = [queue] + [f"{queue}:{p}" for p in range(1, PRIORITY_LEVELS)]
    lengths = {k: client.llen(k) for k in keys}
    lengths["unacked"] = client.hlen("unacked")
    return {k: v for k, v in lengths.items() if v}


def test_malformed_and_foreign_messages_are_dropped_once_and_the_worker_goes_on(
    cluster: FaultCluster, media: FaultMedia, tmp_path: Path
) -> None:
    worker = cluster.start_worker("--concurrency", "1")
    settings = cluster.settings
    app = make_celery(settings)
    client = redis.Redis.from_url(settings.broker_url)
    marker = tmp_path / "unpickled"

    def send(task_id: str, name: str = "vidq.classify", **options: object) -> None:
        app.send_task(name, task_id=task_id, queue=settings.queue, **options)

    send("bad-arg", args=["not-an-int"])
    send("bool-arg", args=[True])
    send("bad-retry-count", args=[1, "many"])
    send("foreign-task", name="os.system", args=["echo pwned"])
    send("pickled", args=[MakesADirectory(str(marker))], serializer="pickle")
    client.lpush(settings.queue, b"\x80\x04 raw bytes, not JSON \xff")
    client.lpush(settings.queue, json.dumps({"hello": "world"}))
    client.lpush(settings.queue, json.dumps([1, 2, 3]))
    # Our task name, but a body Celery cannot unpack / a header it cannot use.
    client.lpush(settings.queue, kombu_envelope({"job_id": 1}, {"task": "vidq.classify",
                                                               "id": "bad-body"}, "tag-1"))
    client.lpush(settings.queue, kombu_envelope([[1], {}, {}], {"task": "vidq.classify",
                                                               "id": "bad-limit",
                                                               "timelimit": "soon"}, "tag-2"))
    cluster.vidq("submit", str(media.good[1]), "--batch", "after-garbage")

    cluster.wait_done(n=1)
    cluster.assert_succeeded_once(1)
    cluster.wait_for(lambda: not queue_lengths(client, settings.queue), timeout=30,
                     what="the queue and its unacked set to drain")
    log = cluster.log_text(worker)
    once = {
        "rejecting malformed message bad-arg": 1,
        "rejecting malformed message bool-arg": 1,
        "rejecting malformed message bad-retry-count": 1,
        "Received unregistered task of type 'os.system'": 1,
        "Received invalid task message: Refusing to deserialize untrusted content": 1,
        "dropped a message that is not JSON": 1,
        "dropped a message on 'vidq' that is not a Celery message (no properties": 1,
        "dropped a message on 'vidq' that is not a Celery message (a JSON list": 1,
        "Received invalid task message: malformed vidq message (ValueError": 1,
        "Received invalid task message: malformed vidq message (id='bad-limit'": 1,
        "Unrecoverable error": 0,
        "Connection to broker lost": 0,
    }
    seen = {needle: log.count(needle) for needle in once}
    assert seen == once, log[-5000:]
    assert not marker.exists(), "a pickled message was deserialized"
    assert worker.poll() is None
    # Nothing foreign left a row behind, and the good job ran once.
    assert [(j["status"], j["attempts"]) for j in cluster.jobs()] == [("succeeded", 1)]
