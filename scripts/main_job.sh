#!/usr/bin/env bash
# Set-up, then the main job: OPSD on the embedded SmolLM2-135M-Instruct (evaluate, train, evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
selfdistill train recipes/opsd_arithmetic.yaml "$@"
