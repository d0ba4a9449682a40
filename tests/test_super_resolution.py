"""Super-resolution: the Efficient U-Net, noise conditioning augmentation, the SR trainer and script."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from imagen.attention import AttentionBlock
from imagen.checkpoint import latest_checkpoint
from imagen.config import stage_config_from_dict
from imagen.data import MNISTTextDataset
from imagen.efficient_unet import EfficientUNet
from imagen.nn import ResBlock
from imagen.stage import build_diffusion, build_network, sample_stage
from imagen.super_resolution import downsample, draw_aug_levels, noise_augment
from imagen.text import EncodedText
from imagen.trainer import Trainer, build_optimizer

from conftest import REPO_ROOT, randomized

TEXT_DIM = 24


def sr_config(unet=None, **sections):
    settings = {"type": "efficient_unet", "image_size": 32, "base_channels": 16, "channel_mults": [1, 2, 2],
                "num_res_blocks": [1, 2, 3], "num_head_channels": 16}
    settings.update(unet or {})
    raw = {"unet": settings, "super_resolution": {"low_res_size": 16}, "sampling": {"steps": 4}}
    raw.update(sections)
    return stage_config_from_dict(raw)


def sr_inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 1, 32, 32, generator=generator),
        "t": torch.randint(0, 1000, (batch,), generator=generator),
        "text_emb": torch.randn(batch, 5, TEXT_DIM, generator=generator),
        "text_mask": torch.tensor([[True] * 3 + [False] * 2] * batch),
        "low_res": torch.randn(batch, 1, 16, 16, generator=generator),
        "aug_level": torch.full((batch,), 0.25),
    }


def call(network, inputs, **changes):
    values = {**inputs, **changes}
    return network(values.pop("x"), values.pop("t"), **values)


def record(network, inputs, module_type):
    """Input resolution of every ``module_type`` layer that ran, in order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape[-1])))
             for m in network.modules() if isinstance(m, module_type)]
    with torch.no_grad():
        call(network, inputs)
    for hook in hooks:
        hook.remove()
    return seen


def test_efficient_unet_puts_more_blocks_at_low_resolution_and_resamples_outside_them():
    network = build_network(sr_config(), TEXT_DIM)
    assert isinstance(network, EfficientUNet)
    blocks = record(network, sr_inputs(), ResBlock)
    down = blocks[: 1 + 2 + 3]
    # Downsampling happens before a level's blocks, so each runs at its level's resolution.
    assert [resolution for _, resolution in down] == [32, 16, 16, 8, 8, 8]
    up = blocks[6:]
    assert [resolution for _, resolution in up] == [8, 8, 8, 16, 16, 32]  # upsampling after the blocks
    assert all(module.direction is None for module, _ in blocks)


