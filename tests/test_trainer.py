"""The trainer: learning, EMA, learning-rate schedule, checkpoints, resume, the base script."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imagen.checkpoint import latest_checkpoint, list_checkpoints
from imagen.config import load_stage_config, stage_config_from_dict
from imagen.data import MNISTTextDataset
from imagen.stage import build_diffusion, build_network
from imagen.trainer import EMA, Trainer, TrainingError, build_optimizer, lr_factor

from conftest import REPO_ROOT

SMALL_UNET = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [8], "cross_attention_resolutions": [8], "num_head_channels": 16}


def test_a_handful_of_real_digits_is_overfit(mnist_root):
    torch.manual_seed(0)
    config = stage_config_from_dict({
        "unet": {**SMALL_UNET, "base_channels": 32, "num_head_channels": 32},
        "training": {"lr": 2e-3, "warmup_steps": 0, "lr_schedule": "constant"},
    })
    images, prompt_indices = MNISTTextDataset(mnist_root, 16).get_batch(torch.arange(8))
    prompts = torch.randn(20, 4, 32)
    network, diffusion = build_network(config, 32), build_diffusion(config)
    optimizer = build_optimizer(network, config)
    x0 = images.repeat(4, 1, 1, 1)
    cond = {"text_emb": prompts[prompt_indices].repeat(4, 1, 1), "text_mask": torch.ones(32, 4, dtype=torch.bool)}
    generator = torch.Generator().manual_seed(0)
    fixed_t, fixed_noise = torch.linspace(0, 999, 32).long(), torch.randn(x0.shape, generator=generator)

    def held_loss():
        with torch.no_grad():
            return diffusion.training_losses(network, x0, fixed_t, fixed_noise, **cond)["mse"].mean().item()

    before = held_loss()
    for _ in range(30):
        loss = diffusion.training_losses(network, x0, generator=generator, **cond)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before == pytest.approx(1.0, abs=0.05)  # a zero-output network predicts eps = 0
    assert held_loss() < 0.5 * before


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor"])
def test_every_optimizer_trains(name):
    torch.manual_seed(0)
    config = stage_config_from_dict({"training": {"optimizer": name, "lr": 1e-2, "weight_decay": 0.0}})
    network = torch.nn.Linear(4, 1)
    optimizer = build_optimizer(network, config)
    inputs, targets = torch.randn(64, 4), torch.randn(64, 1)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(network(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert type(optimizer).__name__.lower() == name


def test_ema_update_math():
    network = torch.nn.Linear(3, 2)
    ema = EMA(network, decay=0.9, warmup=False)
    start = ema.network.weight.clone()
    with torch.no_grad():
        network.weight.add_(1.0)
    ema.update(network, step=1)
    assert torch.allclose(ema.network.weight, 0.9 * start + 0.1 * network.weight)
    warm = EMA(network, decay=0.999, warmup=True)
    assert warm.decay_at(0) == pytest.approx(0.1)
    assert warm.decay_at(90) == pytest.approx(0.91)
    assert warm.decay_at(10**6) == 0.999
    assert not any(p.requires_grad for p in warm.network.parameters())


def test_learning_rate_warms_up_then_decays_to_zero():
    config = stage_config_from_dict({"training": {"warmup_steps": 10, "max_steps": 110}})
    factors = [lr_factor(step, config) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5)
    assert factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = stage_config_from_dict({"training": {"warmup_steps": 0, "lr_schedule": "constant"}})
    assert lr_factor(5000, constant) == 1.0


def test_checkpoint_reload_gives_bit_identical_outputs(tiny_stage, tmp_path):
    trainer = Trainer.from_config(tiny_stage(), tmp_path / "run")
    trainer.train()
    resumed = Trainer.from_config(tiny_stage(), tmp_path / "run", resume=True)
    assert resumed.step == 2
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 900])
    text = trainer.grid.text
    kwargs = {"text_emb": text.embeddings[:2], "text_mask": text.mask[:2]}
    for before, after in ((trainer.network, resumed.network), (trainer.ema.network, resumed.ema.network)):
        before.eval(), after.eval()
        with torch.no_grad():
            assert torch.equal(before(x, t, **kwargs), after(x, t, **kwargs))
    before, after = trainer.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0]
    assert after["exp_avg"].equal(before["exp_avg"])
    assert resumed.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


def test_non_finite_loss_stops_without_writing_a_checkpoint(tiny_stage, tmp_path):
    trainer = Trainer.from_config(tiny_stage(max_steps=6, checkpoint_every=2), tmp_path / "run")
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    trainer.network.register_forward_hook(poison)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_a_config_changed_in_code_is_validated_and_the_run_folder_defaults_to_output_dir(tiny_stage, tmp_path,
                                                                                        monkeypatch):
    from imagen.config import ConfigError

    config = tiny_stage()
    config.training.batch_size = -5
    with pytest.raises(ConfigError, match=r"<config changed in code>: invalid value for 'training.batch_size'"):
        Trainer.from_config(config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    config = tiny_stage(max_steps=1)
    config.training.output_dir = "runs/from_config"
    monkeypatch.chdir(tmp_path)
    Trainer.from_config(config).train()
    assert [p.name for p in list_checkpoints(tmp_path / "runs" / "from_config")] == ["step_00000001"]


def test_a_second_precision_in_one_process_is_a_clear_error(tmp_path):
    # accelerate keeps one precision per process: a notebook that trains fp32, then bf16.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from imagen.config import stage_config_from_dict\n"
        "from imagen.trainer import TrainingError, make_accelerator\n"
        "make_accelerator(stage_config_from_dict({'training': {'mixed_precision': 'no'}}), Path(sys.argv[1]))\n"
        "try:\n"
        "    make_accelerator(stage_config_from_dict({'training': {'mixed_precision': 'bf16'}}), Path(sys.argv[1]))\n"
        "except TrainingError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("training.mixed_precision bf16: this Python process already trained with another")
    assert "restart the process" in result.stdout


def run_script(*args):
    return subprocess.run([sys.executable, "train_base_mnist.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_train_base_script_end_to_end(mnist_root, tmp_path):
    run_dir = tmp_path / "base"
    common = ["--config", "configs/mnist_cpu/base.yaml", "--output-dir", str(run_dir),
              "--set", f"data.root={mnist_root}", "--set", "training.batch_size=8",
              "--set", "training.log_every=1", "--set", "training.checkpoint_every=3",
              "--set", "training.sample_every=3",
              "--set", "sampling.steps=3", "--set", "training.sample_guidance=[1, 3]"]
    result = run_script(*common, "--set", "training.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stderr  # the tqdm bar

    saved = load_stage_config(run_dir / "config.yaml")
    assert saved == load_stage_config(REPO_ROOT / "configs/mnist_cpu/base.yaml",
                                      [f"data.root={mnist_root}", "training.batch_size=8", "training.log_every=1",
                                       "training.checkpoint_every=3", "training.sample_every=3", "sampling.steps=3",
                                       "training.sample_guidance=[1, 3]", "training.max_steps=3"])
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == "step_00000003"
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
            "config.yaml"} <= {p.name for p in checkpoint.iterdir()}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "img_per_s"} <= set(metrics[0])
    assert any(key.startswith("loss_q") for key in metrics[0])
    grid = Image.open(run_dir / "samples" / "step_00000003.png")
    # 2 guidance weights x (words row + numerals row), 10 digits per row, 16 px + 2 px padding.
    assert grid.size == (10 * 18 + 2, 4 * 18 + 2)

    again = run_script(*common, "--set", "training.max_steps=3")
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr

    resumed = run_script(*common, "--set", "training.max_steps=5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(run_dir).name == "step_00000005"


def test_two_processes_on_cpu_train_in_lockstep(mnist_root, tmp_path):
    """accelerate launch with two processes on a machine without GPUs (accelerate runs them on the
    CPU with gloo): each draws its own batches, gradients are averaged, and both end with
    identical weights that differ from the initial ones."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         "tests/distributed_worker.py", "configs/mnist_cpu/base.yaml", str(tmp_path / "run"), str(mnist_root),
         str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert int(ranks[0]["world"]) == 2
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # different data per process
    weights = [name for name in ranks[0] if name.startswith(("model.", "ema."))]
    assert weights and all(torch.equal(ranks[0][name], ranks[1][name]) for name in weights)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert all(torch.equal(saved[name], ranks[0][f"model.{name}"]) for name in saved)
    assert any(not torch.equal(saved[name], ranks[0][f"initial.{name}"]) for name in saved)


