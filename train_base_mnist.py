"""Train the base stage of the cascade (text -> low-resolution digit) on MNIST.

    python train_base_mnist.py --config configs/mnist_cpu/base.yaml [--set key=value ...]

For now this validates the config: the base U-Net and the trainer are not built yet.
"""

from __future__ import annotations

import argparse
import sys

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
    print(f"{args.config}: valid base-stage config ({config.unet.type}, {config.unet.image_size}x{config.unet.image_size}).")
    sys.exit("train_base_mnist.py: training is not implemented yet (the base U-Net and trainer come next); nothing was written.")


if __name__ == "__main__":
    sys.exit(run_script(main))
