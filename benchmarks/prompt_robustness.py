"""How often a trained cascade draws the right digit for prompts a person would type.

    python benchmarks/prompt_robustness.py --checkpoints runs/mnist_cpu/base runs/mnist_cpu/sr \\
        --data-root ../shared/data [--per-variant 50] [--seed 0] [--normalize none plain]

Every variant writes each digit differently from the training prompts ("seven", "7"):
capitalised, upper case, padded with spaces, with a full stop, with an exclamation mark,
in mixed case. Each is sampled ``--per-variant`` times (every digit equally often) through
the whole cascade, once per ``--normalize`` mode (``text_encoder.normalize``, see
``imagen.captions.normalize_prompt``), and read by the evaluation classifier. Prints one JSON
object: accuracy per mode and variant, the classifier's hash and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys

from imagen.captions import DIGIT_WORDS, NORMALIZATIONS
from imagen.cli import add_debug_argument, check_seed, run_script
from imagen.errors import ImagenError

VARIANTS = {
    "word": lambda digit: DIGIT_WORDS[digit],
    "numeral": lambda digit: str(digit),
    "Capitalised": lambda digit: DIGIT_WORDS[digit].capitalize(),
    "UPPER": lambda digit: DIGIT_WORDS[digit].upper(),
    "mIxEd": lambda digit: "".join(c.upper() if i % 2 else c for i, c in enumerate(DIGIT_WORDS[digit])),
    "  spaced  ": lambda digit: f"  {DIGIT_WORDS[digit]}  ",
    "word.": lambda digit: f"{DIGIT_WORDS[digit]}.",
    "numeral.": lambda digit: f"{digit}.",
    "Word!": lambda digit: f"{DIGIT_WORDS[digit].capitalize()}!",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the cascade's run folders, base first")
    parser.add_argument("--data-root", required=True, help="the MNIST folder (for the classifier)")
    parser.add_argument("--per-variant", type=int, default=50, help="images per variant, a multiple of 10")
    parser.add_argument("--normalize", nargs="+", default=["none", "plain"], choices=NORMALIZATIONS)
    parser.add_argument("--seed", type=int, default=0)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.per_variant < 10 or args.per_variant % 10:
        raise ImagenError(f"--per-variant {args.per_variant}: expected a positive multiple of 10.")
    check_seed(args.seed)

    import torch

    from imagen.cascade import Cascade
    from imagen.classifier import classify, load_or_train_classifier

    digits = torch.arange(args.per_variant) % 10
    prompts = [VARIANTS[name](int(digit)) for name in VARIANTS for digit in digits]
    classifier, info = load_or_train_classifier(args.data_root, progress=False)
    results = {}
    for mode in args.normalize:
        cascade = Cascade.from_checkpoints(args.checkpoints, device="cpu")
        for stage in cascade.stages:
            stage.config.text_encoder.normalize = mode
        images = cascade.sample(prompts, seed=args.seed, progress=True).images
        predicted, _ = classify(classifier, images)
        correct = (predicted.view(len(VARIANTS), -1) == digits).float().mean(dim=1)
        results[mode] = {name: float(value) for name, value in zip(VARIANTS, correct)}
    print(json.dumps({"checkpoints": args.checkpoints, "per_variant": args.per_variant, "seed": args.seed,
                      "classifier": info.short_hash, "accuracy": results}, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
