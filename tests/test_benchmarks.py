"""The benchmark scripts run and report what they promise."""

import json
import os
import subprocess

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from imagen.config import load_stage_config
from imagen.stage import build_network
from imagen.throughput import peak_bandwidth_tbps, peak_tflops, training_flops_per_image

from conftest import REPO_ROOT, python

TINY_T5_WIDTH = 128


def test_bench_train_reports_steady_state_throughput(mnist_root, tmp_path):
    args = ("benchmarks/bench_train.py", "--config", "configs/mnist_cpu/base.yaml", "--set", f"data.root={mnist_root}",
            "--set", "training.batch_size=8", "--steps", "2", "--warmup", "1", "--peak-tflops", "2")
    result = python(*args, "--profile", str(tmp_path / "profile.txt"))
    assert result.returncode == 0, result.stderr
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.startswith("unet 16 px, batch 8, mixed_precision no, compile False, channels_last False, "
                              "group_norm_precision float32, on cpu: ")
    assert "3 steps profiled" in profile and "aten::convolution_backward" in profile
    again = python(*args, "--profile", str(tmp_path / "profile.txt"))
    assert again.returncode == 2 and "--profile" in again.stderr and "already exists" in again.stderr
    assert (tmp_path / "profile.txt").read_text() == profile
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["batch_size"] == 8 and report["device"] == "cpu"
    assert report["images_per_s"] > 0 and report["seconds_per_step"] > 0
    assert abs(report["images_per_s"] * report["seconds_per_step"] - 8) < 1e-6
    assert report["parameters"] > 1_000_000 and report["peak_memory_mb"] > 100
    assert report["mixed_precision"] == "no"  # auto means full precision without a GPU

    # One step is a forward and a backward pass (about twice the forward) over the batch.
    config = load_stage_config("configs/mnist_cpu/base.yaml")
    network = build_network(config, TINY_T5_WIDTH)
    with FlopCounterMode(display=False) as counter:
        network(torch.zeros(8, 1, 16, 16), torch.zeros(8, dtype=torch.long),
                text_emb=torch.zeros(8, config.text_encoder.max_length, TINY_T5_WIDTH),
                text_mask=torch.ones(8, config.text_encoder.max_length, dtype=torch.bool))
    forward = counter.get_total_flops()
    assert 2.5 * forward < report["flops_per_step"] <= 3 * forward
    assert report["flops_per_image"] == report["flops_per_step"] / 8
    assert abs(report["achieved_tflops"] - report["flops_per_step"] / report["seconds_per_step"] / 1e12) < 1e-12
    assert report["peak_tflops"] == 2 and report["peak_precision"] == "fp32"
    assert abs(report["mfu"] - report["achieved_tflops"] / 2) < 1e-12


def test_bench_sample_times_every_stage_per_sampler(trained):
    result = python("benchmarks/bench_sample.py", "--checkpoints", str(trained / "base"), str(trained / "sr"),
                    "--samplers", "ddpm:2", "ddim:3", "--batch-size", "4", "--guidance", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["results"]) == {"ddpm:2", "ddim:3"} and report["guidance"] == [2.0, 2.0]
    for timing in report["results"].values():
        assert [stage["image_size"] for stage in timing["stages"]] == [16, 32]
        assert abs(sum(stage["seconds"] for stage in timing["stages"]) - timing["seconds"]) < 1e-9


def test_bench_sample_rejects_a_bad_setting(trained):
    result = python("benchmarks/bench_sample.py", "--checkpoints", str(trained / "base"), "--samplers", "euler:10")
    assert result.returncode == 2 and "SAMPLER:STEPS" in result.stderr


