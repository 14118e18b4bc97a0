"""`vidq status` asks the broker only about jobs that went through one: the embedded
mode (`vidq run`) has no broker, so its status shows no broker line and no warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.submit import JobRequest, submit
from vidq.cli import main
from vidq.db import dispose_engines
from vidq.settings import Settings

REQUEST = JobRequest(model="x3d_xs", weights="random", strategy="single")
NO_BROKER = "redis://127.0.0.1:1/0"  # nothing listens there


def status(env: dict[str, str]) -> str:
    result = CliRunner().invoke(main, ["status"], env=env)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("published", [False, True])
def test_status_asks_the_broker_only_about_jobs_that_went_through_it(
    tmp_path: Path, published: bool
) -> None:
    video = tmp_path / "a.mp4"
    video.write_bytes(b"not decoded by submit")
    url = f"sqlite:///{tmp_path / 'vidq.db'}"
    settings = Settings(database_url=url, broker_url=NO_BROKER)
    # publish=True records the job as sent before it publishes, and the broker is down.
    submit([str(video)], settings=settings, request=REQUEST, batch="b", publish=published)
    dispose_engines()
    out = status({"VIDQ_DATABASE_URL": url, "VIDQ_BROKER_URL": NO_BROKER})
    assert "queued 1" in out
    assert ("broker not reachable" in out) is published, out
