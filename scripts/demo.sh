#!/usr/bin/env bash
# Set up vidq and run the main job on the embedded default: SQLite, no broker.
#   bash scripts/demo.sh [VIDEO_DIR]
# Without VIDEO_DIR it writes three synthetic sample videos to ./samples.
# Weights: VIDQ_WEIGHTS=pretrained (default; downloads once), a checkpoint path, or random.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh worker
. .venv/bin/activate

videos=${1:-}
if [ -z "$videos" ]; then
    videos=samples
    [ -d samples ] || python benchmarks/corpus.py samples 3 >/dev/null
fi

vidq run "$videos" --recursive --batch demo --strategy uniform --clips 3
vidq status --batch demo
vidq results --batch demo
db=$(python -c "from vidq.settings import Settings; print(Settings.from_env().database_url)")
echo
echo "Results are in $db: vidq show JOB_ID, vidq results --format csv, or SQL (see README.md)."
