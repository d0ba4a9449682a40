"""The two Python steps of benchmarks/gpu_cascade.sh.

    python benchmarks/cascade_report.py encoder
        prints the text encoder to train with: google/t5-v1_1-small when the local Hugging
        Face cache holds it, else tiny (the offline T5 built in code).
    python benchmarks/cascade_report.py report --runs RUNS --output-dir OUT --encoder NAME \\
        --wall-seconds S
        reads the two training runs and the evaluation under RUNS and writes OUT/report.json
        and OUT/cascade_samples.png (gpu_cascade.sh keeps each stage's grid as it ends).

Per stage the report gives the steps and images trained, the steady-state images/s (the
median of the logged intervals after the first two, which hold CUDA warm-up and any
compilation), peak memory, model FLOPs per training image (``imagen.throughput``, counted
on this machine's device), the TFLOP/s that makes and the MFU against the device's dense
peak for the precision trained in (null where the device is not a known GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch

from imagen.cli import add_debug_argument, run_script
from imagen.errors import ImagenError

PREFERRED_ENCODER = "google/t5-v1_1-small"
GOALS = {"base_mfu": 0.30, "prompt_accuracy": 0.95}
SKIPPED_INTERVALS = 2


def pick_encoder() -> str:
    """The preferred T5 if it loads from the local cache alone, else ``tiny``."""
    from imagen.text import T5TextEncoder, TextEncoderError

    try:
        T5TextEncoder(PREFERRED_ENCODER, device="cpu")
    except TextEncoderError:
        return "tiny"
    return PREFERRED_ENCODER


def stage_report(run: Path, device: torch.device, seconds: float | None) -> dict:
    from imagen.checkpoint import latest_checkpoint, load_state
    from imagen.config import load_stage_config
    from imagen.io import resolve_mixed_precision
    from imagen.throughput import compute_precision, device_name, peak_tflops, training_flops_per_image

    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise ImagenError(f"{run}: no checkpoint; did its training run fail? (see log.txt)")
    config, state = load_stage_config(checkpoint / "config.yaml"), load_state(checkpoint)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steady = [r["img_per_s"] for r in records[SKIPPED_INTERVALS:]] or [r["img_per_s"] for r in records]
    images_per_s = statistics.median(steady)
    flops = training_flops_per_image(config, state["text_dim"], device)
    precision = compute_precision(resolve_mixed_precision(config.training.mixed_precision, device), device,
                                  config.training.allow_tf32)
    peak = peak_tflops(device_name(device), precision)
    achieved = flops * images_per_s / 1e12
    training = config.training
    return {
        "config": {"image_size": config.unet.image_size, "unet": config.unet.type,
                   "batch_size": training.batch_size, "lr": training.lr, "warmup_steps": training.warmup_steps,
                   "objective": config.diffusion.objective,
                   "mixed_precision": precision, "compile": training.compile,
                   "channels_last": training.channels_last,
                   "group_norm_precision": config.unet.group_norm_precision,
                   "max_minutes": training.max_minutes},
        "steps": state["step"],
        "images_trained": state["step"] * training.batch_size * training.grad_accum_steps,
        "final_loss": records[-1]["loss"],
        "images_per_s": images_per_s,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
        "flops_per_image": flops,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "wall_seconds": seconds,
    }


def write_report(runs: Path, output: Path, encoder: str, wall_seconds: float) -> dict:
    from imagen.io import atomic_write, resolve_device

    device = resolve_device("auto")
    timings = {}
    timings_file = runs / "timings.txt"
    if timings_file.is_file():
        timings = {name: float(value) for name, value in
                   (line.split() for line in timings_file.read_text(encoding="utf-8").splitlines())}
    evaluation = json.loads((runs / "evaluation" / "report.json").read_text(encoding="utf-8"))
    result = evaluation["results"][0]
    stages = {name: stage_report(runs / name, device, timings.get(name)) for name in ("base", "sr")}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "text_encoder": encoder,
        "stages": stages,
        "evaluation": {
            "num_images": evaluation["num_images"], "seed": evaluation["seed"], "resolution": evaluation["resolution"],
            "guidance": [s["guidance"] for s in evaluation["stages"]],
            "sampler": [f"{s['sampler']}:{s['steps']}" for s in evaluation["stages"]],
            "prompt_accuracy": result["prompt_accuracy"], "words_accuracy": result["words_accuracy"],
            "numerals_accuracy": result["numerals_accuracy"], "per_digit_accuracy": result["per_digit_accuracy"],
            "fid": result["fid"], "fid_floor": evaluation["fid_floor"],
            "classifier": evaluation["classifier"]["hash"],
            "sampling_and_scoring_seconds": result["seconds"],
            "images_per_s": evaluation["num_images"] / result["seconds"],
            "wall_seconds": timings.get("evaluation"),
        },
        "goals": {
            "base_mfu_at_least": GOALS["base_mfu"],
            "base_mfu_met": (stages["base"]["mfu"] or 0.0) >= GOALS["base_mfu"],
            "prompt_accuracy_at_least": GOALS["prompt_accuracy"],
            "prompt_accuracy_met": result["prompt_accuracy"] >= GOALS["prompt_accuracy"],
        },
        "wall_seconds": wall_seconds,
    }
    atomic_write(output / "report.json", json.dumps(report, indent=1))
    samples = sorted((runs / "evaluation" / "samples").glob("guidance_*.png"))
    if samples:
        shutil.copyfile(samples[0], output / "cascade_samples.png")
    return report


def summary(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, text encoder {report['text_encoder']}"]
    for name, stage in report["stages"].items():
        mfu = f"{stage['mfu']:.1%}" if stage["mfu"] is not None else "n/a"
        lines.append(f"{name}: {stage['steps']} steps, {stage['images_per_s']:.1f} img/s, "
                     f"{stage['flops_per_image'] / 1e9:.1f} GFLOP/img, {stage['achieved_tflops']:.2f} TFLOP/s, "
                     f"MFU {mfu}, peak {stage['peak_memory_mb']:.0f} MB")
    evaluation = report["evaluation"]
    lines.append(f"cascade at {evaluation['resolution']} px, {evaluation['num_images']} images: prompt accuracy "
                 f"{evaluation['prompt_accuracy']:.3f}, FID {evaluation['fid']:.3f} "
                 f"(floor {evaluation['fid_floor']:.3f})")
    lines.append(f"goals: {report['goals']}; total {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("encoder", help="print the text encoder to use")
    report = commands.add_parser("report", help="write OUT/report.json and the cascade samples")
    report.add_argument("--runs", required=True, type=Path)
    report.add_argument("--output-dir", required=True, type=Path)
    report.add_argument("--encoder", required=True)
    report.add_argument("--wall-seconds", required=True, type=float)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.command == "encoder":
        print(pick_encoder())
        return
    print(summary(write_report(args.runs, args.output_dir, args.encoder, args.wall_seconds)))


if __name__ == "__main__":
    sys.exit(run_script(main))
