"""Device hygiene: training, sample grids, resume, cascade sampling and evaluation with the network
and the data on one device and the text encoder, the files and the reports on the host.

PyTorch's meta device stands in for the GPU this machine lacks. Meta tensors hold shapes
but no values, so a tensor combined with a CPU tensor fails exactly as a CUDA tensor would
("expected all tensors to be on the same device"), and so does a copy to the host that
bypasses ``imagen.io.to_host``, the one place values leave the accelerator. Passing here
means no such crossing is left on these paths (the grid crash of issue 15 was one: the
super-resolution grid joined the ground-truth row on the device with sampled rows
already moved to the host).
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from imagen.cascade import Cascade
from imagen.checkpoint import latest_checkpoint
from imagen.config import config_to_dict, stage_config_from_dict
from imagen.data import MNISTScenesDataset, MNISTTextDataset
from imagen.diffusion import GaussianDiffusion
from imagen.evaluation import Evaluator
from imagen.io import resolve_device, save_png, seeded_generator, to_device, to_host
from imagen.nn import GroupNorm, group_norm, set_group_norm_precision
from imagen.stage import build_diffusion, build_network, sample_stage
from imagen.text import EncodedText
from imagen.trainer import Trainer

from conftest import HostWaits, randomized

META = torch.device("meta")
# Loading real weights into meta parameters is a (warned) no-op: values are not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")


@pytest.mark.parametrize("super_resolution", [False, True], ids=["base", "sr"])
def test_a_stage_trains_writes_grids_and_resumes_on_another_device(tiny_stage, tmp_path, super_resolution):
    run_dir = tmp_path / "run"
    config = tiny_stage(super_resolution, sample_every=1, sample_guidance=[1.0, 3.0])
    trainer = Trainer.from_config(config, run_dir, device=META)
    # Everything the step touches lives on the training device; the grid's text stays on the host.
    assert trainer.device == META and trainer.dataset.images.is_meta and trainer.text_table.embeddings.is_meta
    assert all(p.is_meta for p in trainer.network.parameters())
    assert all(p.is_meta for p in trainer.ema.network.parameters())
    assert not trainer.grid.text.embeddings.is_meta
    if super_resolution:
        assert trainer.grid.images.is_meta  # the ground-truth row of the grid comes from the dataset
    trainer.train()

    for step in (1, 2):  # 4 rows: SR low-res, 2 weights, truth; base: 2 weights x (words, numerals)
        grid = Image.open(run_dir / "samples" / f"step_{step:08d}.png")
        assert grid.size == (10 * 18 + 2, 4 * 18 + 2)
    assert latest_checkpoint(run_dir).name == "step_00000002"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["peak_memory_mb"] > 0 for m in metrics)

    config = tiny_stage(super_resolution, sample_every=1, sample_guidance=[1.0, 3.0], max_steps=3)
    resumed = Trainer.from_config(config, run_dir, resume=True, device=META)
    assert resumed.step == 2
    resumed.train()
    assert latest_checkpoint(run_dir).name == "step_00000003"


def _variant(tiny_stage, variant: str, tmp_path):
    """A tiny stage config of one kind of training run."""
    config = config_to_dict(tiny_stage(variant == "sr", max_steps=10, log_every=100, checkpoint_every=100))
    if variant == "v_min_snr":
        config["diffusion"].update(objective="v", min_snr_gamma=5.0)
    elif variant == "edm":
        config["diffusion"]["formulation"] = "edm"
        config["sampling"]["sampler"] = "heun"
    elif variant == "caption_folder":
        folder = tmp_path / "captioned"
        folder.mkdir()
        for index in range(4):
            Image.new("L", (20, 20), 60 * index).save(folder / f"{index}.png")
            (folder / f"{index}.txt").write_text(f"grey {index}")
        config["data"].update(dataset="caption_folder", root=str(folder))
    return stage_config_from_dict(config)


@pytest.mark.parametrize("variant", ["base", "sr", "v_min_snr", "edm", "caption_folder"])
def test_a_training_step_never_makes_the_host_wait_for_the_device(tiny_stage, tmp_path, variant):
    """After the first step (which copies the diffusion's per-step tables to the device once),
    a step copies nothing from the host that the host must wait for, so the training loop
    queues work ahead of a GPU. Each step used to make three such copies (five for
    super-resolution): the diffusion's coefficient tables, moved to the device at every use."""
    trainer = Trainer.from_config(_variant(tiny_stage, variant, tmp_path), tmp_path / "run", device=META)
    trainer.train_step()
    with HostWaits() as waits:
        trainer.train_step()
        trainer.train_step()
    assert waits.copies == []
    assert trainer.step == 3


def test_a_scene_batch_never_makes_the_host_wait_for_the_device(mnist_root):
    """Scene batches draw their captions and layouts on the host and compose the canvases on
    the device; the few integers cross without a wait."""
    canvases = MNISTScenesDataset(mnist_root, 16, split="test", device=META)
    with HostWaits() as waits:
        images, captions = canvases.sample_batch(8, torch.Generator().manual_seed(0))
    assert waits.copies == []
    assert images.is_meta and images.shape == (8, 1, 16, 16) and captions.is_meta and captions.shape == (8,)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m_sde", "heun_stochastic"])
@pytest.mark.parametrize("super_resolution", [False, True], ids=["base", "sr"])
def test_sampling_makes_the_host_wait_only_before_its_first_step(tiny_stage, sampler, super_resolution):
    """The copies sampling makes from the host (the prompts, the low-res input, the diffusion's
    tables) happen once per call: as many for 6 steps as for 2, none per step."""
    raw = config_to_dict(tiny_stage(super_resolution))
    if sampler == "heun_stochastic":
        raw["diffusion"]["formulation"] = "edm"
        raw["sampling"]["sampler"] = sampler
    config = stage_config_from_dict(raw)
    network = build_network(config, 32).to(META).eval()
    text = EncodedText(torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool))
    low_res = torch.zeros(2, 1, 8, 8) if super_resolution else None
    # The diffusion processes are shared (cached by their settings): a first call puts the tables
    # that other tests may already have put on the device there.
    sample_stage(network, build_diffusion(config), config, text, steps=2, sampler=sampler,
                 generator=seeded_generator(META, 0), low_res=low_res)
    counts = []
    for steps in (2, 6):
        with HostWaits() as waits:
            images = sample_stage(network, build_diffusion(config), config, text, guidance=3.0, sampler=sampler,
                                  steps=steps, generator=seeded_generator(META, 0), low_res=low_res)
        assert images.is_meta and images.shape == (2, 1, 16, 16)
        counts.append(len(waits.copies))
    assert 0 < counts[0] == counts[1]


