"""Train the base stage of the cascade (text -> low-resolution digit) on MNIST.

    python train_base_mnist.py --config configs/mnist_cpu/base.yaml [--set key=value ...]
                               [--output-dir DIR] [--resume]

The run folder (training.output_dir unless --output-dir is given) receives config.yaml,
checkpoints/step_N/, samples/step_N.png and metrics.jsonl. Multi-GPU:
accelerate launch train_base_mnist.py --config ...
"""

import sys

from imagen.cli import run_script, train_stage


def main(argv: list[str] | None = None) -> None:
    train_stage(argv, __doc__, super_resolution=False)


if __name__ == "__main__":
    sys.exit(run_script(main))
