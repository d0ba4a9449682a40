#!/usr/bin/env bash
# A CPU stand-in for a time-budgeted GPU run (benchmarks/gpu_cascade.sh): train one
# configs/mnist_cpu stage for as many steps as the GPU budget gives its configs/mnist
# counterpart, at a chosen learning rate and warmup, then score it with evaluate_imagen.py
# (200 images, seed 0). The results are in benchmarks/RESULTS.md, "The learning rate of a
# budget run" and "The objective of a budget super-resolution stage".
#
#   bash benchmarks/budget_lr_cpu.sh OUT base|sr LR [MNIST_ROOT]
#
# Settings: WARMUP (100), STEPS (base 580 at batch 128, sr 420 at batch 32: what 2.5 minutes
# give each stage on an H200, scaled from a 3-minute run's 717 and 519), WIDTH (unet.base_channels;
# default the config's 32), OBJECTIVE (diffusion.objective, eps or v; default the config's eps),
# SWEEP (guidance weights of the evaluated stage; default base 2,5 and sr 3,4), MIXED_PRECISION
# (training.mixed_precision, e.g. bf16 on a CPU with native bf16; default the config's: float32 on a
# CPU), GROUP_NORMS (unet.group_norm_precision; default the config's float32). The learning rate is
# held constant after the warmup, as the configs' 50,000-step cosine is over those few hundred
# steps. OUT receives the run (OUT/run) and its evaluation (OUT/evaluation/report.json).
set -euo pipefail
source "$(dirname "$0")/caller_paths.sh"
cd "$(dirname "$0")/.."
if [ $# -lt 3 ] || { [ "$2" != base ] && [ "$2" != sr ]; }; then
  echo "usage: bash benchmarks/budget_lr_cpu.sh OUT base|sr LR [MNIST_ROOT]" >&2
  exit 2
fi
OUT=$(from_caller "$1")
STAGE="$2"
LR="$3"
DATA=$(from_caller "${4:-${IMAGEN_MNIST_ROOT:-}}")
DATA="${DATA:-../shared/data}"
if [ -e "$OUT" ]; then echo "error: $OUT already exists; choose another OUT." >&2; exit 2; fi
if [ "$STAGE" = base ]; then
  script=train_base_mnist.py; steps="${STEPS:-580}"; batch=128; sweep="${SWEEP:-2,5}"
else
  script=train_sr_mnist.py; steps="${STEPS:-420}"; batch=32; sweep="${SWEEP:-3,4}"
fi
overrides=()
if [ -n "${WIDTH:-}" ]; then overrides+=(--set "unet.base_channels=$WIDTH"); fi
if [ -n "${OBJECTIVE:-}" ]; then overrides+=(--set "diffusion.objective=$OBJECTIVE"); fi
if [ -n "${MIXED_PRECISION:-}" ]; then overrides+=(--set "training.mixed_precision=$MIXED_PRECISION"); fi
if [ -n "${GROUP_NORMS:-}" ]; then overrides+=(--set "unet.group_norm_precision=$GROUP_NORMS"); fi
mkdir -p "$OUT"
python "$script" --config "configs/mnist_cpu/$STAGE.yaml" --output-dir "$OUT/run" --set "data.root=$DATA" \
  --set "training.batch_size=$batch" --set "training.max_steps=$steps" --set "training.lr=$LR" \
  --set "training.warmup_steps=${WARMUP:-100}" --set training.lr_schedule=constant --set training.ema_decay=0.9999 \
  --set "training.checkpoint_every=$steps" --set "training.sample_every=$steps" "${overrides[@]}"
python evaluate_imagen.py --mode "$STAGE" --checkpoints "$OUT/run" --data-root "$DATA" --num-images 200 --seed 0 \
  --guidance-sweep "$sweep" --output-dir "$OUT/evaluation"
