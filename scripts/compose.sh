#!/usr/bin/env bash
# The cluster of docker-compose.yml on this host, project "vidq":
#
#   bash scripts/compose.sh up     build what is missing, start every service, wait until healthy
#   bash scripts/compose.sh down   remove the containers, networks and volumes (and .env)
#
# `up` generates the passwords once, prints them, and keeps them in .env (mode 600, beside
# docker-compose.yml), where `docker compose` (or docker-compose) reads them: afterwards
#   docker compose run --rm producer submit /media --recursive --batch nightly --wait
# works from this directory as docker-compose.yml describes. Videos: VIDQ_MEDIA_DIR
# (default ./media), mounted read-only at /media.
#
# Where Docker Hub is out of reach, the base image, Redis and PostgreSQL are built from
# Debian's packages (deploy/debian/, deploy/compose.debian.yml). Without an NVIDIA
# container runtime the worker runs on CPU, without the GPU reservation.
# Images are built with BuildKit, so their layers are cached between runs. Settings:
#   VIDQ_COMPOSE_IMAGES=hub|debian   skip the Docker Hub probe
#   VIDQ_COMPOSE_DEVICE=gpu|cpu      skip the NVIDIA runtime probe
#   VIDQ_WORKER_PIP_ARGS             the worker image's extra pip arguments (see below)
#   VIDQ_COMPOSE_OVERRIDES           more compose files, ':'-separated, applied last
#   VIDQ_WEIGHTS, VIDQ_MODEL...      passed on to the containers as docker-compose.yml says
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export COMPOSE_PROJECT_NAME=vidq
ENV_FILE=.env
ENV_MARK="# Written by scripts/compose.sh; removed by its down."
CPU_FILE=.compose-cpu.yml
DOCKERD_LOG=/var/log/vidq-dockerd.log

say() { echo "compose.sh: $*" >&2; }
die() { say "$*"; exit 1; }

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        docker-compose "$@"
    else
        die "neither 'docker compose' nor docker-compose is installed (Debian: apt-get install docker-compose)"
    fi
}

apt_install() {  # as root with apt-get only; otherwise say what is missing
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    say "installing $* (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1
    }
}

ensure_daemon() {
    docker info >/dev/null 2>&1 && return 0
    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io || die "no Docker daemon answers and dockerd is not installed" \
            "(Debian, as root: apt-get install docker.io)"
    fi
    command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
        || apt_install docker-compose || true
    docker info >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "no Docker daemon answers, and only root can start one here"
    say "starting dockerd (log: $DOCKERD_LOG)"
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "dockerd did not start within 60 s: see $DOCKERD_LOG"
}

# `docker build` with BuildKit (build secrets, cached layers): the buildx plugin, or a
# Docker CLI older than 23 whose BuildKit client is built in (Debian's docker.io).
build() {
    if docker buildx version >/dev/null 2>&1; then
        docker buildx build --load "$@"
        return
    fi
    local cli
    for cli in $(type -ap docker); do
        case "$("$cli" version --format '{{.Client.Version}}' 2>/dev/null)" in
            1[0-9].*|2[0-2].*) DOCKER_BUILDKIT=1 "$cli" build "$@"; return ;;
        esac
    done
    die "building needs BuildKit: install the docker buildx plugin (Debian: docker-buildx)"
}

pip_cert() {  # the CA bundle this host's pip trusts, if it has one of its own
    local cert="${PIP_CERT:-}"
    [ -n "$cert" ] || cert=$(pip config get global.cert 2>/dev/null || true)
    [ -n "$cert" ] && [ -s "$cert" ] && echo "$cert"
    return 0
}

images_source() {
    if [ -n "${VIDQ_COMPOSE_IMAGES:-}" ]; then echo "$VIDQ_COMPOSE_IMAGES"; return; fi
    if docker image inspect python:3.11-slim >/dev/null 2>&1 \
        || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        echo hub
    else
        echo debian
    fi
}

