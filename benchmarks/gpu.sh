#!/usr/bin/env bash
# The GPU numbers for benchmarks/RESULTS.md: training throughput, peak memory and model FLOPs
# utilisation of the configs/mnist stages in each speed setting, as JSON lines. The U-Nets are
# the configs'; the text encoder is the offline tiny T5 (GPU machines here cannot reach the
# hub), which only changes the cross-attention width.
#
#   bash benchmarks/gpu.sh ../shared/data > gpu.jsonl
#   VARIANTS="eager channels_last" bash benchmarks/gpu.sh ../shared/data   # a subset
#   STEPS=2 WARMUP=1 BATCH=2 bash benchmarks/gpu.sh ../shared/data         # a quick smoke run
#   STAGES=base TIMEOUT=240 bash benchmarks/gpu.sh .mnist > $OUT/gpu.jsonl  # on a lent GPU
#
# VARIANTS (default "eager float32_norms compile channels_last compile+channels_last"): eager is
# the configs as they are (their group norms in bf16); float32_norms sets
# unet.group_norm_precision=float32 (CUDA autocast's float32 norms, with a cast to float32 and
# back around each); compile sets training.compile; channels_last sets training.channels_last.
# STAGES (default "base sr_256"): the configs/mnist stages, measured in this order.
# TIMEOUT (seconds a measurement may take, default 0: no limit).
# Each measurement prints its line as it ends: bench_train.py's JSON with the stage, the variant
# and wall_s (its whole time, compiling included), or {"stage", "variant", "error"} when it
# failed, ran out of TIMEOUT, or torch.compile cannot build kernels here (a probe of a few
# seconds checks that first). A failure does not stop the sweep, so that the other numbers
# still come, but the script then exits 1: no failure passes for a number.
set -euo pipefail
source "$(dirname "$0")/caller_paths.sh"
cd "$(dirname "$0")/.."
# bench_train.py imports imagen from this checkout: a lent GPU machine has it uninstalled.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA="$(from_caller "${1:-../shared/data}")"
STEPS="${STEPS:-50}"
WARMUP="${WARMUP:-10}"
TIMEOUT="${TIMEOUT:-0}"
KNOWN="eager float32_norms compile channels_last compile+channels_last"
KNOWN_STAGES="base sr_256"
read -r -a variants <<< "${VARIANTS:-$KNOWN}"
read -r -a stages <<< "${STAGES:-$KNOWN_STAGES}"
extra=()
if [ -n "${BATCH:-}" ]; then extra=(--set "training.batch_size=$BATCH"); fi

settings_of() {  # settings_of VARIANT: sets the array settings to the variant's --set options
  case "$1" in
    eager) settings=() ;;
    float32_norms) settings=(--set unet.group_norm_precision=float32) ;;
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
if [ ${#stages[@]} -eq 0 ]; then echo "error: STAGES is empty; name one or both of: $KNOWN_STAGES." >&2; exit 2; fi
for stage in "${stages[@]}"; do
  if [[ " $KNOWN_STAGES " != *" $stage "* ]]; then
    echo "error: STAGES: unknown stage '$stage'; expected one of: $KNOWN_STAGES (configs/mnist)." >&2
    exit 2
  fi
done
if ! [[ $TIMEOUT =~ ^[0-9]+$ ]]; then
  echo "error: TIMEOUT '$TIMEOUT': expected whole seconds (0: no limit)." >&2
  exit 2
fi

source benchmarks/seconds_since.sh
line() {  # line STAGE VARIANT WALL_S ERROR: one JSON line; bench_train.py's JSON on stdin when ERROR is empty
  python -c 'import json, sys
stage, variant, wall, error = sys.argv[1:]
fields = {"error": error} if error else {**json.load(sys.stdin), "wall_s": float(wall)}
print(json.dumps({"stage": stage, "variant": variant, **fields}), flush=True)' "$@"
}

compile_problem=""
if [[ " ${variants[*]} " == *" compile"* ]]; then  # Inductor needs a working compiler toolchain for the device
  if ! probe=$(python -c 'import torch
device = "cuda" if torch.cuda.is_available() else "cpu"
try:
    torch.compile(lambda x: x.sin() + 1)(torch.ones(8, device=device))
except Exception as error:  # its first line names the cause (no compiler, no Python headers, ...)
    raise SystemExit(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}")' 2>&1); then
    compile_problem="torch.compile cannot build kernels on this machine ($(printf '%s' "$probe" | tail -n 1))"
    echo "error: $compile_problem. The compiled variants are skipped." >&2
  fi
fi

failed=0
for stage in "${stages[@]}"; do
  for variant in "${variants[@]}"; do
    settings_of "$variant"
    if [[ $variant == compile* && -n $compile_problem ]]; then
      line "$stage" "$variant" 0 "$compile_problem" < /dev/null
      failed=1
      continue
    fi
    start=$(date +%s.%N)
    if result=$(timeout "$TIMEOUT" python benchmarks/bench_train.py --config "configs/mnist/$stage.yaml" \
        --set text_encoder.name=tiny --set "data.root=$DATA" "${settings[@]}" --steps "$STEPS" --warmup "$WARMUP" \
        "${extra[@]}"); then
      line "$stage" "$variant" "$(seconds_since "$start")" "" <<< "$result"
    else
      status=$?
      reason="bench_train.py exited with status $status after $(seconds_since "$start") s"
      if [ "$status" -eq 124 ]; then reason="ran out of TIMEOUT=$TIMEOUT s"; fi
      line "$stage" "$variant" 0 "$reason" < /dev/null
      failed=1
    fi
  done
done
exit "$failed"
