"""Train the base stage of the cascade (text -> low-resolution digit) on MNIST.

    python train_base_mnist.py --config configs/mnist_cpu/base.yaml [--set key=value ...]
                               [--output-dir DIR] [--resume]

The run folder (training.output_dir unless --output-dir is given) receives config.yaml,
checkpoints/step_N/, samples/step_N.png and metrics.jsonl. Multi-GPU:
accelerate launch train_base_mnist.py --config ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagen.cli import add_stage_arguments, load_config_from_args, run_script
from imagen.errors import ImagenError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config_from_args(args)
    if config.is_super_resolution:
        raise ImagenError(
            f"{args.config} is a super-resolution stage (it has a super_resolution section); "
            "train it with train_sr_mnist.py."
        )
    from imagen.trainer import Trainer  # heavy imports only once the arguments are valid

    run_dir = Path(args.output_dir or config.training.output_dir)
    Trainer(config, run_dir, resume=args.resume).train()
    print(f"done: {run_dir}")


if __name__ == "__main__":
    sys.exit(run_script(main))