device() {
    if [ -n "${VIDQ_COMPOSE_DEVICE:-}" ]; then echo "$VIDQ_COMPOSE_DEVICE"; return; fi
    if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
        echo gpu
    else
        echo cpu
    fi
}

build_debian_images() {
    if ! docker image inspect vidq-debian:bookworm >/dev/null 2>&1; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap \
            || die "Docker Hub is out of reach and debootstrap is missing (apt-get install debootstrap)"
        local rootfs
        rootfs=$(mktemp -d /var/tmp/vidq-rootfs.XXXXXX)
        say "Docker Hub is out of reach: building a Debian bookworm base (debootstrap, about a minute)"
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv bookworm \
            "$rootfs" http://deb.debian.org/debian >/dev/null \
            || { rm -rf "$rootfs"; die "debootstrap failed (it needs deb.debian.org)"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import - vidq-debian:bookworm >/dev/null
        rm -rf "$rootfs"
    fi
    build -q -t vidq-python:3.11-bookworm -f deploy/debian/python.Dockerfile deploy/debian >/dev/null
    build -q -t vidq-redis:bookworm -f deploy/debian/redis.Dockerfile deploy/debian >/dev/null
    build -q -t vidq-postgres:bookworm -f deploy/debian/postgres.Dockerfile deploy/debian >/dev/null
}

# The worker's torch is PyPI's default build (CUDA, and CPU where no GPU is seen).
# PyTorch's CPU-only wheels make a far smaller image where they can be reached:
#   VIDQ_WORKER_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# (a CPU torch needs torchvision's CPU build too: PyPI's torchvision needs CUDA torch).
build_vidq_images() {  # $1: the base image
    local base=$1 secret=() cert
    cert=$(pip_cert)
    [ -n "$cert" ] && secret=(--secret "id=pip_cert,src=$cert")
    local target
    for target in producer monitor worker; do
        say "building vidq-$target"
        build -q "${secret[@]}" --build-arg "BASE=$base" --build-arg "WORKER_PIP_ARGS=${VIDQ_WORKER_PIP_ARGS:-}" \
            --target "$target" -t "vidq-$target" . >/dev/null \
            || die "building vidq-$target failed (run again without -q to see why)"
    done
}

# docker-compose.yml less the worker's GPU reservation: Compose v1 cannot delete a key
# in an override file, and a reservation of driver nvidia fails without the toolkit.
write_cpu_file() {
    python3 - "$CPU_FILE" <<'PY'
import sys
import yaml
with open("docker-compose.yml") as f:
    config = yaml.safe_load(f)
config = {k: v for k, v in config.items() if not k.startswith("x-")}
deploy = config["services"]["worker"]["deploy"]
deploy.pop("resources", None)
with open(sys.argv[1], "w") as f:
    f.write("# Generated by scripts/compose.sh from docker-compose.yml: the worker without\n"
            "# its GPU reservation, for a host without the NVIDIA container toolkit.\n")
    yaml.safe_dump(config, f, sort_keys=False, width=100)
PY
}

password() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }

