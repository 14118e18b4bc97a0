"""The embedded mode: run queued jobs in this process, with no broker.

``vidq run`` records jobs exactly as ``vidq submit`` does, then executes them
here through the same ``execute_job`` a Celery worker calls, so results land
in the same table with the same guarantees. One process is the right shape for
one machine: the model uses every core, and there is no server to install.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from vidq.errors import TransientError
from vidq.settings import Settings
from worker.inference import Classifier
from worker.jobs import JobStore, Outcome, backoff_s, execute_job


def run_jobs(
    job_ids: Iterable[int],
    *,
    settings: Settings,
    on_outcome: Callable[[Outcome], None] = lambda _o: None,
    classifier: Classifier | None = None,
) -> list[Outcome]:
    """Execute jobs one after another; transient errors retry with backoff."""
    classifier = classifier or Classifier.from_settings(settings)
    store = JobStore.from_settings(settings)
    outcomes = []
    for job_id in job_ids:
        attempt = 0
        while True:
            try:
                outcome = execute_job(job_id, classifier=classifier, settings=settings, store=store)
                break
            except TransientError as exc:
                if attempt >= settings.max_retries:
                    give_up = TransientError(
                        f"gave up after {attempt + 1} attempts: {exc.message}",
                        kind="retries_exhausted",
                    )
                    store.fail(job_id, None, give_up)
                    outcome = Outcome(job_id, "failed", give_up.message)
                    break
                time.sleep(backoff_s(attempt))
                attempt += 1
        outcomes.append(outcome)
        on_outcome(outcome)
    return outcomes
