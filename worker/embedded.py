"""The embedded mode: run queued jobs in this process, with no broker.

``vidq run`` records jobs exactly as ``vidq submit`` does, then executes them
here through the same ``execute_job`` and the same pipeline a worker process
uses, ``inflight`` jobs at a time, so results land in the same table with the
same guarantees. One process is the right shape for one machine: the model
uses every core, and there is no server to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed

from vidq.errors import TransientError
from vidq.settings import Settings
from worker.inference import Classifier
from worker.jobs import JobStore, Outcome, backoff_s, execute_job
from worker.pipeline import Model, Pipeline


def run_jobs(
    job_ids: Iterable[int],
    *,
    settings: Settings,
    on_outcome: Callable[[Outcome], None] = lambda _o: None,
    classifier: Model | None = None,
) -> list[Outcome]:
    """Execute jobs, ``inflight`` at once; transient errors retry with backoff.
    ``classifier``: a model already loaded (by default, the settings' own)."""
    model = classifier or Classifier.from_settings(settings)
    store = JobStore.from_settings(settings)
    outcomes = []
    with Pipeline.from_settings(model, settings) as pipeline, ThreadPoolExecutor(
        max_workers=pipeline.plan.inflight, thread_name_prefix="vidq-job"
    ) as pool:
        futures = [pool.submit(_run_one, job_id, pipeline=pipeline, settings=settings,
                               store=store) for job_id in job_ids]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            on_outcome(outcome)
    return outcomes


def _run_one(job_id: int, *, pipeline: Pipeline, settings: Settings, store: JobStore) -> Outcome:
    attempt = 0
    while True:
        try:
            outcome = execute_job(job_id, pipeline=pipeline, settings=settings, store=store)
            if outcome.status != "busy":
                return outcome
            # Running elsewhere with a live heartbeat: another `vidq run`, or one just
            # interrupted whose heartbeat has not gone stale yet. Look again later.
            time.sleep(min(5.0, settings.stale_after_s))
        except TransientError as exc:
            if attempt >= settings.max_retries:
                give_up = TransientError(
                    f"gave up after {attempt + 1} attempts: {exc.message}",
                    kind="retries_exhausted",
                )
                store.fail(job_id, None, give_up)
                return Outcome(job_id, "failed", give_up.message)
            time.sleep(backoff_s(attempt))
            attempt += 1
