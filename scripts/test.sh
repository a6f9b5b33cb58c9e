#!/usr/bin/env bash
# Set-up, then the test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m ruff check selfdistill tests benchmarks
$PY -m pytest -q tests "$@"
