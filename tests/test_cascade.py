"""Cascade sampling: the Python API and sample_imagen.py on stages trained by the scripts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from imagen.cascade import Cascade
from imagen.checkpoint import latest_checkpoint
from imagen.errors import ImagenError

REPO_ROOT = Path(__file__).resolve().parent.parent


def python(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory):
    """The CPU cascade's two stages, each trained for two steps through its script."""
    root = tmp_path_factory.mktemp("cascade")
    quick = ["--set", f"data.root={mnist_root}", "--set", "training.batch_size=4", "--set", "training.max_steps=2",
             "--set", "sampling.steps=2", "--set", "training.sample_guidance=[1]"]
    for script, config, name in (("train_base_mnist.py", "configs/mnist_cpu/base.yaml", "base"),
                                 ("train_sr_mnist.py", "configs/mnist_cpu/sr.yaml", "sr")):
        result = python(script, "--config", config, "--output-dir", str(root / name), *quick)
        assert result.returncode == 0, result.stderr
    return root


def sample_cli(trained, *args):
    return python("sample_imagen.py", "--checkpoint", str(trained / "base"), "--checkpoint", str(trained / "sr"), *args)


def test_sample_imagen_end_to_end(trained, tmp_path):
    out = tmp_path / "out"
    long_prompt = "seven " * 30
    result = sample_cli(trained, "--prompts", "seven", "3", "zéro ✓/..", long_prompt, "--num-per-prompt", "2",
                        "--guidance", "3,2", "--steps", "3,2", "--sampler", "ddim", "--seed", "5",
                        "--batch-size", "3", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "truncated to text_encoder.max_length=16" in result.stderr
    assert "stage 0" in result.stderr and "stage 1" in result.stderr  # a progress bar per stage
    # Two images per prompt as columns, one row per prompt; 32 px final, 16 px base (+2 px padding).
    assert Image.open(out / "grid.png").size == (2 * 34 + 2, 4 * 34 + 2)
    assert Image.open(out / "stage_0.png").size == (2 * 18 + 2, 4 * 18 + 2)
    assert Image.open(out / "stage_1.png").size == Image.open(out / "grid.png").size
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files[:4] == ["0_seven.png", "1_seven.png", "2_3.png", "3_3.png"]
    assert files[4].startswith("4_z") and "/" not in files[4] and ".." not in files[4]
    assert len(files) == 8
    assert all(Image.open(out / "images" / name).size == (32, 32) for name in files)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["prompts"] == ["seven", "3", "zéro ✓/..", long_prompt]
    assert metadata["num_per_prompt"] == 2 and metadata["seed"] == 5 and metadata["batch_size"] == 3
    assert [s["guidance"] for s in metadata["stages"]] == [3.0, 2.0]
    assert [s["steps"] for s in metadata["stages"]] == [3, 2]
    assert [s["sampler"] for s in metadata["stages"]] == ["ddim", "ddim"]
    assert [s["step"] for s in metadata["stages"]] == [2, 2]
    assert metadata["stages"][1]["sample_aug_level"] == 0.2 and "sample_aug_level" not in metadata["stages"][0]
    assert metadata["stages"][0]["checkpoint"] == str(latest_checkpoint(trained / "base"))
    assert metadata["images"] == [f"images/{name}" for name in sorted(files, key=lambda n: int(n.split("_")[0]))]

    again = sample_cli(trained, "--prompts", "seven", "--output-dir", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_super_resolution_stage_receives_exactly_the_base_output(trained):
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    received = []
    cascade.stages[1].network.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["low_res"].clone()), with_kwargs=True)
    out = cascade.sample(["seven", "1", "two"], steps=2, sample_aug_level=0.0, seed=0)
    assert out.stages[0].shape == (3, 1, 16, 16) and out.images.shape == (3, 1, 32, 32)
    assert torch.equal(out.images, out.stages[1])
    for low_res in received:
        # Guidance runs the conditional and unconditional halves as one batch.
        assert torch.equal(low_res[:3], out.stages[0]) and torch.equal(low_res[3:], out.stages[0])


def test_same_seed_same_images_other_seed_other_images(trained):
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    first = cascade.sample(["4", "four"], steps=2, seed=1)
    second = cascade.sample(["4", "four"], steps=2, seed=1)
    other = cascade.sample(["4", "four"], steps=2, seed=2)
    assert torch.equal(first.images, second.images) and torch.equal(first.stages[0], second.stages[0])
    assert not torch.allclose(first.images, other.images)


def test_per_stage_settings_must_match_the_stage_count(trained):
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    with pytest.raises(ImagenError, match="guidance: got 3 values for a cascade of 2 stages"):
        cascade.sample(["1"], guidance=[1.0, 2.0, 3.0])


def edited_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    config_path = latest_checkpoint(target) / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    edit(config)
    config_path.write_text(yaml.safe_dump(config))
    return target


def test_bad_cascades_and_arguments_exit_2_with_a_clear_message(trained, tmp_path):
    def smaller_input(config):
        config["super_resolution"]["low_res_size"] = 8

    def wider(config):
        config["unet"]["base_channels"] = 48

    mismatched = edited_copy(trained / "sr", tmp_path / "sr_8", smaller_input)
    other_architecture = edited_copy(trained / "sr", tmp_path / "sr_wide", wider)
    unreadable = tmp_path / "prompts.txt"
    unreadable.write_bytes(b"\xff\xfe\x00bad")
    base, sr = str(trained / "base"), str(trained / "sr")
    out = ["--output-dir", str(tmp_path / "out")]
    cases = [
        (["--checkpoint", base, "--checkpoint", str(mismatched), "--prompts", "1"], "low_res_size is 8"),
        (["--checkpoint", base, "--checkpoint", str(other_architecture), "--prompts", "1"], "do not fit the network"),
        (["--checkpoint", base, "--checkpoint", str(tmp_path / "missing"), "--prompts", "1"], "does not exist"),
        (["--checkpoint", sr, "--prompts", "1"], "must be a base stage"),
        (["--checkpoint", base, "--checkpoint", sr, "--prompts", "1", "--guidance", "1,2,3"], "got 3 values for a cascade of 2"),
        (["--checkpoint", base, "--prompts", "1", "--sampler", "euler"], "unknown 'euler'"),
        (["--checkpoint", base, "--prompts", "1", "--steps", "0"], "positive integers"),
        (["--checkpoint", base, "--prompts", "1", "--steps", "5000"], "only 1000 timesteps"),
        (["--checkpoint", base, "--prompts", "1", "--guidance", "x"], "not a valid float"),
        (["--checkpoint", base, "--prompts-file", str(unreadable)], "cannot read it"),
        (["--checkpoint", base, "--prompts-file", str(tmp_path / "none.txt")], "cannot read it"),
        (["--checkpoint", base], "no prompts"),
        (["--checkpoint", base, "--prompts", "1", "--num-per-prompt", "0"], "--num-per-prompt 0"),
        (["--checkpoint", base, "--prompts", "1", "--sample-aug-level", "1.5"], "in [0, 1]"),
    ]
    for args, fragment in cases:
        result = python("sample_imagen.py", *args, *out)
        assert result.returncode == 2, (args, result.stderr)
        assert fragment in result.stderr, (fragment, result.stderr)
        assert "Traceback" not in result.stderr