@pytest.mark.parametrize("mode", ["cascade", "sr"])
def test_cascade_sampling_and_evaluation_on_another_device(trained, classifier, mnist_root, mode):
    """Stages and classifier on the device; prompts, real digits, low-res inputs and the report on the host."""
    network, info = classifier
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="meta")
    assert cascade.device == META
    evaluator = Evaluator(cascade.stages, mode, copy.deepcopy(network).to(META), info, mnist_root, num_images=20,
                          steps=[2, 2], batch_size=10, progress=False)
    report = evaluator.evaluate([1.0], unconditional=False)
    result = report["results"][0]
    assert report["resolution"] == 32 and 0.0 <= result["prompt_accuracy"] <= 1.0
    assert all(value == value for value in (result["fid"], report["fid_floor"]))  # finite, not NaN


@pytest.mark.parametrize("edit", ["image_to_image", "inpaint", "low_res"])
def test_cascade_edits_images_given_on_the_host_on_another_device(trained, mnist_root, edit):
    """Images passed to Cascade.sample are checked and resized on the host, then meet the device's samples."""
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="meta")
    digits = MNISTTextDataset(mnist_root, 32, split="test").get_batch([0, 1])[0]
    masks = torch.zeros(2, 1, 32, 32)
    masks[..., 16:, :] = 1.0
    if edit == "image_to_image":
        out = cascade.sample(["seven", "2"], steps=2, init_images=digits, strength=0.5)
    elif edit == "inpaint":
        out = cascade.sample(["seven", "2"], steps=2, inpaint_images=digits, inpaint_masks=masks, sampler="ddpm",
                             inpaint_resample=2)
    else:
        out = Cascade([cascade.stages[1]], super_resolution_first=True).sample(["seven", "2"], steps=2, low_res=digits)
    assert all(stage.is_meta for stage in out.stages) and out.images.shape == (2, 1, 32, 32)


