#!/usr/bin/env bash
# Wall time of the full demo (every stage on a fresh 240-case phantom cohort) into a fresh run
# folder. Goal (issue 5): <= 5 minutes on 2 cores. Usage: bench/demo_time.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/bench_demo}"
rm -rf "$run"
SECONDS=0
"${MEDPIPE:-.venv/bin/medpipe}" demo --run "$run" 2>/dev/null | tail -n 6
echo "demo wall time: ${SECONDS} s (goal <= 300 s)"
