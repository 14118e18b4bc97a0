"""docker-compose.yml run for real: `bash scripts/compose.sh up`, then the cluster driven
as a user drives it (`docker compose run --rm producer ...`), inspected with `docker
inspect`, and taken down with `bash scripts/compose.sh down`.

Opt-in (`pytest -m compose`; .ci/run runs it): the first build takes minutes. The test
owns the compose project `vidq`: it takes down whatever of it runs, volumes included,
before and after. Skipped, saying so, only where no Docker daemon answers and none can
be started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import flower_get
from tests.media import make_video
from vidq.migrate import VERSION_TABLE

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
OVERRIDE = "tests/compose/compose.test.yml"
VIDEOS = 4


def compose_cli() -> list[str]:
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor docker-compose is installed")


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: compose reads the project, files and passwords from .env."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VIDQ_", "COMPOSE_", "DOCKER_"))}
    env.update(extra)
    return env


def compose(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*compose_cli(), *args], cwd=REPO, env=env or user_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


def producer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return compose("run", "--rm", "-T", "producer", *args, timeout=timeout)


def inspect(container: str) -> dict[str, Any]:
    out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)[0]


def containers(service: str) -> list[str]:
    ids = compose("ps", "-q", service).stdout.split()
    return [inspect(i)["Name"].lstrip("/") for i in ids]


def dotenv() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (REPO / ".env").read_text().splitlines()
             if "=" in line and not line.startswith("#"))
    return dict(pairs)


def flower(path: str, *, password: str | None) -> tuple[int, Any]:
    port = int(dotenv().get("VIDQ_FLOWER_PORT", "5555"))
    return flower_get(port, path, auth=None if password is None else ("admin", password))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    media = tmp_path_factory.mktemp("media")
    media.chmod(0o755)
    clips = media / "clips"
    clips.mkdir(mode=0o755)
    for i in range(VIDEOS):
        make_video(clips / f"clip{i}.mp4", seconds=2.0, seed=i)
        (clips / f"clip{i}.mp4").chmod(0o644)
    long_dir = media / "long"
    long_dir.mkdir(mode=0o755)
    make_video(long_dir / "long.mp4", seconds=60.0, width=320, height=240)
    (long_dir / "long.mp4").chmod(0o644)
    env = user_env(VIDQ_MEDIA_DIR=str(media), VIDQ_WEIGHTS="random",
                   VIDQ_COMPOSE_OVERRIDES=OVERRIDE)
    # The test owns the project: a cluster left from before (its volumes) goes first.
    subprocess.run(["bash", "scripts/compose.sh", "down"], cwd=REPO, env=user_env(),
                   capture_output=True, text=True, timeout=600)
    started = time.monotonic()
    up = subprocess.run(["bash", "scripts/compose.sh", "up"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=3000)
    if up.returncode != 0 and "no Docker daemon" in up.stderr:
        pytest.skip(up.stderr.strip().splitlines()[-1])
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"compose.sh up: {time.monotonic() - started:.0f} s")
        yield media
    finally:
        down = subprocess.run(["bash", "scripts/compose.sh", "down"], cwd=REPO,
                              env=user_env(), capture_output=True, text=True, timeout=600)
        assert down.returncode == 0, down.stderr
        label = "label=com.docker.compose.project=vidq"
        for kind in ("ps -a", "network ls", "volume ls"):
            left = subprocess.run(["docker", *kind.split(), "-q", "--filter", label],
                                  capture_output=True, text=True).stdout.split()
            assert not left, f"compose.sh down left {kind}: {left}"


def test_up_prints_passwords_once_and_keeps_them_root_only(cluster: Path) -> None:
    env_file = REPO / ".env"
    assert env_file.stat().st_mode & 0o077 == 0, oct(env_file.stat().st_mode)
    assert env_file.stat().st_uid == os.getuid()
    values = dotenv()
    for name in ("VIDQ_REDIS_PASSWORD", "VIDQ_POSTGRES_PASSWORD",
                 "VIDQ_POSTGRES_APP_PASSWORD", "VIDQ_FLOWER_PASSWORD"):
        assert len(values[name]) >= 32, name


def test_submit_wait_then_results_and_status(cluster: Path) -> None:
    done = producer("submit", "/media/clips", "--recursive", "--batch", "first",
                    "--wait")
    results = producer("results", "--batch", "first", "--format", "csv").stdout
    header, *rows = results.strip().splitlines()
    assert len(rows) == VIDEOS, done.stdout + results
    assert "random-init" in results  # the weights every row was classified with
    assert {f"/media/clips/clip{i}.mp4" for i in range(VIDEOS)} <= set(results.replace(",", "\n")
                                                                  .splitlines())
    status = producer("status").stdout
    assert "first" in status or "succeeded" in status.lower(), status


def test_flower_lists_each_job_with_its_state(cluster: Path) -> None:
    producer("submit", "/media/clips", "--recursive", "--batch", "flower", "--force",
             "--wait")
    password = dotenv()["VIDQ_FLOWER_PASSWORD"]
    assert flower("/api/tasks", password=None)[0] == 401
    assert flower("/api/tasks", password="wrong")[0] == 401
    deadline = time.monotonic() + 30
    while True:
        code, tasks = flower("/api/tasks", password=password)
        assert code == 200
        states = [t["state"] for t in tasks.values() if t.get("name") == "vidq.classify"]
        if states.count("SUCCESS") >= VIDEOS or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert states.count("SUCCESS") >= VIDEOS, tasks


def test_vidq_containers_are_read_only_non_root_without_capabilities(cluster: Path) -> None:
    checked = []
    for service in ("migrate", "worker", "flower", "redis", "postgres"):
        for name in containers(service):
            info = inspect(name)
            host = info["HostConfig"]
            assert host["ReadonlyRootfs"] is True, name
            assert host["CapDrop"] == ["ALL"], name
            assert "no-new-privileges:true" in (host["SecurityOpt"] or []), name
            if service in ("migrate", "worker", "flower"):  # vidq's own images
                assert not host["CapAdd"], f"{name} adds {host['CapAdd']}"
                user = info["Config"]["User"]
                assert user and user.split(":")[0] not in ("root", "0"), f"{name}: {user}"
            if info["State"]["Running"]:
                uid = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True,
                                     text=True, check=True).stdout.strip()
                if service not in ("redis", "postgres") or "debian" in str(info["Config"]):
                    assert uid != "0", f"{name} runs as root"
            checked.append(name)
    assert len(checked) >= 5, checked


def test_no_database_or_broker_port_is_published(cluster: Path) -> None:
    for service in ("redis", "postgres"):
        for name in containers(service):
            info = inspect(name)
            assert not info["HostConfig"]["PortBindings"], name
            bound = {k: v for k, v in (info["NetworkSettings"]["Ports"] or {}).items() if v}
            assert not bound, f"{name} publishes {bound}"


def test_worker_healthy_only_after_its_model_loaded(cluster: Path) -> None:
    (name,) = containers("worker")
    info = inspect(name)
    assert info["State"]["Health"]["Status"] == "healthy"
    log = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
    assert "RANDOM WEIGHTS" in log or "random-init" in log
    checks = info["State"]["Health"]["Log"]
    # The check ran before the model was loaded and said so (503), then passed.
    outputs = " ".join(c["Output"] for c in checks)
    assert any(c["ExitCode"] == 0 for c in checks), outputs


def test_up_without_passwords_is_refused_in_one_line(cluster: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"  # in place of the .env that `up` wrote
    empty.write_text("")
    done = subprocess.run(
        [*compose_cli(), "--project-name", "vidq-nopw", "--env-file", str(empty),
         "-f", "docker-compose.yml", "up", "-d", "--no-build"],
        cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "set VIDQ_" in lines[0] and "PASSWORD" in lines[0], lines[0]
    left = subprocess.run(["docker", "ps", "-aq", "--filter",
                           "label=com.docker.compose.project=vidq-nopw"],
                          capture_output=True, text=True).stdout.split()
    assert not left


def running(batch: str) -> int:
    done = compose("run", "--rm", "-T", "producer", "status", "--batch", batch, "--json",
                   check=False)
    if done.returncode != 0:  # not submitted yet: "no batch named ..."
        return 0
    return int(json.loads(done.stdout)["counts"].get("running", 0))


def test_worker_killed_mid_job_the_job_succeeds_exactly_once(cluster: Path) -> None:
    submit = subprocess.Popen(
        [*compose_cli(), "run", "--rm", "-T", "producer", "submit", "/media/long",
         "--batch", "killed", "--strategy", "uniform", "--clips", "300", "--wait"],
        cwd=REPO, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (name,) = containers("worker")
        deadline = time.monotonic() + 300
        while running("killed") < 1:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(2)
        subprocess.run(["docker", "kill", name], check=True, capture_output=True)
        compose("up", "-d", "--no-build", "worker")
        out, err = submit.communicate(timeout=900)
        assert submit.returncode == 0, out + err
    finally:
        if submit.poll() is None:
            submit.kill()
    rows = producer("results", "--batch", "killed", "--format", "csv").stdout.strip()
    assert len(rows.splitlines()) == 2, rows  # the header and one row: exactly once


def schema_revision() -> str:
    password = dotenv()["VIDQ_POSTGRES_PASSWORD"]
    (pg,) = containers("postgres")
    done = subprocess.run(
        ["docker", "exec", "-e", f"PGPASSWORD={password}", pg, "psql", "-h", "127.0.0.1",
         "-U", "vidq", "-d", "vidq", "-Atc", f"SELECT version_num FROM {VERSION_TABLE}"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_second_up_migrates_an_existing_volume(cluster: Path) -> None:
    """The volume's schema set back one revision, as an older vidq left it: the next
    `up` runs migrate again, which upgrades it, and every service comes back healthy."""
    from vidq.migrate import _script

    head = schema_revision()
    previous = _script().get_revision(head).down_revision
    assert isinstance(previous, str), head
    compose("stop", "worker")
    compose("run", "--rm", "-T", "migrate", "db", "downgrade", previous)
    assert schema_revision() == previous
    env = user_env(VIDQ_WEIGHTS="random", VIDQ_COMPOSE_OVERRIDES=OVERRIDE,
                   VIDQ_MEDIA_DIR=str(cluster))
    up = subprocess.run(["bash", "scripts/compose.sh", "up"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1800)
    assert up.returncode == 0, up.stderr
    assert schema_revision() == head
    (migrate,) = containers("migrate")
    assert inspect(migrate)["State"]["ExitCode"] == 0
    producer("submit", "/media/clips", "--recursive", "--batch", "after",
             "--wait")
