#!/usr/bin/env bash
# Create .venv on the first run and install vidq into it with the given extras.
#   bash scripts/setup.sh worker          # what demo.sh needs
#   bash scripts/setup.sh worker,test     # what test.sh needs
# pip's output goes to .venv/install.log and is shown only if the install fails. An
# install is redone only when the extras or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${1:?extras, e.g. worker}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv .venv
fi
installed=".venv/vidq-installed"
wanted="[$extras] $(cksum < pyproject.toml | cut -d' ' -f1)"
if grep -qxF "$wanted" "$installed" 2>/dev/null; then
    exit 0
fi
echo "installing vidq[$extras] into .venv (first run: a few minutes; log in .venv/install.log)..."
log=.venv/install.log
if ! { .venv/bin/python -m pip install --upgrade pip \
       && .venv/bin/python -m pip install -e ".[$extras]"; } >"$log" 2>&1; then
    tail -n 25 "$log" >&2
    echo "setup.sh: installing vidq[$extras] failed; the whole output is in $log" >&2
    exit 1
fi
echo "$wanted" >>"$installed"
