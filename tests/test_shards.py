"""Training shards: preparation from a caption folder and a Hugging Face dataset, exact round
trips, resumed preparation, damaged shards, streaming to training, disjoint processes, and
super-resolution of your own images."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from imagen.captions import normalize_prompt
from imagen.checkpoint import latest_checkpoint, list_checkpoints
from imagen.config import TextEncoderConfig, load_stage_config
from imagen.data import DataError, read_image
from imagen.shards import EpochSampler, ShardDataset, read_index, resize_item
from imagen.text import TextEmbeddingCache
from imagen.trainer import Trainer

from conftest import REPO_ROOT, HostWaits, python

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
COUNT = 200


def render(index: int) -> tuple[Image.Image, str]:
    """A synthetic captioned image, not square (so the centre crop matters)."""
    color, shape = list(COLORS)[index % 4], ("square", "circle")[index // 4 % 2]
    image = Image.new("RGB", (48, 40), (index % 7, 0, 0))
    x, y = 4 + index % 20, 4 + index % 13
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + 16, y + 16], fill=COLORS[color])
    return image, f"A {color} {shape}, number {index}."


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same captioned images as a folder and as a datasets dataset saved to disk."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    folder = root / "folder"
    folder.mkdir()
    images, captions = [], []
    for index in range(COUNT):
        image, caption = render(index)
        image.save(folder / f"img_{index:04d}.png")
        (folder / f"img_{index:04d}.txt").write_text(caption)
        images.append(image)
        captions.append(caption)
    table = datasets.Dataset.from_dict({"image": images, "text": captions, "id": list(range(COUNT))})
    table.cast_column("image", datasets.Image()).save_to_disk(str(root / "hf"))
    stages = {}
    for name, settings in (("base", {"unet": {"image_size": 16, "channels": 3, "base_channels": 16,
                                              "channel_mults": [1, 2], "num_res_blocks": 1,
                                              "attention_resolutions": [8], "cross_attention_resolutions": [8],
                                              "num_head_channels": 16}}),
                           ("sr", {"unet": {"type": "efficient_unet", "image_size": 32, "channels": 3,
                                            "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": [1, 1],
                                            "num_head_channels": 16}, "super_resolution": {"low_res_size": 16}})):
        stage = {"text_encoder": {"name": "tiny", "max_length": 12, "device": "cpu"}, "sampling": {"steps": 2},
                 "data": {"dataset": "shards", "root": str(root / "shards"), "workers": 2},
                 "training": {"batch_size": 8, "max_steps": 3, "log_every": 1, "checkpoint_every": 3,
                              "sample_every": 3, "sample_guidance": [1.0]}, **settings}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(stage))
        stages[name] = root / f"{name}.yaml"
    return {"root": root, "folder": folder, "hf": root / "hf", "captions": captions, **stages}


def prepare(sources, source, output, *extra):
    return python("prepare_dataset.py", "--config", str(sources["base"]), "--config", str(sources["sr"]),
                  "--source", str(source), "--output", str(output), "--shard-size", "64", *extra)


@pytest.fixture(scope="module")
def shards(sources):
    result = prepare(sources, sources["folder"], sources["root"] / "shards")
    assert result.returncode == 0, result.stderr
    assert "wrote 200 items in 4 shards" in result.stdout
    return sources["root"] / "shards"


def test_shards_hold_the_source_after_the_stated_resize_bit_for_bit(sources, shards):
    index = read_index(shards)
    assert index.complete and index.resolutions == [16, 32] and index.num_items == COUNT
    assert [shard["count"] for shard in index.shards] == [64, 64, 64, 8]
    text_encoder = TextEncoderConfig(name="tiny", max_length=12, device="cpu")
    cache = TextEmbeddingCache.from_config(text_encoder)
    for size in (16, 32):
        data = ShardDataset(shards, size, 3, text_encoder)
        for item in (0, 63, 64, 199):
            image, embeddings, length = data[item]
            source = read_image(sources["folder"] / f"img_{item:04d}.png", 3)
            assert source.shape == (3, 40, 40)  # the centre crop of a 48x40 image
            assert torch.equal(image, resize_item(source, size))
            assert data.caption(item) == sources["captions"][item]
            fresh = cache.encode([sources["captions"][item]])
            assert length == int(fresh.mask.sum())
            torch.testing.assert_close(embeddings.float(), fresh.embeddings[0].half().float(), atol=2e-3, rtol=0)
    assert normalize_prompt(sources["captions"][0], "plain") == "a red square number 0"


def test_a_hugging_face_dataset_gives_the_same_shards_as_the_folder(sources, shards, tmp_path):
    result = prepare(sources, sources["hf"], tmp_path / "from_hf")
    assert result.returncode == 0, result.stderr
    for name in ("shard_00000.safetensors", "shard_00003.safetensors"):
        folder, hf = load_file(str(shards / name)), load_file(str(tmp_path / "from_hf" / name))
        assert all(torch.equal(folder[key], hf[key]) for key in folder)
    ambiguous = python("prepare_dataset.py", "--config", str(sources["base"]), "--source", str(sources["hf"]),
                       "--output", str(tmp_path / "x"), "--text-column", "missing")
    assert ambiguous.returncode == 2 and "--image-column and --text-column" in ambiguous.stderr


def test_a_cascade_file_names_the_stages_and_a_prepared_folder_is_said_to_be_so(sources, shards, tmp_path):
    cascade = sources["root"] / "cascade.yaml"
    cascade.write_text("# both stages, as the shipped cascade files begin\nstages:\n  - base.yaml\n  - sr.yaml\n")
    result = python("prepare_dataset.py", "--config", str(cascade), "--source", str(sources["folder"]),
                    "--output", str(tmp_path / "from_cascade"), "--shard-size", "64")
    assert result.returncode == 0, result.stderr
    assert read_index(tmp_path / "from_cascade").resolutions == [16, 32]
    times = {path: path.stat().st_mtime_ns for path in shards.glob("shard_*")}
    again = prepare(sources, sources["folder"], shards)
    assert again.returncode == 0 and again.stdout.startswith(f"already prepared: {shards} holds 200 items")
    assert {path: path.stat().st_mtime_ns for path in shards.glob("shard_*")} == times
    (tmp_path / "a_file").write_text("not a folder")
    refused = prepare(sources, sources["folder"], tmp_path / "a_file")
    assert refused.returncode == 2 and "--output " in refused.stderr and "is a file, not a folder" in refused.stderr


def test_a_killed_preparation_resumes_without_duplicates(sources, tmp_path):
    output = tmp_path / "shards"
    command = [sys.executable, "prepare_dataset.py", "--config", str(sources["base"]), "--source",
               str(sources["folder"]), "--output", str(output), "--shard-size", "8"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (output / "index.json").is_file() and len(read_index(output).shards) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = read_index(output)
    assert not interrupted.complete and 3 <= len(interrupted.shards) < COUNT // 8
    resumed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    index = read_index(output)
    assert index.complete and index.num_items == COUNT and len(index.shards) == COUNT // 8
    captions = [caption for shard in index.shards
                for caption in json.loads(ShardCaptions(output / shard["file"]).captions)]
    assert captions == sources["captions"]  # every item once, in order
    other = subprocess.run(command[:-1] + ["16"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "shard_size: 8 there, 16 asked" in other.stderr


class ShardCaptions:
    def __init__(self, path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            self.captions = handle.metadata()["captions"]


def test_a_damaged_or_missing_shard_is_an_error_never_skipped(sources, shards, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in shards.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    text_encoder = TextEncoderConfig(name="tiny", max_length=12, device="cpu")
    shard = damaged / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"shard_00001.safetensors: the shard is .* bytes where its header promises"):
        ShardDataset(damaged, 16, 3, text_encoder)
    shard.unlink()
    with pytest.raises(DataError, match="shard_00001.safetensors: a missing or damaged shard"):
        ShardDataset(damaged, 16, 3, text_encoder)
    result = python("train_base_mnist.py", "--config", str(sources["base"]), "--set", f"data.root={damaged}",
                    "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "training never skips data" in result.stderr
    other_encoder = python("train_base_mnist.py", "--config", str(sources["base"]), "--set", f"data.root={shards}",
                           "--set", "text_encoder.max_length=16", "--output-dir", str(tmp_path / "run"))
    assert other_encoder.returncode == 2 and "prepare it with this stage's text_encoder" in other_encoder.stderr
    size = python("train_base_mnist.py", "--config", str(sources["base"]), "--set", f"data.root={shards}",
                  "--set", "unet.image_size=8", "--output-dir", str(tmp_path / "run"))
    assert size.returncode == 2 and "at [16, 32] px, not 3-channel at 8 px" in size.stderr


@pytest.fixture(scope="module")
def shard_runs(sources, shards):
    runs = sources["root"] / "runs"
    for script, name in (("train_base_mnist.py", "base"), ("train_sr_mnist.py", "sr")):
        result = python(script, "--config", str(sources[name]), "--output-dir", str(runs / name))
        assert result.returncode == 0, result.stderr
    return runs


def test_stages_train_from_shards_and_sample_with_the_encoder_the_shards_were_made_with(shard_runs, tmp_path):
    for name in ("base", "sr"):
        checkpoint = latest_checkpoint(shard_runs / name)
        assert checkpoint.name == "step_00000003" and (checkpoint / "text_probes.safetensors").is_file()
        assert (shard_runs / name / "samples" / "step_00000003.png").is_file()
    sampled = python("sample_imagen.py", "--checkpoint", str(shard_runs / "base"), "--checkpoint",
                     str(shard_runs / "sr"), "--prompts", "a red circle", "--steps", "2", "--output-dir",
                     str(tmp_path / "out"))
    assert sampled.returncode == 0, sampled.stderr


def test_your_own_images_start_the_cascade_at_super_resolution(sources, shard_runs, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    for index in range(3):
        render(index)[0].save(own / f"photo_{index}.png")
    result = python("sample_imagen.py", "--checkpoint", str(shard_runs / "base"), "--checkpoint",
                    str(shard_runs / "sr"), "--low-res", str(own), "--prompts", "a red square", "--steps", "2",
                    "--sample-aug-level", "0", "--num-per-prompt", "2", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert [stage["image_size"] for stage in metadata["stages"]] == [32]  # the base stage is skipped
    assert metadata["stages"][0]["sample_aug_level"] == 0.0 and len(metadata["low_res"]) == 3
    assert len(metadata["images"]) == 6 and Image.open(tmp_path / "out" / "grid.png").size == (2 * 34 + 2, 3 * 34 + 2)
    mismatch = python("sample_imagen.py", "--checkpoint", str(shard_runs / "sr"), "--low-res", str(own), "--prompts",
                      "a", "b", "--output-dir", str(tmp_path / "bad"))
    assert mismatch.returncode == 2 and "3 images but 2 prompts" in mismatch.stderr


def test_a_training_step_from_shards_never_makes_the_host_wait_for_the_device(sources, shards, tmp_path):
    """The batch's images, embeddings and token counts reach the device without a wait (the
    meta device stands in for a GPU), and the text mask is built there."""
    config = load_stage_config(sources["sr"], ["data.workers=0"])
    trainer = Trainer.from_config(config, tmp_path / "run", device=torch.device("meta"))
    trainer.train_step()
    with HostWaits() as waits:
        images, text = trainer.next_batch()
        trainer.train_step()
    assert waits.copies == []
    assert images.is_meta and text.embeddings.is_meta and text.mask.is_meta and text.embeddings.dtype == torch.float32


def test_processes_see_disjoint_shares_and_resume_continues_the_order():
    ranks = [list(zip(range(75), EpochSampler(100, seed=3, rank=rank, world=2))) for rank in (0, 1)]
    first_epoch = [{index for step, index in rank if step < 50} for rank in ranks]
    assert not first_epoch[0] & first_epoch[1] and len(first_epoch[0] | first_epoch[1]) == 100
    straight = [index for _, index in zip(range(130), EpochSampler(100, seed=3))]
    resumed = [index for _, index in zip(range(60), EpochSampler(100, seed=3, start=70))]
    assert resumed == straight[70:]
    assert sorted(straight[:100]) == list(range(100)) and straight[100:130] != straight[:30]  # a new order each epoch


def test_two_processes_train_from_disjoint_shard_data(sources, shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
         "tests/distributed_worker.py", str(sources["base"]), str(tmp_path / "run"), str(shards), str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]


def test_the_loader_benchmark_compares_workers_with_the_step(sources, shards):
    result = python("benchmarks/bench_data.py", "--config", str(sources["sr"]), "--shards", str(shards),
                    "--workers", "0", "1", "--batches", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["workers"] for r in report["loader"]] == [0, 1] and report["items"] == COUNT
    assert all(r["images_per_s"] > 0 for r in report["loader"]) and report["step_images_per_s"] > 0
    assert load_stage_config(sources["sr"]).unet.image_size == report["image_size"] == 32
