"""The file a worker opens is the one submitted: a file replaced or touched after submit
fails ``changed_since_submit`` when its content changed, and is classified otherwise."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from producer.submit import JobRequest, submit
from tests.media import make_video
from tests.services import sql
from vidq.settings import Settings

REQUEST = JobRequest(model="x3d_xs", weights="random", strategy="single")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_file_replaced_after_submit_fails_changed_since_submit(
    database_url: str, tmp_path: Path, videos: list[Path]
) -> None:
    """Before: the worker classified whatever was at the path when it got there, and
    recorded those labels against the content hash taken at submit."""
    from worker.embedded import run_jobs

    replaced, touched = tmp_path / "replaced.mp4", tmp_path / "touched.mp4"
    shutil.copy(videos[0], replaced)
    shutil.copy(videos[1], touched)
    settings = Settings(database_url=database_url, model="x3d_xs", weights="random",
                        device="cpu", precision="fp32")
    report = submit([str(replaced), str(touched)], settings=settings, request=REQUEST,
                    batch="changed", publish=False)
    assert len(report.job_ids) == 2
    make_video(tmp_path / "other.mp4", seconds=2.2, seed=4242)
    os.replace(tmp_path / "other.mp4", replaced)  # another video at the same path
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime

    outcomes = {o.job_id: o for o in run_jobs(report.job_ids, settings=settings)}
    rows = {p: (s, k) for p, s, k in sql(
        database_url, "select path, status, error_kind from jobs")}
    assert rows[str(replaced)] == ("failed", "changed_since_submit"), outcomes
    assert rows[str(touched)] == ("succeeded", None), outcomes
    assert sql(database_url, "select count(*) from video_labels v join jobs j on j.id = v.job_id"
                             " where j.status = 'failed'") == [(0,)]
