"""Cascade sampling: the Python API and sample_imagen.py on stages trained by the scripts."""

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image

from imagen.cascade import Cascade, load_stage
from imagen.checkpoint import latest_checkpoint
from imagen.errors import ImagenError, ImageRangeWarning

from conftest import python


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


def test_a_checkpoint_may_be_named_by_its_step_without_the_zero_padding(trained):
    stage = load_stage(trained / "base" / "checkpoints" / "step_2", torch.device("cpu"))
    assert stage.checkpoint == trained / "base" / "checkpoints" / "step_00000002" and stage.step == 2
    with pytest.raises(ImagenError, match=r"step_00000003 does not exist \(expected a run folder or one of its "):
        load_stage(trained / "base" / "checkpoints" / "step_3", torch.device("cpu"))


def test_per_stage_settings_must_match_the_stage_count(trained):
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    with pytest.raises(ImagenError, match="guidance: got 3 values for a cascade of 2 stages"):
        cascade.sample(["1"], guidance=[1.0, 2.0, 3.0])


def test_bad_cascades_exit_2_with_a_clear_message(trained, tmp_path):
    """The remaining bad inputs are in tests/test_reliability.py's table."""
    shutil.copytree(trained / "sr", tmp_path / "sr_wide")
    config_path = latest_checkpoint(tmp_path / "sr_wide") / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["unet"]["base_channels"] = 48
    config_path.write_text(yaml.safe_dump(config))
    base, out = str(trained / "base"), ["--output-dir", str(tmp_path / "out")]
    cases = [
        (["--checkpoint", str(trained / "sr"), "--checkpoint", base], "must be a base stage"),
        (["--checkpoint", base, "--checkpoint", str(tmp_path / "sr_wide")], "do not fit the network"),
        (["--checkpoint", base, "--checkpoint", str(tmp_path / "missing")], "does not exist"),
    ]
    for args, fragment in cases:
        result = python("sample_imagen.py", *args, "--prompts", "1", *out)
        assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_cascade_file_names_the_run_folders_to_sample(trained, tmp_path):
    """--cascade FILE samples the folders its stages train into, exactly as --checkpoint does."""
    for name, config in (("base", "configs/mnist_cpu/base.yaml"), ("sr", "configs/mnist_cpu/sr.yaml")):
        raw = yaml.safe_load(open(config))
        raw["training"]["output_dir"] = str(trained / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "cascade.yaml").write_text("stages:\n  - base.yaml\n  - sr.yaml\n")
    common = ["--prompts", "seven", "3", "--steps", "2", "--seed", "1"]
    by_file = python("sample_imagen.py", "--cascade", str(tmp_path / "cascade.yaml"), *common,
                     "--output-dir", str(tmp_path / "by_file"))
    assert by_file.returncode == 0, by_file.stderr
    by_folder = sample_cli(trained, *common, "--output-dir", str(tmp_path / "by_folder"))
    assert by_folder.returncode == 0, by_folder.stderr
    stages = json.loads((tmp_path / "by_file" / "metadata.json").read_text())["stages"]
    assert [s["checkpoint"] for s in stages] == [str(latest_checkpoint(trained / n)) for n in ("base", "sr")]
    assert (tmp_path / "by_file" / "grid.png").read_bytes() == (tmp_path / "by_folder" / "grid.png").read_bytes()
    both = python("sample_imagen.py", "--cascade", str(tmp_path / "cascade.yaml"),
                  "--checkpoint", str(trained / "base"), *common, "--output-dir", str(tmp_path / "both"))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_image_to_image_edits_the_base_stage_and_runs_the_rest(trained, tmp_path, mnist_root):
    from imagen.data import MNISTTextDataset

    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    digits = MNISTTextDataset(mnist_root, 16, split="test").get_batch([0, 1])[0]
    kept = cascade.sample(["seven", "3"], steps=4, init_images=digits, strength=0.0)
    assert torch.equal(kept.stages[0], digits) and kept.images.shape == (2, 1, 32, 32)
    edited = cascade.sample(["seven", "3"], steps=4, init_images=digits, strength=0.5)
    assert not torch.equal(edited.stages[0], digits)
    assert torch.equal(edited.images, cascade.sample(["seven", "3"], steps=4, init_images=digits, strength=0.5).images)
    Image.fromarray(((digits[0, 0] + 1) * 127.5).round().byte().numpy()).save(tmp_path / "seven.png")
    result = sample_cli(trained, "--prompts", "seven", "three", "--init-images", str(tmp_path / "seven.png"),
                        "--strength", "0.5", "--steps", "4", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["strength"] == 0.5 and metadata["init_images"] == [str(tmp_path / "seven.png")]
    bad = sample_cli(trained, "--prompts", "seven", "--init-images", str(tmp_path / "seven.png"), "--strength", "2",
                     "--output-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--strength 2.0: expected a number in [0, 1]" in bad.stderr
    # A bright file is no [0, 1] mistake: the script converts files to [-1, 1] itself.
    Image.new("L", (16, 16), 230).save(tmp_path / "bright.png")
    bright = sample_cli(trained, "--prompts", "seven", "--init-images", str(tmp_path / "bright.png"), "--steps", "2",
                        "--output-dir", str(tmp_path / "bright"))
    assert bright.returncode == 0 and "no value is negative" not in bright.stderr, bright.stderr


def test_inpainting_keeps_the_known_part_at_every_stage(trained, tmp_path, mnist_root):
    from imagen.cascade import inpainting_at
    from imagen.data import MNISTTextDataset

    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    digits = MNISTTextDataset(mnist_root, 32, split="test").get_batch([0, 1])[0]
    masks = torch.zeros(2, 1, 32, 32)
    masks[..., 16:, :] = 1.0  # draw the bottom half
    out = cascade.sample(["seven", "2"], steps=3, inpaint_images=digits, inpaint_masks=masks)
    for stage, size in zip(out.stages, (16, 32)):
        known = inpainting_at(size, digits, masks, 1)
        kept = known.keep.bool().expand_as(stage)
        assert torch.equal(stage[kept], known.image[kept]) and not torch.equal(stage[~kept], known.image[~kept])
    Image.fromarray(((digits[0, 0] + 1) * 127.5).round().byte().numpy()).save(tmp_path / "digit.png")
    Image.fromarray((masks[0, 0] * 255).byte().numpy()).save(tmp_path / "mask.png")
    result = sample_cli(trained, "--prompts", "seven", "--inpaint-images", str(tmp_path / "digit.png"),
                        "--inpaint-masks", str(tmp_path / "mask.png"), "--sampler", "ddpm", "--inpaint-resample", "2",
                        "--steps", "3", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["inpaint_resample"] == 2
    bad = sample_cli(trained, "--prompts", "seven", "--inpaint-images", str(tmp_path / "digit.png"),
                     "--inpaint-masks", str(tmp_path / "mask.png"), "--inpaint-resample", "2",
                     "--output-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "add --sampler ddpm" in bad.stderr


def test_python_image_inputs_are_resized_to_their_stage_and_bad_ones_refused(trained, mnist_root):
    from imagen.data import MNISTTextDataset
    from imagen.super_resolution import downsample

    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    digits = MNISTTextDataset(mnist_root, 32, split="test").get_batch([0, 1])[0]
    kept = cascade.sample(["seven", "2"], steps=2, init_images=digits, strength=0.0)
    assert torch.equal(kept.stages[0], downsample(digits, 16))  # init_images at 32 px, base at 16 px
    # A chain from the super-resolution stage takes low_res at any size, resized as in training.
    chain = Cascade([cascade.stages[1]], super_resolution_first=True)
    received = []
    chain.stages[0].network.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["low_res"].clone()), with_kwargs=True)
    chain.sample(["seven", "2"], steps=2, low_res=digits, sample_aug_level=0.0)
    assert torch.allclose(received[0][:2], downsample(digits, 16), atol=1e-6)  # level 0: float rounding only
    masks = torch.ones(2, 1, 32, 32)
    bad = [
        (dict(init_images=digits[:1]), r"init_images: expected 2 images, one per prompt, got 1 \(images.expand"),
        (dict(init_images=digits.expand(-1, 3, -1, -1)), r"init_images: expected 1 channel\(s\), got 3 \(images.mean"),
        (dict(init_images=digits[..., :30]), "init_images: expected square images, got 32x30; crop them first"),
        (dict(init_images=digits[:, 0]), r"init_images: expected a tensor \(N, C, H, W\), got shape \(2, 32, 32\)"),
        (dict(init_images=(digits + 1) * 127.5), r"init_images: expected values in \[-1, 1\] \(x / 127.5 - 1"),
        (dict(init_images=digits * float("nan")), "init_images: holds NaN"),
        (dict(init_images=digits, strength=1.5), r"strength 1.5: expected a number in \[0, 1\]"),
        (dict(inpaint_images=digits), "inpaint_images and inpaint_masks go together"),
        (dict(inpaint_images=digits, inpaint_masks=masks.expand(-1, 3, -1, -1)), "inpaint_masks: expected 1 channel"),
        (dict(inpaint_images=digits, inpaint_masks=-masks), r"inpaint_masks: expected values in \[0, 1\], got \[-1"),
        (dict(inpaint_images=torch.cat([digits, digits]), inpaint_masks=masks), "inpaint_images: expected 2 images"),
    ]
    for arguments, message in bad:
        with pytest.raises(ImagenError, match=message):
            cascade.sample(["seven", "2"], steps=2, **arguments)
    with pytest.warns(ImageRangeWarning, match=r"init_images: no value is negative; if these are \[0, 1\]") as caught:
        cascade.sample(["seven", "2"], steps=2, init_images=(digits + 1) / 2, strength=0.5)
    assert caught[0].filename == __file__  # the caller's line
    with pytest.raises(ImagenError, match="low_res: expected 2 images, one per prompt, got 1"):
        chain.sample(["seven", "2"], steps=2, low_res=digits[:1])


def test_python_sample_arguments_are_checked_before_anything_is_sampled(trained):
    import numpy as np

    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    bad = [
        (("seven",), {}, r"prompts: expected a list of strings, got 'seven' \(str\); one prompt is written \[prompt\]"),
        (([],), {}, "prompts: expected at least one prompt"),
        (([7],), {}, r"prompts: expected strings, got 7 \(int\)"),
        ((["!!!"],), {}, "prompt '!!!': the text encoder reads it as empty"),
        ((["1"],), dict(steps=0), r"steps 0 \(stage 0\): expected an integer >= 1"),
        ((["1"],), dict(steps=[2, 2.5]), r"steps 2.5 \(stage 1\): expected an integer >= 1"),
        ((["1"],), dict(batch_size=0), "batch_size 0: expected an integer >= 1"),
        ((["1"],), dict(guidance=float("nan")), r"guidance nan \(stage 0\): expected a number >= 0"),
        ((["1"],), dict(guidance=[3.0, -1.0]), r"guidance -1.0 \(stage 1\): expected a number >= 0"),
        ((["1"],), dict(seed=-1), "seed -1: expected an integer in 0..4294967295"),
        ((["1"],), dict(seed=None), "seed None: expected an integer"),
        ((["1"],), dict(sample_aug_level=2.0), r"sample_aug_level 2.0 \(stage 1\): expected a number in \[0, 1\]"),
        ((["1"],), dict(strength=0.3), "strength 0.3 says how much of init_images to redraw, but none are given"),
        ((["1"],), dict(inpaint_resample=0), "inpaint_resample 0: expected an integer >= 1"),
        ((["1"],), dict(inpaint_resample=3), "inpaint_resample 3 repeats the steps of inpainting, but no"),
        ((["1"],), dict(thresholding="dynamc"), r"thresholding .dynamc. \(stage 0\): expected one of none"),
    ]
    for arguments, settings, message in bad:
        with pytest.raises(ImagenError, match=message):
            cascade.sample(*arguments, **settings)
    with pytest.raises(ImagenError, match=r"steps '2' \(stage 0\): expected an integer >= 1, got a str"):
        cascade.sample(["1"], steps="2")
    with pytest.raises(ImagenError, match="inpaint_resample 2 runs the ddpm formulation's ancestral sampler"):
        cascade.sample(["1"], inpaint_images=torch.zeros(1, 1, 32, 32) - 1, inpaint_masks=torch.ones(1, 1, 32, 32),
                       inpaint_resample=2, sampler="ddim")
    # NumPy and torch scalars and arrays, and tuples, are numbers and prompts like any other.
    out = cascade.sample(("1", "2"), guidance=np.float32(3.0), steps=np.int64(2), seed=np.int64(5))
    same = cascade.sample(["1", "2"], guidance=torch.tensor([3.0, 3.0]), steps=torch.tensor(2), seed=torch.tensor(5))
    assert out.images.shape == (2, 1, 32, 32) and torch.equal(out.images, same.images)


def test_python_loading_arguments_are_checked(trained):
    from imagen.config import ConfigError, load_stage_config

    with pytest.raises(ImagenError, match=r"paths: expected a list of run folders, .* one stage is written \[path\]"):
        Cascade.from_checkpoints(str(trained / "base"))
    with pytest.raises(ImagenError, match="weights 'emma': expected 'ema'"):
        Cascade.from_checkpoints([trained / "base"], weights="emma")
    with pytest.raises(ImagenError, match="device 'gpu': expected auto, cpu"):
        load_stage(trained / "base", "gpu")
    assert load_stage(trained / "base").network.training is False  # device defaults to auto
    with pytest.raises(ConfigError, match=r"overrides: expected a list of 'key.path=value' strings, got 'training"):
        load_stage_config("configs/mnist_cpu/base.yaml", "training.max_steps=3")


def test_sample_stage_names_a_low_res_of_the_wrong_shape(trained):
    from imagen.stage import sample_stage

    sr = load_stage(trained / "sr", "cpu")
    text = Cascade([sr], super_resolution_first=True).encode(sr, ["1", "2", "3", "4"])
    with pytest.raises(ImagenError, match=r"low_res \(4, 1, 8, 8\): expected \(4, 1, 16, 16\), one image per prompt"):
        sample_stage(sr.network, sr.diffusion, sr.config, text, steps=2, low_res=torch.zeros(4, 1, 8, 8))
    with pytest.raises(ImagenError, match=r"low_res \(2, 1, 16, 16\): expected \(4, 1, 16, 16\)"):
        sample_stage(sr.network, sr.diffusion, sr.config, text, steps=2, low_res=torch.zeros(2, 1, 16, 16))
    with pytest.raises(ImagenError, match=r"must be a base stage .* super_resolution_first=True"):
        Cascade([sr])
