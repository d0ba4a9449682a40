#!/usr/bin/env bash
# Time to quality of the two diffusion formulations on the CPU base stage: configs/mnist_cpu/base.yaml
# (ddpm) against configs/mnist_cpu/base_edm.yaml (edm), the same network, data and 2000-step budget.
#
#   bash benchmarks/formulations_cpu.sh OUT SR_RUN [MNIST_ROOT]
#
# Each formulation is trained once with a checkpoint every 250 steps (all kept). Every checkpoint
# is evaluated alone (evaluate_imagen.py --mode base: prompt accuracy and classifier-FID at 16 px,
# CHECKPOINT_IMAGES images, default 200), which gives the steps each needs to reach 0.95 prompt
# accuracy; the last one is also evaluated through the cascade with the trained super-resolution
# stage SR_RUN (a configs/mnist_cpu/sr.yaml run, shared by both, NUM_IMAGES images, default 500).
# Every evaluation samples with its stage's shipped sampler and step count (ddpm: dpmpp_2m_sde, 50
# steps; edm: heun_stochastic, 25 steps, 49 network evaluations) and guidance, seed 0.
# OUT/<formulation>/ holds the run and its evaluations; OUT/summary.md the table. Running it again
# skips what is finished and resumes an unfinished training. FORMULATIONS limits the list; STEPS
# (2000) and EVERY (250) change the budget and the checkpoint spacing; EXTRA adds --set arguments to
# both trainings and EVAL_STEPS sets every evaluation's sampling steps (both for a smoke run);
# EDM_SAMPLER evaluates the edm runs with another sampler than their config's (heun, heun_stochastic).
set -euo pipefail
source "$(dirname "$0")/caller_paths.sh"
source "$(dirname "$0")/run_flags.sh"
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then echo "usage: bash benchmarks/formulations_cpu.sh OUT SR_RUN [MNIST_ROOT]" >&2; exit 2; fi
OUT=$(from_caller "$1")
SR_RUN=$(from_caller "$2")
DATA=$(from_caller "${3:-${IMAGEN_MNIST_ROOT:-}}")
DATA="${DATA:-../shared/data}"
CHECKPOINT_IMAGES="${CHECKPOINT_IMAGES:-200}"
NUM_IMAGES="${NUM_IMAGES:-500}"
FORMULATIONS="${FORMULATIONS:-ddpm edm}"
STEPS="${STEPS:-2000}"
EVERY="${EVERY:-250}"
read -r -a extra <<< "${EXTRA:-}"
sampling=()
if [ -n "${EVAL_STEPS:-}" ]; then sampling=(--steps "$EVAL_STEPS"); fi
edm_sampler=()
if [ -n "${EDM_SAMPLER:-}" ]; then edm_sampler=(--sampler "$EDM_SAMPLER"); fi
mkdir -p "$OUT"

config_of() {
  case "$1" in
    ddpm) echo configs/mnist_cpu/base.yaml ;;
    edm) echo configs/mnist_cpu/base_edm.yaml ;;
    *) echo "unknown formulation $1" >&2; exit 2 ;;
  esac
}

for formulation in $FORMULATIONS; do
  run="$OUT/$formulation/base"
  config="$(config_of "$formulation")"
  chosen=()
  cascade_sampler=()
  if [ "$formulation" = edm ] && [ -n "${EDM_SAMPLER:-}" ]; then
    chosen=("${edm_sampler[@]}")
    sr_sampler="$(python -c "import sys; from imagen.config import load_stage_config
print(load_stage_config(sys.argv[1]).sampling.sampler)" "$SR_RUN/config.yaml")"
    cascade_sampler=(--sampler "$EDM_SAMPLER,$sr_sampler")
  fi
  if [ ! -d "$run/checkpoints/$(printf 'step_%08d' "$STEPS")" ]; then
    read -r -a resume <<< "$(pick_up "$run")"
    python train_base_mnist.py --config "$config" --output-dir "$run" --set "data.root=$DATA" \
      --set "training.max_steps=$STEPS" --set "training.checkpoint_every=$EVERY" \
      --set "training.keep_checkpoints=$(( (STEPS + EVERY - 1) / EVERY ))" "${extra[@]}" "${resume[@]}"
  fi
  for checkpoint in "$run"/checkpoints/step_*; do
    report="$OUT/$formulation/eval_$(basename "$checkpoint")"
    if [ ! -f "$report/report.json" ]; then
      python evaluate_imagen.py --mode base --checkpoints "$checkpoint" --data-root "$DATA" \
        --num-images "$CHECKPOINT_IMAGES" --no-unconditional --output-dir "$report" "${sampling[@]}" "${chosen[@]}"
    fi
  done
  if [ ! -f "$OUT/$formulation/eval_cascade/report.json" ]; then
    python evaluate_imagen.py --mode cascade --checkpoints "$run" "$SR_RUN" --data-root "$DATA" \
      --num-images "$NUM_IMAGES" --no-unconditional --output-dir "$OUT/$formulation/eval_cascade" "${sampling[@]}" \
      "${cascade_sampler[@]}"
  fi
done

python - "$OUT" $FORMULATIONS <<'EOF'
import json
import sys
from pathlib import Path

out, formulations = Path(sys.argv[1]), sys.argv[2:]
lines = []
for formulation in formulations:
    folder = out / formulation
    metrics = [json.loads(line) for line in (folder / "base" / "metrics.jsonl").read_text().splitlines()]
    img_s = sorted(m["img_per_s"] for m in metrics)[len(metrics) // 2]
    curve = []
    for report_path in sorted(folder.glob("eval_step_*/report.json")):
        result = json.loads(report_path.read_text())["results"][0]
        step = int(report_path.parent.name.removeprefix("eval_step_"))
        curve.append((step, result["prompt_accuracy"], result["fid"]))
    reached = next((step for step, accuracy, _ in curve if accuracy >= 0.95), None)
    cascade = json.loads((folder / "eval_cascade" / "report.json").read_text())
    final = cascade["results"][0]
    lines.append(f"## {formulation}\n")
    lines.append("| step | prompt accuracy (16 px) | classifier-FID (16 px) |\n| --- | --- | --- |")
    lines += [f"| {step} | {accuracy:.3f} | {fid:.2f} |" for step, accuracy, fid in curve]
    lines.append(f"\nfirst checkpoint at >= 0.95: {reached if reached is not None else 'none'}; "
                 f"median training speed {img_s:.1f} img/s")
    lines.append(f"cascade at 32 px ({cascade['num_images']} images, guidance {final['guidance']:g}): "
                 f"prompt accuracy {final['prompt_accuracy']:.3f}, classifier-FID {final['fid']:.2f} "
                 f"(floor {cascade['fid_floor']:.2f})\n")
text = "\n".join(lines)
(out / "summary.md").write_text(text + "\n")
print(text)
EOF
