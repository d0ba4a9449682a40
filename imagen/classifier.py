"""The MNIST classifier that evaluation measures generated digits with.

A small CNN (about 130k parameters) trained by this project on the MNIST training split,
with random shifts, rotations and resolution loss so that it reads 16x16 and 32x32 digits
as well as 28x28 ones. Its weights are cached under ``$IMAGEN_CACHE_DIR/classifier`` (never
committed) with their test-split accuracy, and identified by a hash of the weights file that
every evaluation report prints: numbers are comparable only under the same hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imagen.data import load_mnist, to_model_images
from imagen.errors import ImagenError
from imagen.io import atomic_write, cache_root, file_lock, to_host

CLASSIFIER_SIZE = 28
FEATURE_DIM = 128
RECIPE = "mnist_cnn_v1"  # bump when the network or the training recipe changes
FULL_TRAIN_SIZE = 60_000


class EvaluationError(ImagenError):
    """Evaluation cannot give trustworthy numbers with what it was given."""


class DigitClassifier(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> logits (N, 10); ``features`` gives the penultimate (N, 128)."""

    def __init__(self):
        super().__init__()

        def block(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),  # 14x14
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 7x7
            *block(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 1 or 3, H, W) in [-1, 1] at any size -> (N, 1, 28, 28), grey, antialiased."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise EvaluationError(f"the classifier takes images (N, 1 or 3, H, W); got shape {tuple(images.shape)}.")
    images = images.float()
    if images.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        images = (images * luma).sum(dim=1, keepdim=True)
    if images.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        images = F.interpolate(images, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(-1.0, 1.0)


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor,
             batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digits (N,) and penultimate features (N, 128, float64) of images in [-1, 1]."""
    classifier.eval()
    device = next(classifier.parameters()).device
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        batch = classifier_input(images[start:start + batch_size].to(device))
        feature = classifier.features(batch)
        predictions.append(to_host(classifier.head(feature).argmax(dim=1)))
        features.append(to_host(feature).double())
    return torch.cat(predictions), torch.cat(features)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 degrees), scale (0.9-1.1) and shift (+-2.5 px), then for half the
    batch a round trip through a random lower resolution (12-24 px), as generated digits have."""
    count = len(images)
    angle = (torch.rand(count, generator=generator) - 0.5) * math.radians(24)
    scale = 0.9 + 0.2 * torch.rand(count, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) - 0.5) * (5.0 / CLASSIFIER_SIZE * 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    low = int(torch.randint(12, 25, (1,), generator=generator))
    degraded = F.interpolate(images[: count // 2], size=(low, low), mode="bilinear", antialias=True,
                             align_corners=False)
    degraded = F.interpolate(degraded, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([degraded, images[count // 2:]]).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions, _ = classify(classifier, images)
    return float((predictions == labels).float().mean())


@dataclass
class ClassifierInfo:
    recipe: str
    train_size: int
    steps: int
    seed: int
    test_accuracy: float  # 28x28 test split
    test_accuracy_16px: float  # the test split shrunk to 16x16 (the CPU base stage's size)
    sha256: str = ""  # of the weights file

    @property
    def short_hash(self) -> str:
        return self.sha256[:16]

    @property
    def required_accuracy(self) -> float:
        return 0.99 if self.train_size >= FULL_TRAIN_SIZE else 0.975


def train_classifier(data_root: str | Path, steps: int = 400, batch_size: int = 128, seed: int = 0,
                     device: str | torch.device = "cpu",
                     progress: bool = True) -> tuple[DigitClassifier, ClassifierInfo]:
    """Train the CNN on MNIST's training split and measure it on the test split."""
    torch.manual_seed(seed)
    device = torch.device(device)
    train_images, train_labels = load_mnist(data_root, "train")
    test_images, test_labels = load_mnist(data_root, "test")
    images = to_model_images(train_images, CLASSIFIER_SIZE, 1)
    classifier = DigitClassifier().to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    classifier.train()
    for _ in tqdm(range(steps), desc="train classifier", unit="step", disable=not progress, dynamic_ncols=True):
        indices = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = augment(images[indices], generator).to(device)
        loss = F.cross_entropy(classifier(batch), train_labels[indices].to(device), label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    classifier.eval()
    info = ClassifierInfo(RECIPE, len(images), steps, seed,
                          accuracy(classifier, to_model_images(test_images, CLASSIFIER_SIZE, 1), test_labels),
                          accuracy(classifier, to_model_images(test_images, 16, 1), test_labels))
    return classifier, info


def check_accuracy(info: ClassifierInfo) -> None:
    """Refuse a classifier too weak to judge digits: below 97.5% test accuracy (99% when
    trained on the full 60k split)."""
    if info.test_accuracy < info.required_accuracy:
        raise EvaluationError(
            f"the MNIST classifier {info.short_hash or '(unsaved)'} has {info.test_accuracy:.2%} test accuracy, below "
            f"the {info.required_accuracy:.1%} this evaluation requires for a classifier trained on "
            f"{info.train_size} digits; its numbers would measure the classifier rather than the images. Delete "
            "it from the classifier cache to retrain it, or train it for more steps."
        )


def save_classifier(classifier: DigitClassifier, info: ClassifierInfo, folder: Path) -> ClassifierInfo:
    """Write ``<folder>/<recipe>_n<size>_s<seed>.safetensors`` and its ``.json`` atomically; returns
    ``info`` with the weights' hash filled in."""
    from safetensors.torch import save

    data = save({name: to_host(tensor).contiguous() for name, tensor in classifier.state_dict().items()})
    info = ClassifierInfo(**{**asdict(info), "sha256": hashlib.sha256(data).hexdigest()})
    stem = folder / f"{info.recipe}_n{info.train_size}_s{info.seed}"
    atomic_write(stem.with_suffix(".safetensors"), data)
    atomic_write(stem.with_suffix(".json"), json.dumps(asdict(info), indent=1))
    return info


def load_classifier(stem: Path, device: str | torch.device = "cpu") -> tuple[DigitClassifier, ClassifierInfo]:
    from safetensors.torch import load

    weights = stem.with_suffix(".safetensors")
    try:
        info = ClassifierInfo(**json.loads(stem.with_suffix(".json").read_text(encoding="utf-8")))
        data = weights.read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        raise EvaluationError(
            f"the cached classifier {stem} cannot be read ({exc}); delete its files to retrain it.") from None
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise EvaluationError(f"the cached classifier {weights} does not match the hash recorded in "
                              f"{stem.with_suffix('.json').name}; delete both files to retrain it.")
    classifier = DigitClassifier()
    classifier.load_state_dict(load(data))
    return classifier.to(device).eval(), info


def load_or_train_classifier(data_root: str | Path, device: str | torch.device = "cpu", seed: int = 0,
                             folder: str | Path | None = None,
                             progress: bool = True) -> tuple[DigitClassifier, ClassifierInfo]:
    """The cached classifier for this training split (trained and cached on first use), checked
    against the accuracy gate."""
    folder = Path(folder) if folder is not None else cache_root() / "classifier"
    train_size = len(load_mnist(data_root, "train")[1])
    stem = folder / f"{RECIPE}_n{train_size}_s{seed}"
    cached = stem.with_suffix(".json")
    if not cached.exists():
        # Processes that ask at once (evaluations side by side, test workers) train it once.
        waiting = f"waiting for another process to finish training the classifier {stem}" if progress else None
        with file_lock(stem.with_suffix(".lock"), waiting):
            if not cached.exists():  # nor did another process while this one waited
                save_classifier(*train_classifier(data_root, seed=seed, device=device, progress=progress), folder)
    classifier, info = load_classifier(stem, device)
    check_accuracy(info)
    return classifier, info
