"""Operating workers: a real scrape of the metrics port during a run, the health check,
JSON log lines, and `vidq status --json` / `vidq metrics` from the database and broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str, **labels: str) -> float:
    """The largest value among the samples of ``name`` with these labels (0 if none):
    per-process gauges have one sample per worker process."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if (line.startswith(name + "{") or line.startswith(name + " "))
              and all(f'{k}="{v}"' in line for k, v in labels.items())]
    return max(values, default=0.0)


def wait(check, timeout: float = 120, what: str = "") -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_metrics_health_and_json_logs_of_a_real_run(cluster: Cluster, corpus: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = cluster.start_worker(VIDQ_METRICS_PORT=str(port), VIDQ_LOG_FORMAT="json")
    wait(lambda: get(base + "/healthz")[0] == 200, what="healthy")
    assert "1/1 worker processes alive, 1 with a model loaded" in get(base + "/healthz")[1]

    cluster.vidq("submit", str(corpus), "--recursive", "--batch", "ops", "--strategy",
                 "uniform", "--clips", "3")
    in_flight_seen = 0.0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, text = get(base + "/metrics")
        assert status == 200
        in_flight_seen = max(in_flight_seen, sample(text, "vidq_jobs_in_flight"))
        if sample(text, "vidq_jobs_total", outcome="succeeded") >= 6:
            break
        time.sleep(0.1)
    text = get(base + "/metrics")[1]
    assert sample(text, "vidq_jobs_total", outcome="succeeded") == 6
    assert sample(text, "vidq_attempts_total") == 6
    assert sample(text, "vidq_clips_total") == 6 * 3
    assert sample(text, "vidq_decode_seconds_count") == 6
    assert sample(text, "vidq_batch_fill_count") >= 1
    assert sample(text, "vidq_queue_wait_seconds_count") == 6
    assert sample(text, "vidq_model_load_seconds") > 0
    assert text.count("vidq_model_load_seconds{") == 1  # one worker process, nobody else
    assert in_flight_seen >= 1
    assert sample(text, "vidq_jobs_in_flight") == 0

    # JSON logs: every job line parses and carries the job's fields.
    lines = [json.loads(line) for line in cluster.workers[0][1].read_text().splitlines()
             if line.startswith("{")]
    jobs = [entry for entry in lines if entry.get("job_id") and entry.get("status")]
    done = {entry["job_id"] for entry in jobs if entry["status"] == "succeeded"}
    assert len(done) == 6
    one = next(entry for entry in jobs if entry["status"] == "succeeded")
    assert one["attempt"] == 1 and one["batch_id"] and one["clips"] == 3
    assert "decode_s" in one and "model_s" in one

    # A worker process that dies makes the host unhealthy until its restart has a model.
    (child,) = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and _parent(int(p)) == worker.pid]
    os.kill(child, signal.SIGKILL)
    wait(lambda: get(base + "/healthz")[0] == 503, timeout=30, what="unhealthy")
    wait(lambda: get(base + "/healthz")[0] == 200, timeout=120, what="healthy again")


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_json_and_metrics_command_show_the_queue(cluster: Cluster, corpus: Path) -> None:
    cluster.vidq("submit", str(corpus), "--recursive", "--batch", "waiting", "--priority", "7")
    status = json.loads(cluster.vidq("status", "--json").stdout)
    assert status["counts"]["queued"] == 6
    assert status["queue_depth"]["vidq"]["7"] == 6
    assert status["oldest_queued_s"] is not None and status["oldest_queued_s"] >= 0
    text = cluster.vidq("metrics").stdout
    assert sample(text, "vidq_db_jobs", status="queued") == 6
    assert sample(text, "vidq_broker_queue_depth", queue="vidq", priority="7") == 6