@pytest.mark.slow
def test_sampler_parity_compares_fast_settings_with_the_reference_and_resumes(trained, classifier, mnist_root,
                                                                               tmp_path):
    args = ["benchmarks/sampler_parity.py", "--checkpoints", str(trained / "base"), str(trained / "sr"),
            "--data-root", str(mnist_root), "--reference", "ddpm:3", "--fast", "dpmpp_2m_sde:2",
            "--seeds", "0", "1", "--num-images", "20", "--batch-size", "10", "--output-dir", str(tmp_path)]
    result = python(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["settings"]) == ["ddpm:3", "dpmpp_2m_sde:2"]
    reference = report["settings"]["ddpm:3"]
    assert [run["seed"] for run in reference["runs"]] == [0, 1]
    assert reference["fid"] == sum(run["fid"] for run in reference["runs"]) / 2
    fast = report["settings"]["dpmpp_2m_sde:2"]
    assert fast["fid_ratio_vs_reference"] == fast["fid"] / reference["fid"]
    assert fast["accuracy_points_vs_reference"] == pytest.approx(
        100 * (fast["prompt_accuracy"] - reference["prompt_accuracy"]))
    assert fast["matches_reference"] == (fast["accuracy_points_vs_reference"] >= -1
                                         and fast["fid_ratio_vs_reference"] <= 1.1)
    saved = json.loads((tmp_path / "dpmpp_2m_sde_2_seed1" / "report.json").read_text())
    assert [(stage["sampler"], stage["steps"]) for stage in saved["stages"]] == [("dpmpp_2m_sde", 2)] * 2
    assert saved["seed"] == 1 and saved["num_images"] == 20
    assert saved["unconditional"] is None  # no extra guidance-0 run
    # A second run reuses every report instead of sampling again.
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/report.json")}
    assert len(stamps) == 4
    again = python(*args)
    assert again.returncode == 0 and json.loads(again.stdout) == report
    assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/report.json")} == stamps
    bad = python(*args[:-2], "--fast", "euler:10", "--output-dir", str(tmp_path))
    assert bad.returncode == 2 and "SAMPLER:STEPS" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_the_gpu_cascade_script_runs_the_whole_mission_in_smoke_mode(classifier, mnist_root, tmp_path, uninstalled):
    """benchmarks/gpu_cascade.sh at tiny sizes on the CPU, from the checkout alone as on a lent
    GPU: both stages trained under a time budget, the cascade sampled and evaluated, and the
    report and grids written."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_cascade.sh", str(out), str(mnist_root)], cwd=REPO_ROOT,
                            env={**uninstalled, "SMOKE": "1", "RUNS": str(tmp_path / "runs")},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"report.json", "log.txt", "base_grid.png", "sr_grid.png",
                                                "cascade_samples.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["text_encoder"] == "tiny"  # no T5 in the (offline) Hugging Face cache here
    for name, size in (("base", 16), ("sr", 32)):
        stage = report["stages"][name]
        assert stage["steps"] == 2 and stage["config"]["image_size"] == size and stage["config"]["max_minutes"] == 2.5
        assert stage["config"]["compile"] is False and stage["config"]["channels_last"] is False
        assert stage["config"]["group_norm_precision"] == "activations"
        assert stage["config"]["warmup_steps"] == 100  # the budget schedule, not the configs' 1000 steps
        assert stage["images_per_s"] > 0 and stage["flops_per_image"] > 0 and stage["peak_memory_mb"] > 0
        assert stage["achieved_tflops"] == pytest.approx(stage["flops_per_image"] * stage["images_per_s"] / 1e12)
        assert stage["mfu"] is None and stage["wall_seconds"] > 0  # a CPU has no peak in the table
    base, sr = report["stages"]["base"]["config"], report["stages"]["sr"]["config"]
    assert base["lr"] == 3e-4 and sr["lr"] == 5e-4
    assert base["objective"] == "eps" and sr["objective"] == "v"  # sr_256.yaml predicts v
    evaluation = report["evaluation"]
    assert evaluation["guidance"] == [2.0, 1.0]  # the base config's weight; the budget stage's SR_GUIDANCE
    assert evaluation["num_images"] == 20 and evaluation["resolution"] == 32 and evaluation["seed"] == 0
    assert 0 <= evaluation["prompt_accuracy"] <= 1 and evaluation["fid"] > evaluation["fid_floor"] > 0
    assert report["goals"]["prompt_accuracy_met"] == (evaluation["prompt_accuracy"] >= 0.95)
    assert report["goals"]["base_mfu_met"] is False
    assert "cascade at 32 px, 20 images" in result.stdout
    # Every phase's time and each stage's last logged interval reach the log as they end.
    log = (out / "log.txt").read_text()
    for name in ("base", "sr", "evaluation"):
        assert f"phase {name}: " in log
    # Each stage's grid reaches OUT as the stage ends, so a run cut in its evaluation still returns them.
    assert log.index("phase base: ") < log.index("kept base_grid.png (step_00000002.png)") < log.index("phase sr: ")
    assert log.index("phase sr: ") < log.index("kept sr_grid.png (step_00000002.png)") < log.index("\nclassifier ")
    assert '"step": 2' in log.split("base, last logged interval: ")[1].splitlines()[0]

    again = subprocess.run(["bash", "benchmarks/gpu_cascade.sh", str(out)], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "already holds a report.json" in again.stderr


DEVICE_PATHS = ["train_base", "resume_base", "resume_continued", "train_sr", "network_base", "network_sr", "sample",
                "ran_on_device", "image_to_image", "inpaint", "low_res", "evaluate_sr", "train_caption_folder",
                "prepare_shards", "train_from_shards", "train_scene_base", "train_scene_sr", "evaluate_scenes",
                "train_edm_base", "train_edm_sr", "sample_edm"]


@pytest.mark.slow
def test_the_device_paths_script_runs_every_path_at_tiny_sizes(classifier, mnist_root, tmp_path, uninstalled):
    """benchmarks/device_paths.sh, what a lent GPU runs to show the paths device-clean, on the CPU
    from the checkout alone."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/device_paths.sh", str(out), str(mnist_root)], cwd=REPO_ROOT,
                            env=uninstalled, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("device: cpu torch ") and log[-1] == "every path ran"
    assert [line.split()[1] for line in log[1:-1]] == DEVICE_PATHS and all(line.startswith("ok ") for line in log[1:-1])
    assert sorted(p.name for p in (out / "runs" / "base" / "checkpoints").iterdir()) == ["step_00000002",
                                                                                        "step_00000004"]
    for folder in ("sample", "image_to_image", "inpaint", "low_res", "sample_edm"):
        assert (out / folder / "grid.png").is_file(), folder
    for run in ("caption_folder", "shards", "scene_base", "scene_sr", "edm_base", "edm_sr"):
        assert (out / "runs" / run / "checkpoints" / "step_00000002").is_dir(), run
    for folder in ("evaluate_sr", "evaluate_scenes"):
        assert json.loads((out / folder / "report.json").read_text())["num_images"] == 20

    again = subprocess.run(["bash", "benchmarks/device_paths.sh", str(out)], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr and again.stdout == ""
    failing = subprocess.run(["bash", "benchmarks/device_paths.sh", str(tmp_path / "failing"), str(tmp_path / "none")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert failing.returncode != 0
    assert (tmp_path / "failing" / "log.txt").read_text().splitlines()[1].startswith("FAIL train_base (exit 2 after ")


@pytest.mark.parametrize("value, meaning", [("", "false"), ("0", "false"), ("off", "false"), ("False", "false"),
                                            ("1", "true"), ("true", "true"), ("YES", "true"), ("on", "true")])
def test_an_on_off_setting_of_the_device_scripts_means_the_same_in_each(value, meaning):
    result = subprocess.run(["bash", "-c", 'source benchmarks/switch.sh && switch COMPILE "$0"', value], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == f"{meaning}\n"


@pytest.mark.parametrize("script, existing, message", [("gpu_cascade.sh", "out/report.json", "already holds a report"),
                                                       ("device_paths.sh", "out", "already exists"),
                                                       ("budget_lr_cpu.sh", "out", "already exists")])
def test_a_relative_path_given_to_a_benchmark_script_is_the_callers(script, existing, message, tmp_path):
    """The scripts change into the checkout; a relative OUT must still mean the caller's folder."""
    (tmp_path / "out").mkdir()
    if existing != "out":
        (tmp_path / existing).write_text("")
    # budget_lr_cpu.sh takes OUT STAGE LR; the others read the extra arguments as MNIST_ROOT or not at all.
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / script), "out", "base", "1e-4"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"{tmp_path / 'out'}" in result.stderr and message in result.stderr


@pytest.mark.parametrize("script", ["gpu_cascade.sh", "device_paths.sh"])
def test_the_device_scripts_refuse_an_unknown_compile_setting_before_any_work(script, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", f"benchmarks/{script}", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COMPILE": "maybe"})
    assert result.returncode == 2 and result.stdout == "" and not out.exists()
    assert "error: COMPILE is 'maybe'; expected 1, true, yes or on" in result.stderr


def test_the_gpu_speed_script_refuses_an_unknown_variant_before_running_anything(tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "VARIANTS": "eager compiled"})
    assert result.returncode == 2 and result.stdout == ""
    assert "VARIANTS: unknown variant 'compiled'" in result.stderr and "channels_last" in result.stderr
    empty = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "VARIANTS": " "})
    assert empty.returncode == 2 and "VARIANTS is empty" in empty.stderr
    for setting, message in (({"STAGES": "sr"}, "STAGES: unknown stage 'sr'"), ({"TIMEOUT": "1m"}, "TIMEOUT '1m'")):
        refused = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=60, env={**os.environ, **setting})
        assert refused.returncode == 2 and message in refused.stderr and refused.stdout == ""


