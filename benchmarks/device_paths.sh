#!/usr/bin/env bash
# The main paths besides the acceptance run, at tiny sizes on the machine's device (its GPU,
# when it has one), so that one short call on a lent GPU shows them device-clean.
# gpu_cascade.sh covers training under a time budget and the cascade evaluation; this covers:
# - channels_last training with attention, and resume (checked to continue, not restart);
# - each configs/mnist network's training step under the device's bf16 autocast, for both
#   unet.group_norm_precision: the group norms' dtypes, and one graph for torch.compile;
# - sampling from prompts, image-to-image, inpainting and your own low-resolution images;
# - the super-resolution evaluation;
# - shard preparation and training from shards (loader workers, pinned memory on a GPU);
# - training from a captioned image folder;
# - the configs/mnist_scenes stages and their evaluation;
# - the EDM formulation, both stages.
#
#   bash benchmarks/device_paths.sh OUT [MNIST_ROOT]
#   COMPILE=1 bash benchmarks/device_paths.sh OUT [MNIST_ROOT]   # the resumed base run compiled too
#
# Relative paths are the caller's. OUT (a new folder) receives the runs
# and outputs of every path and log.txt: the device, then "ok NAME SECONDS" per path, or
# "FAIL NAME" and a non-zero exit at the first failure. The ran_on_device check compares the
# device the sampler used with the one torch sees. COMPILE=1 is for a GPU: on a CPU compiling
# takes minutes.
set -euo pipefail
source "$(dirname "$0")/caller_paths.sh"
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then echo "usage: bash benchmarks/device_paths.sh OUT [MNIST_ROOT]" >&2; exit 2; fi
OUT=$(from_caller "$1")
DATA=$(from_caller "${2:-${IMAGEN_MNIST_ROOT:-}}")
DATA="${DATA:-../shared/data}"
source benchmarks/switch.sh
COMPILE=$(switch COMPILE "${COMPILE:-}")
if [ -e "$OUT" ]; then echo "error: $OUT already exists; give a new folder for this check's runs and outputs." >&2; exit 2; fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
source benchmarks/tiny_stages.sh

source benchmarks/seconds_since.sh
log() { echo "$1" | tee -a "$OUT/log.txt"; }
check() {  # check NAME COMMAND...: run one path and log its time, or its failure
  local name=$1 start status
  shift
  start=$(date +%s.%N)
  "$@" || { status=$?; log "FAIL $name (exit $status after $(seconds_since "$start") s)"; exit "$status"; }
  log "ok $name $(seconds_since "$start")"
}

# One interpreter start for both: the device type the checks expect, and the line that names it.
description=$(python -c "import torch; cuda = torch.cuda.is_available(); \
print('cuda' if cuda else 'cpu', torch.cuda.get_device_name() if cuda else 'cpu', 'torch', torch.__version__)")
DEVICE=${description%% *}
log "device: ${description#* }"

data=(--set "data.root=$DATA" --set text_encoder.name=tiny)
base="$OUT/runs/base"
sr="$OUT/runs/sr"
cascade=(--checkpoint "$base" --checkpoint "$sr")

check train_base python train_base_mnist.py --config configs/mnist/base.yaml --output-dir "$base" "${data[@]}" \
  "${TINY_BASE[@]}" --set training.channels_last=true
check resume_base python train_base_mnist.py --config configs/mnist/base.yaml --output-dir "$base" --resume \
  "${data[@]}" "${TINY_BASE[@]}" --set training.channels_last=true --set training.max_steps=4 \
  --set "training.compile=$COMPILE"
check resume_continued python - "$base/metrics.jsonl" <<'PY'
import json
import sys

steps = [json.loads(line)["step"] for line in open(sys.argv[1], encoding="utf-8")]
if steps != [1, 2, 3, 4]:
    sys.exit(f"error: the base run logged steps {steps}; a resume that continues logs 1, 2, then 3, 4.")
