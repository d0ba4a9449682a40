"""Evaluation: the Frechet distance, the classifier and its gate, prompt accuracy, the CLI."""

import csv
import json

import pytest
import torch

from imagen.cascade import Cascade, load_stage
from imagen.classifier import (
    ClassifierInfo,
    DigitClassifier,
    EvaluationError,
    check_accuracy,
    classify,
    load_or_train_classifier,
    save_classifier,
)
from imagen.data import MNISTTextDataset, to_model_images
from imagen.errors import ImagenError
from imagen.evaluation import (
    balanced_indices,
    best_tradeoff,
    class_balance,
    evaluation_prompts,
    frechet_distance,
    prompt_accuracy,
    real_reference,
)
from imagen.stage import sample_stage

from conftest import python


def gaussian_clusters(weights, count, seed):
    """Features from ten well-separated Gaussian clusters drawn with class probabilities ``weights``."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 8, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.multinomial(torch.tensor(weights, dtype=torch.float), count, replacement=True, generator=generator)
    return centres[labels] + torch.randn(count, 8, generator=generator)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_noise():
    features = gaussian_clusters([0.1] * 10, 4000, seed=0)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
    distances = [frechet_distance(features, features + scale * noise) for scale in (0.1, 0.3, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_frechet_distance_grows_with_class_imbalance():
    reference = gaussian_clusters([0.1] * 10, 8000, seed=0)
    balanced = frechet_distance(gaussian_clusters([0.1] * 10, 4000, seed=1), reference)
    skewed = frechet_distance(gaussian_clusters([0.3] + [0.7 / 9] * 9, 4000, seed=1), reference)
    collapsed = frechet_distance(gaussian_clusters([0.9] + [0.1 / 9] * 9, 4000, seed=1), reference)
    assert balanced < skewed < collapsed
    assert skewed > 5 * balanced


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    generator = torch.Generator().manual_seed(0)
    mean_a, mean_b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    a = mean_a + std_a * torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
    b = mean_b + std_b * torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
    expected = float((mean_a - mean_b).square().sum() + (std_a - std_b).square().sum())  # 1.25 + 1.25
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.05)


def test_prompt_accuracy_counts_per_digit_and_per_style():
    digits = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    numerals = torch.tensor([False] * 4 + [True] * 4)
    predicted = torch.tensor([0, 1, 2, 3, 0, 7, 7, 3])
    scores = prompt_accuracy(predicted, digits, numerals)
    assert scores["prompt_accuracy"] == 0.75
    assert scores["words_accuracy"] == 1.0 and scores["numerals_accuracy"] == 0.5
    assert scores["per_digit_accuracy"][:4] == [1.0, 0.5, 0.5, 1.0] and scores["per_digit_accuracy"][4] is None
    confusion = torch.tensor(scores["confusion_matrix"])
    assert confusion.sum() == 8 and confusion[1, 7] == 1 and confusion[2, 7] == 1 and confusion.trace() == 6


def test_class_balance_entropy():
    assert class_balance(torch.arange(10).repeat(5))["normalized_entropy"] == pytest.approx(1.0)
    assert class_balance(torch.full((50,), 4))["normalized_entropy"] == pytest.approx(0.0)
    assert class_balance(torch.full((50,), 4))["class_fractions"][4] == 1.0


def test_evaluation_prompts_are_balanced_and_the_count_is_checked():
    prompts, digits, numerals = evaluation_prompts(40)
    assert torch.bincount(digits).tolist() == [4] * 10 and int(numerals.sum()) == 20
    assert prompts[:12] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "0", "1"]
    for bad in (0, 30, 1001):
        with pytest.raises(EvaluationError, match="multiple of 20"):
            evaluation_prompts(bad)


def test_best_tradeoff_prefers_lower_fid_among_near_best_accuracy():
    results = [{"guidance": 1, "prompt_accuracy": 0.80, "fid": 1.0},
               {"guidance": 3, "prompt_accuracy": 0.965, "fid": 2.0},
               {"guidance": 7, "prompt_accuracy": 0.97, "fid": 4.0}]
    assert best_tradeoff(results)["guidance"] == 3
    assert best_tradeoff(results, tolerance=0.001)["guidance"] == 7


def test_classifier_gate_refuses_a_weak_classifier(tmp_path):
    weak = ClassifierInfo("mnist_cnn_v1", 5000, 10, 0, test_accuracy=0.90, test_accuracy_16px=0.88)
    with pytest.raises(EvaluationError, match="97.5%"):
        check_accuracy(weak)
    check_accuracy(ClassifierInfo("mnist_cnn_v1", 5000, 10, 0, 0.98, 0.97))
    with pytest.raises(EvaluationError, match="99.0%"):  # the bar is higher for the full training split
        check_accuracy(ClassifierInfo("mnist_cnn_v1", 60000, 10, 0, 0.985, 0.98))


def test_a_weak_or_tampered_cached_classifier_is_refused(tmp_path, mnist_root):
    weak = ClassifierInfo("mnist_cnn_v1", 5000, 10, 0, test_accuracy=0.60, test_accuracy_16px=0.5)
    info = save_classifier(DigitClassifier(), weak, tmp_path)
    assert len(info.sha256) == 64
    with pytest.raises(EvaluationError, match="60.00% test accuracy"):
        load_or_train_classifier(mnist_root, folder=tmp_path, progress=False)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(EvaluationError, match="does not match the hash"):
        load_or_train_classifier(mnist_root, folder=tmp_path, progress=False)


def test_processes_asking_at_once_train_the_classifier_once(tmp_path, mnist_root, monkeypatch, capsys):
    import threading
    import time

    import imagen.classifier
    import imagen.io
    from imagen.data import load_mnist

    size = len(load_mnist(mnist_root, "train")[1])
    trainings, waits = [], []

    def counting_print(*args, **kwargs):  # file_lock's waiting message, counted as it is printed
        waits.append(args)
        print(*args, **kwargs)

    def slow_training(data_root, seed, device, progress):  # until both others wait on the lock
        trainings.append(seed)
        deadline = time.monotonic() + 30
        while len(waits) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return DigitClassifier(), ClassifierInfo(imagen.classifier.RECIPE, size, 10, seed, 0.995, 0.99)

    monkeypatch.setattr(imagen.classifier, "train_classifier", slow_training)
    monkeypatch.setattr(imagen.io, "print", counting_print, raising=False)
    results = []
    askers = [threading.Thread(target=lambda: results.append(load_or_train_classifier(mnist_root, folder=tmp_path)))
              for _ in range(3)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert len(trainings) == 1 and len(results) == 3 and len(waits) == 2
    assert len({info.sha256 for _, info in results}) == 1
    first = results[0][0].state_dict()
    assert all(torch.equal(first[key], model.state_dict()[key]) for model, _ in results[1:] for key in first)
    assert "waiting for another process to finish training the classifier" in capsys.readouterr().err
    load_or_train_classifier(mnist_root, folder=tmp_path)  # cached now: neither trained nor waited for
    assert len(trainings) == 1 and capsys.readouterr().err == ""


def test_the_classifier_passes_its_gate_and_reads_small_digits(classifier):
    model, info = classifier
    assert info.test_accuracy >= 0.975 and info.test_accuracy_16px >= 0.96
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 200_000


def test_prompt_accuracy_on_real_digits_is_the_classifiers_accuracy_and_chance_when_shuffled(classifier, mnist_root):
    model, info = classifier
    test = MNISTTextDataset(mnist_root, 32, split="test")
    _, digits, numerals = evaluation_prompts(1000)
    images = to_model_images(test.raw_images[balanced_indices(test.labels, digits, seed=0)], 32, 1)
    predicted, _ = classify(model, images)
    true_labels = prompt_accuracy(predicted, digits, numerals)["prompt_accuracy"]
    assert abs(true_labels - info.test_accuracy) < 0.015
    shuffled = digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]
    assert abs(prompt_accuracy(predicted, shuffled, numerals)["prompt_accuracy"] - 0.1) < 0.035


def test_real_digits_sit_at_the_floor_and_noise_moves_away(classifier, mnist_root):
    model, _ = classifier
    reference = real_reference(model, mnist_root, 32, 1, count=500)
    test = MNISTTextDataset(mnist_root, 32, split="test")
    _, digits, _ = evaluation_prompts(500)
    real = to_model_images(test.raw_images[balanced_indices(test.labels, digits, seed=5)], 32, 1)
    noisy = (real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    ones = to_model_images(test.raw_images[test.labels == 1][:500], 32, 1)
    fid = lambda images: frechet_distance(classify(model, images)[1], reference.test_features)  # noqa: E731
    assert reference.floor_fid < 2 * fid(real) + 1e-3 and fid(real) < 2 * reference.floor_fid + 1e-3
    assert fid(noisy) > 10 * fid(real) and fid(ones) > 10 * fid(real)


def test_cascade_can_start_at_a_super_resolution_stage(trained):
    stage = load_stage(trained / "sr", torch.device("cpu"))
    with pytest.raises(Exception, match="base stage"):
        Cascade([stage])
    cascade = Cascade([stage], super_resolution_first=True)
    low_res = torch.rand(3, 1, 16, 16) * 2 - 1
    out = cascade.sample(["one", "2", "three"], steps=3, low_res=low_res, seed=4, batch_size=3)
    text = cascade.encode(stage, ["one", "2", "three"])
    direct = sample_stage(stage.network, stage.diffusion, stage.config, text, steps=3, low_res=low_res,
                          generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.images, direct) and len(out.stages) == 1
    with pytest.raises(Exception, match="low_res"):
        cascade.sample(["one"], steps=2)


def test_evaluate_cli_writes_the_documented_report(trained, classifier, tmp_path, mnist_root):
    out = tmp_path / "eval"
    args = ["evaluate_imagen.py", "--mode", "cascade", "--checkpoints", str(trained / "base"), str(trained / "sr"),
            "--data-root", str(mnist_root), "--num-images", "20", "--guidance-sweep", "0,3", "--steps", "2",
            "--output-dir", str(out), "--json"]
    result = python(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report) >= {"mode", "stages", "swept_stage", "classifier", "num_images", "seed", "resolution",
                           "fid_floor", "results", "best", "unconditional"}
    assert report["classifier"]["sha256"] == classifier[1].sha256 and report["resolution"] == 32
    assert [r["guidance"] for r in report["results"]] == [0.0, 3.0] and report["num_images"] == 20
    for r in report["results"]:
        assert set(r) >= {"prompt_accuracy", "per_digit_accuracy", "words_accuracy", "numerals_accuracy",
                          "confusion_matrix", "fid", "class_fractions", "normalized_entropy", "seconds"}
        assert sum(map(sum, r["confusion_matrix"])) == 20 and r["fid"] > 0
    assert report["stages"][1]["guidance"] == 3.0  # the SR stage keeps its config's weight
    assert report["unconditional"]["class_fractions"] == report["results"][0]["class_fractions"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [float(row["guidance"]) for row in rows] == [0.0, 3.0] and sum(int(row["best"]) for row in rows) == 1
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "samples" / "guidance_3.png").exists()
    again = python(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("mode", ["base", "sr"])
def test_evaluate_cli_single_stage_modes(trained, classifier, tmp_path, mnist_root, mode):
    out = tmp_path / mode
    result = python("evaluate_imagen.py", "--mode", mode, "--checkpoints", str(trained / "base"), str(trained / "sr"),
                    "--data-root", str(mnist_root), "--num-images", "20", "--guidance", "2", "--steps", "2",
                    "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resolution"] == (16 if mode == "base" else 32) and len(report["stages"]) == 1
    assert report["results"][0]["guidance"] == 2.0 and report["swept_stage"] == (0 if mode == "base" else 1)


def test_evaluate_cli_rejects_bad_arguments(trained, tmp_path):
    base = ["evaluate_imagen.py", "--checkpoints", str(trained / "base"), str(trained / "sr"), "--output-dir",
            str(tmp_path / "x")]
    for extra, message in ((["--num-images", "30"], "multiple of 20"),
                           (["--guidance-sweep", "1,x"], "--guidance-sweep"),
                           (["--mode", "sr", "--stage", "0"], "not a super-resolution stage"),
                           (["--mode", "cascade", "--checkpoints", str(trained / "base")], "--mode cascade")):
        result = python(*base, *extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr


def test_the_evaluator_takes_settings_as_cascade_sample_does(trained, classifier, mnist_root):
    from imagen.evaluation import Evaluator

    network, info = classifier
    cascade = Cascade.from_checkpoints([trained / "base", trained / "sr"], device="cpu")
    # One value for all stages, a Cascade for its stages, and one weight for the sweep.
    evaluator = Evaluator(cascade, "cascade", network, info, mnist_root, num_images=20, guidance=2.0, steps=2,
                          progress=False)
    report = evaluator.evaluate(3.0, unconditional=False)
    assert [r["guidance"] for r in report["results"]] == [3.0]
    assert [s["guidance"] for s in report["stages"]] == [2.0, 2.0] and [s["steps"] for s in report["stages"]] == [2, 2]
    with pytest.raises(EvaluationError, match=r"images \(20, 1, 16, 16\): expected 20 images .* of 32x32"):
        evaluator.score(torch.zeros(20, 1, 16, 16))  # the base stage's size, not the cascade's
    with pytest.raises(ImagenError, match="guidance: got 3 values for a cascade of 2 stages"):
        Evaluator(cascade, "cascade", network, info, mnist_root, num_images=20, guidance=[1.0, 2.0, 3.0])
    with pytest.raises(EvaluationError, match=r"stages: expected loaded stages .* got str"):
        Evaluator([str(trained / "base")], "base", network, info, mnist_root, num_images=20)
