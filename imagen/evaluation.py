"""Measuring a trained cascade on MNIST: prompt accuracy and a classifier Frechet distance.

    classifier, info = load_or_train_classifier("../shared/data")
    stages = [load_stage(path, torch.device("cpu")) for path in ("runs/mnist_cpu/base", "runs/mnist_cpu/sr")]
    evaluator = Evaluator(stages, "cascade", classifier, info, "../shared/data", num_images=1000)
    report = evaluator.evaluate([0, 1, 2, 3, 5, 7])   # one result per guidance weight
    report["best"]["guidance"]

The N evaluation prompts hold every digit equally often, half as words and half as
numerals. Generated images are classified by :mod:`imagen.classifier`; the Frechet distance
compares its penultimate features with those of the real test split at the same resolution,
beside the floor: N training digits against the same test split, measured the same way.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from imagen.captions import DIGIT_WORDS
from imagen.cascade import Cascade, Stage, per_stage
from imagen.classifier import ClassifierInfo, DigitClassifier, EvaluationError, classify
from imagen.data import load_mnist, to_model_images

EVALUATION_MODES = ("base", "sr", "cascade")
BEST_TOLERANCE = 0.01  # weights within 1 point of the best accuracy compete on FID


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (N, D), in float64.

    tr((C_a C_b)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric
    C_a^(1/2) C_b C_a^(1/2), which has the same spectrum and is stable to compute.
    """
    if len(features_a) < 2 or len(features_b) < 2:
        raise EvaluationError("the Frechet distance needs at least two images on each side.")
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


def prompt_accuracy(predicted: torch.Tensor, digits: torch.Tensor, numerals: torch.Tensor) -> dict:
    """How often the classifier read the prompted digit: overall, per digit, for word prompts
    and for numeral prompts, with the confusion matrix (rows: prompted, columns: read)."""
    correct = (predicted == digits).float()
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((digits, predicted), torch.ones_like(digits), accumulate=True)

    def share(mask: torch.Tensor) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {
        "prompt_accuracy": float(correct.mean()),
        "per_digit_accuracy": [share(digits == digit) for digit in range(10)],
        "words_accuracy": share(~numerals),
        "numerals_accuracy": share(numerals),
        "confusion_matrix": confusion.tolist(),
    }


def class_balance(predicted: torch.Tensor) -> dict:
    """The share of each digit among the classified images, and its entropy over log(10)
    (1 for a perfectly balanced set, 0 when every image is the same digit)."""
    fractions = torch.bincount(predicted, minlength=10).double() / len(predicted)
    entropy = -(fractions[fractions > 0] * fractions[fractions > 0].log()).sum()
    return {"class_fractions": fractions.tolist(), "normalized_entropy": float(entropy / torch.log(torch.tensor(10.0)))}