PY
check train_sr python train_sr_mnist.py --config configs/mnist/sr_256.yaml --output-dir "$sr" "${data[@]}" \
  "${TINY_SR[@]}" --set training.channels_last=true --set "unet.attention_resolutions=[16]"

network_under_bf16() {  # network_under_bf16 CONFIG --set KEY=VALUE...: a stage's network on the device
  python - "$DEVICE" "$@" <<'PY'
# A training step's forward and backward under the device's bf16 autocast, for both
# unet.group_norm_precision settings:
# - what each group norm returns: CUDA's autocast would turn a bf16 norm back into float32 if
#   imagen.nn.GroupNorm did not guard it;
# - one graph: training.compile fuses across the whole network only if Dynamo sees it whole, so
#   the step is traced with fullgraph=True, which fails at any graph break (aot_eager traces
#   forward and backward without generating kernels).
import sys

import torch

from imagen.config import load_stage_config
from imagen.nn import GroupNorm
from imagen.stage import build_network

device, config_path, overrides = torch.device(sys.argv[1]), sys.argv[2], sys.argv[3:][1::2]
for precision in ("float32", "activations"):
    config = load_stage_config(config_path, overrides + [f"unet.group_norm_precision={precision}"])
    network = build_network(config, 32).to(device)
    size = config.unet.image_size
    inputs = {"x": torch.randn(2, 1, size, size, device=device), "t": torch.tensor([10, 900], device=device),
              "text_emb": torch.randn(2, 8, 32, device=device),
              "text_mask": torch.ones(2, 8, dtype=torch.bool, device=device),
              "drop_text": torch.tensor([False, True], device=device)}
    if config.super_resolution is not None:
        low = config.super_resolution.low_res_size
        inputs.update(low_res=torch.randn(2, 1, low, low, device=device),
                      aug_level=torch.tensor([0.0, 0.3], device=device))
    seen = []
    hooks = [module.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
             for module in network.modules() if isinstance(module, GroupNorm)]
    with torch.autocast(device.type, torch.bfloat16):
        network(**inputs).float().square().mean().backward()
    wrong = [pair for pair in seen if pair[1] != (torch.float32 if precision == "float32" else pair[0])]
    print(f"{config_path}, {precision} norms: (input, output) dtypes {sorted(set(map(str, seen)))}")
    if wrong or (precision == "activations" and (torch.bfloat16, torch.bfloat16) not in seen):
        sys.exit(f"error: under {device.type} bf16 autocast, {precision} group norms returned {wrong or seen}.")
    for hook in hooks:
        hook.remove()
    torch._dynamo.reset()
    with torch.autocast(device.type, torch.bfloat16):
        torch.compile(network, fullgraph=True, backend="aot_eager")(**inputs).float().square().mean().backward()
    print(f"{config_path}, {precision} norms: one graph")
PY
}
check network_base network_under_bf16 configs/mnist/base.yaml "${TINY_BASE[@]}"
check network_sr network_under_bf16 configs/mnist/sr_256.yaml "${TINY_SR[@]}" \
  --set "unet.attention_resolutions=[16]" --set "unet.cross_attention_resolutions=[16]"
check sample python sample_imagen.py "${cascade[@]}" --prompts seven 3 --num-per-prompt 2 --steps 2 \
  --output-dir "$OUT/sample"
check ran_on_device python - "$OUT/sample/metadata.json" "$DEVICE" <<'PY'
import json
import sys

used = json.load(open(sys.argv[1], encoding="utf-8"))["device"]
if not used.startswith(sys.argv[2]):
    sys.exit(f"error: the sampler ran on {used}, but torch sees {sys.argv[2]}.")
