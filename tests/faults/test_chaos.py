"""The chaos run (tests/chaos.py) under pytest: 3 hosts, 200 jobs, 5 minutes of faults
at random, then healed; every job succeeds exactly once with a clean run's results.
It takes about 10 minutes, so it is left out by default:

    python -m pytest -m chaos tests/faults/test_chaos.py -s
    VIDQ_CHAOS_JOBS=40 VIDQ_CHAOS_FAULT_S=60 python -m pytest -m chaos tests/faults -s

``VIDQ_CHAOS_SEED`` replays a run's faults (the table prints its seed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import chaos

pytestmark = [pytest.mark.faults, pytest.mark.chaos, pytest.mark.timeout(3600)]


def test_a_fleet_under_random_faults_runs_every_job_once_with_a_clean_runs_results(
    tmp_path: Path,
) -> None:
    seed = os.environ.get("VIDQ_CHAOS_SEED")
    report = chaos.run(
        hosts=int(os.environ.get("VIDQ_CHAOS_HOSTS", "3")),
        jobs=int(os.environ.get("VIDQ_CHAOS_JOBS", "200")),
        fault_s=float(os.environ.get("VIDQ_CHAOS_FAULT_S", "300")),
        seed=int(seed) if seed else None,
        workdir=tmp_path,
    )
    print(chaos.table(report))
    assert report.faults, "no fault was injected"
    assert report.passed, chaos.table(report)
