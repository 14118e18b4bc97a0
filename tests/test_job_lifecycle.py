"""How a job's attempts end, on real SQLite and PostgreSQL: ``execute_job`` with a
stand-in for the pipeline (the model is not what these tests are about).

- every attempt counts, however it ends; after VIDQ_MAX_ATTEMPTS the job is failed
  with what happened to the last one (``exception``, ``crashed``);
- a time limit fails the job at once with ``timeout``;
- a cancelled running job is given up at its next clip and gets no result rows;
- a finished result survives a failing commit and is written once the database
  answers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from producer.submit import JobRequest, submit
from tests.cli import run_vidq, vidq_command
from tests.media import make_video
from vidq.errors import TransientError, VidqError
from vidq.sampling import Sampling
from vidq.settings import Settings
from worker.jobs import JobStore, Outcome, execute_job
from worker.models import get_preset


class StandIn:
    """The pipeline's interface; ``run`` decides what a submitted video does."""

    def __init__(self, run: Callable[[Callable[[], VidqError | None]], Any]) -> None:
        self.model = type("C", (), {"preset": get_preset("x3d_xs")})()
        self._run = run
        self.submitted = 0

    def submit(self, path: str, sampling: Sampling, *,
               should_stop: Callable[[], VidqError | None] = lambda: None) -> Future[Any]:
        self.submitted += 1
        future: Future[Any] = Future()

        def work() -> None:
            try:
                future.set_result(self._run(should_stop))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        threading.Thread(target=work, daemon=True).start()
        return future


@pytest.fixture
def stores() -> Iterator[Callable[..., JobStore]]:
    """JobStores closed when the test ends. An open store's heartbeat thread outlives
    its test, probing a database since dropped, and records the failures in this
    process's CONTACT, which a later test's takeover rule reads."""
    made: list[JobStore] = []

    def make(settings: Settings, **fields: Any) -> JobStore:
        made.append(JobStore(settings.database_url, **fields) if fields
                    else JobStore.from_settings(settings))
        return made[-1]

    yield make
    for store in made:
        store.close()


@pytest.fixture
def job(database_url: str, tmp_path: Path) -> tuple[Settings, int]:
    video = tmp_path / "v.mp4"
    make_video(video, seconds=1)
    settings = Settings.from_env({}, database_url=database_url, model="x3d_xs",
                                 weights="random", heartbeat_s=1, max_attempts=3)
    report = submit([str(video)], settings=settings, request=JobRequest(model="x3d_xs",
                    weights="random"), batch="b", force=False, publish=False)
    return settings, report.job_ids[0]


def row(settings: Settings, job_id: int) -> dict[str, Any]:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            r = conn.execute(text("select status, attempts, error_kind, error_message "
                                  "from jobs where id = :id"), {"id": job_id}).one()
            n_rows = conn.execute(text("select count(*) from clip_predictions where job_id = :id"),
                                  {"id": job_id}).scalar_one()
    finally:
        engine.dispose()
    return {"status": r[0], "attempts": r[1], "error_kind": r[2], "error_message": r[3],
            "clip_rows": n_rows}


def test_unexpected_errors_count_as_attempts_then_fail_the_job(
    job: tuple[Settings, int], stores: Callable[..., JobStore]) -> None:
    settings, job_id = job
    store = stores(settings)

    def boom(_stop: Any) -> None:
        raise RuntimeError("decoder library said boom")

    pipeline = StandIn(boom)
    for attempt in (1, 2, 3):
        with pytest.raises(TransientError) as caught:
            execute_job(job_id, pipeline=pipeline, settings=settings, store=store)  # type: ignore[arg-type]
        assert caught.value.kind == "exception"
        r = row(settings, job_id)
        assert (r["status"], r["attempts"], r["error_kind"]) == ("queued", attempt, "exception")
    outcome = execute_job(job_id, pipeline=pipeline, settings=settings, store=store)  # type: ignore[arg-type]
    assert outcome == Outcome(job_id, "failed", "attempts exhausted")
    r = row(settings, job_id)
    assert (r["status"], r["attempts"], r["error_kind"]) == ("failed", 3, "exception")
    assert "gave up after 3 attempts" in r["error_message"]
    assert "RuntimeError: decoder library said boom" in r["error_message"]
    assert pipeline.submitted == 3  # the fourth delivery never reached the pipeline


