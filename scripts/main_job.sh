#!/usr/bin/env bash
# Set-up, then the main job: OPSD on the embedded SmolLM2-135M-Instruct (evaluate, train, evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# CPU training allocates and frees several embedding-sized buffers a step (113 MiB each here); glibc would give each
# a fresh mmap and fault it in page by page again. Keep freed blocks in the heap instead (set where the process
# starts, never from inside the library; docs/performance.md). An allocator setting of your own wins.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647}
selfdistill train recipes/opsd_arithmetic.yaml "$@"