def test_a_time_budget_ends_training_with_a_checkpoint_and_a_grid_and_resume_goes_on(mnist_root, tmp_path):
    run_dir = tmp_path / "base"
    common = ["--config", "configs/mnist_cpu/base.yaml", "--output-dir", str(run_dir),
              "--set", f"data.root={mnist_root}", "--set", "training.batch_size=4", "--set", "training.max_steps=4",
              "--set", "training.checkpoint_every=100", "--set", "training.sample_every=100",
              "--set", "sampling.steps=2", "--set", "training.sample_guidance=[1]"]
    # 6 ms: the setup alone takes longer, so the budget is spent after the first step.
    result = run_script(*common, "--set", "training.max_minutes=0.0001")
    assert result.returncode == 0, result.stderr
    assert "training.max_minutes=0.0001 reached after step 1" in result.stdout
    assert latest_checkpoint(run_dir).name == "step_00000001"
    assert (run_dir / "samples" / "step_00000001.png").is_file()

    resumed = run_script(*common, "--resume", "--set", "training.max_minutes=null")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with changed settings: training.max_minutes" in resumed.stdout
    assert latest_checkpoint(run_dir).name == "step_00000004"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 4]  # a log line at the budget stop and at the end (log_every is 50)


def test_the_budget_counts_from_the_start_and_every_finished_step_counts(tiny_stage, tmp_path):
    config = tiny_stage(max_steps=100_000, checkpoint_every=100_000, max_minutes=10.0)
    trainer = Trainer.from_config(config, tmp_path / "run")
    assert not trainer.out_of_time()
    trainer.deadline = time.monotonic() + 2.0  # as if two seconds of the budget were left
    start = time.monotonic()
    trainer.train()
    assert 1 <= trainer.step < 100_000 and time.monotonic() - start < 60
    assert latest_checkpoint(tmp_path / "run").name == f"step_{trainer.step:08d}"
    assert (tmp_path / "run" / "samples" / f"step_{trainer.step:08d}.png").is_file()


@pytest.mark.slow
def test_compiled_channels_last_training_computes_the_same_loss(tiny_stage, tmp_path):
    """training.compile and training.channels_last change how the step runs, not what it computes:
    the same batches give the same losses, and training goes on (torch.compile takes about a
    minute on a 2-core CPU). The first loss only shows that the batch and noise are the same (the
    output layer starts at zero); the second is computed by the whole network after an update."""
    losses = {}
    for name, fast in (("eager", False), ("compiled", True)):
        config = tiny_stage(compile=fast, channels_last=fast)
        trainer = Trainer.from_config(config, tmp_path / name)
        trainer.train()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
        if fast:
            assert trainer.forward is not trainer.network
            assert trainer.ema.network.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert losses["compiled"][0] == pytest.approx(losses["eager"][0], rel=1e-4)
    assert losses["compiled"][1] == pytest.approx(losses["eager"][1], rel=1e-3)
    assert losses["eager"][1] != pytest.approx(losses["eager"][0], rel=1e-3)
    assert all(math.isfinite(loss) for loss in losses["compiled"])
