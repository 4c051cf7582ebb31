#!/usr/bin/env bash
# Check a parallel layout on a cluster before a real run: a few training steps on random tokens.
# Multi-node: run on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 bash examples/smoke.sh examples/configs/llama3-8b.yaml
set -euo pipefail
CONFIG=${1:-examples/configs/tiny-cpu.yaml}
shift || true
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m dqo_megatron smoke --config "$CONFIG" "$@"