def test_an_attempt_whose_worker_died_is_recorded_as_crashed(
    job: tuple[Settings, int], stores: Callable[..., JobStore]) -> None:
    settings, job_id = job
    dead = stores(settings, stale_after_s=0.5, max_attempts=2)
    for attempt in (1, 2):  # claimed by a worker that vanished (no heartbeat, no release)
        assert not isinstance(dead.claim(job_id, "t", f"gone-host:{attempt}"), Outcome)
        time.sleep(0.7)
        if attempt == 2:  # the takeover recorded what happened to the attempt before it
            r = row(settings, job_id)
            assert (r["status"], r["attempts"], r["error_kind"]) == ("running", 2, "crashed")
            assert r["error_message"] == ("the worker running attempt 1 stopped (killed, out "
                                          "of memory or crashed) on gone-host:1")
    outcome = execute_job(job_id, pipeline=StandIn(lambda _s: None), settings=settings,  # type: ignore[arg-type]
                          store=dead)
    assert outcome.status == "failed"
    r = row(settings, job_id)
    assert (r["status"], r["attempts"], r["error_kind"]) == ("failed", 2, "crashed")
    assert ("attempt 2 stopped (killed, out of memory or crashed) on gone-host:2"
            in r["error_message"])


def test_a_time_limit_fails_the_job_at_once(
    job: tuple[Settings, int], stores: Callable[..., JobStore]) -> None:
    settings, job_id = job
    settings = settings.replace(task_time_limit_s=61)  # 1 s once the 60 s margin is taken

    def slow(should_stop: Callable[[], VidqError | None]) -> None:
        while should_stop() is None:  # a long video: the limit ends it between clips
            time.sleep(0.05)
        raise should_stop()  # type: ignore[misc]

    t = time.monotonic()
    outcome = execute_job(job_id, pipeline=StandIn(slow), settings=settings,  # type: ignore[arg-type]
                          store=stores(settings))
    assert outcome.status == "failed" and time.monotonic() - t < 10
    r = row(settings, job_id)
    assert (r["status"], r["attempts"], r["error_kind"]) == ("failed", 1, "timeout")
    assert "VIDQ_TASK_TIME_LIMIT_S" in r["error_message"]


def test_cancelling_a_running_job_gives_it_up_without_results(
    job: tuple[Settings, int], stores: Callable[..., JobStore]) -> None:
    from producer.query import cancel
    from vidq.db import sessions

    settings, job_id = job
    started = threading.Event()

    def long_video(should_stop: Callable[[], VidqError | None]) -> None:
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stop = should_stop()
            if stop is not None:
                raise stop
            time.sleep(0.05)
        raise AssertionError("the cancel was never noticed")

    result: list[Outcome] = []
    runner = threading.Thread(target=lambda: result.append(execute_job(
        job_id, pipeline=StandIn(long_video), settings=settings,  # type: ignore[arg-type]
        store=stores(settings))))
    runner.start()
    assert started.wait(30)
    with sessions(settings.database_url)() as session, session.begin():
        assert cancel(session, batch="b") == 1
    runner.join(timeout=30)
    assert result and result[0].status == "skipped", result
    assert "cancelled" in result[0].detail
    r = row(settings, job_id)
    assert (r["status"], r["clip_rows"]) == ("cancelled", 0)


def test_one_heartbeat_statement_refreshes_every_job_held_and_finds_the_lost_one(
    database_url: str, tmp_path: Path, stores: Callable[..., JobStore]) -> None:
    """The process's heartbeat thread refreshes all its jobs in one statement; a job
    cancelled or taken over is marked lost, the others are refreshed and kept."""
    from worker.jobs import Lease

    settings = Settings.from_env({}, database_url=database_url, model="x3d_xs",
                                 weights="random", heartbeat_s=60)
    videos = []
    for i in range(3):
        videos.append(tmp_path / f"v{i}.mp4")
        make_video(videos[-1], seconds=1, seed=i)
    ids = submit([str(v) for v in videos], settings=settings, batch="beats", publish=False,
                 request=JobRequest(model="x3d_xs", weights="random")).job_ids
    store = stores(settings)
    for job_id in ids:
        assert not isinstance(store.claim(job_id, f"token-{job_id}", "h"), Outcome)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("update jobs set heartbeat_at = '2000-01-01 00:00:00'"))
        # The second job was taken over by another worker; the third was cancelled.
        conn.execute(text("update jobs set lease_token = 'thief' where id = :id"), {"id": ids[1]})
        conn.execute(text("update jobs set status = 'cancelled' where id = :id"), {"id": ids[2]})
    beats = store.heartbeats(60)
    leases = [Lease(job_id, f"token-{job_id}") for job_id in ids]
    beats.beat(leases)
    assert [lease.lost is None for lease in leases] == [True, False, False]
    with engine.connect() as conn:
        fresh = dict(conn.execute(text(
            "select id, heartbeat_at > '2000-01-02' from jobs")).all())
    engine.dispose()
    assert {k: bool(v) for k, v in fresh.items()} == {ids[0]: True, ids[1]: False, ids[2]: False}


