#!/usr/bin/env bash
# The GPU numbers for benchmarks/RESULTS.md: training throughput, peak memory and model FLOPs
# utilisation of the configs/mnist stages in each speed setting, as JSON lines. The U-Nets are
# the configs'; the text encoder is the offline tiny T5 (GPU machines here cannot reach the
# hub), which only changes the cross-attention width.
#
#   bash benchmarks/gpu.sh ../shared/data > gpu.jsonl
#   VARIANTS="eager channels_last" bash benchmarks/gpu.sh ../shared/data   # a subset
#   STEPS=2 WARMUP=1 BATCH=2 bash benchmarks/gpu.sh ../shared/data         # a quick smoke run
#
# VARIANTS (default "eager compile channels_last compile+channels_last"): eager is the configs
# as they are; compile sets training.compile; channels_last sets training.channels_last. A
# variant that fails stops the sweep (set -e), so that no failure passes for a number.
set -euo pipefail
DATA="${1:-../shared/data}"
STEPS="${STEPS:-50}"
WARMUP="${WARMUP:-10}"
KNOWN="eager compile channels_last compile+channels_last"
read -r -a variants <<< "${VARIANTS:-$KNOWN}"
extra=()
if [ -n "${BATCH:-}" ]; then extra=(--set "training.batch_size=$BATCH"); fi

settings_of() {  # settings_of VARIANT: sets the array settings to the variant's --set options
  case "$1" in
    eager) settings=() ;;
    compile) settings=(--set training.compile=true) ;;
    channels_last) settings=(--set training.channels_last=true) ;;
    compile+channels_last) settings=(--set training.compile=true --set training.channels_last=true) ;;
    *) return 1 ;;
  esac
}
if [ ${#variants[@]} -eq 0 ]; then
  echo "error: VARIANTS is empty; name one or more of: $KNOWN." >&2
  exit 2
fi
for variant in "${variants[@]}"; do  # every name checked before anything runs
  if ! settings_of "$variant"; then
    echo "error: VARIANTS: unknown variant '$variant'; expected one of: $KNOWN." >&2
    exit 2
  fi
done

for stage in base sr_256; do
  for variant in "${variants[@]}"; do
    settings_of "$variant"
    python benchmarks/bench_train.py --config "configs/mnist/$stage.yaml" --set text_encoder.name=tiny \
      --set "data.root=$DATA" "${settings[@]}" --steps "$STEPS" --warmup "$WARMUP" "${extra[@]}" \
      | python -c "import json, sys; print(json.dumps({'variant': sys.argv[1], **json.load(sys.stdin)}))" "$variant"
  done
done
