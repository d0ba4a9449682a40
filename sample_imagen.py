"""Sample the whole cascade: text prompts -> base stage -> every super-resolution stage -> images.

    python sample_imagen.py --checkpoint runs/mnist_cpu/base --checkpoint runs/mnist_cpu/sr \\
        --prompts seven 3 "a handwritten nine" --num-per-prompt 4 --guidance 3 --output-dir out

Each --checkpoint is a stage's run folder (its latest checkpoint is used) or one
checkpoints/step_N folder, base first; or --cascade configs/mnist_cpu/cascade.yaml samples
the run folders its stages train into (their training.output_dir). --low-res PATH...
(images or folders) starts at the first super-resolution stage from your own images,
resized to its input size and noise-augmented at --sample-aug-level. --init-images PATH...
--strength S edits images at the base stage (image-to-image, SDEdit): the last S of the
diffusion is redone from them, noised to where it starts. --inpaint-images PATH...
--inpaint-masks PATH... (white: draw, black: keep) make every stage keep the black part of
the image at its own size and draw the rest (RePaint; --inpaint-resample N with --sampler
ddpm). --guidance, --steps, --sampler and
--thresholding take one value for every stage or a comma-separated value per stage;
unset, each stage uses its config's sampling section. Writes OUT/grid.png (final images,
one row per prompt), OUT/stage_<k>.png, OUT/images/<index>_<prompt>.png and
OUT/metadata.json (every setting, so a run can be repeated exactly).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

from imagen.cli import (
    add_debug_argument,
    add_stage_sources,
    check_seed,
    per_stage_values,
    run_script,
    stage_folders,
)
from imagen.config import SAMPLER_NAMES
from imagen.diffusion import THRESHOLD_MODES
from imagen.errors import ImagenError, ImageRangeWarning


def safe_name(prompt: str, limit: int = 40) -> str:
    """A prompt as a file-name fragment: letters, digits, '-' and '_' only, never empty."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", prompt).strip("_")[:limit]
    return name or "empty"


# How much of the diffusion --init-images redo when --strength is not given.
DEFAULT_STRENGTH = 0.6

# What this script writes into --output-dir; --overwrite replaces exactly these.
OUTPUTS = ("grid.png", "stage_*.png", "images", "metadata.json")


def image_files(paths: list[str], argument: str = "--low-res") -> list[Path]:
    """The image files among ``paths``, folders expanded (sorted, subfolders too)."""
    from imagen.data import IMAGE_SUFFIXES

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ImagenError(f"{argument} {path}: no such file or folder.")
    if not files:
        raise ImagenError(f"{argument} {' '.join(paths)}: no images ({', '.join(IMAGE_SUFFIXES)}) there.")
    return files


def read_per_prompt(paths: list[str], argument: str, count: int, channels: int, size: int):
    """Images (count, channels, size, size) in [-1, 1]: one file for all, or one per item."""
    import torch

    from imagen.data import read_image, to_model_images

    files = image_files(paths, argument)
    if len(files) not in (1, count):
        raise ImagenError(f"{argument}: {len(files)} images for {count}; give one for all or one each.")
    images = [to_model_images(read_image(path, channels)[None], size, channels)[0] for path in files]
    return torch.stack([images[min(i, len(images) - 1)] for i in range(count)])


def super_resolution_cascade(folders: list[str], device, weights: str):
    """The given stages from the first super-resolution stage on (a base stage before it is
    skipped: the images given replace its output)."""
    from imagen.cascade import Cascade, load_stage

    stages = [load_stage(folder, device, weights) for folder in folders]
    while stages and stages[0].config.super_resolution is None:
        print(f"--low-res: {stages.pop(0).checkpoint} is a base stage, not used: your images replace its output.",
              file=sys.stderr)
    if not stages:
        raise ImagenError("--low-res: none of the checkpoints is a super-resolution stage to start from.")
    return Cascade(stages, super_resolution_first=True)


