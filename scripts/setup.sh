#!/usr/bin/env bash
# Create .venv on the first run and install vidq into it with the given extras.
#   bash scripts/setup.sh worker          # what demo.sh needs
#   bash scripts/setup.sh worker,test     # what test.sh needs
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${1:?extras, e.g. worker}]"
