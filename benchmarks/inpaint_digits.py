"""Inpainting through the cascade, measured: half of a real digit is given, the other half is
drawn to match the prompt.

    python benchmarks/inpaint_digits.py --checkpoints runs/mnist_cpu/base runs/mnist_cpu/sr \\
        --data-root ../shared/data --output-dir runs/inpaint [--num-images 200] [--keep top]

Test digits (every digit equally often, seeded) keep their top (or left) half; the rest is
inpainted with the prompt naming the same digit, and again naming the next digit (d + 1 mod
10), where the kept half and the prompt disagree. The evaluation classifier reads every
completion. Prints one JSON object: the share read as the prompted digit in both cases,
and writes a grid (rows: the kept half, completions of the same digit, of the next digit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imagen.cli import add_debug_argument, check_seed, run_script
from imagen.errors import ImagenError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the cascade's run folders, base first")
    parser.add_argument("--data-root", required=True, help="the MNIST folder")
    parser.add_argument("--output-dir", required=True, help="where grid.png and report.json go")
    parser.add_argument("--num-images", type=int, default=200, help="a multiple of 20 (default 200)")
    parser.add_argument("--keep", choices=["top", "left"], default="top", help="the half that is given")
    parser.add_argument("--sampler", help="sampler of every stage (default: the configs')")
    parser.add_argument("--steps", type=int, help="sampling steps of every stage (default: the configs')")
    parser.add_argument("--resample", type=int, default=1, help="RePaint resampling (needs --sampler ddpm)")
    parser.add_argument("--seed", type=int, default=0)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    check_seed(args.seed)
    if args.resample > 1 and args.sampler != "ddpm":
        raise ImagenError(f"--resample {args.resample} runs the ancestral sampler: add --sampler ddpm.")

    import torch

    from imagen.captions import DIGIT_WORDS
    from imagen.cascade import Cascade
    from imagen.classifier import classify, load_or_train_classifier
    from imagen.data import load_mnist, to_model_images
    from imagen.evaluation import balanced_indices, evaluation_prompts
    from imagen.io import atomic_write, save_png

    _, digits, _ = evaluation_prompts(args.num_images)
    images, labels = load_mnist(args.data_root, "test")
    cascade = Cascade.from_checkpoints(args.checkpoints, device="cpu")
    last = cascade.stages[-1].config.unet
    known = to_model_images(images[balanced_indices(labels, digits, args.seed)], last.image_size, last.channels)
    masks = torch.zeros(len(known), 1, last.image_size, last.image_size)
    half = last.image_size // 2
    if args.keep == "top":
        masks[..., half:, :] = 1.0
    else:
        masks[..., half:] = 1.0
    classifier, info = load_or_train_classifier(args.data_root, progress=False)
    report = {"num_images": len(known), "keep": args.keep, "seed": args.seed, "classifier": info.short_hash,
              "checkpoints": args.checkpoints, "sampler": args.sampler, "steps": args.steps, "resample": args.resample}
    rows = [torch.where(masks.bool(), torch.full_like(known, 0.0), known)[:10]]
    for name, prompted in (("same_digit", digits), ("next_digit", (digits + 1) % 10)):
        prompts = [DIGIT_WORDS[int(d)] for d in prompted]
        out = cascade.sample(prompts, sampler=args.sampler, steps=args.steps, seed=args.seed, inpaint_images=known,
                             inpaint_masks=masks, inpaint_resample=args.resample, progress=True).images
        predicted, _ = classify(classifier, out)
        report[f"{name}_prompt_accuracy"] = float((predicted == prompted).float().mean())
        report[f"{name}_reads_as_given_digit"] = float((predicted == digits).float().mean())
        rows.append(out[:10])
    output = Path(args.output_dir)
    save_png(rows, output / "grid.png", columns=10)
    atomic_write(output / "report.json", json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
