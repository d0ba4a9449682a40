"""Cascade sampling throughput: a batch of prompts through every stage, per sampler and step count.

    python benchmarks/bench_sample.py --checkpoints runs/mnist_cpu/base runs/mnist_cpu/sr \\
        --samplers ddpm:1000 ddpm:100 dpmpp_2m_sde:50 ddim:50

Prints one JSON object with, per sampler:steps setting, the seconds and images/s of the whole
cascade and of each stage, after one untimed warm-up pass. Guidance weights come from the
stages' configs unless --guidance is given (one value, or one per stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from imagen.cli import add_debug_argument, per_stage_values, run_script
from imagen.config import SAMPLER_NAMES
from imagen.errors import ImagenError


def parse_setting(text: str) -> tuple[str, int]:
    """'ddpm:100' -> ('ddpm', 100)."""
    sampler, _, steps = text.partition(":")
    if sampler not in SAMPLER_NAMES or not steps.isdigit() or int(steps) < 1:
        raise ImagenError(f"--samplers {text}: expected SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLER_NAMES)} "
                          "and STEPS a positive integer, e.g. ddpm:100.")
    return sampler, int(steps)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the stages' run folders, base first")
    parser.add_argument("--samplers", nargs="+", default=["ddpm:100", "dpmpp_2m_sde:50", "ddpm:50", "ddim:50"],
                        help="SAMPLER:STEPS settings, each applied to every stage")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--guidance", help="one weight, or one per stage (default: the configs')")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if any), cpu, cuda, cuda:N or mps")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    settings = [parse_setting(text) for text in args.samplers]
    if args.batch_size < 1:
        raise ImagenError(f"--batch-size {args.batch_size}: expected a positive integer.")
    guidance = per_stage_values(args.guidance, "--guidance", float)

    from imagen.cascade import Cascade

    cascade = Cascade.from_checkpoints(args.checkpoints, device=args.device)
    prompts = [str(index % 10) for index in range(args.batch_size)]
    device = cascade.device
    weights = [guidance[min(index, len(guidance) - 1)] if guidance else stage.config.sampling.guidance
               for index, stage in enumerate(cascade.stages)]
    cascade.sample(prompts[:2], guidance=weights, steps=1)  # warm-up: allocations, text cache
    results = {}
    for sampler, steps in settings:
        stage_seconds = []
        low_res = None
        for index, stage in enumerate(cascade.stages):
            single = Cascade([stage], super_resolution_first=index > 0)
            synchronize(device)
            start = time.perf_counter()
            low_res = single.sample(prompts, guidance=weights[index], steps=steps, sampler=sampler, low_res=low_res,
                                    batch_size=args.batch_size).images
            synchronize(device)
            stage_seconds.append(time.perf_counter() - start)
        total = sum(stage_seconds)
        results[f"{sampler}:{steps}"] = {
            "seconds": total,
            "images_per_s": args.batch_size / total,
            "stages": [{"image_size": stage.config.unet.image_size, "seconds": seconds,
                        "images_per_s": args.batch_size / seconds}
                       for stage, seconds in zip(cascade.stages, stage_seconds)],
        }
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                      "guidance": weights, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
