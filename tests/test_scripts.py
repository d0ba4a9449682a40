"""The scripts: user errors are one paragraph and exit code 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


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
        (["train_base_mnist.py", "--config", "configs/mnist_cpu/sr.yaml"], "train it with train_sr_mnist.py"),
        (["train_sr_mnist.py", "--config", "configs/mnist_cpu/base.yaml"], "train it with train_base_mnist.py"),
        (["train_sr_mnist.py", "--config", "configs/mnist_cpu/sr.yaml", "--set", "super_resolution.low_res_size=64"],
         "below unet.image_size (32)"),
        (["sample_imagen.py", "--checkpoint", "runs/does-not-exist"], "--checkpoint runs/does-not-exist: no config.yaml"),
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


def test_sample_imagen_checks_stage_order(tmp_path):
    base = yaml.safe_load((REPO_ROOT / "configs/mnist_cpu/base.yaml").read_text())
    sr = yaml.safe_load((REPO_ROOT / "configs/mnist/sr_256.yaml").read_text())
    for name, config in (("base", base), ("sr", sr)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    result = run("sample_imagen.py", "--checkpoint", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "sr"))
    assert result.returncode == 2
    assert "low_res_size is 64" in result.stderr and "produces 16x16" in result.stderr


def test_sr_training_script_says_plainly_that_it_is_not_built_yet(tmp_path):
    result = run(str(REPO_ROOT / "train_sr_mnist.py"), "--config", str(REPO_ROOT / "configs/mnist_cpu/sr.yaml"),
                 cwd=tmp_path)
    assert result.returncode == 1
    assert "valid" in result.stdout
    assert "not implemented yet" in result.stderr and "nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []
