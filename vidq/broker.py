"""The Redis transport vidq uses: kombu's, except that junk on the queue is dropped.

Anyone who can write to Redis can LPUSH anything onto the ``vidq`` list. Celery
already refuses bad *task* content (unknown task names, pickle, malformed args);
but a payload that is not a kombu message at all makes kombu's reader raise:
non-JSON (or JSON that is not an object) stops the worker with "Unrecoverable
error", and an object without kombu's envelope reads as a lost broker
connection, which cancels every running job. BRPOP has already taken such a
payload out of Redis, so logging it and dropping it loses nothing and cannot loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger("vidq.broker")


def envelope_problem(payload: Any) -> str | None:
    """Why ``payload`` is not a message kombu can hand to Celery, or None if it is."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not an object"
    props = payload.get("properties")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str):
        return "no properties.delivery_tag"
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        return "no properties.delivery_info"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return "a body that is not text"
    encoding = props.get("body_encoding")
    if body and encoding not in (None, "utf-8", "base64"):
        return f"an unknown body_encoding {encoding!r}"
    if body and encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "a body that is not base64"
    return None


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except json.JSONDecodeError as exc:
            log.error("dropped a message that is not JSON (%s); it was not sent by vidq", exc)
            raise Empty() from None  # nothing was delivered


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error("dropped a message on %r that is not a Celery message (%s): %.200r",
                      queue, problem, message)
            return
        super()._deliver(message, queue)
