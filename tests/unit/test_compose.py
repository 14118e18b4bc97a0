"""The container deployment: docker-compose.yml, Dockerfile and .dockerignore.

No Docker engine runs here, so these tests check what can be checked without one:
``docker-compose config`` (the schema and the interpolation of ``${VAR:-default}``),
the properties the deployment promises (no broker or database port on the host, a
persistent, password-protected Redis, GPU workers with a read-only /media...), that
the Dockerfile's targets install what they should, and that every command the
containers run exists in this checkout.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli import run_vidq
from vidq.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

SETTINGS_VARS = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
# Read by ``vidq worker`` and worker/tasks.py rather than by Settings.
EXTRA_VIDQ_VARS = {"VIDQ_WORKER_PROCESSES"}
# Host-side knobs of docker-compose.yml itself; never passed into a container.
COMPOSE_ONLY_VARS = {
    "VIDQ_REDIS_PASSWORD", "VIDQ_POSTGRES_PASSWORD", "VIDQ_POSTGRES_APP_PASSWORD",
    "VIDQ_FLOWER_USER", "VIDQ_FLOWER_PASSWORD", "VIDQ_MEDIA_DIR",
    "VIDQ_WORKER_REPLICAS", "VIDQ_FLOWER_PORT", "VIDQ_PROMETHEUS_PORT",
}
PASSWORDS = {
    "VIDQ_REDIS_PASSWORD": "r3dis-pw", "VIDQ_POSTGRES_PASSWORD": "pg-pw",
    "VIDQ_POSTGRES_APP_PASSWORD": "app-pw", "VIDQ_FLOWER_PASSWORD": "flower-pw",
}
INIT_SCRIPT = REPO / "deploy" / "postgres-init" / "10-vidq-app-role.sh"

# Stand-ins for torch being absent: what the producer and monitor images run must
# import without it (they do not install it).
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed in this image")
sys.meta_path.insert(0, _NoTorch())
"""


# --- helpers -----------------------------------------------------------------

