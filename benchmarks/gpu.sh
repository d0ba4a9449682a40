#!/usr/bin/env bash
# The GPU numbers for benchmarks/RESULTS.md: training throughput, peak memory and model FLOPs
# utilisation of the configs/mnist stages, without and with torch.compile, as JSON lines.
# The U-Nets are the configs'; the text encoder is the offline tiny T5 (GPU machines here
# cannot reach the hub), which only changes the cross-attention width.
#
#   bash benchmarks/gpu.sh ../shared/data > gpu.jsonl
#   STEPS=2 WARMUP=1 BATCH=2 bash benchmarks/gpu.sh ../shared/data   # a quick smoke run
set -euo pipefail
DATA="${1:-../shared/data}"
STEPS="${STEPS:-50}"
WARMUP="${WARMUP:-10}"
extra=()
if [ -n "${BATCH:-}" ]; then extra=(--set "training.batch_size=$BATCH"); fi

for stage in base sr_256; do
  for compile in false true; do
    python benchmarks/bench_train.py --config "configs/mnist/$stage.yaml" --set text_encoder.name=tiny \
      --set "data.root=$DATA" --set "training.compile=$compile" --steps "$STEPS" --warmup "$WARMUP" \
      "${extra[@]}" | python -c "import json, sys; print(json.dumps(json.load(sys.stdin)))"
  done
done