def read_prompts(args) -> list[str]:
    if args.prompts_file is not None:
        try:  # utf-8-sig: a byte-order mark some editors write is not part of the first prompt
            lines = Path(args.prompts_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImagenError(f"--prompts-file {args.prompts_file}: cannot read it as UTF-8 text ({exc}).") from None
        prompts = list(args.prompts or []) + [line for line in lines if line.strip()]  # blank lines are no prompts
    else:
        prompts = list(args.prompts or [])
    if not prompts:
        raise ImagenError("no prompts: give --prompts TEXT [TEXT ...] or --prompts-file FILE (one prompt per line).")
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_sources(parser, "--checkpoint", action="append",
                      help="a stage's run folder or checkpoints/step_N folder; repeat per stage, base first")
    parser.add_argument("--prompts", nargs="+", help="text prompts")
    parser.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line")
    parser.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--low-res", nargs="+", metavar="PATH",
                        help="your own images (files or folders): start at the first super-resolution stage, one "
                             "prompt for all of them or one per image")
    parser.add_argument("--init-images", nargs="+", metavar="PATH",
                        help="image-to-image: images (files or folders) the base stage edits instead of sampling "
                             "from noise, one for all prompts or one per prompt")
    parser.add_argument("--inpaint-images", nargs="+", metavar="PATH",
                        help="inpainting: images (files or folders) whose unmasked part every stage keeps, one for "
                             "all prompts or one per prompt")
    parser.add_argument("--inpaint-masks", nargs="+", metavar="PATH",
                        help="with --inpaint-images: masks, white where to draw and black where to keep, one for all "
                             "or one per image")
    parser.add_argument("--inpaint-resample", type=int, default=1,
                        help="RePaint resampling: repeat every step this often (needs --sampler ddpm; default 1)")
    parser.add_argument("--strength", type=float,
                        help="with --init-images: how much of the diffusion to redo, 0 (keep them) to 1 (ignore "
                             f"them); default {DEFAULT_STRENGTH}")
    parser.add_argument("--guidance", help="guidance weight, or one per stage: 5 or 5,3")
    parser.add_argument("--steps", help="sampling steps, or one per stage: 50 or 50,25")
    parser.add_argument("--sampler", help=f"{' | '.join(SAMPLER_NAMES)}, or one per stage")
    parser.add_argument("--thresholding", help=f"{' | '.join(THRESHOLD_MODES)}, or one per stage")
    parser.add_argument("--sample-aug-level", type=float, help="noise level of the super-resolution inputs, in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int,
                        help="images per forward pass (default: each stage's sampling.batch_size)")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if any), cpu, cuda, cuda:N or mps")
    parser.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    parser.add_argument("--output-dir", required=True, help="where the images and metadata.json go")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --output-dir")
    add_debug_argument(parser)
    args = parser.parse_args(argv)

    prompts = read_prompts(args)
    if args.num_per_prompt < 1:
        raise ImagenError(f"--num-per-prompt {args.num_per_prompt}: expected a positive integer.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ImagenError(f"--batch-size {args.batch_size}: expected a positive integer.")
    check_seed(args.seed)
    if args.strength is not None and not args.init_images:
        raise ImagenError(f"--strength {args.strength} says how much of --init-images to redraw, but none are given.")
    strength = (DEFAULT_STRENGTH if args.strength is None else args.strength) if args.init_images else 1.0
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ImagenError(f"--strength {strength}: expected a number in [0, 1].")
    if args.init_images and args.low_res:
        raise ImagenError("--init-images edits the base stage's images and --low-res replaces them: give one.")
    if bool(args.inpaint_images) != bool(args.inpaint_masks):
        raise ImagenError("--inpaint-images and --inpaint-masks go together: the images and what to draw in them.")
    if args.inpaint_resample < 1:
        raise ImagenError(f"--inpaint-resample {args.inpaint_resample}: expected a positive integer.")
    if args.inpaint_resample > 1 and not args.inpaint_images:
        raise ImagenError(f"--inpaint-resample {args.inpaint_resample} repeats the steps of inpainting, but no "
                          "--inpaint-images are given.")

    if args.sample_aug_level is not None and not 0.0 <= args.sample_aug_level <= 1.0:
        raise ImagenError(f"--sample-aug-level {args.sample_aug_level}: expected a level in [0, 1].")
    settings = {
        "guidance": per_stage_values(args.guidance, "--guidance", float),
        "steps": per_stage_values(args.steps, "--steps", int),
        "sampler": per_stage_values(args.sampler, "--sampler", str, SAMPLER_NAMES),
        "thresholding": per_stage_values(args.thresholding, "--thresholding", str, THRESHOLD_MODES),
    }
    import torch

    from imagen.cascade import Cascade, per_stage
    from imagen.data import read_image, to_model_images
    from imagen.inputs import check_prompts
    from imagen.io import atomic_write, new_results, prepare_output, resolve_device, save_png
    from imagen.run_folder import refuse_results_in_a_run
    from imagen.stage import check_stage_settings

    device = resolve_device(args.device)
    folders = stage_folders(args, "--checkpoint")
    low_res = None
    if args.low_res:
        cascade = super_resolution_cascade(folders, device, args.weights)
        first = cascade.stages[0].config
        paths = image_files(args.low_res)
        if len(prompts) not in (1, len(paths)):
            raise ImagenError(f"--low-res: {len(paths)} images but {len(prompts)} prompts; give one prompt for all "
                              "of them or one per image.")
        prompts = prompts * len(paths) if len(prompts) == 1 else prompts
        low_res = torch.stack([to_model_images(read_image(path, first.unet.channels)[None],
                                               first.super_resolution.low_res_size, first.unet.channels)[0]
                               for path in paths for _ in range(args.num_per_prompt)])
    else:
        cascade = Cascade.from_checkpoints(folders, device=device, weights=args.weights)
    init_images = None
    if args.init_images:
        base = cascade.stages[0].config.unet
        init_images = read_per_prompt(args.init_images, "--init-images", len(prompts), base.channels,
                                      base.image_size).repeat_interleave(args.num_per_prompt, dim=0)
    inpaint_images = inpaint_masks = None
    if args.inpaint_images:
        last = cascade.stages[-1].config.unet
        images = read_per_prompt(args.inpaint_images, "--inpaint-images", len(prompts), last.channels, last.image_size)
        masks = read_per_prompt(args.inpaint_masks, "--inpaint-masks", len(images), 1, last.image_size)
        inpaint_images = images.repeat_interleave(args.num_per_prompt, dim=0)
        inpaint_masks = ((masks + 1) / 2).repeat_interleave(args.num_per_prompt, dim=0)  # 1: draw
    check_prompts(prompts, cascade.stages, unconditional="--guidance 0")
    count = len(cascade.stages)
    # One value for all stages, or exactly one per stage (None: the stage's config decides).
    resolved = {name: per_stage(values, count, f"--{name}") for name, values in settings.items()}
    samplers = [resolved["sampler"][i] or stage.config.sampling.sampler for i, stage in enumerate(cascade.stages)]
    check_stage_settings([stage.config for stage in cascade.stages], resolved["sampler"], resolved["steps"])
    if args.inpaint_images and args.inpaint_resample > 1 and set(samplers) != {"ddpm"}:
        raise ImagenError(f"--inpaint-resample {args.inpaint_resample} runs the ddpm formulation's ancestral sampler, "
                          f"but the stages sample with {', '.join(samplers)}: add --sampler ddpm (ddpm stages only).")
    output = Path(args.output_dir)  # checked once every input has been read, so that their errors come first
    refuse_results_in_a_run(output)
    prepare_output(output, OUTPUTS, args.overwrite)
    all_prompts = [prompt for prompt in prompts for _ in range(args.num_per_prompt)]
    with warnings.catch_warnings():  # image files are converted to [-1, 1] above: a bright one is no mistake
        warnings.simplefilter("ignore", ImageRangeWarning)
        result = cascade.sample(all_prompts, **resolved, sample_aug_level=args.sample_aug_level, seed=args.seed,
                                batch_size=args.batch_size, low_res=low_res, init_images=init_images,
                                strength=strength, inpaint_images=inpaint_images, inpaint_masks=inpaint_masks,
                                inpaint_resample=args.inpaint_resample, progress=True)

    columns = args.num_per_prompt if args.num_per_prompt > 1 else min(10, len(all_prompts))
    with new_results(output, OUTPUTS) as staging:  # they replace earlier ones once all are written
        save_png(result.images, staging / "grid.png", columns)
        for index, images in enumerate(result.stages):
            save_png(images, staging / f"stage_{index}.png", columns)
        width = len(str(len(all_prompts) - 1))
        files = []
        for index, (prompt, image) in enumerate(zip(all_prompts, result.images)):
            path = Path("images") / f"{index:0{width}d}_{safe_name(prompt)}.png"
            save_png(image[None], staging / path, 1)
            files.append(str(path))
        metadata = {
            "prompts": prompts,
            "low_res": [str(path) for path in paths] if args.low_res else None,
            "init_images": [str(path) for path in image_files(args.init_images, "--init-images")]
            if args.init_images else None,
            "strength": strength if args.init_images else None,
            "inpaint_images": [str(p) for p in image_files(args.inpaint_images, "--inpaint-images")]
            if args.inpaint_images else None,
            "inpaint_masks": [str(p) for p in image_files(args.inpaint_masks, "--inpaint-masks")]
            if args.inpaint_masks else None,
            "inpaint_resample": args.inpaint_resample if args.inpaint_images else None,
            "num_per_prompt": args.num_per_prompt,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "device": str(cascade.device),
            "weights": args.weights,
            "stages": [
                {
                    "checkpoint": str(stage.checkpoint),
                    "step": stage.step,
                    "image_size": stage.config.unet.image_size,
                    "guidance": (resolved["guidance"][i] if resolved["guidance"][i] is not None
                                 else stage.config.sampling.guidance),
                    "steps": resolved["steps"][i] or stage.config.sampling.steps,
                    "sampler": resolved["sampler"][i] or stage.config.sampling.sampler,
                    "thresholding": resolved["thresholding"][i] or stage.config.thresholding.mode,
                    **({"sample_aug_level": args.sample_aug_level if args.sample_aug_level is not None
                        else stage.config.super_resolution.sample_aug_level} if stage.config.super_resolution else {}),
                }
                for i, stage in enumerate(cascade.stages)
            ],
            "images": files,
        }
        atomic_write(staging / "metadata.json", json.dumps(metadata, indent=1, ensure_ascii=False))
    print(f"wrote {len(files)} images to {output}")


if __name__ == "__main__":
    sys.exit(run_script(main))
