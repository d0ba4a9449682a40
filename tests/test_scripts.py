"""The scripts: user errors are one paragraph and exit code 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT


def run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train_base_mnist.py", "--config", "configs/missing.yaml"], "configs/missing.yaml: config file not found"),
        (["train_base_mnist.py", "--config", "configs/mnist_cpu/base.yaml", "--set", "training.batchsize=2"],
         "did you mean 'training.batch_size'"),
        (["train_base_mnist.py", "--config", "configs/mnist_cpu/base.yaml", "--set", "sampling.steps=0"],
         "'sampling.steps': expected a positive integer"),
        (["train_base_mnist.py", "--config", "configs/mnist_cpu/base.yaml", "--set", "text_encoder.name=tiny-scene"],
         "did you mean 'tiny-scenes'?"),
        (["train_base_mnist.py", "--config", "configs/mnist_cpu/sr.yaml"], "train it with train_sr_mnist.py"),
        (["train_sr_mnist.py", "--config", "configs/mnist_cpu/base.yaml"], "train it with train_base_mnist.py"),
        (["train_sr_mnist.py", "--config", "configs/mnist_cpu/sr.yaml", "--set", "super_resolution.low_res_size=64"],
         "below unet.image_size (32)"),
        (["sample_imagen.py", "--checkpoint", "runs/does-not-exist", "--prompts", "1", "--output-dir", "x"],
         "checkpoint folder runs/does-not-exist does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, fragment):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback():
    result = run("train_base_mnist.py", "--config", "configs/missing.yaml", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
