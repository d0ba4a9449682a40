"""Evaluate trained stages with an MNIST classifier: prompt accuracy and classifier-FID, or for
scene stages how often a canvas says what its caption says.

    python evaluate_imagen.py --mode cascade --checkpoints runs/mnist_cpu/base runs/mnist_cpu/sr \\
        --data-root ../shared/data --guidance-sweep 0,1,2,3,5,7 --output-dir runs/eval_cascade

Modes: base (the first stage alone), sr (a super-resolution stage fed real test digits
shrunk to its input size; --stage picks it, default the last checkpoint), cascade (every
stage), scenes (every stage, on captions of 2x2 digit scenes; see imagen/scene_evaluation.py).
Without --mode: scenes for stages trained on data.dataset mnist_scenes, else cascade (base
for a single base stage). --guidance-sweep varies the guidance weight of the evaluated stage
(the base stage in cascade and scenes mode); the other stages keep --guidance (one value, or
one per stage) or their config. The classifier is trained on first use and cached; its hash
is in every report.

Writes OUT/report.json (--json also prints it), OUT/sweep.csv, OUT/sweep.png (FID against
prompt accuracy, the best trade-off starred; for scenes, caption satisfaction of seen and
held-out captions against the guidance weight) and OUT/samples/guidance_<w>.png (the first
40 images: rows of words and numerals 0-9, or the first 40 scene captions).
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
from imagen.config import SAMPLER_NAMES
from imagen.errors import ImagenError
from imagen.io import atomic_write

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
    save_figure(figure, axes, path)


def save_figure(figure, axes, path: Path) -> None:
    """Legend, grid and layout of a report plot, then the PNG written atomically."""
    from matplotlib import pyplot as plt

    axes.legend(fontsize=8, loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


SCENE_CSV_COLUMNS = ("guidance", "satisfaction", "seen_satisfaction", "held_out_satisfaction", "place", "relation",
                     "layout", "count", "cell_accuracy", "count_accuracy", "ceiling_seen", "ceiling_held_out",
                     "seconds", "best")


def default_mode(stages) -> str:
    """scenes for stages trained on scene canvases, else the whole cascade (or the base stage alone)."""
    if stages[0].config.data.dataset == "mnist_scenes":
        return "scenes"
    return "cascade" if len(stages) > 1 else "base"


def check_count(mode: str, count: int) -> None:
    from imagen.evaluation import evaluation_prompts
    from imagen.scene_evaluation import evaluation_specs

    if mode == "scenes":
        evaluation_specs(count, seed=0)
    else:
        evaluation_prompts(count)


def write_scene_csv(report: dict, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SCENE_CSV_COLUMNS)
    for result in report["results"]:
        row = {**result, **result["family_satisfaction"], "ceiling_seen": report["ceiling"]["seen_satisfaction"],
               "ceiling_held_out": report["ceiling"]["held_out_satisfaction"],
               "best": int(result["guidance"] == report["best"]["guidance"])}
        writer.writerow([f"{row[key]:.6g}" if isinstance(row[key], float) else row[key] for key in SCENE_CSV_COLUMNS])
    atomic_write(path, buffer.getvalue())


def write_scene_plot(report: dict, path: Path) -> None:
    """Caption satisfaction of seen and held-out captions against the guidance weight, with the
    evaluator's ceiling on real canvases dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    results = report["results"]
    weights = [r["guidance"] for r in results]
    figure, axes = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for key, label, color in (("seen_satisfaction", "seen captions", "tab:blue"),
                              ("held_out_satisfaction", "held-out captions", "tab:orange")):
        axes.plot(weights, [r[key] for r in results], "o-", color=color, label=label)
        axes.axhline(report["ceiling"][key], color=color, linestyle="--", alpha=0.6)
    axes.set_xlabel("guidance weight of the base stage")
    axes.set_ylabel("share of canvases that satisfy their caption")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"scenes at {report['resolution']}px, {report['num_images']} canvases "
                   f"(dashed: real canvases)", fontsize=9)
    save_figure(figure, axes, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["base", "sr", "cascade", "scenes"],
                        help="default: scenes for stages trained on mnist_scenes, else cascade (base for one stage)")
    add_stage_sources(parser, "--checkpoints", nargs="+", help="run folders or checkpoints/step_N folders, base first")
    parser.add_argument("--stage", type=int, help="sr mode: the index of the stage to evaluate (default: the last)")
    parser.add_argument("--data-root", help="the MNIST folder (default: the evaluated stage's data.root)")
    parser.add_argument("--num-images", type=int, default=1000,
                        help="a multiple of 20, or of 5 for scenes (default 1000)")
    parser.add_argument("--guidance", help="guidance weight, or one per stage: 5 or 5,3 (default: configs)")
    parser.add_argument("--guidance-sweep", help="weights for the evaluated stage, e.g. 0,1,2,3,5,7")
    parser.add_argument("--steps", help="sampling steps, or one per stage")
    parser.add_argument("--sampler", help=f"{' | '.join(SAMPLER_NAMES)}, or one per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: each stage's config)")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if any), cpu, cuda, cuda:N or mps")
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
    if args.stage is not None and args.stage < 0:
        raise ImagenError(f"--stage {args.stage}: expected the index of a stage, 0 or more.")
    sweep = per_stage_values(args.guidance_sweep, "--guidance-sweep", float)
    settings = {"guidance": per_stage_values(args.guidance, "--guidance", float),
                "steps": per_stage_values(args.steps, "--steps", int),
                "sampler": per_stage_values(args.sampler, "--sampler", str, SAMPLER_NAMES)}
    from imagen.cascade import load_stage, per_stage
    from imagen.classifier import load_or_train_classifier
    from imagen.evaluation import Evaluator, evaluated_stages
    from imagen.io import new_results, prepare_output, resolve_device, save_png
    from imagen.run_folder import refuse_results_in_a_run
    from imagen.scene_evaluation import SceneEvaluator
    from imagen.stage import check_stage_settings

    if args.mode is not None:  # validate the count before anything is loaded
        check_count(args.mode, args.num_images)
    device = resolve_device(args.device)
    stages = [load_stage(path, device, args.weights) for path in stage_folders(args, "--checkpoints")]
    mode = args.mode or default_mode(stages)
    if args.stage is not None and mode != "sr":
        evaluates = "the base stage" if mode == "base" else "every stage"
        raise ImagenError(f"--stage {args.stage} picks the stage of sr mode, but {mode} mode evaluates {evaluates}; "
                          "drop --stage or add --mode sr.")
    datasets = [stage.config.data.dataset for stage in stages]
    if mode == "scenes" and set(datasets) != {"mnist_scenes"}:
        raise ImagenError(f"--mode scenes: the stages were trained on data.dataset {', '.join(datasets)}, not all on "
                          "mnist_scenes, so scene captions would measure what some never learnt; evaluate scene "
                          "stages alone, and others with --mode cascade, base or sr.")
    if mode != "scenes" and "mnist_scenes" in datasets:
        raise ImagenError(f"--mode {mode}: the stages were trained on data.dataset {', '.join(datasets)}, and "
                          "single-digit prompts measure nothing a scene stage learnt; evaluate scene stages with "
                          "--mode scenes.")
    check_count(mode, args.num_images)
    resolved = {name: per_stage(values, len(stages), f"--{name}") for name, values in settings.items()}
    check_stage_settings([stage.config for stage in stages], resolved["sampler"], resolved["steps"])
    # Also refuses an unusable --stage now, before the classifier may take a minute to train.
    first_evaluated = 0 if mode == "scenes" else evaluated_stages(stages, mode, args.stage)[0]
    data_root = args.data_root or stages[first_evaluated].config.data.root
    output = Path(args.output_dir)  # checked once the stages have loaded, before the classifier may train
    refuse_results_in_a_run(output)
    prepare_output(output, OUTPUTS, args.overwrite)
    log = sys.stderr if args.json else sys.stdout
    classifier, info = load_or_train_classifier(data_root, device=device)
    print(f"classifier {info.short_hash}: {info.test_accuracy:.2%} test accuracy "
          f"({info.train_size} training digits)", file=log)
    if mode == "scenes":
        evaluator = SceneEvaluator(stages, classifier, info, data_root, args.num_images, seed=args.seed,
                                   batch_size=args.batch_size, **resolved)
    else:
        evaluator = Evaluator(stages, mode, classifier, info, data_root, args.num_images, stage=args.stage,
                              seed=args.seed, batch_size=args.batch_size, **resolved)
    weights = sweep or [evaluator.guidance[0] if evaluator.guidance[0] is not None
                        else evaluator.cascade.stages[0].config.sampling.guidance]

    with new_results(output, OUTPUTS) as staging:  # they replace earlier ones once all are written

        def save_samples(weight: float, images) -> None:
            save_png(images[:40], staging / "samples" / f"guidance_{weight:g}.png", 10)

        report = evaluator.evaluate(weights, on_images=save_samples, unconditional=not args.no_unconditional)
        text = json.dumps(report, indent=1)
        atomic_write(staging / "report.json", text)
        (write_scene_csv if mode == "scenes" else write_csv)(report, staging / "sweep.csv")
        (write_scene_plot if mode == "scenes" else write_plot)(report, staging / "sweep.png")
    for result in report["results"]:
        if mode == "scenes":
            print(f"guidance {result['guidance']:g}: captions satisfied {result['satisfaction']:.3f} (seen "
                  f"{result['seen_satisfaction']:.3f}, held-out {result['held_out_satisfaction']:.3f}; ceiling "
                  f"{report['ceiling']['seen_satisfaction']:.3f} and {report['ceiling']['held_out_satisfaction']:.3f})",
                  file=log)
        else:
            print(f"guidance {result['guidance']:g}: prompt accuracy {result['prompt_accuracy']:.3f} "
                  f"(words {result['words_accuracy']:.3f}, numerals {result['numerals_accuracy']:.3f}), "
                  f"FID {result['fid']:.3f} (floor {report['fid_floor']:.3f})", file=log)
    print(f"best: guidance {report['best']['guidance']:g}; wrote {output}", file=log)
    if args.json:
        print(text)


if __name__ == "__main__":
    sys.exit(run_script(main))
