"""The benchmark scripts run and report what they promise."""

import json

from conftest import python


def test_bench_train_reports_steady_state_throughput(mnist_root):
    result = python("benchmarks/bench_train.py", "--config", "configs/mnist_cpu/base.yaml", "--set",
                    f"data.root={mnist_root}", "--set", "training.batch_size=8", "--steps", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["batch_size"] == 8 and report["device"] == "cpu"
    assert report["images_per_s"] > 0 and report["seconds_per_step"] > 0
    assert abs(report["images_per_s"] * report["seconds_per_step"] - 8) < 1e-6
    assert report["parameters"] > 1_000_000 and report["peak_memory_mb"] > 100
    assert report["mixed_precision"] == "no"  # auto means full precision without a GPU


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
