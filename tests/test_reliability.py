"""Reliability: bad input, crash-safe checkpoints, exact resume, safe loading, odd prompts."""

import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import evaluate_imagen
import sample_imagen
import train_base_mnist
import train_sr_mnist
from imagen.cascade import Cascade, load_stage
from imagen.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_tensors
from imagen.cli import MAX_PROMPT_WARNINGS, run_script
from imagen.config import TextEncoderConfig, load_stage_config
from imagen.errors import ImagenError, PromptWarning
from imagen.io import atomic_write, new_results, prepare_output
from imagen.text import TextEmbeddingCache
from imagen.trainer import Trainer, TrainingError

from conftest import REPO_ROOT, python

QUICK = ["--set", "training.batch_size=4", "--set", "sampling.steps=2", "--set", "training.sample_guidance=[1]"]


def edited_checkpoint(source: Path, target: Path, edit) -> Path:
    """A copy of a run whose latest checkpoint's config.yaml is changed by ``edit``."""
    shutil.copytree(source, target)
    path = latest_checkpoint(target) / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    return target


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, trained, mnist_root):
    """Files the bad-input table points at."""
    root = tmp_path_factory.mktemp("bad")
    (root / "syntax.yaml").write_text("training:\n  batch_size: 8\n  lr: [1e-4\n")
    (root / "typo.yaml").write_text("unet:\n  chanel_mults: [1, 2]\n")
    (root / "duplicate.yaml").write_text("training:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    (root / "empty_dir").mkdir()
    (root / "no_mnist").mkdir()
    (root / "prompts_latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "existing_out").mkdir()
    (root / "existing_out" / "metadata.json").write_text("{}")
    edited_checkpoint(trained / "sr", root / "sr_low8", lambda c: c["super_resolution"].update(low_res_size=8))
    edited_checkpoint(trained / "sr", root / "sr_wide", lambda c: c["unet"].update(base_channels=48))
    edited_checkpoint(trained / "base", root / "scene_base", lambda c: c["data"].update(dataset="mnist_scenes"))
    corrupt = edited_checkpoint(trained / "base", root / "corrupt", lambda c: None)
    (latest_checkpoint(corrupt) / "ema.safetensors").write_bytes(b"\x00garbage")
    shutil.copytree(trained / "base", root / "base_run")  # a base run, resumed with the SR config below
    (root / "a_file").write_text("not a folder")
    (root / "user_folder").mkdir()  # someone's own files: never a run, never to be overwritten
    (root / "user_folder" / "notes.txt").write_text("mine")
    (root / "user_folder" / "samples").mkdir()
    (root / "unfinished").mkdir()  # a run that failed before its first checkpoint
    shutil.copy(trained / "base" / "config.yaml", root / "unfinished" / "config.yaml")
    (root / "grid_only").mkdir()
    (root / "grid_only" / "grid.png").write_bytes(b"an earlier grid")
    (root / "report_only").mkdir()
    (root / "report_only" / "sweep.png").write_bytes(b"an earlier plot")
    nonfinite = edited_checkpoint(trained / "base", root / "nonfinite", lambda c: None)
    weights = load_tensors(latest_checkpoint(nonfinite) / "ema.safetensors")
    next(iter(weights.values())).fill_(float("nan"))
    save_file(weights, str(latest_checkpoint(nonfinite) / "ema.safetensors"))
    for name, content in (("state_empty", b""), ("state_partial", b'{"step": 2')):
        damaged = edited_checkpoint(trained / "base", root / name, lambda c: None)
        (latest_checkpoint(damaged) / "state.json").write_bytes(content)
    (root / "prompts_blank.txt").write_text("\n\n   \n")
    (root / "empty.yaml").write_text("# nothing yet\n")
    for case, edit_files in MNIST_DAMAGE.items():
        raw = root / "mnist" / case / "MNIST" / "raw"
        shutil.copytree(mnist_root / "MNIST" / "raw", raw)
        for path in raw.iterdir():
            path.chmod(0o644)
        edit_files(raw)
    captions = root / "captions"
    captions.mkdir()
    Image.new("L", (8, 8)).save(captions / "a.png")
    (captions / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def _truncate_labels(raw: Path) -> None:
    labels = (raw / "train-labels-idx1-ubyte").read_bytes()
    (raw / "train-labels-idx1-ubyte").write_bytes(labels[:4] + (100).to_bytes(4, "big") + labels[8:108])


MNIST_DAMAGE = {
    "garbage_header": lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b"not an idx file" * 20),
    "empty_images": lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b""),
    "more_labels": lambda raw: shutil.copy(raw / "t10k-labels-idx1-ubyte", raw / "train-labels-idx1-ubyte"),
    "fewer_labels": _truncate_labels,
}


def table(root: Path, trained: Path, mnist: Path):
    base, sr = str(trained / "base"), str(trained / "sr")
    cpu_base, cpu_sr = "configs/mnist_cpu/base.yaml", "configs/mnist_cpu/sr.yaml"
    edm_base = "configs/mnist_cpu/base_edm.yaml"
    data = ["--set", f"data.root={mnist}"]
    out = ["--output-dir", str(root / "out")]
    train_out = ["--output-dir", str(root / "train_out")]
    T, S, P, E = train_base_mnist, train_sr_mnist, sample_imagen, evaluate_imagen
    return [
        (T, ["--config", cpu_base, "--set", "training.batchsize=3"], "did you mean 'training.batch_size'"),
        (T, ["--config", str(root / "typo.yaml")], "unknown key 'unet.chanel_mults'"),
        (T, ["--config", cpu_base, "--set", "training.batch_size=abc"], "expected an integer, got 'abc'"),
        (T, ["--config", cpu_base, "--set", "unet.image_size=30"], "divisible by 4"),
        (T, ["--config", str(root / "syntax.yaml")], "invalid YAML at line 4"),
        (T, ["--config", str(root / "duplicate.yaml")], "duplicate key 'lr'"),
        (T, ["--config", "configs/nope.yaml"], "configs/nope.yaml: config file not found"),
        (T, ["--config", cpu_base, "--set", "training.batch_size=0"], "'training.batch_size': expected a positive"),
        (T, ["--config", cpu_base, "--set", "training.max_steps=-5"], "'training.max_steps': expected a positive"),
        (T, ["--config", cpu_base, "--set", "sampling.steps=0"], "'sampling.steps': expected a positive"),
        (T, ["--config", cpu_base, "--set", "sampling.sampler=euler"], "'sampling.sampler': expected one of"),
        (T, ["--config", cpu_base, "--set", "guidance.cond_drop_prob=2"], "probability in [0, 1]"),
        (T, ["--config", cpu_base, "--set", "training.batch_size"], "expected KEY=VALUE"),
        (T, ["--config", cpu_base, "--set", f"data.root={root / 'no_mnist'}", "--set", "data.download=false", *QUICK,
             *train_out], "holds no MNIST"),
        (T, ["--config", cpu_base, "--set", "data.dataset=caption_folder", "--set", f"data.root={root / 'nope'}",
             *train_out], "is not a folder"),
        (T, ["--config", cpu_sr], "train it with train_sr_mnist.py"),
        (T, ["--config", cpu_base, *data, "--resume", "--output-dir", str(root / "empty_dir")],
         "no complete checkpoint"),
        (T, ["--config", cpu_base, *data, "--output-dir", base], "already holds a run"),
        (T, ["--config", cpu_base, *data, "--output-dir", base, "--resume", "--overwrite"], "contradict"),
        (S, ["--config", cpu_base], "train it with train_base_mnist.py"),
        (S, ["--config", cpu_sr, "--set", "super_resolution.low_res_size=32"], "below unet.image_size (32)"),
        (S, ["--config", cpu_sr, "--set", "super_resolution.train_aug_range=[0.8, 0.2]"], "train_aug_range"),
        (S, ["--config", cpu_sr, *data, *QUICK, "--resume", "--output-dir", str(root / "base_run")], "do not fit"),
        (P, ["--checkpoint", str(root / "missing"), "--prompts", "1", *out], "does not exist"),
        (P, ["--checkpoint", str(root / "empty_dir"), "--prompts", "1", *out], "holds no complete checkpoint"),
        (P, ["--checkpoint", sr, "--prompts", "1", *out], "must be a base stage"),
        (P, ["--checkpoint", base, "--checkpoint", str(root / "sr_low8"), "--prompts", "1", *out], "low_res_size is 8"),
        (P, ["--checkpoint", base, "--checkpoint", str(root / "sr_wide"), "--prompts", "1", *out], "do not fit"),
        (P, ["--checkpoint", str(root / "corrupt"), "--prompts", "1", *out], "not a readable safetensors file"),
        (P, ["--checkpoint", base, "--checkpoint", sr, "--prompts", "1", "--guidance", "1,2,3", *out],
         "got 3 values for a cascade of 2 stages"),
        (P, ["--checkpoint", base, "--prompts", "1", "--sampler", "euler", *out], "unknown 'euler'"),
        (P, ["--checkpoint", base, "--prompts", "1", "--thresholding", "soft", *out], "unknown 'soft'"),
        (P, ["--checkpoint", base, "--prompts", "1", "--steps", "0", *out], "positive integers"),
        (P, ["--checkpoint", base, "--prompts", "1", "--steps", "-3", *out], "positive integers"),
        (P, ["--checkpoint", base, "--prompts-file", str(root / "prompts_latin1.txt"), *out], "cannot read it"),
        (P, ["--checkpoint", base, "--prompts-file", str(root / "absent.txt"), *out], "cannot read it"),
        (P, ["--checkpoint", base, *out], "no prompts"),
        (P, ["--checkpoint", base, "--prompts", "1", "--num-per-prompt", "0", *out], "--num-per-prompt 0"),
        (P, ["--checkpoint", base, "--prompts", "1", "--batch-size", "0", *out], "--batch-size 0"),
        (P, ["--checkpoint", base, "--prompts", "1", "--sample-aug-level", "2", *out], "in [0, 1]"),
        (P, ["--checkpoint", base, "--prompts", "1", "--output-dir", str(root / "existing_out")], "--overwrite"),
        # --overwrite: nothing is deleted before the new run is built; only runs are ever replaced.
        (T, ["--config", cpu_base, *data, "--set", "data.root=/no/such/mnist", "--set", "data.download=false",
             "--output-dir", str(root / "base_run"), "--overwrite"], "holds no MNIST"),
        (T, ["--config", cpu_base, *data, "--set", "training.batch_size=1000000000000", "--output-dir",
             str(root / "base_run"), "--overwrite"], "need at least"),
        (T, ["--config", cpu_base, *data, "--output-dir", str(root / "user_folder")], "holds no training run"),
        (T, ["--config", cpu_base, *data, "--output-dir", str(root / "user_folder"), "--overwrite"],
         "holds no training run"),
        (T, ["--config", cpu_base, *data, "--output-dir", str(root / "unfinished")], "--overwrite to start it anew"),
        (T, ["--config", cpu_base, *data, "--output-dir", str(root / "unfinished"), "--resume"],
         "stopped before its first checkpoint"),
        (T, ["--config", cpu_base, *data, "--output-dir", str(root / "a_file")], "is a file, not a folder"),
        # Non-finite and out-of-range numbers.
        (T, ["--config", cpu_base, "--set", "training.lr=.inf"], "'training.lr': expected a finite number"),
        (T, ["--config", cpu_base, "--set", "training.lr=.nan"], "'training.lr': expected a finite number"),
        (T, ["--config", cpu_base, "--set", "sampling.guidance=.inf"], "'sampling.guidance': expected a finite"),
        (T, ["--config", cpu_base, "--set", "training.grad_clip=.nan"], "'training.grad_clip'"),
        (T, ["--config", cpu_base, "--set", "training.seed=1099511627776"], "a seed in 0..4294967295"),
        (T, ["--config", cpu_base, "--set", "training.seed=-1"], "a seed in 0..4294967295"),
        (T, ["--config", cpu_base, "--set", "data.seed=4294967296"], "'data.seed'"),
        (T, ["--config", cpu_base, "--set", "sampling.eta=2"], "'sampling.eta'"),
        (T, ["--config", cpu_base, "--set", "unet.channels=2"], "1 (grey) or 3 (RGB)"),
        (T, ["--config", cpu_base, "--set", "training.max_minutes=-1"], "'training.max_minutes'"),
        # The EDM formulation's settings.
        (T, ["--config", cpu_base, "--set", "diffusion.formulation=edm"], "a sampler of the edm formulation"),
        (T, ["--config", cpu_base, "--set", "sampling.sampler=heun"], "a sampler of the ddpm formulation"),
        (T, ["--config", cpu_base, "--set", "diffusion.formulation=karras"], "'diffusion.formulation'"),
        (T, ["--config", edm_base, "--set", "diffusion.edm.sigma_max=.inf"], "'diffusion.edm.sigma_max'"),
        (T, ["--config", edm_base, "--set", "diffusion.edm.sigma_min=0"], "'diffusion.edm.sigma_min'"),
        (T, ["--config", edm_base, "--set", "diffusion.edm.rho=-7"], "'diffusion.edm.rho'"),
        (T, ["--config", edm_base, "--set", "diffusion.edm.s_churn=-1"], "'diffusion.edm.s_churn'"),
        (T, ["--config", edm_base, "--set", "diffusion.min_snr_gamma=5"], "null under formulation edm"),
        (P, ["--checkpoint", base, "--prompts", "1", "--sampler", "heun", *out], "trained with the ddpm formulation"),
        (P, ["--checkpoint", base, "--prompts", "1", "--guidance", "nan", *out], "finite numbers >= 0"),
        (P, ["--checkpoint", base, "--prompts", "1", "--guidance", "inf", *out], "finite numbers >= 0"),
        (P, ["--checkpoint", base, "--prompts", "1", "--seed", str(2**70), *out], "a seed in 0..4294967295"),
        (P, ["--checkpoint", base, "--prompts", "1", "--seed=-1", *out], "a seed in 0..4294967295"),
        (P, ["--checkpoint", base, "--prompts", "1", "--sample-aug-level", "nan", *out], "in [0, 1]"),
        (E, ["--checkpoints", base, "--mode", "base", "--guidance-sweep", "nan", *out], "finite numbers >= 0"),
        (E, ["--checkpoints", base, "--mode", "base", "--guidance=-inf", *out], "finite numbers >= 0"),
        (E, ["--checkpoints", base, "--mode", "base", "--seed", str(2**70), *out], "a seed in 0..4294967295"),
        # Damaged and diverged checkpoints.
        (P, ["--checkpoint", str(root / "nonfinite"), "--prompts", "1", *out], "weights are NaN or infinite"),
        (P, ["--checkpoint", str(root / "state_empty"), "--prompts", "1", *out], "state.json: not readable JSON"),
        (P, ["--checkpoint", str(root / "state_partial"), "--prompts", "1", *out], "use an earlier checkpoints/step_N"),
        (E, ["--checkpoints", str(root / "state_empty"), "--mode", "base", *out], "not readable JSON"),
        # Outputs and devices.
        (P, ["--checkpoint", base, "--prompts", "1", "--output-dir", str(root / "a_file")], "is a file, not a folder"),
        (P, ["--checkpoint", base, "--prompts", "1", "--output-dir", str(root / "grid_only")], "grid.png"),
        (E, ["--checkpoints", base, "--mode", "base", "--output-dir", str(root / "a_file")], "is a file, not a folder"),
        (E, ["--checkpoints", base, "--mode", "base", "--output-dir", str(root / "report_only")], "sweep.png"),
        (E, ["--checkpoints", base, "--mode", "base", "--output-dir", str(root / "base_run"), "--overwrite"],
         "is a training run's folder"),
        (P, ["--checkpoint", base, "--prompts", "1", "--output-dir", str(root / "unfinished")],
         "is a training run's folder"),
        (E, ["--checkpoints", base, sr, "--mode", "sr", "--stage=-5", *out], "--stage -5"),
        (P, ["--checkpoint", base, "--prompts", "1", "--device", "cuda", *out], "--device cuda: this machine has"),
        (E, ["--checkpoints", base, "--mode", "base", "--device", "cuda", *out], "--device cuda: this machine has"),
        (T, ["--config", cpu_base, *data, *QUICK, "--set", "text_encoder.device=cuda", *train_out],
         "text_encoder.device cuda: this machine has"),
        (P, ["--checkpoint", base, "--prompts-file", str(root / "prompts_blank.txt"), *out], "no prompts"),
        # Data that cannot be read.
        *[(T, ["--config", cpu_base, "--set", f"data.root={root / 'mnist' / case}", *QUICK, *train_out], fragment)
          for case, fragment in (("garbage_header", "not valid idx files"), ("empty_images", "not valid idx files"),
                                 ("more_labels", "but 10000 labels"), ("fewer_labels", "but 100 labels"))],
        (T, ["--config", cpu_base, "--set", "data.dataset=caption_folder", "--set", f"data.root={root / 'captions'}",
             *QUICK, *train_out], "a.txt: the caption is not UTF-8 text"),
        # What a new user tried: an empty config, empty prompts, a setting that does nothing, a device by index.
        (T, ["--config", str(root / "empty.yaml"), *data], "the config file is empty"),
        (P, ["--checkpoint", base, "--prompts", "", *out], "the text encoder reads it as empty"),
        (P, ["--checkpoint", base, "--prompts", "seven", "!!!", *out], "prompt '!!!': the text encoder reads it"),
        (P, ["--checkpoint", base, "--prompts", "1", "--strength", "0.5", *out], "--strength 0.5 says how much"),
        (P, ["--checkpoint", base, "--prompts", "1", "--init-images", str(root / "absent.png"), "--output-dir",
             str(root / "existing_out")], "--init-images " + str(root / "absent.png") + ": no such file"),
        (P, ["--checkpoint", str(root / "a_file"), "--prompts", "1", *out], "a_file is a file (expected a run"),
        (P, ["--checkpoint", base, "--prompts", "1", "--device", "cuda:1", *out], "--device cuda:1: this machine has"),
        (P, ["--checkpoint", base, "--prompts", "1", "--device", "gpu", *out], "--device 'gpu': expected auto, cpu"),
        (E, ["--checkpoints", base, sr, "--mode", "cascade", "--stage", "0", *out], "picks the stage of sr mode"),
        (E, ["--checkpoints", base, sr, "--mode", "scenes", "--num-images", "5", *out], "not all on mnist_scenes"),
        (E, ["--checkpoints", str(root / "scene_base"), sr, "--mode", "scenes", "--num-images", "5", *out],
         "not all on mnist_scenes"),
        (E, ["--checkpoints", str(root / "scene_base"), "--mode", "base", *out], "single-digit prompts measure"),
        (P, ["--checkpoint", base, "--prompts", "1", "--inpaint-resample", "2", *out], "no --inpaint-images"),
        # Sizes that can never fit.
        (T, ["--config", cpu_base, *data, "--set", "training.batch_size=1000000000000", *train_out], "need at least"),
        (T, ["--config", cpu_base, *data, "--set", "unet.base_channels=1000000000", *train_out], "too large to build"),
        (T, ["--config", cpu_base, *data, "--set", "unet.base_channels=8192", *train_out], "need at least"),
    ]


def snapshot(*roots: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for root in roots for path in root.rglob("*") if path.is_file()}


def test_an_exclusive_atomic_write_never_replaces_a_file(tmp_path):
    target = tmp_path / "profile.txt"
    atomic_write(target, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, "second", exclusive=True)
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["profile.txt"]
    atomic_write(target, "third")  # the default replaces, atomically
    assert target.read_text() == "third" and [p.name for p in tmp_path.iterdir()] == ["profile.txt"]


def test_results_that_fail_leave_no_folder_and_a_folder_that_cannot_be_made_is_refused_first(tmp_path):
    output = tmp_path / "a" / "b" / "out"
    prepare_output(output, ["x.txt"], overwrite=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError, match="the sampler failed"):
        with new_results(output, ["x.txt"]) as staging:
            (staging / "x.txt").write_text("partial")
            raise RuntimeError("the sampler failed")
    assert not (tmp_path / "a").exists()
    with new_results(output, ["x.txt"]) as staging:
        (staging / "x.txt").write_text("done")
    assert (output / "x.txt").read_text() == "done" and [p.name for p in output.iterdir()] == ["x.txt"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ImagenError, match="dangling: cannot create the folder"):
        prepare_output(tmp_path / "dangling", ["x.txt"], overwrite=False)


def test_prompt_warnings_are_one_line_each_and_past_the_cap_counted_in_one_line(capsys):
    def many_odd_prompts(argv):
        for index in range(MAX_PROMPT_WARNINGS + 5):
            warnings.warn(f"prompt {index}: odd", PromptWarning, stacklevel=2)
        warnings.warn("not about a prompt", UserWarning, stacklevel=2)
        if argv:
            raise ImagenError("bad argument")

    with pytest.warns(UserWarning) as passed_on:
        python_show = warnings.showwarning
        assert run_script(many_odd_prompts, []) == 0
        assert warnings.showwarning is python_show  # restored
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: prompt {i}: odd" for i in range(MAX_PROMPT_WARNINGS)] + [
        f"warning: 5 more prompt warnings not shown ({MAX_PROMPT_WARNINGS + 5} in all; --debug shows every one)."]
    # Any other warning goes on to Python's own display.
    assert [str(w.message) for w in passed_on] == ["not about a prompt"]
    # A user error stays the last paragraph, after the count; a crash still gets the count.
    assert run_script(many_odd_prompts, ["x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-2].startswith("warning: 5 more") and lines[-1] == "error: bad argument"

    def crash(argv):
        many_odd_prompts([])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        run_script(crash, [])
    assert capsys.readouterr().err.splitlines()[-1].startswith("warning: 5 more prompt warnings not shown")


def test_every_bad_input_exits_2_with_one_clear_message_and_loses_no_file(bad_inputs, trained, mnist_root, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cases = table(bad_inputs, trained, mnist_root)
    assert len(cases) >= 80
    before = snapshot(bad_inputs, trained)
    for script, argv, fragment in cases:
        code = run_script(script.main, argv)
        err = capsys.readouterr().err
        message = err.strip().splitlines()[-1] if err.strip() else ""
        assert code == 2, (script.__name__, argv, err)
        assert message.startswith("error: ") and fragment in message, (script.__name__, argv, fragment, err)
        assert "Traceback" not in err
        assert "--overwrite" not in message or "holds no training run" not in message  # never advise deleting it
    after = snapshot(bad_inputs, trained)
    assert {path: after.get(path) for path in before} == before  # every file is still there, unchanged
    assert not (bad_inputs / "out").exists()  # refused results leave not even an empty folder
    assert not (bad_inputs / "train_out").exists() or not any((bad_inputs / "train_out").rglob("*.*"))


def test_a_real_process_exits_2_without_traceback_and_shows_it_with_debug(tmp_path):
    result = python("train_sr_mnist.py", "--config", "configs/mnist_cpu/sr.yaml", "--set", "unet.dropout=3")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "'unet.dropout'" in result.stderr
    debug = python("train_sr_mnist.py", "--config", "configs/mnist_cpu/sr.yaml", "--set", "unet.dropout=3", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_resuming_halfway_gives_bit_identical_weights(tiny_stage, tmp_path):
    config = tiny_stage(max_steps=6, warmup_steps=2, checkpoint_every=3)
    straight = Trainer.from_config(config, tmp_path / "straight")
    straight.train()
    halves = Trainer.from_config(config, tmp_path / "halves")
    halves.train(until=3)
    assert halves.step == 3 and latest_checkpoint(tmp_path / "halves").name == "step_00000003"
    resumed = Trainer.from_config(config, tmp_path / "halves", resume=True)
    assert resumed.step == 3
    resumed.train()
    for a, b in ((straight.network, resumed.network), (straight.ema.network, resumed.ema.network)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    state_a, state_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"]) for k in state_a)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert torch.equal(straight.data_generator.get_state(), resumed.data_generator.get_state())


def test_a_resumed_channels_last_run_keeps_its_optimizer_moments_in_the_parameters_layout(tiny_stage, tmp_path):
    """CUDA's fused Adam refuses moments whose strides differ from their parameters' ("must have
    same dtype, device, and layout"), a check the CPU's optimizer does not make. Checkpoints
    store the moments contiguous, so loading must give them back the channels_last layout."""
    Trainer.from_config(tiny_stage(channels_last=True), tmp_path / "run").train()
    resumed = Trainer.from_config(tiny_stage(channels_last=True, max_steps=3), tmp_path / "run", resume=True)
    parameters = resumed.optimizer.param_groups[0]["params"]
    assert any(not p.is_contiguous() for p in parameters)  # channels_last convolution weights
    for parameter in parameters:
        for name, moment in resumed.optimizer.state[parameter].items():
            if moment.shape == parameter.shape:
                assert moment.stride() == parameter.stride(), (name, parameter.shape)
    resumed.train()
    assert resumed.step == 3


@pytest.mark.slow
def test_killed_runs_always_leave_a_loadable_checkpoint_and_resume(mnist_root, tmp_path):
    run_dir = tmp_path / "run"

    def command(max_steps: int) -> list[str]:
        # A checkpoint every step, so that many kills land in the middle of a checkpoint write.
        return [sys.executable, "train_base_mnist.py", "--config", "configs/mnist_cpu/base.yaml",
                "--output-dir", str(run_dir), "--set", f"data.root={mnist_root}", "--set", "training.batch_size=2",
                "--set", f"training.max_steps={max_steps}", "--set", "training.checkpoint_every=1",
                "--set", "training.sample_every=100000", "--set", "training.keep_checkpoints=2",
                "--set", "unet.base_channels=16", "--set", "unet.num_head_channels=16"]

    chooser = random.Random(0)
    steps_seen = []
    for _ in range(10):
        before = latest_checkpoint(run_dir)
        resume = ["--resume"] if before is not None else []
        process = subprocess.Popen(command(100000) + resume, cwd=REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # Wait until this process has written a checkpoint of its own, then kill it at a random moment.
        while latest_checkpoint(run_dir) == before and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        time.sleep(chooser.uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = latest_checkpoint(run_dir)
        assert checkpoint is not None
        stage = load_stage(run_dir, torch.device("cpu"))  # config, state and weights all load
        for name in ("model", "optimizer", "rng"):
            load_tensors(checkpoint / f"{name}.safetensors")
        steps_seen.append(stage.step)
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]
    finish = subprocess.run(command(steps_seen[-1] + 2) + ["--resume"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert latest_checkpoint(run_dir).name == f"step_{steps_seen[-1] + 2:08d}"
    assert len(list_checkpoints(run_dir)) <= 2


class Planted:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_refused_and_never_runs(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "base", run)
    marker = tmp_path / "code_ran"
    for name in ("ema.safetensors", "model.safetensors"):
        (latest_checkpoint(run) / name).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Cascade.from_checkpoints([run], device="cpu")
    with pytest.raises(CheckpointError):
        load_stage(run, torch.device("cpu"), weights="model")
    assert not marker.exists()
    # The checkpoint format itself holds no pickle: safetensors, JSON and YAML only.
    assert {p.suffix for p in latest_checkpoint(trained / "base").iterdir()} == {".safetensors", ".json", ".yaml"}


def test_overwrite_replaces_a_run_only_when_asked(mnist_root, tmp_path):
    args = ["--config", "configs/mnist_cpu/base.yaml", "--output-dir", str(tmp_path / "run"),
            "--set", f"data.root={mnist_root}", "--set", "training.max_steps=1", *QUICK]
    assert python("train_base_mnist.py", *args).returncode == 0
    refused = python("train_base_mnist.py", *args)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    replaced = python("train_base_mnist.py", *args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # the old run is gone


def test_odd_prompts_never_crash_and_make_safe_file_names(trained, tmp_path):
    prompts = ["", "   ", "seven " * 40, "zéro ünïcode ✓ 七", "bell\x07 nul\x00 tab\t newline\n end",
               "../../etc/passwd",
               "a" * 300]
    typed = [p.replace("\x00", "") for p in prompts if p.strip()]  # the script refuses blank ones (bad-input table)
    result = python("sample_imagen.py", "--checkpoint", str(trained / "base"), "--checkpoint", str(trained / "sr"),
                    "--prompts", *typed, "七", "--steps", "2", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    names = [p.name for p in (tmp_path / "out" / "images").iterdir()]
    assert len(names) == len(typed) + 1 and any(name.endswith("_empty.png") for name in names)
    # A warning is one line for the user, not Python's file, line and source.
    assert "warning: prompt 'zéro ünïcode 七': the tiny tokenizer does not know" in result.stderr
    assert "UserWarning" not in result.stderr and "self.encoder.encode" not in result.stderr
    for name in names:
        assert all(c.isalnum() or c in "_-." for c in name) and len(name) < 60, name
    # Training-side: the embedding cache takes the same prompts (NUL included).
    cache = TextEmbeddingCache.from_config(TextEncoderConfig(name="tiny", max_length=16, device="cpu"))
    encoded = cache.encode(prompts)
    assert encoded.mask.sum(1).min() >= 1 and torch.isfinite(encoded.embeddings).all()


def test_overwrite_removes_only_the_runs_own_files_once_the_new_run_is_built(mnist_root, tmp_path):
    run = tmp_path / "run"
    args = ["--config", "configs/mnist_cpu/base.yaml", "--output-dir", str(run), "--set", f"data.root={mnist_root}",
            "--set", "training.max_steps=2", "--set", "training.checkpoint_every=1", "--set", "training.sample_every=1",
            *QUICK]
    assert python("train_base_mnist.py", *args).returncode == 0
    (run / "notes.txt").write_text("mine")
    (run / "samples" / "favourite.png").write_bytes(b"mine too")
    replaced = python("train_base_mnist.py", *args[:-len(QUICK)], *QUICK, "--set", "training.max_steps=1",
                      "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["favourite.png", "step_00000001.png"]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_skips_damaged_checkpoints_and_keeps_them(mnist_root, tmp_path, tiny_stage):
    config = tiny_stage(max_steps=3, checkpoint_every=1, keep_checkpoints=5)
    Trainer.from_config(config, tmp_path / "run").train()
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [c.name for c in checkpoints] == ["step_00000001", "step_00000002", "step_00000003"]
    model = checkpoints[2] / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # a truncated copy
    (checkpoints[1] / "state.json").write_text("")  # an empty state
    probes = checkpoints[0] / "text_probes.safetensors"
    intact = probes.read_bytes()
    probes.write_bytes(intact[:50])  # a damaged fingerprint is damage too, not another encoder
    with pytest.raises(TrainingError, match="no checkpoint of .* can be loaded"):
        Trainer.from_config(tiny_stage(max_steps=4), tmp_path / "run", resume=True)
    probes.write_bytes(intact)
    resumed = Trainer.from_config(tiny_stage(max_steps=4, checkpoint_every=1, keep_checkpoints=5), tmp_path / "run",
                                  resume=True)
    assert resumed.step == 1
    # The damaged ones are kept for the user under another name, out of the way of sampling and pruning.
    run = tmp_path / "run" / "checkpoints"
    assert (run / "damaged_step_00000003" / "model.safetensors").stat().st_size == 1000
    assert (run / "damaged_step_00000002" / "state.json").read_text() == ""
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_00000001"]
    resumed.train()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"


def test_resuming_applies_a_changed_learning_rate_and_survives_another_device_kind(tiny_stage, tmp_path, capsys):
    Trainer.from_config(tiny_stage(max_steps=2, lr=1e-3, warmup_steps=0, lr_schedule="constant"),
                        tmp_path / "run").train()
    capsys.readouterr()
    resumed = Trainer.from_config(tiny_stage(max_steps=4, lr=1e-5, warmup_steps=0, lr_schedule="constant",
                                             weight_decay=0.01), tmp_path / "run", resume=True)
    printed = capsys.readouterr().out
    assert ("resuming with changed settings: training.max_steps 2 -> 4, training.lr 0.001 -> 1e-05, "
            "training.weight_decay 0.0 -> 0.01\n") in printed
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step_00000002'} (step 2)" in printed
    group = resumed.optimizer.param_groups[0]
    assert group["lr"] == 1e-5 and group["weight_decay"] == 0.01 and resumed.scheduler.base_lrs[0] == 1e-5
    # The run's config.yaml is its latest checkpoint's: the new settings once a checkpoint has them.
    assert load_stage_config(tmp_path / "run" / "config.yaml").training.lr == 1e-3
    resumed.train()
    assert load_stage_config(tmp_path / "run" / "config.yaml").training.lr == 1e-5
    assert resumed.scheduler.get_last_lr()[0] == 1e-5
    # A checkpoint whose noise generator lived on a GPU resumes on a CPU with fresh seeded noise.
    state_file = latest_checkpoint(tmp_path / "run") / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "noise_device": "cuda"}))
    moved = Trainer.from_config(tiny_stage(max_steps=5, lr=1e-5), tmp_path / "run", resume=True)
    assert moved.step == 4
    moved.train()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005"
    capsys.readouterr()
    finished = Trainer.from_config(tiny_stage(max_steps=5, lr=1e-5), tmp_path / "run", resume=True)
    finished.train()
    assert "the run is at step 5, training.max_steps 5: nothing to train" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005"


def test_diverged_weights_stop_training_before_a_checkpoint(tiny_stage, tmp_path):
    trainer = Trainer.from_config(tiny_stage(max_steps=4, checkpoint_every=2), tmp_path / "run")
    trainer.train(until=2)
    with torch.no_grad():  # weights that blew up while every loss stayed finite (the EMA enters no loss)
        next(trainer.ema.network.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"weights became NaN or infinite by step 4.*step_00000002, is kept"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_a_checkpoint_refuses_a_text_encoder_other_than_its_own(tiny_stage, tmp_path, monkeypatch):
    """The tiny T5 is built on each machine; a different build (here: other random weights)
    must not meet a checkpoint trained with another."""
    config = tiny_stage()
    Trainer.from_config(config, tmp_path / "run").train()
    assert (latest_checkpoint(tmp_path / "run") / "text_probes.safetensors").is_file()
    Cascade.from_checkpoints([tmp_path / "run"], device="cpu").sample(["seven"], steps=1)  # the same build: fine

    import imagen.text as text

    build = text.make_tiny_t5

    def other_build(name="tiny"):
        tokenizer, model = build(name)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(-1.0)
        return tokenizer, model

    monkeypatch.setattr(text, "make_tiny_t5", other_build)
    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path / "other_machine"))
    with pytest.raises(CheckpointError, match=r"trained with text encoder 'tiny'.*cosine similarity.*tiny-t5-v1"):
        Cascade.from_checkpoints([tmp_path / "run"], device="cpu").sample(["seven"], steps=1)
    with pytest.raises(TrainingError, match="different model"):
        Trainer.from_config(tiny_stage(max_steps=3), tmp_path / "run", resume=True)


def test_resuming_with_another_objective_is_refused(tiny_stage, tmp_path):
    """An eps run resumed under a v config (configs/mnist/sr_256.yaml changed) must not mix the two."""
    Trainer.from_config(tiny_stage(), tmp_path / "run").train()
    config = tiny_stage(max_steps=3)
    config.diffusion.objective = "v"
    with pytest.raises(TrainingError, match=r"diffusion.objective \(eps -> v\)"):
        Trainer.from_config(config, tmp_path / "run", resume=True)


def test_sample_overwrite_replaces_every_earlier_result_and_prompt_files_read_as_typed(trained, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "prompts.txt").write_bytes("\ufeffseven\n\n3\n   \n".encode("utf-8"))
    common = ["--checkpoint", str(trained / "base"), "--checkpoint", str(trained / "sr"), "--steps", "2",
              "--output-dir", str(out)]
    first = python("sample_imagen.py", *common, "--prompts-file", str(tmp_path / "prompts.txt"))
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "metadata.json").read_text())["prompts"] == ["seven", "3"]  # no BOM, no blank lines
    (out / "mine.txt").write_text("mine")
    second = python("sample_imagen.py", *common, "--prompts", "one", "--overwrite")
    assert second.returncode == 0, second.stderr
    assert [p.name for p in (out / "images").iterdir()] == ["0_one.png"]  # nothing stale is left
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "metadata.json", "mine.txt", "stage_0.png",
                                                     "stage_1.png"]