def test_with_downsample_first_level_every_level_halves_the_resolution_as_in_appendix_f():
    config = sr_config({"downsample_first_level": True})
    assert config.unet.level_resolutions() == [16, 8, 4]
    network = build_network(config, TEXT_DIM)
    blocks = record(network, sr_inputs(), ResBlock)
    assert [resolution for _, resolution in blocks] == [16, 8, 8, 4, 4, 4] + [4, 4, 4, 8, 8, 16]
    calls = record(network, sr_inputs(), AttentionBlock)
    assert {resolution for _, resolution in calls} == {4}  # attention at image/8 with 3 levels
    with torch.no_grad():
        assert call(network, sr_inputs()).shape == (2, 1, 32, 32)
    # Two more resampling convolutions than the full-resolution first level, nothing else.
    plain = build_network(sr_config(), TEXT_DIM)
    extra = sum(p.numel() for p in network.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * (16 * 16 * 9 + 16)


@pytest.mark.parametrize("key", ["attention_resolutions", "cross_attention_resolutions"])
def test_an_empty_attention_list_switches_that_attention_off(key):
    config = sr_config({key: []})
    calls = record(build_network(config, TEXT_DIM), sr_inputs(), AttentionBlock)
    if key == "attention_resolutions":
        assert calls and all(not block.self_attention and block.text_dim == TEXT_DIM for block, _ in calls)
    else:
        assert calls and all(block.self_attention and block.text_dim is None for block, _ in calls)


def test_efficient_unet_attends_only_at_the_lowest_resolution_by_default():
    calls = record(build_network(sr_config(), TEXT_DIM), sr_inputs(), AttentionBlock)
    assert {resolution for _, resolution in calls} == {8}
    assert all(block.self_attention and block.text_dim == TEXT_DIM for block, _ in calls)


def test_without_self_attention_the_text_cross_attention_stays():
    config = sr_config({"self_attention": False, "cross_attention_resolutions": [16, 8]})
    network = randomized(build_network(config, TEXT_DIM))
    calls = record(network, sr_inputs(), AttentionBlock)
    assert {resolution for _, resolution in calls} == {16, 8}
    assert all(not block.self_attention and block.text_dim == TEXT_DIM for block, _ in calls)
    inputs = sr_inputs()
    with torch.no_grad():
        assert not torch.allclose(call(network, inputs), call(network, inputs, text_emb=torch.randn(2, 5, TEXT_DIM)),
                                  atol=1e-4)


@pytest.mark.parametrize("scaled", [True, False])
def test_skip_connections_are_scaled_by_one_over_sqrt_two(scaled):
    network = build_network(sr_config({"scale_skip_connections": scaled}), TEXT_DIM)
    captured = {}
    network.down_blocks[-1].register_forward_hook(lambda m, args, out: captured.update(skip=out))
    network.up_blocks[0].register_forward_pre_hook(lambda m, args: captured.update(concat=args[0]))
    with torch.no_grad():
        call(network, sr_inputs())
    channels = captured["skip"].shape[1]
    expected = captured["skip"] * (2**-0.5 if scaled else 1.0)
    assert torch.allclose(captured["concat"][:, channels:], expected)


def test_efficient_unet_ignores_padding_and_uses_every_input():
    network = randomized(build_network(sr_config(), TEXT_DIM))
    inputs = sr_inputs()
    polluted = inputs["text_emb"].clone()
    polluted[:, 3:] = 50.0
    with torch.no_grad():
        reference = call(network, inputs)
        assert torch.allclose(reference, call(network, inputs, text_emb=polluted), atol=1e-5)
        for key, other in (("low_res", torch.randn(2, 1, 16, 16)), ("aug_level", torch.full((2,), 0.75)),
                           ("text_emb", torch.randn(2, 5, TEXT_DIM))):
            assert not torch.allclose(reference, call(network, inputs, **{key: other}), atol=1e-4), key


def test_the_base_unet_can_serve_as_a_super_resolution_network():
    config = sr_config({"type": "unet", "num_res_blocks": 1, "attention_resolutions": [8],
                        "cross_attention_resolutions": [8]})
    network = randomized(build_network(config, TEXT_DIM))
    inputs = sr_inputs()
    with torch.no_grad():
        assert not torch.allclose(call(network, inputs), call(network, inputs, low_res=torch.randn(2, 1, 16, 16)))


@pytest.mark.parametrize("network_type", ["unet", "efficient_unet"])
def test_either_network_type_overfits_a_super_resolution_task(mnist_root, network_type):
    torch.manual_seed(0)
    unet = {"type": network_type, "base_channels": 32, "num_head_channels": 32}
    unet.update({"num_res_blocks": 1, "attention_resolutions": [8], "cross_attention_resolutions": [8]}
                if network_type == "unet" else {})
    config = sr_config(unet, training={"lr": 2e-3, "warmup_steps": 0, "lr_schedule": "constant"})
    network, diffusion = build_network(config, TEXT_DIM), build_diffusion(config)
    optimizer = build_optimizer(network, config)
    images = MNISTTextDataset(mnist_root, 32).get_batch(torch.arange(8))[0].repeat(2, 1, 1, 1)
    cond = {"text_emb": torch.randn(16, 3, TEXT_DIM), "text_mask": torch.ones(16, 3, dtype=torch.bool),
            "low_res": downsample(images, 16), "aug_level": torch.zeros(16)}
    generator = torch.Generator().manual_seed(0)
    fixed_t, fixed_noise = torch.linspace(0, 999, 16).long(), torch.randn(images.shape, generator=generator)

    def held_loss():
        with torch.no_grad():
            return diffusion.training_losses(network, images, fixed_t, fixed_noise, **cond)["mse"].mean().item()

    before = held_loss()
    for _ in range(25):
        loss = diffusion.training_losses(network, images, generator=generator, **cond)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_loss() < 0.5 * before


def test_the_efficient_unet_can_serve_as_the_base_network():
    config = stage_config_from_dict({"unet": {"type": "efficient_unet", "image_size": 16, "base_channels": 16,
                                              "channel_mults": [1, 2], "num_res_blocks": [1, 2],
                                              "num_head_channels": 16}})
    network = randomized(build_network(config, TEXT_DIM))
    inputs = sr_inputs()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = network(x, inputs["t"], text_emb=inputs["text_emb"], text_mask=inputs["text_mask"])
        other = network(x, inputs["t"], text_emb=torch.randn(2, 5, TEXT_DIM), text_mask=inputs["text_mask"])
    assert out.shape == x.shape and not torch.allclose(out, other, atol=1e-4)
    with pytest.raises(AssertionError, match="given to a base network"):
        network(x, inputs["t"], text_emb=inputs["text_emb"], text_mask=inputs["text_mask"], low_res=inputs["low_res"])


def test_noise_augmentation_follows_the_forward_process():
    diffusion = build_diffusion(sr_config())
    low_res = torch.rand(4096, 1, 4, 4) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    levels = torch.full((4096,), 0.5)
    augmented, applied = noise_augment(diffusion, low_res, levels, generator=generator)
    t = round(0.5 * 999)
    assert torch.equal(applied, torch.full((4096,), t / 999))
    alpha_bar = float(diffusion.alphas_cumprod[t])
    residual = augmented - alpha_bar**0.5 * low_res
    assert residual.mean().abs() < 0.01
    assert residual.var().item() == pytest.approx(1 - alpha_bar, rel=0.03)
    # Level 1 leaves (nearly) pure noise: the input is gone.
    drowned, _ = noise_augment(diffusion, low_res, torch.ones(4096), generator=generator)
    correlation = torch.corrcoef(torch.stack([drowned.flatten(), low_res.flatten()]))[0, 1]
    assert correlation.abs() < 0.02 and drowned.std().item() == pytest.approx(1.0, abs=0.02)
    # Level 0 means no augmentation at all; the same generator seed repeats the noise.
    untouched, zero = noise_augment(diffusion, low_res[:3], torch.zeros(3))
    assert torch.equal(untouched, low_res[:3]) and torch.equal(zero, torch.zeros(3))
    again, _ = noise_augment(diffusion, low_res, levels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, augmented)


def test_training_levels_are_drawn_from_the_configured_range():
    levels = draw_aug_levels(10000, [0.2, 0.6], generator=torch.Generator().manual_seed(0))
    assert levels.min() >= 0.2 and levels.max() <= 0.6
    assert levels.mean().item() == pytest.approx(0.4, abs=0.01)


def test_downsample_is_antialiased():
    stripes = torch.ones(1, 1, 32, 32)
    stripes[..., ::2] = -1.0  # one-pixel stripes: pure aliasing if subsampled
    low = downsample(stripes, 16)
    assert low[..., 2:-2].abs().max() < 0.01  # averaged to grey away from the border
    assert stripes[..., ::2].abs().min() == 1.0  # where plain subsampling would keep full contrast


class Recorder(torch.nn.Module):
    """Wraps a network and keeps the conditioning arguments of every call."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return self.network(x, t, **kwargs)


def test_sampling_feeds_the_fixed_level_and_one_augmented_low_res_to_every_step():
    config = sr_config(super_resolution={"low_res_size": 16, "sample_aug_level": 0.3})
    recorder = Recorder(randomized(build_network(config, TEXT_DIM)))
    text = EncodedText(torch.randn(2, 5, TEXT_DIM), torch.ones(2, 5, dtype=torch.bool))
    low_res = torch.rand(2, 1, 16, 16) * 2 - 1
    images = sample_stage(recorder, build_diffusion(config), config, text, low_res=low_res,
                          generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 32, 32) and images.abs().max() <= 1
    assert len(recorder.calls) == 4
    for call_args in recorder.calls:
        # Guidance doubles the batch: conditional and unconditional halves share the low-res input.
        assert torch.equal(call_args["aug_level"], torch.full((4,), round(0.3 * 999) / 999))
        assert torch.equal(call_args["low_res"], recorder.calls[0]["low_res"])
    assert not torch.allclose(recorder.calls[0]["low_res"][:2], low_res)  # it was noised...
    recorder.calls.clear()
    sample_stage(recorder, build_diffusion(config), config, text, low_res=low_res, aug_level=0.0)
    assert torch.equal(recorder.calls[0]["low_res"][:2], low_res)  # ...and level 0 leaves it alone


def test_trainer_noise_augments_with_levels_from_the_training_range(mnist_root, tmp_path):
    config = sr_config(
        super_resolution={"low_res_size": 16, "train_aug_range": [0.4, 0.6]},
        text_encoder={"name": "tiny", "max_length": 8, "device": "cpu"},
        data={"root": str(mnist_root)},
        training={"batch_size": 6, "max_steps": 1, "sample_every": 100, "checkpoint_every": 100},
    )
    trainer = Trainer.from_config(config, tmp_path / "run")
    recorder = Recorder(trainer.network)
    trainer.forward = recorder  # the network call of a training step
    trainer._micro_step()
    levels = recorder.calls[0]["aug_level"]
    assert levels.shape == (6,) and levels.min() >= 0.4 and levels.max() <= 0.6
    assert len(set(levels.tolist())) > 1


def test_train_sr_script_end_to_end(mnist_root, tmp_path):
    run_dir = tmp_path / "sr"
    result = subprocess.run(
        [sys.executable, "train_sr_mnist.py", "--config", "configs/mnist_cpu/sr.yaml", "--output-dir", str(run_dir),
         "--set", f"data.root={mnist_root}", "--set", "training.batch_size=4", "--set", "training.max_steps=2",
         "--set", "training.log_every=1", "--set", "sampling.steps=2", "--set", "training.sample_guidance=[1, 3]"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    grid = Image.open(run_dir / "samples" / "step_00000002.png")
    # Rows: low-res input, one per guidance weight (2), ground truth; 10 digits of 32 px + 2 px padding.
    assert grid.size == (10 * 34 + 2, 4 * 34 + 2)
