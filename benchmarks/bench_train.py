"""Training throughput of one stage: the real Trainer's optimizer step, timed in steady state.

    python benchmarks/bench_train.py --config configs/mnist_cpu/base.yaml --set data.root=../shared/data
    python benchmarks/bench_train.py --config configs/mnist/base.yaml --set text_encoder.name=tiny \\
        --set data.root=../shared/data --steps 50 --warmup 10

Prints one JSON object: images/s and seconds per step after ``--warmup`` steps (compilation,
allocator warm-up), peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA),
parameter count, the settings that matter (device, batch size, precision, compile), and the
model FLOPs of one training step (the network's forward and backward, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the training device, see
``imagen.throughput``), the FLOP/s achieved and the model FLOPs utilisation: achieved / the
device's dense peak for the precision used (known NVIDIA GPUs, or ``--peak-tflops``; null
on a CPU without it).

``--profile FILE`` then runs three more steps under ``torch.profiler`` and writes its table of
the ops and kernels that took the most time (device time on a GPU, CPU time on a CPU) to
FILE: where a step's time goes (convolutions, layout conversions, dtype casts, norms).
The run folder is temporary: nothing is written but the ``--profile`` FILE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from imagen.cli import add_debug_argument, load_config_from_args, run_script
from imagen.errors import ImagenError
from imagen.io import atomic_write
from imagen.throughput import compute_precision, device_name, peak_memory_mb, peak_tflops, training_flops_per_image


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROFILED_STEPS = 3
PROFILE_ROWS = 30


def profile_table(trainer, device: torch.device) -> str:
    """torch.profiler's table over ``PROFILED_STEPS`` training steps, the costliest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        for _ in range(PROFILED_STEPS):
            trainer.train_step()
        synchronize(device)
    return profiler.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                         row_limit=PROFILE_ROWS, max_name_column_width=70)


def measure(config, steps: int, warmup: int, peak: float | None = None, profile: Path | None = None) -> dict:
    from imagen.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        trainer = Trainer.from_config(config, Path(folder) / "run")
        device = trainer.device
        for _ in range(warmup):
            trainer.train_step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        training = config.training
        images_per_step = training.batch_size * training.grad_accum_steps * trainer.accelerator.num_processes
        network = trainer.accelerator.unwrap_model(trainer.network)
        flops_per_image = training_flops_per_image(config, trainer.text_dim, device)
        flops = flops_per_image * training.batch_size * training.grad_accum_steps
        precision = compute_precision(trainer.accelerator.mixed_precision, device, training.allow_tf32)
        name = device_name(device)
        peak = peak if peak is not None else peak_tflops(name, precision)
        achieved = flops / (elapsed / steps) / 1e12
        result = {
            "config": config.unet.type,
            "image_size": config.unet.image_size,
            "device": str(device),
            "device_name": name,
            "threads": torch.get_num_threads(),
            "batch_size": training.batch_size,
            "mixed_precision": trainer.accelerator.mixed_precision,
            "compile": training.compile,
            "channels_last": training.channels_last,
            "group_norm_precision": config.unet.group_norm_precision,
            "parameters": sum(p.numel() for p in network.parameters()),
            "warmup_steps": warmup,
            "steps": steps,
            "seconds_per_step": elapsed / steps,
            "images_per_s": steps * images_per_step / elapsed,
            "peak_memory_mb": peak_memory_mb(device),
            "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "max_rss",
            "flops_per_step": flops,
            "flops_per_image": flops_per_image,
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "peak_precision": precision,
            "mfu": achieved / peak if peak else None,
        }
        if profile is not None:  # after the measurement, so that the profiler's own memory is not in it
            settings = ", ".join(f"{key} {result[key]}" for key in ("mixed_precision", "compile", "channels_last",
                                                                  "group_norm_precision"))
            text = (f"{config.unet.type} {config.unet.image_size} px, batch {training.batch_size}, {settings}, on "
                    f"{name}: {result['seconds_per_step'] * 1000:.1f} ms/step timed, then {PROFILED_STEPS} steps "
                    f"profiled\n{profile_table(trainer, device)}\n")
            try:
                atomic_write(profile, text, exclusive=True)
            except FileExistsError:
                raise ImagenError(f"--profile {profile}: another process created it during the run; it was left "
                                  "as it is and this profile was not written.") from None
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak TFLOP/s for the MFU "
                        "(default: a table of NVIDIA GPUs)")
    parser.add_argument("--profile", type=Path, metavar="FILE", help="also profile three steps and write the "
                        "table of the costliest ops and kernels to FILE (a new file)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ImagenError(f"--steps {args.steps} / --warmup {args.warmup}: expected steps >= 1 and warmup >= 0.")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise ImagenError(f"--peak-tflops {args.peak_tflops}: expected a positive number of TFLOP/s.")
    if args.profile is not None:
        problem = ("already exists" if args.profile.exists() or args.profile.is_symlink() else
                   None if args.profile.parent.is_dir() else "is in a folder that does not exist")
        if problem:
            raise ImagenError(f"--profile {args.profile}: expected a new file in an existing folder, but it "
                              f"{problem}.")
    config = load_config_from_args(args)
    print(json.dumps(measure(config, args.steps, args.warmup, args.peak_tflops, args.profile), indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
