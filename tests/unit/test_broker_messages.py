"""The broker: kombu pinned to a version with batched publishing, and a message's retry
counter bounded by the worker whatever the message says."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vidq.errors import TransientError

REPO = Path(__file__).resolve().parents[2]


def test_kombu_is_pinned_to_a_version_with_batched_publishing() -> None:
    import re
    from importlib.metadata import version

    from kombu import Producer

    pin = re.search(r'"kombu\[redis\]>=([\d.]+)', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin kombu: vidq/queue.py uses Producer.batch"
    assert tuple(map(int, pin.group(1).split("."))) >= (5, 7, 0)  # batch() is new in 5.7.0
    assert tuple(map(int, version("kombu").split(".")[:2])) >= (5, 7)
    assert callable(Producer.batch)


def test_a_crafted_retry_counter_is_bounded_by_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the ``transient`` kwarg was trusted: a message carrying -1000 made a job
    that keeps hitting a transient error retry more than a thousand times."""
    import worker.tasks as tasks

    calls: list[int] = []
    failed: list[Any] = []

    def always_transient(job_id: int, **_: Any) -> None:
        calls.append(job_id)
        if len(calls) > 50:
            raise RuntimeError("retried without bound")
        raise TransientError("database unavailable (test)")

    store = SimpleNamespace(fail=lambda job_id, token, error: failed.append(error))
    monkeypatch.setattr(tasks, "execute_job", always_transient)
    monkeypatch.setattr(tasks, "load_process_state",
                        lambda: SimpleNamespace(pipeline=None, store=store))

    class Redelivered(Exception):
        def __init__(self, kwargs: dict[str, Any]) -> None:
            self.kwargs = kwargs

    # What the broker does with a retry: deliver a message with the new kwargs.
    monkeypatch.setattr(tasks.classify, "retry",
                        lambda kwargs=None, **_: Redelivered(dict(kwargs or {})))
    message: dict[str, Any] = {"job_id": 7, "transient": -1000}  # the crafted message
    for _ in range(60):
        try:
            assert tasks.classify.run(**message) == "failed"
            break
        except Redelivered as again:
            message = again.kwargs
    assert len(calls) == tasks.settings.max_retries + 1
    assert [e.kind for e in failed] == ["retries_exhausted"]