def test_bf16_group_norms_move_fewer_bytes_than_float32_ones_and_lower_the_roofline():
    result = python("benchmarks/bench_traffic.py", "--config", "configs/mnist_cpu/base.yaml", "--batch", "16")
    assert result.returncode == 0, result.stderr
    float32, activations = (json.loads(line) for line in result.stdout.splitlines())
    assert (float32["group_norm_precision"], activations["group_norm_precision"]) == ("float32", "activations")
    assert activations["casts"] < float32["casts"] and activations["total_gib"] < 0.7 * float32["total_gib"]
    for name, gib in float32["gib_by_op"].items():  # each of them: no float32 copy, no float32 norm or SiLU
        assert 0 < activations["gib_by_op"][name] < 0.6 * gib, name
    model_tflop = training_flops_per_image(load_stage_config("configs/mnist_cpu/base.yaml"), 128) * 16 / 1e12
    for report in (float32, activations):
        assert report["tflop"] == pytest.approx(model_tflop, rel=0.05)  # norms change no model FLOPs
        bound = report["roofline"]
        assert bound["gpu"] == "H100"
        compute_ms = report["tflop"] / peak_tflops("H100", "bf16") * 1e3
        memory_ms = report["total_gib"] * 2**30 / (peak_bandwidth_tbps("H100") * 1e12) * 1e3
        # Per operation the longer of the two: at least either total, at most both.
        assert max(compute_ms, memory_ms) < bound["ms"] < compute_ms + memory_ms
        assert 0 < bound["ms_memory_bound"] < bound["ms"]
        assert bound["mfu_bound"] == pytest.approx(compute_ms / bound["ms"])
    assert activations["roofline"]["ms"] < float32["roofline"]["ms"]
    faster = python("benchmarks/bench_traffic.py", "--config", "configs/mnist_cpu/base.yaml", "--batch", "16",
                    "--gpu", "H200")
    assert faster.returncode == 0, faster.stderr
    h200 = json.loads(faster.stdout.splitlines()[1])
    assert h200["total_gib"] == activations["total_gib"] and h200["roofline"]["gpu"] == "H200"
    assert h200["roofline"]["ms"] < activations["roofline"]["ms"]  # the same bytes, more bandwidth
    refused = python("benchmarks/bench_traffic.py", "--config", "configs/mnist_cpu/base.yaml", "--batch", "0")
    assert refused.returncode == 2 and "--batch 0: expected a positive number of images" in refused.stderr


