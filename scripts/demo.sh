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
    if [ ! -d samples ]; then
        echo "writing 3 sample videos to samples/"
        python benchmarks/corpus.py samples 3 >/dev/null
    fi
fi
db=$(python -c "from vidq.settings import Settings; print(Settings.from_env().database_url)")
echo "classifying $videos into $db (loading the model first)..."
vidq run "$videos" --recursive --batch demo --strategy uniform --clips 3
echo
vidq status --batch demo
echo
vidq results --batch demo

# What the user's own shell needs for the next command to find vidq and the same weights.
next=". .venv/bin/activate"
if [ -n "${VIDQ_WEIGHTS:-}" ] && [ "$VIDQ_WEIGHTS" != pretrained ]; then
    next="$next && export VIDQ_WEIGHTS=$(printf %q "$VIDQ_WEIGHTS")"
fi
echo
echo "Done: the results are in $db. Next, in your shell:"
echo "    $next"
example=$(find "$videos" -type f -name '*.mp4' 2>/dev/null | sort | head -n 1 || true)
echo "    vidq results --batch demo --format csv"
echo "    vidq classify ${example:-VIDEO.mp4}"
echo "More in README.md and docs/usage.md."
