"""Training throughput of one stage: the real Trainer's optimizer step, timed in steady state.

    python benchmarks/bench_train.py --config configs/mnist_cpu/base.yaml --set data.root=../shared/data
    python benchmarks/bench_train.py --config configs/mnist/base.yaml --set text_encoder.name=tiny \\
        --set data.root=../shared/data --steps 50 --warmup 10

Prints one JSON object: images/s and seconds per step after ``--warmup`` steps (compilation,
allocator warm-up), peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA),
parameter count, the settings that matter (device, batch size, precision, compile), and the
model FLOPs of one training step (forward and backward, counted by
``torch.utils.flop_counter.FlopCounterMode``), the FLOP/s achieved and the model FLOPs
utilisation: achieved / the device's dense peak for the precision used (known NVIDIA GPUs,
or ``--peak-tflops``; null on a CPU without it).
The run folder is temporary: nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from imagen.cli import add_debug_argument, load_config_from_args, run_script  # noqa: E402
from imagen.errors import ImagenError  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Dense peak TFLOP/s per precision (vendor datasheets), matched against the device name in order.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS:
        if name in device_name:
            return peaks[precision]
    return None


def step_flops(trainer) -> int:
    """Model FLOPs of one optimizer step (forward and backward), counted on the uncompiled
    network so that compilation cannot hide operations from the counter."""
    compiled, trainer.forward = trainer.forward, trainer.network
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step()
    finally:
        trainer.forward = compiled
    return counter.get_total_flops()


def measure(config, steps: int, warmup: int, peak: float | None = None) -> dict:
    from imagen.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        trainer = Trainer(config, Path(folder) / "run")
        device = trainer.accelerator.device
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
        images = steps * training.batch_size * training.grad_accum_steps * trainer.accelerator.num_processes
        network = trainer.accelerator.unwrap_model(trainer.network)
        flops = step_flops(trainer)
        precision = trainer.accelerator.mixed_precision
        if precision == "no":
            precision = "tf32" if device.type == "cuda" and training.allow_tf32 else "fp32"
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = peak if peak is not None else peak_tflops(device_name, precision)
        achieved = flops / (elapsed / steps) / 1e12
        return {
            "config": config.unet.type,
            "image_size": config.unet.image_size,
            "device": str(device),
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "batch_size": training.batch_size,
            "mixed_precision": trainer.accelerator.mixed_precision,
            "compile": training.compile,
            "parameters": sum(p.numel() for p in network.parameters()),
            "warmup_steps": warmup,
            "steps": steps,
            "seconds_per_step": elapsed / steps,
            "images_per_s": images / elapsed,
            "peak_memory_mb": peak_memory_mb(device),
            "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "max_rss",
            "flops_per_step": flops,
            "flops_per_image": flops / (training.batch_size * training.grad_accum_steps),
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "peak_precision": precision,
            "mfu": achieved / peak if peak else None,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak TFLOP/s for the MFU "
                        "(default: a table of NVIDIA GPUs)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ImagenError(f"--steps {args.steps} / --warmup {args.warmup}: expected steps >= 1 and warmup >= 0.")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ImagenError(f"--peak-tflops {args.peak_tflops}: expected a positive number of TFLOP/s.")
    config = load_config_from_args(args)
    print(json.dumps(measure(config, args.steps, args.warmup, args.peak_tflops), indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
