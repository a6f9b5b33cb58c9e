#!/usr/bin/env bash
# Launch `selfdistill train RECIPE` on several processes with accelerate (docs/scaling.md).
#
#   bash scripts/launch.sh MODE RECIPE [key=value ...]
#
# MODE (the accelerate config in recipes/accelerate/):
#   ddp        multi_gpu.yaml         every GPU holds the whole model
#   zero2      deepspeed_zero2.yaml   optimizer states and gradients sharded
#   zero3      deepspeed_zero3.yaml   weights, gradients and optimizer states sharded
#   fsdp2      fsdp2.yaml             PyTorch FSDP2 (see its header for the limits)
#   cpu-ddp    two or more CPU processes over gloo (the CPU demo; no GPU needed)
#   cpu-zero3  DeepSpeed ZeRO-3 on CPU processes over gloo (first run compiles a comm op, ~35 s)
#
# Environment:
#   NUM_PROCESSES  processes per node (default: the GPUs nvidia-smi lists; 2 for cpu-*)
#   NNODES         number of nodes (default 1); run this script once on every node
#   NODE_RANK      this node's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR    address of node 0 (default 127.0.0.1)
#   MASTER_PORT    a free port on node 0 (default 29500)
#
# Examples:
#   bash scripts/launch.sh zero3 recipes/opsd_math.yaml training.max_steps=200
#   NUM_PROCESSES=2 bash scripts/launch.sh cpu-ddp recipes/opsd_arithmetic.yaml training.max_steps=10
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/launch.sh zero3 recipes/opsd_math.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
MODE=$1
RECIPE=$2
shift 2
PY=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
gpus() { (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true; }

EXTRA=()
OVERRIDES=()
case "$MODE" in
  ddp) CONFIG=recipes/accelerate/multi_gpu.yaml ;;
  zero2) CONFIG=recipes/accelerate/deepspeed_zero2.yaml ;;
  zero3) CONFIG=recipes/accelerate/deepspeed_zero3.yaml ;;
  fsdp2) CONFIG=recipes/accelerate/fsdp2.yaml ;;
  cpu-ddp)
    CONFIG=recipes/accelerate/multi_gpu.yaml
    # freed large CPU buffers stay in each process's heap (glibc tunables; docs/performance.md)
    export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647}
    export ACCELERATE_USE_CPU=1   # without it the processes train apart instead of together
    EXTRA=(--mixed_precision no)
    OVERRIDES=(training.use_cpu=true training.bf16=false) ;;
  cpu-zero3)
    CONFIG=recipes/accelerate/deepspeed_zero3.yaml
    export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647}
    export DS_ACCELERATOR=cpu
    unset ACCELERATE_USE_CPU      # CPU mode would switch DeepSpeed off; gloo is named instead
    EXTRA=(--mixed_precision no)
    OVERRIDES=(training.use_cpu=false training.ddp_backend=gloo training.bf16=false) ;;
  *) echo "launch.sh: unknown MODE '$MODE'; use ddp, zero2, zero3, fsdp2, cpu-ddp or cpu-zero3" >&2; exit 2 ;;
esac
case "$MODE" in
  cpu-*) NUM_PROCESSES=${NUM_PROCESSES:-2} ;;
  *)
    NUM_PROCESSES=${NUM_PROCESSES:-$(gpus)}
    # A GPU run must not inherit a CPU recipe's use_cpu: true.
    OVERRIDES=(training.use_cpu=false) ;;
esac
if [ "${NUM_PROCESSES:-0}" -lt 1 ]; then
  echo "launch.sh: no GPU found for MODE=$MODE; set NUM_PROCESSES, or use cpu-ddp / cpu-zero3 on a CPU machine" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

set -x
exec $PY -m accelerate.commands.launch --config_file "$CONFIG" "${EXTRA[@]}" \
  --num_processes $((NUM_PROCESSES * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m selfdistill train "$RECIPE" "${OVERRIDES[@]}" "$@"