write_env() {  # $1: COMPOSE_FILE, $2: gpu|cpu
    if [ -e "$ENV_FILE" ] && ! grep -qxF "$ENV_MARK" "$ENV_FILE"; then
        die "$ENV_FILE exists and was not written by this script: move it away, or run" \
            "docker compose with it yourself"
    fi
    local media="${VIDQ_MEDIA_DIR:-./media}" fresh=0 name
    mkdir -p "$media"
    media=$(cd "$media" && pwd)
    if [ ! -e "$ENV_FILE" ]; then
        fresh=1
        (umask 077; {
            echo "$ENV_MARK"
            for name in VIDQ_REDIS_PASSWORD VIDQ_POSTGRES_PASSWORD VIDQ_POSTGRES_APP_PASSWORD \
                        VIDQ_FLOWER_PASSWORD; do
                echo "$name=$(password)"
            done
        } >"$ENV_FILE")
    fi
    # Keep the passwords (the volumes were initialised with them); rewrite the rest.
    local keep
    keep=$(grep -E '^VIDQ_(REDIS|POSTGRES|POSTGRES_APP|FLOWER)_PASSWORD=' "$ENV_FILE")
    (umask 077; {
        echo "$ENV_MARK"
        echo "$keep"
        echo "COMPOSE_PROJECT_NAME=vidq"
        echo "COMPOSE_FILE=$1"
        echo "VIDQ_MEDIA_DIR=$media"
        [ "$2" = cpu ] && echo "VIDQ_DEVICE=cpu"
        for name in VIDQ_WEIGHTS VIDQ_MODEL VIDQ_WEIGHTS_SHA256 VIDQ_QUEUE VIDQ_EMBEDDINGS \
                    VIDQ_WORKER_CONCURRENCY VIDQ_WORKER_REPLICAS VIDQ_FLOWER_PORT; do
            [ -z "${!name:-}" ] || echo "$name=${!name}"
        done
    } >"$ENV_FILE.new")
    mv "$ENV_FILE.new" "$ENV_FILE"
    if [ "$fresh" = 1 ]; then
        echo "Generated passwords (kept in $REPO/$ENV_FILE, readable by $(id -un) only):"
        grep -E '_PASSWORD=' "$ENV_FILE" | sed 's/^/  /'
    fi
}

wait_healthy() {
    local deadline=$((SECONDS + ${VIDQ_COMPOSE_WAIT_S:-900})) ids id state pending
    ids=$(compose ps -q)
    [ -n "$ids" ] || die "no container was started"
    while :; do
        pending=""
        for id in $ids; do
            state=$(docker inspect --format \
                '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")
            set -- $state
            case "$2/$3" in
                running/healthy|running/none) ;;
                exited/none) [ "$4" = 0 ] || die "${1#/} exited with status $4: docker logs ${1#/}" ;;
                exited/*|dead/*) die "${1#/} stopped: docker logs ${1#/}" ;;
                *) pending="$pending ${1#/}($3)" ;;
            esac
        done
        [ -z "$pending" ] && return 0
        [ $SECONDS -lt "$deadline" ] || die "not healthy in time:$pending (docker logs NAME)"
        sleep 2
    done
}

up() {
    ensure_daemon
    local source dev base files
    source=$(images_source)
    dev=$(device)
    files=docker-compose.yml
    if [ "$source" = debian ]; then
        build_debian_images
        base=vidq-python:3.11-bookworm
    else
        base=python:3.11-slim
    fi
    if [ "$dev" = cpu ]; then
        write_cpu_file
        files=$CPU_FILE
    fi
    [ "$source" = debian ] && files="$files:deploy/compose.debian.yml"
    [ -z "${VIDQ_COMPOSE_OVERRIDES:-}" ] || files="$files:$VIDQ_COMPOSE_OVERRIDES"
    say "images: $source, worker device: $dev"
    build_vidq_images "$base"
    write_env "$files" "$dev"
    compose up -d --no-build
    wait_healthy
    say "every service is healthy; try: docker compose run --rm producer status" \
        "(or docker-compose)"
}

down() {
    docker info >/dev/null 2>&1 || { say "no Docker daemon answers: nothing to take down"; return 0; }
    if [ -e "$ENV_FILE" ] && grep -qxF "$ENV_MARK" "$ENV_FILE"; then
        compose --profile tools --profile monitoring down --volumes --remove-orphans \
            --timeout 30 2>/dev/null || compose down --volumes --remove-orphans --timeout 30
        rm -f "$ENV_FILE" "$CPU_FILE"
    else
        # Without the .env it wrote: remove the project's resources by their label.
        local label=com.docker.compose.project=vidq
        docker ps -aq --filter "label=$label" | xargs -r docker rm -f >/dev/null
        docker network ls -q --filter "label=$label" | xargs -r docker network rm >/dev/null
        docker volume ls -q --filter "label=$label" | xargs -r docker volume rm >/dev/null
        rm -f "$CPU_FILE"
    fi
    say "the vidq cluster is down: no container, network or volume of it is left"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) die "usage: bash scripts/compose.sh up | down" ;;
esac