def evaluation_prompts(count: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``count`` prompts (a multiple of 20) cycling through the ten digits, alternately as ten
    words and ten numerals: (prompts, digits (N,), is_numeral (N,) bool)."""
    if count < 20 or count % 20:
        raise EvaluationError(f"--num-images {count}: expected a positive multiple of 20 (equal counts of every "
                              "digit, half as words and half as numerals).")
    index = torch.arange(count)
    digits, numerals = index % 10, (index // 10) % 2 == 1
    prompts = [str(int(d)) if n else DIGIT_WORDS[int(d)] for d, n in zip(digits, numerals)]
    return prompts, digits, numerals


def balanced_indices(labels: torch.Tensor, digits: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices into a dataset whose labels equal ``digits`` position by position, drawn without
    repetition from a seeded shuffle."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    pools = {digit: order[labels[order] == digit].tolist() for digit in range(10)}
    picked = []
    for digit in digits.tolist():
        if not pools[digit]:
            raise EvaluationError(f"the MNIST split has too few images of digit {digit} for {len(digits)} evaluation "
                                  "images; lower --num-images.")
        picked.append(pools[digit].pop())
    return torch.tensor(picked)


@dataclass
class RealReference:
    """The real test split's classifier features at one resolution, and the real-vs-real floor."""

    size: int
    test_features: torch.Tensor
    floor_fid: float
    test_accuracy: float  # of the classifier on the test split at this resolution


def real_reference(classifier: DigitClassifier, data_root: str | Path, size: int, channels: int, count: int,
                   seed: int = 0) -> RealReference:
    """Features of the whole test split at ``size`` and the Frechet distance of ``count``
    balanced training digits (processed identically) to them."""
    test_images, test_labels = load_mnist(data_root, "test")
    train_images, train_labels = load_mnist(data_root, "train")
    predicted, test_features = classify_at(classifier, test_images, size, channels)
    _, digits, _ = evaluation_prompts(count)
    picked = balanced_indices(train_labels, digits, seed)
    _, train_features = classify_at(classifier, train_images[picked], size, channels)
    return RealReference(size, test_features, frechet_distance(train_features, test_features),
                         float((predicted == test_labels).float().mean()))


def classify_at(classifier: DigitClassifier, digits: torch.Tensor, size: int, channels: int,
                chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`classify` real uint8 digits (N, 1, 28, 28) processed as generated images are
    compared with them: resized to ``size`` and ``channels``, on the classifier's device,
    a chunk at a time (the test split at 256 px would be 2.6 GB at once)."""
    device = next(classifier.parameters()).device
    results = [classify(classifier, to_model_images(part.to(device), size, channels)) for part in digits.split(chunk)]
    return torch.cat([predicted for predicted, _ in results]), torch.cat([features for _, features in results])


def evaluated_stages(stages: Sequence[Stage], mode: str, stage: int | None = None) -> list[int]:
    """The indices of the stages that ``mode`` evaluates: the base stage, all of them, or in sr
    mode the super-resolution stage ``stage`` (default the last)."""
    if mode not in EVALUATION_MODES:
        raise EvaluationError(f"--mode {mode!r}: expected one of {', '.join(EVALUATION_MODES)}.")
    if mode == "base":
        return [0]
    if mode == "cascade":
        if len(stages) < 2:
            raise EvaluationError("--mode cascade needs a base stage and at least one super-resolution stage.")
        return list(range(len(stages)))
    index = len(stages) - 1 if stage is None else stage
    if not 0 <= index < len(stages) or stages[index].config.super_resolution is None:
        raise EvaluationError(f"--mode sr: stage {index} is not a super-resolution stage among the "
                              f"{len(stages)} checkpoints given.")
    return [index]


class Evaluator:
    """Generates the evaluation images of one mode at a guidance weight and scores them.

    ``stages`` are loaded stages, base first. Modes: ``base`` samples the first stage alone;
    ``sr`` feeds real test digits, shrunk to its input size, to super-resolution stage
    ``stage`` (default: the last one given); ``cascade`` samples every stage. The swept
    guidance weight applies to the evaluated stage (the base stage in cascade mode); other
    stages keep ``guidance``. ``guidance``, ``steps`` and ``sampler`` are one value for all
    stages or one per stage given (None: each stage's config).
    """

    def __init__(self, stages: Sequence[Stage], mode: str, classifier: DigitClassifier, info: ClassifierInfo,
                 data_root: str | Path, num_images: int = 1000, *, stage: int | None = None, seed: int = 0,
                 guidance: Sequence[float | None] | None = None, steps: Sequence[int | None] | None = None,
                 sampler: Sequence[str | None] | None = None, batch_size: int | None = None, progress: bool = True):
        if isinstance(stages, Cascade):
            stages = stages.stages
        if not all(isinstance(item, Stage) for item in stages):
            raise EvaluationError("stages: expected loaded stages (imagen.cascade.load_stage, or a Cascade's "
                                  f".stages), got {', '.join(sorted({type(item).__name__ for item in stages}))}.")
        guidance, steps, sampler = (per_stage(values, len(stages), name) for values, name in
                                    ((guidance, "guidance"), (steps, "steps"), (sampler, "sampler")))
        chosen = evaluated_stages(stages, mode, stage)
        self.mode, self.chosen = mode, chosen
        self.cascade = Cascade([stages[i] for i in chosen], super_resolution_first=mode == "sr")
        self.classifier, self.info = classifier, info
        self.data_root, self.seed, self.progress, self.batch_size = data_root, seed, progress, batch_size
        self.prompts, self.digits, self.numerals = evaluation_prompts(num_images)
        def pick(values):  # the evaluated stages' entries of a per-stage setting
            return None if values is None else [values[i] for i in chosen]

        self.guidance, self.steps, self.sampler = pick(guidance), pick(steps), pick(sampler)
        last = self.cascade.stages[-1].config.unet
        self.reference = real_reference(classifier, data_root, last.image_size, last.channels, num_images, seed)
        self.low_res = None
        if mode == "sr":
            config = self.cascade.stages[0].config
            test_images, test_labels = load_mnist(data_root, "test")
            picked = balanced_indices(test_labels, self.digits, seed + 1)
            self.low_res = to_model_images(test_images[picked], config.super_resolution.low_res_size,
                                           config.unet.channels)

    def generate(self, weight: float) -> torch.Tensor:
        guidance = [weight, *self.guidance[1:]]
        return self.cascade.sample(self.prompts, guidance=guidance, steps=self.steps, sampler=self.sampler,
                                   seed=self.seed, batch_size=self.batch_size, low_res=self.low_res,
                                   progress=self.progress).images

    def score(self, images: torch.Tensor) -> dict:
        """Prompt accuracy and FID of ``images`` (N, C, H, W), one per evaluation prompt, at the
        evaluated resolution."""
        expected = (len(self.prompts), self.reference.size)
        if images.dim() != 4 or (images.shape[0], images.shape[-1]) != expected:
            raise EvaluationError(f"images {tuple(images.shape)}: expected {expected[0]} images (one per evaluation "
                                  f"prompt) of {expected[1]}x{expected[1]}, the resolution the reference is at.")
        predicted, features = classify(self.classifier, images)
        return {**prompt_accuracy(predicted, self.digits, self.numerals),
                "fid": frechet_distance(features, self.reference.test_features),
                **class_balance(predicted)}

    def evaluate(self, weights: Sequence[float], on_images=None, unconditional: bool = True) -> dict:
        """The report: one result per weight, the best trade-off and the unconditional balance.
        ``on_images(weight, images)`` sees every generated batch (to save sample grids).
        The balance needs guidance-0 samples: without 0 among ``weights`` they are drawn
        separately, unless ``unconditional`` is False (then the report's entry is None)."""
        results = sweep(self, weights, on_images)
        balance = next((r for r in results if r["guidance"] == 0), None)
        if balance is None and unconditional:
            balance = self.score(self.generate(0.0))
        return {
            "mode": self.mode,
            "stages": stage_settings(self.cascade.stages, self.guidance, self.steps, self.sampler),
            "swept_stage": self.chosen[0],
            "classifier": {**classifier_record(self.info), "test_accuracy_at_resolution": self.reference.test_accuracy},
            "num_images": len(self.prompts),
            "seed": self.seed,
            "resolution": self.reference.size,
            "fid_floor": self.reference.floor_fid,
            "results": results,
            "best": best_tradeoff(results),
            "unconditional": None if balance is None else {key: balance[key]
                                                           for key in ("class_fractions", "normalized_entropy")},
        }


def sweep(evaluator, weights: Sequence[float], on_images=None) -> list[dict]:
    """For each guidance weight: the evaluator's images (``generate``), their scores (``score``)
    and the seconds both took; ``on_images(weight, images)`` sees every set of images. One
    weight may be given as a number."""
    weights = [weights] if isinstance(weights, numbers.Real) else list(weights)
    results = []
    for weight in weights:
        start = time.perf_counter()
        images = evaluator.generate(weight)
        results.append({"guidance": weight, **evaluator.score(images), "seconds": time.perf_counter() - start})
        if on_images is not None:
            on_images(weight, images)
    return results


def stage_settings(stages: Sequence[Stage], guidance: Sequence[float | None], steps: Sequence[int | None] | None,
                   sampler: Sequence[str | None] | None) -> list[dict]:
    """What a report says of each sampled stage: checkpoint, step, image size and the sampling
    settings used (the given ones, else the stage's config)."""
    steps, sampler = steps or [None] * len(stages), sampler or [None] * len(stages)
    return [{"checkpoint": str(stage.checkpoint), "step": stage.step, "image_size": stage.config.unet.image_size,
             "guidance": weight if weight is not None else stage.config.sampling.guidance,
             "steps": steps[i] or stage.config.sampling.steps, "sampler": sampler[i] or stage.config.sampling.sampler}
            for i, (stage, weight) in enumerate(zip(stages, guidance))]


def classifier_record(info: ClassifierInfo) -> dict:
    """Which classifier a report's numbers come from: numbers compare only under the same hash."""
    return {"sha256": info.sha256, "hash": info.short_hash, "recipe": info.recipe, "train_size": info.train_size,
            "test_accuracy": info.test_accuracy}


def best_tradeoff(results: Sequence[dict], tolerance: float = BEST_TOLERANCE) -> dict:
    """The weight with the lowest FID among those within ``tolerance`` of the best prompt accuracy."""
    top = max(result["prompt_accuracy"] for result in results)
    best = min((r for r in results if r["prompt_accuracy"] >= top - tolerance), key=lambda r: r["fid"])
    return {"guidance": best["guidance"], "prompt_accuracy": best["prompt_accuracy"], "fid": best["fid"],
            "rule": f"lowest FID among weights within {tolerance:g} of the best prompt accuracy"}