def test_the_gpu_speed_script_reports_each_measurement_as_it_ends_and_goes_on_past_failures(mnist_root, uninstalled,
                                                                                          tmp_path):
    """A lent GPU's call can be cut off or lack a compiler (and has imagen uninstalled): each
    variant's line must come as it ends, and a failing one must not cost the others their
    numbers (nor pass for a number). Started from another folder, its data path is read from there."""
    # CXX is Inductor's CPU compiler: the probe finds none, as on a GPU machine without one.
    env = {**uninstalled, "STAGES": "base", "VARIANTS": "float32_norms compile", "STEPS": "1", "WARMUP": "1",
           "BATCH": "2", "CXX": "/bin/false"}
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks/gpu.sh"), os.path.relpath(mnist_root, tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    norms, compiled = (json.loads(line) for line in result.stdout.splitlines())
    assert norms["stage"] == "base" and norms["variant"] == "float32_norms" and norms["image_size"] == 64
    assert norms["steps"] == 1 and norms["batch_size"] == 2 and norms["wall_s"] > 0 and norms["images_per_s"] > 0
    assert norms["group_norm_precision"] == "float32"  # the configs' is activations
    assert compiled == {"stage": "base", "variant": "compile", "error": compiled["error"]}
    assert compiled["error"].startswith("torch.compile cannot build kernels on this machine (")
    assert "InvalidCxxCompiler" in compiled["error"] and "compiled variants are skipped" in result.stderr
    cut = subprocess.run(["bash", "benchmarks/gpu.sh", str(mnist_root)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "VARIANTS": "eager", "TIMEOUT": "1", "STEPS": "100000"})
    assert cut.returncode == 1
    assert json.loads(cut.stdout) == {"stage": "base", "variant": "eager", "error": "ran out of TIMEOUT=1 s"}


