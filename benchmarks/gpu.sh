#!/usr/bin/env bash
# One prepared command for a GPU host, under 8 minutes: `python -m benchmarks gpu` (the
# slow_r50 bf16 forward floor at batch sizes 1-64, the decoders' rate, and `vidq run`'s
# path end to end against the floor).
#
# The host needs python3 with torch and torchvision. Whatever else vidq needs (PyAV,
# SQLAlchemy, Celery, PyTorchVideo...) comes as wheels in .whl/, fetched beforehand on a
# machine with a package index:   bash scripts/gpu_wheels.sh [PYTHON_VERSION]
#   bash benchmarks/gpu.sh [--json gpu.json]      # then, on the GPU host
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/vidq-site .whl/*.whl
    export PYTHONPATH="/tmp/vidq-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
exec timeout 460 python3 -m benchmarks gpu "$@"
