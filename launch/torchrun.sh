#!/usr/bin/env bash
# Single node:   launch/torchrun.sh train.py --config configs/womens_clothing.yaml --strategy fsdp
# Multi node:    on every node, with the same HEAD_ADDR:
#                NNODES=2 NPROC_PER_NODE=8 HEAD_ADDR=node01 launch/torchrun.sh train.py --config ...
# Any entry script (train.py, evaluate.py) and its arguments follow; c10d rendezvous on HEAD_ADDR:HEAD_PORT.
# NPROC_PER_NODE defaults to the visible GPUs, else SLURM_CPUS_ON_NODE (inside a SLURM allocation), else 2.
# Under SLURM use launch/slurm.sbatch, which sets all of these from the allocation.
set -euo pipefail
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then   # only the GPUs we were given (SLURM --gpus...)
      IFS=, read -ra _gpus <<<"$CUDA_VISIBLE_DEVICES"
      NPROC_PER_NODE=${#_gpus[@]}
    fi
  else
    # CPU runs: one process per CPU of the SLURM allocation on this node, else 2; each process
    # gets its share of the cores. CPU_PROCS overrides.
    NPROC_PER_NODE=${CPU_PROCS:-${SLURM_CPUS_ON_NODE:-2}}
  fi
fi
HEAD_ADDR=${HEAD_ADDR:-127.0.0.1}
HEAD_PORT=${HEAD_PORT:-29500}
RDZV_ID=${RDZV_ID:-mmbert}
if [[ "$NNODES" == 1 && "$HEAD_ADDR" == 127.0.0.1 ]]; then
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}   # single node: any free port
else
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-$HEAD_ADDR:$HEAD_PORT}
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
  --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
  "$@"
