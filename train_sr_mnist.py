"""Train one super-resolution stage of the cascade (low-res digit + text -> high-res) on MNIST.

    python train_sr_mnist.py --config configs/mnist_cpu/sr.yaml [--set key=value ...]
                             [--output-dir DIR] [--resume]

The high-resolution target is each MNIST digit at unet.image_size; its antialiased
downsample to super_resolution.low_res_size is the low-res input, noise-augmented at a
random level in super_resolution.train_aug_range. Same run folder layout as
train_base_mnist.py; the sample grids show the low-res input, the output per guidance
weight and the ground truth.
"""

import sys

from imagen.cli import run_script, train_stage


def main(argv: list[str] | None = None) -> None:
    train_stage(argv, __doc__, super_resolution=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
