#!/usr/bin/env bash
# Launch a stage on the GPUs of this machine (or a DeepSpeed hostfile), e.g.
#   ./launch.sh sft.py configs/sft_9b.json --lr=1e-5
#   NUM_GPUS=2 ./launch.sh lora.py configs/lora_2b.json
#   HOSTFILE=hosts ./launch.sh sft.py configs/sft_9b.json        # multi-node: "host slots=8" lines
# Without a GPU it starts NUM_GPUS (default 1) CPU ranks, which is how the tests run it.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 SCRIPT.py CONFIG.json [--key=value ...]" >&2
  exit 2
fi
script=$1 config=$2
shift 2
n=${NUM_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
args=(--num_gpus "$n" --master_port "$port")
[ -n "${HOSTFILE:-}" ] && args=(--hostfile "$HOSTFILE" --master_port "$port")
[ -z "${CUDA_VISIBLE_DEVICES:-}" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
  && export DS_ACCELERATOR=cpu
exec deepspeed "${args[@]}" "$script" --config "$config" "$@"