def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """``${VAR:-default}`` as compose resolves it (enough for this file)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def argv(value: Any) -> list[str]:
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


@dataclasses.dataclass
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append(Mount(str(v.get("source")), v["target"], bool(v.get("read_only"))))
        else:
            parts = interpolate(v).split(":")  # "${VIDQ_MEDIA_DIR:-./media}:/media:ro"
            mode = parts[2] if len(parts) > 2 else "rw"
            out.append(Mount(parts[0], parts[1], "ro" in mode.split(",")))
    return out


def mount_at(service: dict[str, Any], target: str) -> Mount:
    found = [m for m in mounts(service) if m.target == target]
    assert found, f"nothing is mounted at {target}"
    return found[0]


def seconds(duration: str) -> float:
    """Compose durations: ``90s``, ``10m``, ``1h30m``, ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def run_compose_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of the file, resolved against ``env`` only."""
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed "
                    "(apt-get install -y docker-compose)")
    empty_env_file = tmp_path / "empty.env"  # a developer's .env must not leak in
    empty_env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VIDQ_", "COMPOSE_"))}
    return subprocess.run(
        [*command, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True, text=True, cwd=REPO, env={**clean, **env}, timeout=120,
    )


def compose_config(tmp_path: Path, **env: str) -> dict[str, Any]:
    done = run_compose_config(tmp_path, **env)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]


def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    global_args: dict[str, str] = {}  # ARGs before the first FROM: their defaults
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        elif keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda v: global_args[v.group(1)], m.group(1))
            current = Stage(name=m.group(2) or f"stage{len(stages)}", base=base,
                            instructions=[])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
    return stages


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """The last ``keyword`` instruction (USER, ENTRYPOINT...) in effect for a target."""
    for stage in lineage(stages, name):
        for kw, rest in reversed(stage.instructions):
            if kw == keyword:
                return rest
    return None


def pip_installs(stages: dict[str, Stage], name: str) -> list[str]:
    return [rest for stage in lineage(stages, name) for kw, rest in stage.instructions
            if kw == "RUN" and "pip install" in rest]


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last match wins,
    and a pattern that matches a parent directory matches everything under it)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rules.append((negate, pattern))
    parts = path.strip("/").split("/")
    excluded = False
    for negate, pattern in rules:
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        for i in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:i])):
                excluded = not negate
                break
    return excluded


def vidq_script() -> str:
    beside = Path(sys.executable).with_name("vidq")
    found = str(beside) if beside.exists() else shutil.which("vidq")
    assert found, "the vidq console script is not installed (pip install -e .)"
    return found


# --- docker-compose config ---------------------------------------------------

def test_docker_compose_config_validates_with_the_passwords(tmp_path: Path) -> None:
    config = compose_config(tmp_path, **PASSWORDS)
    services = config["services"]
    assert {"redis", "postgres", "worker", "flower", "producer"} <= set(services)
    assert int(services["worker"]["deploy"]["replicas"]) == 1


@pytest.mark.parametrize("missing", sorted(PASSWORDS))
def test_docker_compose_refuses_to_start_without_each_password(
    tmp_path: Path, missing: str
) -> None:
    """No weak default: without a password, `docker compose up` stops and names it."""
    done = run_compose_config(tmp_path, **{k: v for k, v in PASSWORDS.items() if k != missing})
    assert done.returncode != 0, done.stdout
    assert f"set {missing}" in done.stderr
    assert "change-me" not in COMPOSE_FILE.read_text()


def test_passwords_and_paths_reach_every_service(tmp_path: Path) -> None:
    config = compose_config(
        tmp_path, **PASSWORDS, VIDQ_MEDIA_DIR="/srv/videos", VIDQ_WORKER_REPLICAS="3",
    )
    services = config["services"]
    redis = argv(services["redis"]["command"])
    assert redis[redis.index("--requirepass") + 1] == "r3dis-pw"
    assert env_of(services["redis"])["REDISCLI_AUTH"] == "r3dis-pw"  # the health check's
    assert env_of(services["postgres"])["POSTGRES_PASSWORD"] == "pg-pw"
    for name in ("worker", "producer", "flower"):
        settings = Settings.from_env(env_of(services[name]))
        assert settings.broker_url == "redis://:r3dis-pw@redis:6379/0", name
        # The application's own role, not the database owner.
        assert settings.database_url == (
            "postgresql+psycopg://vidq_app:app-pw@postgres:5432/vidq"), name
    migrate = Settings.from_env(env_of(services["migrate"]))
    assert migrate.database_url == "postgresql+psycopg://vidq:pg-pw@postgres:5432/vidq"
    assert env_of(services["postgres"])["APP_DB_PASSWORD"] == "app-pw"
    assert env_of(services["flower"])["FLOWER_BASIC_AUTH"] == "admin:flower-pw"
    for name in ("worker", "producer"):
        media = mount_at(services[name], "/media")
        assert (media.source, media.read_only) == ("/srv/videos", True), name
    assert int(services["worker"]["deploy"]["replicas"]) == 3


# --- the properties promised, read from the file -----------------------------

def test_no_broker_or_database_port_on_the_host() -> None:
    services = raw_compose()["services"]
    for name in ("redis", "postgres"):
        assert not services[name].get("ports"), f"{name} publishes a port to the host"
        assert not services[name].get("expose")
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports") or []:
            published = interpolate(port if isinstance(port, str) else port.get("host_ip", ""))
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_redis_is_persistent_and_password_protected() -> None:
    redis = raw_compose()["services"]["redis"]
    command = argv(redis["command"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${VIDQ_REDIS_PASSWORD")
    assert mount_at(redis, "/data").source == "redis-data"
    assert "redis-data" in raw_compose()["volumes"]
    check = " ".join(argv(redis["healthcheck"]["test"]))
    # redis-cli exits 0 on NOAUTH too: the check must look for PONG.
    assert "redis-cli ping" in check and "PONG" in check


def test_postgres_has_a_volume_a_health_check_and_env_credentials() -> None:
    postgres = raw_compose()["services"]["postgres"]
    assert mount_at(postgres, "/var/lib/postgresql/data").source == "postgres-data"
    assert "pg_isready" in " ".join(argv(postgres["healthcheck"]["test"]))
    env = env_of(postgres)
    assert env["POSTGRES_PASSWORD"].startswith("${VIDQ_POSTGRES_PASSWORD")
    assert env["POSTGRES_USER"] == env["POSTGRES_DB"] == "vidq"


def test_worker_runs_vidq_worker_on_gpus() -> None:
    config = raw_compose()
    worker = config["services"]["worker"]
    assert worker["build"]["target"] == "worker"
    assert argv(worker["entrypoint"]) + argv(worker["command"]) == ["vidq", "worker"]
    deploy = worker["deploy"]
    assert interpolate(deploy["replicas"]) == "1"
    assert "VIDQ_WORKER_REPLICAS" in str(deploy["replicas"])
    devices = deploy["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    media = mount_at(worker, "/media")
    assert media.read_only and media.source == "./media"
    assert any(str(v).startswith("${VIDQ_MEDIA_DIR") for v in worker["volumes"])
    env = env_of(worker)
    cache = mount_at(worker, env["TORCH_HOME"])
    assert cache.source in config["volumes"], "the weights cache is not a named volume"
    assert env["VIDQ_MEDIA_ROOTS"] == "/media"
    for dependency in ("redis", "postgres"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"
    # SIGTERM is a warm shutdown: the grace period must let a job finish.
    assert seconds(worker["stop_grace_period"]) >= 300
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_flower_monitors_the_vidq_celery_app() -> None:
    flower = raw_compose()["services"]["flower"]
    command = argv(flower.get("entrypoint")) + argv(flower["command"])
    assert command[:4] == ["celery", "-A", "worker.tasks", "flower"]
    assert env_of(flower)["VIDQ_BROKER_URL"] == env_of(raw_compose()["services"]["worker"])[
        "VIDQ_BROKER_URL"]


def test_producer_runs_on_demand_with_the_same_settings() -> None:
    services = raw_compose()["services"]
    producer = services["producer"]
    assert producer["build"]["target"] == "producer"
    assert producer.get("profiles"), "`docker compose up` would start the producer"
    assert argv(producer["entrypoint"]) == ["vidq"]
    assert mount_at(producer, "/media").read_only
    worker_env = env_of(services["worker"])
    for key, value in env_of(producer).items():
        assert worker_env.get(key) == value, f"producer and worker disagree on {key}"


def test_containers_are_given_only_real_vidq_settings() -> None:
    """A misspelt VIDQ_* variable would be ignored silently: vidq would use its default."""
    for name, service in raw_compose()["services"].items():
        for key in env_of(service):
            if key.startswith(ENV_PREFIX):
                assert key in SETTINGS_VARS | EXTRA_VIDQ_VARS, f"{name}: {key} is not a setting"
    used = set(re.findall(r"\$\{(VIDQ_\w+)", COMPOSE_FILE.read_text()))
    assert used <= SETTINGS_VARS | COMPOSE_ONLY_VARS, used - SETTINGS_VARS - COMPOSE_ONLY_VARS


def test_default_environment_parses_as_settings() -> None:
    env = interpolate(env_of(raw_compose()["services"]["worker"]), PASSWORDS)
    settings = Settings.from_env(env)
    assert settings.media_roots == ("/media",)
    assert settings.broker_url.startswith("redis://:r3dis-pw@redis:6379/")
    assert settings.database_url.startswith("postgresql+psycopg://vidq_app:")
    assert "r3dis-pw" not in str(settings.public())


def test_every_container_is_read_only_with_no_capabilities(tmp_path: Path) -> None:
    services = compose_config(tmp_path, **PASSWORDS)["services"]
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert any(str(t).startswith("/tmp") for t in service.get("tmpfs", [])), name
    # The official images start as root and drop to their user: only that, added back.
    assert set(services["redis"].get("cap_add", [])) <= {"SETUID", "SETGID"}
    assert set(services["postgres"].get("cap_add", [])) <= {
        "CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"}
    for name in ("worker", "producer", "migrate", "flower"):
        assert not services[name].get("cap_add"), name


def test_postgres_creates_the_application_role_with_row_rights_only() -> None:
    postgres = raw_compose()["services"]["postgres"]
    init = mount_at(postgres, "/docker-entrypoint-initdb.d")
    assert init.read_only and (REPO / init.source.lstrip("./")).resolve() == INIT_SCRIPT.parent
    script = INIT_SCRIPT.read_text()
    assert os.access(INIT_SCRIPT, os.X_OK)
    assert "CREATE ROLE vidq_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE" in script
    grants = re.findall(r"GRANT ([A-Z, ]+) ON", script)
    allowed = {"SELECT", "INSERT", "UPDATE", "DELETE", "USAGE", "CONNECT", "TEMPORARY"}
    assert grants and all(set(g.replace(" ", "").split(",")) <= allowed for g in grants), grants


# --- Dockerfile and build context --------------------------------------------

def test_compose_build_targets_are_dockerfile_stages() -> None:
    stages = dockerfile_stages()
    for name, service in raw_compose()["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, f"{name}: no such Dockerfile target"
    assert stages["base"].base == "python:3.11-slim"


def test_worker_target_installs_the_worker_extra() -> None:
    installs = " ".join(pip_installs(dockerfile_stages(), "worker"))
    extras = re.findall(r"\.\[([\w,]+)\]", installs)
    assert any("worker" in e.split(",") and "postgres" in e.split(",") for e in extras), installs


@pytest.mark.parametrize("target", ["producer", "monitor"])
def test_light_targets_do_not_install_torch(target: str) -> None:
    installs = " ".join(pip_installs(dockerfile_stages(), target))
    assert "torch" not in installs
    for extras in re.findall(r"\.\[([\w,]+)\]", installs):
        assert "worker" not in extras.split(","), installs
    assert "postgres" in installs  # a producer records jobs in PostgreSQL


@pytest.mark.parametrize("target", ["producer", "monitor", "worker"])
def test_images_run_as_a_non_root_user(target: str) -> None:
    user = effective(dockerfile_stages(), target, "USER")
    assert user and user.split(":")[0] not in ("root", "0"), f"{target} runs as {user}"


def test_image_entrypoints_match_compose() -> None:
    stages = dockerfile_stages()
    services = raw_compose()["services"]
    for name, target in (("worker", "worker"), ("producer", "producer"), ("flower", "monitor")):
        entrypoint = yaml.safe_load(effective(stages, target, "ENTRYPOINT") or "[]")
        assert argv(services[name].get("entrypoint")) in ([], entrypoint), name
    worker_cmd = yaml.safe_load(effective(stages, "worker", "CMD") or "[]")
    assert worker_cmd == ["worker"]


def test_build_context_carries_the_package_and_nothing_private() -> None:
    for path in ("pyproject.toml", "README.md", "vidq/cli.py", "worker/tasks.py",
                 "producer/submit.py"):
        assert not dockerignore_excludes(path), f"{path} is left out of the build context"
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/config", ".env",
                 "vidq.db", "media/a.mp4", "vidq/__pycache__/cli.cpython-311.pyc", "tests/e2e"):
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker daemon"
    listed = re.search(r"^packages\s*=\s*\[(.*?)\]", (REPO / "pyproject.toml").read_text(),
                       re.M | re.S)
    assert listed, "pyproject.toml lists no packages"
    for package in re.findall(r'"([\w.]+)"', listed.group(1)):
        assert not dockerignore_excludes(f"{package.replace('.', '/')}/__init__.py"), package


# --- the commands the containers run exist here ------------------------------

@pytest.mark.parametrize("args", [["worker", "--help"], ["submit", "--help"]])
def test_vidq_commands_exist(args: list[str]) -> None:
    vidq_script()  # the console script the containers run is installed
    done = run_vidq(*args, script=True)
    assert done.returncode == 0, done.stderr
    assert "Usage: vidq " + args[0] in done.stdout


def test_worker_tasks_imports() -> None:
    done = subprocess.run([sys.executable, "-c", "import worker.tasks"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr


def test_producer_and_flower_commands_work_without_torch() -> None:
    """The producer and monitor images have no torch: `vidq submit` and
    `celery -A worker.tasks` (what flower loads) must not need it."""
    flower = raw_compose()["services"]["flower"]
    command = argv(flower.get("entrypoint")) + argv(flower["command"])
    app = command[command.index("-A") + 1]
    script = BLOCK_TORCH + f"""
import celery, importlib
module, _, attr = {app!r}.partition(":")
app = getattr(importlib.import_module(module), attr or "app")
assert isinstance(app, celery.Celery), app
assert "vidq.classify" in app.tasks
from vidq.cli import main
main(["submit", "--help"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage: " in done.stdout


def test_worker_health_check_asks_vidq_worker_for_loaded_models() -> None:
    worker = raw_compose()["services"]["worker"]
    port = env_of(worker)["VIDQ_METRICS_PORT"]
    test = " ".join(argv(worker["healthcheck"]["test"]))
    assert f"127.0.0.1:{port}/healthz" in test
    assert seconds(worker["healthcheck"]["start_period"]) >= 300  # weights may download


def test_prometheus_is_optional_and_scrapes_every_worker() -> None:
    services = raw_compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert all(p.startswith("127.0.0.1:") for p in map(str, prometheus["ports"]))
    config_mount = next(m for m in prometheus["volumes"] if "prometheus.yml" in m)
    config = yaml.safe_load((REPO / config_mount.split(":")[0].lstrip("./")).read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    port = int(env_of(services["worker"])["VIDQ_METRICS_PORT"])
    assert sd["names"] == ["worker"] and sd["port"] == port
