"""Training data: MNIST digits with text prompts, and folders of captioned images.

Both datasets yield ``(image, prompt)`` with images as (C, H, W) float in [-1, 1] at the
stage's resolution, and expose ``prompts`` (the distinct prompts, for the embedding
cache) and ``prompt_indices`` (each item's index into ``prompts``) so a trainer can
look embeddings up by index instead of by string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset

from imagen import scenes
from imagen.captions import digit_prompts
from imagen.errors import ImagenError
from imagen.io import remove_made_folders, to_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ImagenError):
    """A data folder that does not hold what the config says it holds."""


def to_model_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 images (N, 1 or 3, h, w) -> float (N, channels, size, size) in [-1, 1].

    Resizing is antialiased bicubic (antialiasing matters when shrinking: it keeps the
    low-resolution inputs of super-resolution stages free of aliasing).
    """
    images = images.float() / 255.0
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0.0, 1.0)
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        images = (images * luma).sum(dim=1, keepdim=True)
    return images * 2.0 - 1.0


def load_mnist(root: str | Path, split: str = "train", download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as stored: images (N, 1, 28, 28) uint8 and labels (N,) long, from torchvision's
    layout under ``root`` (``MNIST/raw``); with ``download`` fetched there first if missing."""
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    files = f"{raw / prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte"
    missing = [path for path in (raw, *raw.parents) if not path.exists()]  # a failed download leaves none behind
    try:
        mnist = MNIST(str(root), train=split == "train", download=download)
    except (AssertionError, ValueError, IndexError) as exc:  # what torchvision's idx reader raises on bad bytes
        raise DataError(
            f"data.root {str(root)!r}: the MNIST {split} files ({files}) are not valid idx files "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200] or 'bad header'}); replace them with intact "
            "copies (delete them to download them again with data.download: true)."
        ) from None
    except (RuntimeError, OSError) as exc:
        reason = " ".join(str(exc).split())[:300]
        if download:
            remove_made_folders(raw, missing[-1] if missing else None)
            raise DataError(
                f"data.root {str(root)!r} holds no MNIST {split} split and downloading it failed ({reason}). "
                f"Without internet access, copy the four idx files (train-images-idx3-ubyte, "
                f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) into {raw}, or "
                "point data.root at a folder that holds MNIST/raw (this repository's offline copy: "
                "--set data.root=../shared/data)."
            ) from None
        raise DataError(
            f"data.root {str(root)!r} holds no MNIST {split} split ({reason}). Expected {raw} with the idx "
            "files (e.g. train-images-idx3-ubyte); point data.root at such a folder (offline copy: "
            "../shared/data) or set data.download: true on a machine with internet access."
        ) from None
    if len(mnist.data) != len(mnist.targets) or mnist.data.shape[1:] != (28, 28):
        raise DataError(
            f"data.root {str(root)!r}: the MNIST {split} files ({files}) do not match: {len(mnist.data)} images of "
            f"{tuple(mnist.data.shape[1:])} pixels but {len(mnist.targets)} labels; replace them with intact copies."
        )
    return mnist.data.unsqueeze(1), mnist.targets.long()


def resize_uint8(images: torch.Tensor, size: int, device: torch.device | str = "cpu",
                 chunk: int = 4096) -> torch.Tensor:
    """uint8 grey images (N, 1, h, w) -> uint8 (N, 1, size, size) on ``device``, resized there
    chunk by chunk exactly as :func:`to_model_images` does (a GPU resizes the 60k MNIST digits
    to 256 px in a fraction of the time a CPU takes)."""
    return torch.cat([
        ((to_model_images(part.to(device), size, 1) + 1) * 127.5).round().to(torch.uint8)
        for part in images.split(chunk)
    ])


class MNISTTextDataset(Dataset):
    """MNIST digits, each paired with its digit as a word or a numeral.

    The whole split is resized once to the stage's resolution and kept as one uint8 tensor
    (``images``, grey, as a PNG would hold it; 3-channel stages repeat it per batch), so a
    batch is one indexing operation: no per-batch resizing and no loader workers. It is
    resized on ``device`` and stays there (e.g. the GPU that trains on it); :meth:`to`
    moves it. With ``prompt_style='both'`` each digit's prompt style is drawn per epoch
    (:meth:`set_epoch`) from a generator seeded by ``seed``, so runs are reproducible yet
    every digit is seen with both styles.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        channels: int = 1,
        split: str = "train",
        prompt_style: str = "both",
        seed: int = 0,
        download: bool = False,
        device: torch.device | str = "cpu",
    ):
        self.prompts = digit_prompts(prompt_style)
        self.raw_images, self.labels = load_mnist(root, split, download)  # (N, 1, 28, 28) uint8, (N,)
        self.image_size = image_size
        self.channels = channels
        self.prompt_style = prompt_style
        self.seed = seed
        self.device = torch.device(device)
        self.images = resize_uint8(self.raw_images, image_size, self.device)
        self.set_epoch(0)

    def to(self, device: torch.device | str) -> "MNISTTextDataset":
        """Keep the preprocessed images and prompt indices on ``device``."""
        self.device = torch.device(device)
        self.images = self.images.to(self.device)
        self.prompt_indices = self.prompt_indices.to(self.device)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Draw the word/numeral choice of every digit for this epoch."""
        if self.prompt_style == "both":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            as_numeral = torch.rand(len(self.labels), generator=generator) < 0.5
            prompt_indices = self.labels + 10 * as_numeral.long()
        else:
            prompt_indices = self.labels.clone()
        self.prompt_indices = to_device(prompt_indices, self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] and prompt indices (B,) for ``indices``."""
        indices = to_device(torch.as_tensor(indices, dtype=torch.long), self.device)
        images = self.images[indices].float() / 127.5 - 1.0
        return images.expand(-1, self.channels, -1, -1), self.prompt_indices[indices]

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: ``batch_size`` items drawn uniformly with ``generator`` (CPU)."""
        return self.get_batch(torch.randint(len(self), (batch_size,), generator=generator))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        images, prompt_indices = self.get_batch([index])
        return images[0], self.prompts[int(prompt_indices[0])]


def square_pixels(image, channels: int) -> torch.Tensor:
    """A PIL image as uint8 (C, s, s), grey or RGB, centre-cropped to its shorter side."""
    pixels = torch.frombuffer(bytearray(image.convert("L" if channels == 1 else "RGB").tobytes()), dtype=torch.uint8)
    width, height = image.size
    pixels = rearrange(pixels, "(h w c) -> c h w", h=height, w=width)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[:, top : top + side, left : left + side]


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file as uint8 (C, s, s), centre-cropped to a square."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return square_pixels(image, channels)
    except OSError as exc:
        raise DataError(f"{path}: cannot read this image ({exc}).") from None


def caption_folder_items(root: str | Path) -> list[tuple[Path, str]]:
    """Every image under ``root`` (sorted, subfolders too) with the caption of its ``.txt`` file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected images with .txt captions beside them).")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    uncaptioned = [p for p in paths if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise DataError(f"{root}: {len(uncaptioned)} image(s) have no caption file, e.g. {uncaptioned[0]} needs "
                        f"{uncaptioned[0].with_suffix('.txt')} holding its caption.")
    return [(path, read_caption(path.with_suffix(".txt"))) for path in paths]


