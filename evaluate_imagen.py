"""Evaluate trained stages with an MNIST classifier: prompt accuracy and classifier-FID.

    python evaluate_imagen.py --mode cascade --checkpoints runs/mnist_cpu/base runs/mnist_cpu/sr \\
        --data-root ../shared/data --guidance-sweep 0,1,2,3,5,7 --output-dir runs/eval_cascade

Modes: base (the first stage alone), sr (a super-resolution stage fed real test digits
shrunk to its input size; --stage picks it, default the last checkpoint), cascade (every
stage). --guidance-sweep varies the guidance weight of the evaluated stage (the base stage in
cascade mode); the other stages keep --guidance (one value, or one per stage) or their
config. The classifier is trained on first use and cached; its hash is in every report.

Writes OUT/report.json (--json also prints it), OUT/sweep.csv, OUT/sweep.png (FID against
prompt accuracy, the best trade-off starred) and OUT/samples/guidance_<w>.png (the first
40 images: rows of words and numerals 0-9).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from imagen.cli import (
    add_debug_argument,
    add_stage_sources,
    check_seed,
    per_stage_values,
    run_script,
    stage_folders,
)
from imagen.errors import ImagenError
from imagen.io import atomic_write
from imagen.samplers import SAMPLERS

# What this script writes into --output-dir; --overwrite replaces exactly these.
OUTPUTS = ("report.json", "sweep.csv", "sweep.png", "samples")
CSV_COLUMNS = ("guidance", "prompt_accuracy", "words_accuracy", "numerals_accuracy", "fid", "fid_floor",
               "normalized_entropy", "seconds", "best")


def write_csv(report: dict, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for result in report["results"]:
        best = int(result["guidance"] == report["best"]["guidance"])
        row = {**result, "fid_floor": report["fid_floor"], "best": best}
        writer.writerow([f"{row[key]:.6g}" if isinstance(row[key], float) else row[key] for key in CSV_COLUMNS])
    atomic_write(path, buffer.getvalue())


def write_plot(report: dict, path: Path) -> None:
    """The paper's Pareto view: FID (x) against prompt accuracy (y), one point per weight."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    results = report["results"]
    figure, axes = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    axes.plot([r["fid"] for r in results], [r["prompt_accuracy"] for r in results], "o-", color="tab:blue")
    for result in results:
        axes.annotate(f"w={result['guidance']:g}", (result["fid"], result["prompt_accuracy"]),
                      textcoords="offset points", xytext=(5, -10), fontsize=8)
    best = report["best"]
    axes.plot([best["fid"]], [best["prompt_accuracy"]], "*", color="tab:red", markersize=16,
              label=f"best trade-off (w={best['guidance']:g})")
    axes.axvline(report["fid_floor"], color="gray", linestyle="--",
                 label=f"real-vs-real floor ({report['fid_floor']:.3g})")
    axes.set_xlabel("classifier-FID against the MNIST test split (lower is better)")
    axes.set_ylabel("prompt accuracy")
    axes.set_title(f"{report['mode']} at {report['resolution']}px, {report['num_images']} images, "
                   f"classifier {report['classifier']['hash'][:8]}", fontsize=9)
    axes.legend(fontsize=8, loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="cascade", choices=["base", "sr", "cascade"])
    add_stage_sources(parser, "--checkpoints", nargs="+", help="run folders or checkpoints/step_N folders, base first")
    parser.add_argument("--stage", type=int, help="sr mode: the index of the stage to evaluate (default: the last)")
    parser.add_argument("--data-root", help="the MNIST folder (default: the evaluated stage's data.root)")
    parser.add_argument("--num-images", type=int, default=1000, help="a multiple of 20 (default 1000)")
    parser.add_argument("--guidance", help="guidance weight, or one per stage: 5 or 5,3 (default: configs)")
    parser.add_argument("--guidance-sweep", help="weights for the evaluated stage, e.g. 0,1,2,3,5,7")
    parser.add_argument("--steps", help="sampling steps, or one per stage")
    parser.add_argument("--sampler", help=f"{' | '.join(SAMPLERS)}, or one per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: each stage's config)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--weights", default="ema", choices=["ema", "model"])
    parser.add_argument("--output-dir", required=True, help="where report.json, sweep.csv, sweep.png and samples/ go")
    parser.add_argument("--no-unconditional", action="store_true",
                        help="without 0 in the sweep, skip the extra guidance-0 run that measures class balance")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON on stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output-dir")
    add_debug_argument(parser)
    args = parser.parse_args(argv)

    if args.batch_size is not None and args.batch_size < 1:
        raise ImagenError(f"--batch-size {args.batch_size}: expected a positive integer.")
    check_seed(args.seed)
    sweep = per_stage_values(args.guidance_sweep, "--guidance-sweep", float)
    settings = {"guidance": per_stage_values(args.guidance, "--guidance", float),
                "steps": per_stage_values(args.steps, "--steps", int),
                "sampler": per_stage_values(args.sampler, "--sampler", str, tuple(SAMPLERS))}
    from imagen.cascade import load_stage, per_stage
    from imagen.classifier import load_or_train_classifier
    from imagen.evaluation import Evaluator, evaluation_prompts
    from imagen.io import new_results, prepare_output, resolve_device, save_png

    output = Path(args.output_dir)
    prepare_output(output, OUTPUTS, args.overwrite)

    evaluation_prompts(args.num_images)  # validates the count before anything is loaded
    device = resolve_device(args.device)
    stages = [load_stage(path, device, args.weights) for path in stage_folders(args, "--checkpoints")]
    resolved = {name: per_stage(values, len(stages), f"--{name}") for name, values in settings.items()}
    sr_index = -1 if args.stage is None else min(args.stage, len(stages) - 1)
    evaluated = stages[0] if args.mode != "sr" else stages[sr_index]
    data_root = args.data_root or evaluated.config.data.root
    log = sys.stderr if args.json else sys.stdout
    classifier, info = load_or_train_classifier(data_root, device=device)
    print(f"classifier {info.short_hash}: {info.test_accuracy:.2%} test accuracy "
          f"({info.train_size} training digits)", file=log)
    evaluator = Evaluator(stages, args.mode, classifier, info, data_root, args.num_images, stage=args.stage,
                          seed=args.seed, batch_size=args.batch_size, **resolved)
    weights = sweep or [evaluator.guidance[0] if evaluator.guidance[0] is not None
                        else evaluator.cascade.stages[0].config.sampling.guidance]

    with new_results(output, OUTPUTS) as staging:  # they replace earlier ones once all are written

        def save_samples(weight: float, images) -> None:
            save_png(images[:40], staging / "samples" / f"guidance_{weight:g}.png", 10)

        report = evaluator.evaluate(weights, on_images=save_samples, unconditional=not args.no_unconditional)
        text = json.dumps(report, indent=1)
        atomic_write(staging / "report.json", text)
        write_csv(report, staging / "sweep.csv")
        write_plot(report, staging / "sweep.png")
    for result in report["results"]:
        print(f"guidance {result['guidance']:g}: prompt accuracy {result['prompt_accuracy']:.3f} "
              f"(words {result['words_accuracy']:.3f}, numerals {result['numerals_accuracy']:.3f}), "
              f"FID {result['fid']:.3f} (floor {report['fid_floor']:.3f})", file=log)
    print(f"best trade-off: guidance {report['best']['guidance']:g}; wrote {output}", file=log)
    if args.json:
        print(text)


if __name__ == "__main__":
    sys.exit(run_script(main))
