#!/usr/bin/env bash
# The CPU quality benchmark (issue 7): train the configs/mnist_cpu cascade from scratch, one stage
# after the other (each sized for about 20 minutes on a 2-core CPU), then evaluate the whole
# cascade with a guidance sweep.
#
#   bash benchmarks/quality_cpu.sh [OUTPUT_DIR] [MNIST_ROOT]
#
# OUTPUT_DIR (default runs/quality_cpu) receives base/, sr/, timings.txt and evaluation/
# (report.json, sweep.csv, sweep.png, samples/). Running it again resumes whatever is unfinished
# (a stage stopped before its first checkpoint starts anew); a stage already at its last step is
# not retrained, and a finished evaluation is not repeated.
#
# The evaluation samples 500 images per guidance weight with 25-step ancestral sampling in both
# stages, so the six-weight sweep fits in about half an hour on 2 cores (1,000 images with the
# configs' 100 steps would take about eight times as long). Override with NUM_IMAGES, STEPS,
# SAMPLER and SWEEP.
set -euo pipefail
source "$(dirname "$0")/caller_paths.sh"
source "$(dirname "$0")/run_flags.sh"
cd "$(dirname "$0")/.."
OUT=$(from_caller "${1:-}")
OUT="${OUT:-runs/quality_cpu}"
DATA=$(from_caller "${2:-${IMAGEN_MNIST_ROOT:-}}")
DATA="${DATA:-../shared/data}"
SWEEP="${SWEEP:-0,1,2,3,5,7}"
NUM_IMAGES="${NUM_IMAGES:-500}"
STEPS="${STEPS:-25}"
SAMPLER="${SAMPLER:-ddpm}"
mkdir -p "$OUT"

train() {  # train <script> <config> <run folder>
  local flags
  read -r -a flags <<< "$(pick_up "$3")"
  local start=$SECONDS
  python "$1" --config "$2" --set "data.root=$DATA" --output-dir "$3" "${flags[@]}"
  echo "$(basename "$3"): $((SECONDS - start)) s ${flags[*]}" | tee -a "$OUT/timings.txt"
}

train train_base_mnist.py configs/mnist_cpu/base.yaml "$OUT/base"
train train_sr_mnist.py configs/mnist_cpu/sr.yaml "$OUT/sr"

if [ -f "$OUT/evaluation/report.json" ]; then
  echo "evaluation: already done ($OUT/evaluation/report.json)"
  exit 0
fi
start=$SECONDS
python evaluate_imagen.py --mode cascade --checkpoints "$OUT/base" "$OUT/sr" --data-root "$DATA" \
  --num-images "$NUM_IMAGES" --steps "$STEPS" --sampler "$SAMPLER" --guidance-sweep "$SWEEP" \
  --output-dir "$OUT/evaluation"
echo "evaluation: $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
