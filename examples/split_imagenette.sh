#!/usr/bin/env bash
# Learn split-imagenette task by task with the small CLIP in ../shared/bench (no download needed).
# Usage: examples/split_imagenette.sh [BENCH_DIR] [WORKSPACE] [TASKS]
set -euo pipefail
bench=${1:-../shared/bench}
ws=${2:-./imagenette-ws}
tasks=${3:-5}
clipcl init -w "$ws" --model "$bench/MiniCLIP-64.json" --pretrained "$bench/miniclip-B-cifar10.safetensors"
for t in $(seq 1 "$tasks"); do
  clipcl add-task -w "$ws" "$bench/split-imagenette/task-$t"
done
clipcl tasks -w "$ws"
clipcl eval -w "$ws"
python examples/zero_shot_reference.py "$bench/split-imagenette" --tasks "$tasks" \
  --model "$bench/MiniCLIP-64.json" --pretrained "$bench/miniclip-B-cifar10.safetensors"
