#!/usr/bin/env bash
# Fetch, into .whl/, the wheels benchmarks/gpu.sh installs on a GPU host that has only
# python3 + torch + torchvision and no network:  bash scripts/gpu_wheels.sh [3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d .whl \
    av sqlalchemy alembic mako markupsafe click tqdm \
    celery kombu billiard vine amqp click-didyoumean click-repl click-plugins \
    python-dateutil six tzlocal tzdata prompt-toolkit wcwidth redis packaging \
    yacs pyyaml termcolor tabulate portalocker parameterized networkx
# Pure-Python projects published only as source: build their wheels here.
python3 -m pip wheel -q --no-deps -w .whl pytorchvideo==0.1.5 fvcore iopath
ls .whl | wc -l