def test_save_png_joins_rows_from_different_devices(tmp_path):
    rows = [torch.zeros(10, 1, 8, 8, device=META), torch.ones(10, 1, 8, 8)]
    save_png(rows, tmp_path / "grid.png", columns=10)
    assert Image.open(tmp_path / "grid.png").size == (10 * 10 + 2, 2 * 10 + 2)


def test_host_copies_and_generators_of_the_stand_in_device():
    host = to_host(torch.ones(3, 2, device=META, dtype=torch.bfloat16))
    assert host.device.type == "cpu" and host.dtype == torch.bfloat16 and host.shape == (3, 2)
    cpu = torch.arange(3.0, requires_grad=True)
    assert not to_host(cpu).requires_grad and torch.equal(to_host(cpu), torch.arange(3.0))
    a, b = seeded_generator("cpu", 5), seeded_generator(META, 5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert torch.rand(4, generator=seeded_generator(META, 5), device=META).is_meta


def test_a_diffusion_table_reaches_a_device_once_cast_on_the_host():
    """Each table crosses once per device and dtype, already cast (MPS has no float64), and
    indexing it gives the CPU table's values."""
    diffusion = GaussianDiffusion.from_schedule("cosine", 50)
    with HostWaits() as waits:
        first = diffusion.table("sqrt_alphas_cumprod", META, torch.float32)
        again = diffusion.table("sqrt_alphas_cumprod", META, torch.float32)
    assert again is first and first.dtype == torch.float32
    assert waits.copies == [("aten._to_copy.default", (50,), torch.float32)]
    t = torch.tensor([0, 17, 49])
    x = torch.ones(3, 1, 2, 2)
    assert torch.equal(diffusion.q_sample(x, t, torch.zeros_like(x))[:, 0, 0, 0],
                       diffusion.sqrt_alphas_cumprod[t].float())
    assert torch.equal(diffusion.model_timesteps(t), t)


def test_the_suite_and_the_scripts_it_starts_see_no_gpu():
    """What the suite checks is the CPU's behaviour, also on a machine with a GPU (conftest hides it)."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and resolve_device("auto") == torch.device("cpu")
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "0", child.stderr


@pytest.mark.parametrize("device, pinned, asynchronous", [("cuda:0", True, True), ("mps", False, False),
                                                           ("meta", False, True), ("cpu", False, False)])
def test_only_cuda_copies_in_asynchronously_and_from_pinned_memory(device, pinned, asynchronous):
    """A host tensor reaches a GPU from pinned memory without blocking; elsewhere (MPS corrupts
    such copies, pytorch#189690) it is an ordinary copy. Recorded on a stand-in tensor, as this
    machine has neither device."""
    calls = []

    class HostTensor:
        device = torch.device("cpu")

        def is_pinned(self):
            return False

        def pin_memory(self):
            calls.append("pin_memory")
            return self

        def to(self, target, non_blocking=False):
            calls.append(("to", target, non_blocking))
            return self

    to_device(HostTensor(), torch.device(device))
    assert calls == ["pin_memory"] * pinned + [("to", torch.device(device), asynchronous)]


def test_sampling_in_bf16_runs_the_network_in_bf16_and_the_sampler_in_float32(tiny_stage):
    config = tiny_stage()
    network = randomized(build_network(config, 32))
    seen = []
    network.output.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    text = EncodedText(torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool))
    images = {}
    for precision in ("no", "bf16"):
        stage = stage_config_from_dict({**config_to_dict(config),
                                        "sampling": {"steps": 3, "mixed_precision": precision}})
        images[precision] = sample_stage(network, build_diffusion(stage), stage, text, guidance=3.0,
                                         generator=seeded_generator("cpu", 0))
    assert seen[:3] == [torch.float32] * 3 and seen[3:] == [torch.bfloat16] * 3
    assert images["bf16"].dtype == torch.float32
    difference = (images["bf16"] - images["no"]).abs()
    assert 0 < difference.mean() < 0.05  # bf16 rounding, not another image


@pytest.mark.parametrize("precision", ["float32", "activations"])
def test_group_norms_under_autocast_compute_in_the_configured_precision(precision):
    norm = group_norm(64)
    norm.precision = precision
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64, generator=generator))
        norm.bias.copy_(torch.randn(64, generator=generator))
    x = (torch.randn(4, 64, 8, 8, generator=generator) * 3 + 1).bfloat16().requires_grad_()
    exact = nn.functional.group_norm(x.detach().float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    with torch.autocast("cpu", torch.bfloat16):
        y = norm(x)
        y_from_float32 = norm(x.detach().float())
    if precision == "float32":  # what CUDA's autocast does; CPU's would return bf16
        assert y.dtype == torch.float32 and torch.equal(y, exact)
    else:  # float32 statistics, a bf16 result
        assert y.dtype == torch.bfloat16 and not torch.equal(y.float(), exact)
        torch.testing.assert_close(y.float(), exact, rtol=0.02, atol=0.02)
    assert y_from_float32.dtype == torch.float32  # never lowers a float32 input's precision
    torch.testing.assert_close(y_from_float32, exact)
    with torch.no_grad():  # outside autocast it is nn.GroupNorm whatever its precision
        assert torch.equal(norm(x.float()), exact)
    y.float().square().sum().backward()
    expected = torch.autograd.grad(exact.square().sum(), norm.weight)[0]
    torch.testing.assert_close(norm.weight.grad, expected, rtol=0.02, atol=0.5)


def test_a_group_norm_runs_outside_autocast_so_that_no_device_policy_recasts_it(monkeypatch):
    """CUDA's autocast would cast a bf16 norm back to float32; CPU's leaves norms alone, so on a
    CPU the guard shows only as where the norm runs (autocast off)."""
    import imagen.nn

    norm, seen = group_norm(16), []
    norm.precision = "activations"
    group_norm_function = nn.functional.group_norm
    monkeypatch.setattr(imagen.nn.nn.functional, "group_norm", lambda *args, **kwargs: (
        seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)), group_norm_function(*args, **kwargs))[1])
    with torch.autocast("cpu", torch.bfloat16):
        norm(torch.randn(2, 16, 4, 4).bfloat16())
    assert seen == [(False, torch.bfloat16)]
    with pytest.raises(ValueError, match="group norm precision 'bf16': expected one of"):
        set_group_norm_precision(norm, "bf16")
    assert "precision=activations" in repr(norm)


def network_inputs(config) -> dict:
    """Seeded keyword inputs of a training step for a network of ``config`` built with text width
    32: two images, 8 text tokens, the second caption dropped; a low-resolution image and its
    augmentation level for a super-resolution network."""
    generator, size = torch.Generator().manual_seed(1), config.unet.image_size
    inputs = {"x": torch.randn(2, 1, size, size, generator=generator), "t": torch.tensor([10, 900]),
              "text_emb": torch.randn(2, 8, 32, generator=generator), "text_mask": torch.ones(2, 8, dtype=torch.bool),
              "drop_text": torch.tensor([False, True])}
    if config.super_resolution is not None:
        low = config.super_resolution.low_res_size
        inputs.update(low_res=torch.randn(2, 1, low, low, generator=generator), aug_level=torch.tensor([0.0, 0.3]))
    return inputs


@pytest.mark.parametrize("unet_type", ["unet", "efficient_unet"])
def test_the_configured_group_norm_precision_reaches_every_norm_and_changes_only_mixed_precision(tiny_stage,
                                                                                                unet_type):
    raw = config_to_dict(tiny_stage())
    raw["unet"] = {"type": unet_type, "image_size": 16, "base_channels": 16, "channel_mults": [1, 2],
                   "num_head_channels": 16, "attention_resolutions": [8], "cross_attention_resolutions": [8],
                   "num_res_blocks": [1, 1] if unet_type == "efficient_unet" else 1}
    outputs = {}
    for precision in ("float32", "activations"):
        config = stage_config_from_dict({**raw, "unet": {**raw["unet"], "group_norm_precision": precision}})
        torch.manual_seed(0)
        network = randomized(build_network(config, 32))
        inputs = network_inputs(config)
        norms = [module for module in network.modules() if isinstance(module, nn.GroupNorm)]
        assert norms and all(isinstance(norm, GroupNorm) and norm.precision == precision for norm in norms)
        dtypes = []
        for norm in norms:
            norm.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        with torch.no_grad():
            outputs[precision, "full"] = network(**inputs)
            with torch.autocast("cpu", torch.bfloat16):
                outputs[precision, "bf16"] = network(**inputs).float()
        assert set(dtypes[:len(norms)]) == {torch.float32}
        assert set(dtypes[len(norms):]) == {torch.float32 if precision == "float32" else torch.bfloat16}
    assert torch.equal(outputs["float32", "full"], outputs["activations", "full"])
    assert not torch.equal(outputs["float32", "bf16"], outputs["activations", "bf16"])


@pytest.mark.parametrize("unet_type", ["unet", "efficient_unet"])
def test_each_unet_compiles_to_one_graph_with_and_without_autocast(tiny_stage, unet_type):
    """training.compile gains most when Inductor sees the whole network: a graph break (torch
    2.11, the GPU machine's version, broke at every group norm's autocast check) splits it and
    stops fusion across the break. fullgraph=True turns any break into an error; the call is
    the training step's (gradients on, a caption dropped), and the eager backend traces
    without generating kernels."""
    config = tiny_stage(super_resolution=unet_type == "efficient_unet")
    for precision in GroupNorm.PRECISIONS:
        network = randomized(build_network(config, 32))
        set_group_norm_precision(network, precision)
        inputs = network_inputs(config)
        for autocast in (False, True):
            torch._dynamo.reset()
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                compiled = torch.compile(network, fullgraph=True, backend="eager")(**inputs)
                assert torch.equal(compiled, network(**inputs))
            compiled.float().square().mean().backward()
            assert all(parameter.grad is not None for parameter in network.parameters())
            network.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def test_bf16_on_a_cpu_that_would_emulate_it_is_warned_of_and_kept(monkeypatch):
    import warnings

    import imagen.io
    from imagen.io import cpu_computes_bf16, resolve_mixed_precision
    from imagen.stage import autocast_dtype

    assert isinstance(cpu_computes_bf16(), bool)
    cpu = torch.device("cpu")
    monkeypatch.setattr(imagen.io, "cpu_computes_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"training\.mixed_precision bf16 on this CPU .* Use auto"):
        assert resolve_mixed_precision("bf16", cpu, key="training.mixed_precision") == "bf16"
    with pytest.warns(UserWarning, match=r"sampling\.mixed_precision bf16 on this CPU"):
        assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [resolve_mixed_precision(setting, cpu) for setting in ("auto", "no", "fp16")] == ["no", "no", "fp16"]
        assert resolve_mixed_precision("bf16", META) == "bf16"  # not a CPU: its own kernels
        monkeypatch.setattr(imagen.io, "cpu_computes_bf16", lambda: True)
        assert resolve_mixed_precision("bf16", cpu) == "bf16"
