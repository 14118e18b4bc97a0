#!/usr/bin/env bash
# Set up (first run) and run the whole test suite:  bash scripts/test.sh [pytest args]
# Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (trust auth,
# database "test"); starts them if they are installed but not running.
# `bash scripts/test.sh tests/unit` runs the unit tier alone, without them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh worker,test
. .venv/bin/activate
# Debian packages the tests use: docker-compose validates docker-compose.yml (no
# Docker engine needed); libfaketime gives a fault-test host its own clock.
missing=""
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$missing faketime libfaketime"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    (apt-get install -y -q $missing >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null 2>&1)) || \
        echo "test.sh: could not install$missing; the tests that need them say so" >&2
fi
# The viewer's browser tests drive Debian's chromium-headless-shell (Playwright's own
# browser download cannot work here); without it they are skipped, saying so.
if ! dpkg -s chromium-headless-shell >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q chromium-headless-shell >/dev/null 2>&1 || \
         (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium-headless-shell >/dev/null 2>&1)) || \
            echo "test.sh: could not install chromium-headless-shell; the browser tests will be skipped" >&2
    else
        echo "test.sh: chromium-headless-shell is not installed and this is not root with apt-get;" \
             "the viewer's browser tests will be skipped (as root: apt-get install chromium-headless-shell)" >&2
    fi
fi
# A run of tests/unit alone (every argument that names a file or directory is under
# it) needs no Redis or PostgreSQL: the services are neither checked nor started.
paths=$(for arg in "$@"; do [ -e "${arg%%::*}" ] && printf '%s\n' "${arg#./}"; done || true)
if [ -z "$paths" ] || grep -qv '^tests/unit\(/\|::\|$\)' <<<"$paths"; then
    bash scripts/services.sh
fi
if [ -z "$paths" ]; then
    echo "test.sh: the whole default run takes about 20 minutes on 2 cores;" \
         "tests/unit alone runs in under a minute (bash scripts/test.sh tests/unit)."
fi
# -v names each test as it starts (some run for minutes); count style numbers them.
# A -q among the arguments (as .ci/run gives) takes the names back out.
exec python -m pytest -v -o console_output_style=count "$@"