def test_a_closed_store_stops_its_heartbeat_thread(job: tuple[Settings, int]) -> None:
    """A store made for a while (a test, a tool) leaves no thread behind probing its
    database once closed."""
    settings, _ = job

    def beating() -> int:
        return sum(t.name == "vidq-heartbeats" for t in threading.enumerate())

    before = beating()
    store = JobStore.from_settings(settings)
    store.heartbeats(0.05).start()
    assert beating() == before + 1
    store.close()
    deadline = time.monotonic() + 5
    while beating() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert beating() == before


def test_a_finished_result_survives_a_failing_commit(
    job: tuple[Settings, int], tmp_path: Path
) -> None:
    from worker.inference import Classifier
    from worker.pipeline import classify

    settings, job_id = job
    classifier = Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32")
    video = str(tmp_path / "v.mp4")
    result = classify(classifier, video, Sampling())

    class FlakyStore(JobStore):
        failures = 2

        def succeed(self, job_id: int, token: str, result: object) -> bool:
            if self.failures:
                self.failures -= 1
                raise TransientError("database unavailable (connection refused)")
            return super().succeed(job_id, token, result)

    store = FlakyStore(settings.database_url, stale_after_s=settings.stale_after_s)
    import worker.jobs as jobs

    real_backoff = jobs.backoff_s
    jobs.backoff_s = lambda attempt: 0.1  # type: ignore[assignment]
    try:
        outcome = execute_job(job_id, pipeline=StandIn(lambda _s: result), settings=settings,  # type: ignore[arg-type]
                              store=store)
    finally:
        jobs.backoff_s = real_backoff
    assert outcome.status == "succeeded" and store.failures == 0
    r = row(settings, job_id)
    assert (r["status"], r["attempts"], r["clip_rows"]) == ("succeeded", 1, 5)


@pytest.mark.heavy_on_postgresql
def test_an_interrupted_vidq_run_is_finished_by_the_next_one(
    database_url: str, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        make_video(videos / f"v{i}.mp4", seconds=1, seed=40 + i)
    hold = tmp_path / "hold"
    hold.touch()
    env = {**os.environ, "VIDQ_DATABASE_URL": database_url, "VIDQ_MODEL": "x3d_xs",
           "VIDQ_WEIGHTS": "random", "VIDQ_HEARTBEAT_S": "1", "VIDQ_INFLIGHT": "1",
           "VIDQ_FAULT_PAUSE": f"after_claim={hold}"}
    first = subprocess.Popen([*vidq_command(), "run", str(videos), "--batch", "first"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(f"{hold}.log")
    deadline = time.monotonic() + 120
    while not (log.exists() and "held" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # Ctrl-C or kill: one job running, two queued
    first.wait()
    hold.unlink()
    settings = Settings.from_env({}, database_url=database_url)
    statuses = sorted(row(settings, j)["status"] for j in (1, 2, 3))
    assert statuses == ["queued", "queued", "running"]

    env.pop("VIDQ_FAULT_PAUSE")
    second = run_vidq("run", str(videos), "--batch", "second", env=env, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "resuming 3 jobs an interrupted `vidq run` left unfinished" in second.stderr
    for job_id in (1, 2, 3):
        r = row(settings, job_id)
        assert r["status"] == "succeeded" and r["clip_rows"] == 5, r
    engine = create_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from jobs")).scalar_one() == 3
    engine.dispose()
