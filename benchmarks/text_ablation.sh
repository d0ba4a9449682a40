#!/usr/bin/env bash
# Imagen's text-conditioning ablation (Saharia et al. 2022, Sec. 4.4 and Fig. 4) at MNIST scale:
# the CPU scene base stage (configs/mnist_scenes_cpu/base.yaml) trained once per variant, each
# evaluated through the cascade with the same super-resolution stage, on scene captions.
#
#   bash benchmarks/text_ablation.sh OUT SR_RUN [MNIST_ROOT]
#
# Variants, all by --set on the shipped config:
#   both               pooled text vector + cross-attention (the default, as in Imagen)
#   cross_attention    cross-attention only        (unet.text_pooling=none)
#   pooled_mean        mean-pooled vector only     (unet.text_pooling=mean, no cross-attention)
#   pooled_attention   attention-pooled only       (unet.text_pooling=attention, no cross-attention)
#   no_layernorm       both, without the LayerNorm on text (unet.text_layernorm=false)
# SR_RUN is a trained configs/mnist_scenes_cpu/sr.yaml run. Settings: ENCODER (text_encoder.name of
# the base stage, default the config's random tiny-scenes; tiny-scenes-pretrained is that T5
# pretrained on text, and with internet e.g. google/t5-v1_1-small vs -base compares T5 sizes:
# the paper's other finding), NUM_IMAGES (500), GUIDANCE (base stage weight, 3), VARIANTS,
# EXTRA (more --set arguments for every training, e.g. a shorter schedule) and STEPS (sampling steps).
# OUT/<variant>/ holds the run and evaluation/; OUT/summary.md the table. Running it again skips
# what is finished and resumes an unfinished training.
set -euo pipefail
source "$(dirname "$0")/caller_paths.sh"
source "$(dirname "$0")/run_flags.sh"
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then echo "usage: bash benchmarks/text_ablation.sh OUT SR_RUN [MNIST_ROOT]" >&2; exit 2; fi
OUT=$(from_caller "$1")
SR_RUN=$(from_caller "$2")
DATA=$(from_caller "${3:-${IMAGEN_MNIST_ROOT:-}}")
DATA="${DATA:-../shared/data}"
encoder=()
if [ -n "${ENCODER:-}" ]; then encoder=(--set "text_encoder.name=$ENCODER"); fi
NUM_IMAGES="${NUM_IMAGES:-500}"
GUIDANCE="${GUIDANCE:-3}"
VARIANTS="${VARIANTS:-both cross_attention pooled_mean pooled_attention no_layernorm}"
read -r -a extra <<< "${EXTRA:-}"
sampling=()
if [ -n "${STEPS:-}" ]; then sampling=(--steps "$STEPS"); fi
mkdir -p "$OUT"

settings() {
  case "$1" in
    both) ;;
    cross_attention) echo "--set unet.text_pooling=none" ;;
    pooled_mean) echo "--set unet.text_pooling=mean --set unet.cross_attention_resolutions=[]" ;;
    pooled_attention) echo "--set unet.text_pooling=attention --set unet.cross_attention_resolutions=[]" ;;
    no_layernorm) echo "--set unet.text_layernorm=false" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

for variant in $VARIANTS; do
  run="$OUT/$variant"
  # shellcheck disable=SC2046  # the settings are words
  set -- $(settings "$variant")
  if [ ! -f "$run/evaluation/report.json" ]; then
    read -r -a resume <<< "$(pick_up "$run")"
    start=$SECONDS
    python train_base_mnist.py --config configs/mnist_scenes_cpu/base.yaml --output-dir "$run" \
      --set "data.root=$DATA" "${encoder[@]}" "$@" "${extra[@]}" "${resume[@]}"
    echo "$variant: trained in $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
    python evaluate_imagen.py --mode scenes --checkpoints "$run" "$SR_RUN" --data-root "$DATA" \
      --num-images "$NUM_IMAGES" --guidance-sweep "$GUIDANCE" --output-dir "$run/evaluation" "${sampling[@]}"
  fi
done

python - "$OUT" $VARIANTS <<'EOF'
import json
import sys
from pathlib import Path

out, variants = Path(sys.argv[1]), sys.argv[2:]
lines = ["| variant | seen | held-out | place | relation | layout | count | cell accuracy |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for variant in variants:
    report = json.loads((out / variant / "evaluation" / "report.json").read_text())
    r = report["results"][0]
    family = r["family_satisfaction"]
    lines.append(f"| {variant} | {r['seen_satisfaction']:.3f} | {r['held_out_satisfaction']:.3f} | "
                 + " | ".join(f"{family[name]:.3f}" for name in ("place", "relation", "layout", "count"))
                 + f" | {r['cell_accuracy']:.3f} |")
ceiling = report["ceiling"]
lines.append(f"| real canvases (ceiling) | {ceiling['seen_satisfaction']:.3f} | {ceiling['held_out_satisfaction']:.3f} | "
             + " | ".join(f"{ceiling['family_satisfaction'][n]:.3f}" for n in ("place", "relation", "layout", "count"))
             + f" | {ceiling['cell_accuracy']:.3f} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