def test_the_benchmarks_pick_up_a_run_where_it_stopped(tmp_path):
    """Run again, the benchmarks that train resume a run with a complete checkpoint and restart one
    killed before its first (config.yaml alone: --resume has nothing to continue, a plain start is
    refused), which a checkpoints folder holding only a half-written one must not hide."""
    unfinished, resumable = tmp_path / "unfinished", tmp_path / "resumable"
    (unfinished / "checkpoints" / ".step_00000500").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("unet: {}\n")
    (resumable / "checkpoints" / "step_00000500").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    script = "source benchmarks/run_flags.sh; for run in \"$@\"; do echo \"[$(pick_up \"$run\")]\"; done"
    folders = [tmp_path / name for name in ("missing", "empty", "unfinished", "resumable")]
    result = subprocess.run(["bash", "-c", script, "pick_up", *map(str, folders)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "[]", "[--overwrite]", "[--resume]"]


def test_the_budget_stand_in_script_refuses_a_bad_stage_or_an_existing_folder(tmp_path):
    def run(*args):
        return subprocess.run(["bash", "benchmarks/budget_lr_cpu.sh", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)

    bad_stage = run(str(tmp_path / "new"), "sr_256", "1e-3")
    assert bad_stage.returncode == 2 and "base|sr" in bad_stage.stderr and not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    existing = run(str(tmp_path / "old"), "base", "1e-3")
    assert existing.returncode == 2 and "already exists" in existing.stderr and not any((tmp_path / "old").iterdir())


def test_the_inpainting_benchmark_reports_both_prompts(trained, classifier, mnist_root, tmp_path):
    result = python("benchmarks/inpaint_digits.py", "--checkpoints", str(trained / "base"), str(trained / "sr"),
                    "--data-root", str(mnist_root), "--output-dir", str(tmp_path), "--num-images", "20", "--steps", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_images"] == 20 and report["keep"] == "top"
    for key in ("same_digit_prompt_accuracy", "next_digit_prompt_accuracy", "next_digit_reads_as_given_digit"):
        assert 0 <= report[key] <= 1
    assert json.loads((tmp_path / "report.json").read_text()) == report and (tmp_path / "grid.png").is_file()


@pytest.mark.slow
def test_the_formulations_benchmark_trains_evaluates_and_resumes(trained, classifier, mnist_root, tmp_path):
    """benchmarks/formulations_cpu.sh with a 2-step budget: both formulations trained, every
    checkpoint and the cascade evaluated, and a second run finds everything done."""
    env = {**os.environ, "STEPS": "2", "EVERY": "1", "CHECKPOINT_IMAGES": "20", "NUM_IMAGES": "20",
           "EXTRA": "--set training.batch_size=8 --set training.sample_guidance=[1] --set sampling.steps=2",
           "EVAL_STEPS": "2"}
    command = ["bash", "benchmarks/formulations_cpu.sh", str(tmp_path), str(trained / "sr"), str(mnist_root)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for formulation, sampler in (("ddpm", "dpmpp_2m_sde"), ("edm", "heun_stochastic")):
        folder = tmp_path / formulation
        assert sorted(p.name for p in folder.glob("eval_step_*")) == ["eval_step_00000001", "eval_step_00000002"]
        cascade = json.loads((folder / "eval_cascade" / "report.json").read_text())
        assert cascade["num_images"] == 20 and cascade["resolution"] == 32
        saved = (folder / "base" / "config.yaml").read_text()
        assert f"formulation: {formulation}" in saved and f"sampler: {sampler}" in saved
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| 1 |") == 2 and summary.count("| 2 |") == 2 and "cascade at 32 px (20 images" in summary
    again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "train:" not in again.stderr and again.stdout.strip() == summary.strip()
