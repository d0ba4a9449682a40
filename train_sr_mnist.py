"""Train one super-resolution stage of the cascade (low-res digit + text -> high-res) on MNIST.

    python train_sr_mnist.py --config configs/mnist_cpu/sr.yaml [--set key=value ...]

For now this validates the config: the Efficient U-Net and the trainer are not built yet.
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
    if config.super_resolution is None:
        raise ImagenError(
            f"{args.config} is a base stage (it has no super_resolution section); train it with train_base_mnist.py."
        )
    size, low = config.unet.image_size, config.super_resolution.low_res_size
    print(f"{args.config}: valid super-resolution config ({config.unet.type}, {low}->{size}).")
    sys.exit("train_sr_mnist.py: training is not implemented yet (the Efficient U-Net and trainer come next); nothing was written.")


if __name__ == "__main__":
    sys.exit(run_script(main))