def read_caption(path: Path) -> str:
    """A caption file's text, stripped; a UTF-8 BOM is allowed, other encodings are refused."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the caption is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                        "UTF-8.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the caption ({exc.strerror}).") from None


class CaptionFolderDataset(Dataset):
    """A folder of images, each with a caption in a ``.txt`` file of the same name.

    ``photos/cat.png`` + ``photos/cat.txt``; subfolders are searched too. Images are
    centre-cropped to a square and resized; they are read from disk per item.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3):
        try:
            items = caption_folder_items(root)
        except DataError as error:
            raise DataError(f"data.root (data.dataset: caption_folder): {error}") from None
        self.image_paths = [path for path, _ in items]
        captions = [caption for _, caption in items]
        self.prompts = list(dict.fromkeys(captions))
        position = {caption: index for index, caption in enumerate(self.prompts)}
        self.prompt_indices = torch.tensor([position[caption] for caption in captions], dtype=torch.long)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.image_paths)

    def _load(self, index: int) -> torch.Tensor:
        """(1, C, h, h) uint8: the image, centre-cropped to a square."""
        return read_image(self.image_paths[index], self.channels)[None]

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] and prompt indices (B,) for ``indices``."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        images = torch.cat([to_model_images(self._load(int(i)), self.image_size, self.channels) for i in indices])
        return images, self.prompt_indices[indices]

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: ``batch_size`` items drawn uniformly with ``generator`` (CPU)."""
        return self.get_batch(torch.randint(len(self), (batch_size,), generator=generator))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        images, prompt_indices = self.get_batch([index])
        return images[0], self.prompts[int(prompt_indices[0])]


class MNISTScenesDataset(Dataset):
    """Canvases of 2x2 cells of MNIST digits, each with a caption that must be read to draw it
    (:mod:`imagen.scenes`: places, relations, layouts and counts).

    Canvases are composed on the fly, so combinations are effectively unlimited: a batch
    draws caption specs and layouts satisfying them from the trainer's seeded generator (a
    few integers per canvas, on the CPU), then gathers one random digit image per cell from
    the split, pre-resized to the cell size and kept on ``device``, and tiles them there. No
    Python loop runs per canvas. ``prompts`` lists every caption of the grammar
    (``scenes.NUM_CAPTIONS``) in ``scenes.caption_index`` order, so a batch's text is a
    lookup by index; held-out captions are in the list but never drawn for training. An
    epoch is as many canvases as the split has digits.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 1, split: str = "train",
                 download: bool = False, device: torch.device | str = "cpu"):
        if image_size % 2:
            raise DataError(f"data.dataset: mnist_scenes tiles 2x2 cells, so unet.image_size must be even, got "
                            f"{image_size}.")
        self.raw_images, self.labels = load_mnist(root, split, download)
        self.image_size, self.channels, self.device = image_size, channels, torch.device(device)
        order = self.labels.argsort(stable=True)
        self.cells = resize_uint8(self.raw_images[order], image_size // 2, self.device)  # sorted by digit
        counts = torch.bincount(self.labels, minlength=10)
        self.first, self.counts = counts.cumsum(0) - counts, counts  # each digit's images: first .. first+count
        self.prompts = [scenes.render(spec) for spec in scenes.all_specs()]

    def __len__(self) -> int:
        return len(self.labels)

    def compose(self, layouts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Canvases (B, C, H, W) in [-1, 1] on the dataset's device for layouts (B, 4): each
        digit a random image of it from the split, each empty cell black."""
        offsets = (torch.rand(layouts.shape, generator=generator) * self.counts[layouts.clamp(min=0)]).long()
        picked = to_device(self.first[layouts.clamp(min=0)] + offsets, self.device)
        cells = self.cells[picked] * to_device(layouts >= 0, self.device)[..., None, None, None]
        canvases = rearrange(cells, "b (rows columns) c h w -> b c (rows h) (columns w)", rows=2)
        return (canvases.float() / 127.5 - 1.0).expand(-1, self.channels, -1, -1)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: canvases (B, C, H, W) and caption indices (B,), on the device."""
        specs = scenes.draw_specs(batch_size, generator)
        images = self.compose(scenes.draw_layouts(specs, generator), generator)
        return images, to_device(scenes.caption_index(specs), self.device)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """A canvas and its caption drawn as training draws them, from a generator seeded with
        ``index`` (the same index gives the same pair)."""
        images, captions = self.sample_batch(1, torch.Generator().manual_seed(index))
        return images[0], self.prompts[int(captions[0])]


def build_dataset(data_config, image_size: int, channels: int, device: torch.device | str = "cpu",
                  text_encoder=None):
    """The dataset a stage's ``data`` section asks for, at the stage's resolution and channels;
    MNIST and its scenes are prepared on and kept on ``device``. Shards must have been made by
    the stage's ``text_encoder``; their batches come with their text."""
    if data_config.dataset == "shards":
        from imagen.shards import ShardBatches, ShardDataset

        shards = ShardDataset(data_config.root, image_size, channels, text_encoder)
        return ShardBatches(shards, channels, data_config.seed, data_config.workers, torch.device(device))
    if data_config.dataset == "mnist":
        return MNISTTextDataset(
            data_config.root,
            image_size,
            channels,
            split=data_config.split,
            prompt_style=data_config.prompt_style,
            seed=data_config.seed,
            download=data_config.download,
            device=device,
        )
    if data_config.dataset == "mnist_scenes":
        return MNISTScenesDataset(data_config.root, image_size, channels, split=data_config.split,
                                  download=data_config.download, device=device)
    return CaptionFolderDataset(data_config.root, image_size, channels)
