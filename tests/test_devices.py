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

import pytest
import torch
from PIL import Image

from imagen.cascade import Cascade
from imagen.checkpoint import latest_checkpoint
from imagen.config import stage_config_from_dict
from imagen.evaluation import Evaluator
from imagen.io import save_png, seeded_generator, to_host
from imagen.trainer import Trainer

META = torch.device("meta")
# Loading real weights into meta parameters is a (warned) no-op: values are not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")


def tiny_stage(mnist_root, super_resolution: bool, **training):
    unet = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_head_channels": 16}
    if super_resolution:
        unet.update(type="efficient_unet", num_res_blocks=[1, 1])
    else:
        unet.update(num_res_blocks=1, attention_resolutions=[8], cross_attention_resolutions=[8])
    settings = {"batch_size": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
                "sample_every": 1, "sample_guidance": [1.0, 3.0]}
    settings.update(training)
    raw = {"text_encoder": {"name": "tiny", "max_length": 8, "device": "cpu"}, "unet": unet,
           "sampling": {"steps": 2}, "data": {"root": str(mnist_root)}, "training": settings}
    if super_resolution:
        raw["super_resolution"] = {"low_res_size": 8}
    return stage_config_from_dict(raw)


@pytest.mark.parametrize("super_resolution", [False, True], ids=["base", "sr"])
def test_a_stage_trains_writes_grids_and_resumes_on_another_device(mnist_root, tmp_path, super_resolution):
    run_dir = tmp_path / "run"
    trainer = Trainer.from_config(tiny_stage(mnist_root, super_resolution), run_dir, device=META)
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

    resumed = Trainer.from_config(tiny_stage(mnist_root, super_resolution, max_steps=3), run_dir, resume=True,
                                  device=META)
    assert resumed.step == 2
    resumed.train()
    assert latest_checkpoint(run_dir).name == "step_00000003"


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