PY
images=("$OUT"/sample/images/*.png)
digit=${images[0]}
check image_to_image python sample_imagen.py "${cascade[@]}" --prompts three --init-images "$digit" --strength 0.5 \
  --steps 2 --output-dir "$OUT/image_to_image"
python - "$OUT/mask.png" <<'PY'
import sys

from PIL import Image

mask = Image.new("L", (32, 32), 0)  # black: keep
mask.paste(255, (0, 16, 32, 32))  # white: draw the lower half
mask.save(sys.argv[1])
PY
check inpaint python sample_imagen.py "${cascade[@]}" --prompts seven --inpaint-images "$digit" \
  --inpaint-masks "$OUT/mask.png" --sampler ddpm --inpaint-resample 2 --steps 2 --output-dir "$OUT/inpaint"
check low_res python sample_imagen.py "${cascade[@]}" --prompts seven --low-res "$digit" --steps 2 \
  --output-dir "$OUT/low_res"
check evaluate_sr python evaluate_imagen.py --mode sr --checkpoints "$base" "$sr" --data-root "$DATA" \
  --num-images 20 --steps 2 --batch-size 10 --seed 0 --output-dir "$OUT/evaluate_sr"

# The sampled digits as a captioned folder (image.png + image.txt). Their names are
# <index>_<prompt>.png, and the one-word prompts above survive that naming unchanged.
captions="$OUT/captions"
mkdir -p "$captions"
for image in "${images[@]}"; do
  name=$(basename "$image" .png)
  cp "$image" "$captions/$name.png"
  echo "${name#*_}" > "$captions/$name.txt"
done
check train_caption_folder python train_base_mnist.py --config configs/mnist/base.yaml \
  --output-dir "$OUT/runs/caption_folder" "${TINY_BASE[@]}" --set text_encoder.name=tiny \
  --set data.dataset=caption_folder --set "data.root=$captions"
check prepare_shards python prepare_dataset.py --config configs/mnist/base.yaml "${TINY_BASE[@]}" \
  --set text_encoder.name=tiny --source "$captions" --output "$OUT/shards" --shard-size 2
check train_from_shards python train_base_mnist.py --config configs/mnist/base.yaml --output-dir "$OUT/runs/shards" \
  "${TINY_BASE[@]}" --set text_encoder.name=tiny --set data.dataset=shards --set "data.root=$OUT/shards" \
  --set data.workers=2

scene=(--set "data.root=$DATA" --set text_encoder.name=tiny-scenes --set text_encoder.max_length=24)
check train_scene_base python train_base_mnist.py --config configs/mnist_scenes/base.yaml \
  --output-dir "$OUT/runs/scene_base" "${TINY_BASE[@]}" "${scene[@]}"
check train_scene_sr python train_sr_mnist.py --config configs/mnist_scenes/sr_256.yaml \
  --output-dir "$OUT/runs/scene_sr" "${TINY_SR[@]}" "${scene[@]}"
check evaluate_scenes python evaluate_imagen.py --mode scenes --checkpoints "$OUT/runs/scene_base" \
  "$OUT/runs/scene_sr" --data-root "$DATA" --num-images 20 --steps 2 --seed 0 --output-dir "$OUT/evaluate_scenes"

small=(--set "data.root=$DATA" --set training.batch_size=4 --set training.max_steps=2 --set sampling.steps=2
       --set "training.sample_guidance=[1]" --set unet.base_channels=16 --set unet.num_head_channels=16)
check train_edm_base python train_base_mnist.py --config configs/mnist_cpu/base_edm.yaml \
  --output-dir "$OUT/runs/edm_base" "${small[@]}"
check train_edm_sr python train_sr_mnist.py --config configs/mnist_cpu/sr_edm.yaml --output-dir "$OUT/runs/edm_sr" \
  "${small[@]}"
check sample_edm python sample_imagen.py --checkpoint "$OUT/runs/edm_base" --checkpoint "$OUT/runs/edm_sr" \
  --prompts seven --steps 2 --output-dir "$OUT/sample_edm"
log "every path ran"
