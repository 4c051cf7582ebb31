#!/usr/bin/env bash
# Train DQO (or a baseline: override algorithm=dro|sft|rs) with torchrun, on one node or many.
# Every node runs this with the same MASTER_ADDR/MASTER_PORT/NNODES and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 bash examples/train_dqo.sh examples/configs/qwen2-7b-gsm8k-dqo.yaml
# Extra arguments are config overrides, e.g. train.lr=1e-6 run_dir=runs/qwen-dqo-2.
# Resume after a crash or preemption: run the same command; train.resume=auto picks the newest
# complete checkpoint in run_dir/checkpoints.
set -euo pipefail
CONFIG=${1:?usage: train_dqo.sh CONFIG.yaml [key=value ...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's TP/SP overlap wants 1
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m dqo_megatron train --config "$CONFIG" "$@"
