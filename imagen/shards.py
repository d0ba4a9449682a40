"""Training shards: a captioned source prepared once into images at every resolution a
cascade needs and the text encoder's embeddings, streamed to training by a DataLoader.

A shard folder holds::

    index.json                what it holds: the format, the text encoder (name, identity,
                              normalisation, max_length, dtype, width), the resolutions, the
                              channels, the shard size, the shards written, the source
    probes.safetensors        the encoder's embeddings of imagen.text.PROBE_PROMPTS, the
                              fingerprint every checkpoint trained from the shards carries
    shard_00000.safetensors   per item: images_<size> (n, C, size, size) uint8 for every
                              resolution, embeddings (n, max_length, D) float16 (zero past
                              the caption's tokens) and lengths (n,) int32 (its tokens);
                              the captions, as typed, in the file's metadata

Why safetensors: no pickle (the project's checkpoint format already), and its layout (a
JSON header of byte offsets, then the raw tensors) lets a reader fetch one item's bytes
with a single positioned read, so training holds neither the images nor the embeddings in
memory and memory stays flat whatever the dataset's size. Each shard is written under a
temporary name and renamed, and ``index.json`` (rewritten atomically after every shard)
is where an interrupted preparation resumes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from imagen.captions import normalize_prompt
from imagen.data import DataError, to_model_images
from imagen.io import atomic_write, to_device, to_host
from imagen.text import EncodedText

FORMAT = "imagen-shards-v1"
INDEX = "index.json"
PROBES = "probes.safetensors"
_DTYPES = {"U8": (torch.uint8, 1), "F16": (torch.float16, 2), "I32": (torch.int32, 4)}


@dataclass
class ShardIndex:
    """What ``index.json`` says of a shard folder."""

    format: str
    encoder: dict  # name, identity, normalize, max_length, dtype, dim
    resolutions: list[int]
    channels: int
    shard_size: int
    source: str
    num_source_items: int
    shards: list[dict]  # file, count
    complete: bool = False

    @property
    def num_items(self) -> int:
        return sum(shard["count"] for shard in self.shards)


def encoder_record(text_encoder, dim: int) -> dict:
    """The fields of a text encoder that make its embeddings what they are."""
    from imagen.text import encoder_identity

    return {"name": text_encoder.name, "identity": encoder_identity(text_encoder.name),
            "normalize": text_encoder.normalize, "max_length": text_encoder.max_length,
            "dtype": text_encoder.dtype, "dim": dim}


def read_index(root: Path) -> ShardIndex:
    path = Path(root) / INDEX
    if not path.is_file():
        raise DataError(f"{root} holds no {INDEX}: it is not a shard folder (make one with prepare_dataset.py).")
    try:
        return ShardIndex(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise DataError(f"{path}: not a shard index ({error}); prepare the folder again.") from None


def write_index(root: Path, index: ShardIndex) -> None:
    atomic_write(Path(root) / INDEX, json.dumps(asdict(index), indent=1))


def resize_item(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, s, s) -> uint8 (C, size, size), exactly as the MNIST datasets resize."""
    return ((to_model_images(pixels[None], size, pixels.shape[0])[0] + 1) * 127.5).round().to(torch.uint8)


def prepare_shards(items: Sequence, load: Callable[[object], tuple[torch.Tensor, str]], output: Path,
                   stages: Sequence, source: str, shard_size: int = 1024, progress: bool = True) -> ShardIndex:
    """Write ``items`` (each turned into (uint8 (C, s, s) square image, caption) by ``load``)
    into shards under ``output`` for the stage configs ``stages`` (their resolutions, one text
    encoder). An interrupted run resumes after the last complete shard; a folder prepared for
    another encoder, resolution, channel count, shard size or source is refused."""
    from tqdm import tqdm

    from imagen.text import TextEmbeddingCache, probe_embeddings

    encoders = {(s.text_encoder.name, s.text_encoder.max_length, s.text_encoder.normalize, s.text_encoder.dtype)
                for s in stages}
    if len(encoders) > 1:
        raise DataError(f"the stage configs use different text encoders ({sorted(encoders)}); shards hold one "
                        "encoder's embeddings, so prepare one folder per encoder.")
    channels = {s.unet.channels for s in stages}
    if len(channels) > 1:
        raise DataError(f"the stage configs have different unet.channels ({sorted(channels)}).")
    text_encoder, channels = stages[0].text_encoder, channels.pop()
    resolutions = sorted({s.unet.image_size for s in stages})
    output.mkdir(parents=True, exist_ok=True)
    cache = TextEmbeddingCache.from_config(text_encoder)  # its encoder loads only if there is work left
    wanted = {"resolutions": resolutions, "channels": channels, "shard_size": shard_size, "source": source,
              "num_source_items": len(items)}
    if (output / INDEX).is_file():
        index = read_index(output)
        record = dict(index.encoder, dim=None)
        expected = dict(encoder_record(text_encoder, 0), dim=None)
        differences = [f"{key}: {getattr(index, key)!r} there, {value!r} asked" for key, value in wanted.items()
                       if getattr(index, key) != value]
        differences += [f"encoder {key}: {record[key]!r} there, {expected[key]!r} asked" for key in record
                        if record[key] != expected[key]]
        if differences:
            raise DataError(f"{output} holds shards prepared otherwise ({'; '.join(differences)}); prepare into "
                            "another folder.")
    else:
        probes = probe_embeddings(cache)
        save_tensors(output / PROBES, {"embeddings": probes.embeddings, "mask": probes.mask})
        index = ShardIndex(FORMAT, encoder_record(text_encoder, probes.embeddings.shape[-1]), **wanted, shards=[])
        write_index(output, index)
    done = index.num_items
    bar = tqdm(total=len(items), initial=done, desc="prepare", unit="image", disable=not progress,
               dynamic_ncols=True)
    for start in range(done, len(items), shard_size):
        chunk = [load(item) for item in items[start:start + shard_size]]
        captions = [caption for _, caption in chunk]
        encoded = encode_captions(cache.encoder, captions, text_encoder.normalize)
        tensors = {f"images_{size}": torch.stack([resize_item(pixels, size) for pixels, _ in chunk])
                   for size in resolutions}
        tensors["embeddings"] = encoded.embeddings.to(torch.float16)
        tensors["lengths"] = encoded.mask.sum(dim=1).to(torch.int32)
        name = f"shard_{len(index.shards):05d}.safetensors"
        save_tensors(output / name, tensors, {"captions": json.dumps(captions, ensure_ascii=False)})
        index.shards.append({"file": name, "count": len(chunk)})
        write_index(output, index)
        bar.update(len(chunk))
    bar.close()
    index.complete = True
    write_index(output, index)
    return index


def encode_captions(encoder, captions: Sequence[str], normalize: str, batch_size: int = 64) -> EncodedText:
    """Captions encoded as training reads them (normalised, padded to max_length), in batches;
    nothing is cached, so memory does not grow with the source."""
    parts = [encoder.encode([normalize_prompt(c, normalize) for c in captions[start:start + batch_size]])
             for start in range(0, len(captions), batch_size)]
    return EncodedText(torch.cat([p.embeddings for p in parts]), torch.cat([p.mask for p in parts]))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write(path, save({name: to_host(t).contiguous() for name, t in tensors.items()}, metadata=metadata))


class ShardFile:
    """Reads single items of a shard with positioned reads; nothing is mapped or kept."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            size = path.stat().st_size
        except (OSError, ValueError, struct.error) as error:
            raise DataError(f"{path}: a missing or damaged shard ({error}); prepare the folder again (training never "
                            "skips data).") from None
        self.metadata = header.pop("__metadata__", {})
        self.base = 8 + length
        self.tensors = header
        end = max(spec["data_offsets"][1] for spec in header.values())
        if self.base + end != size:
            raise DataError(f"{path}: the shard is {size} bytes where its header promises {self.base + end} (a "
                            "truncated or damaged copy); prepare the folder again (training never skips data).")
        self._handle = None

    def row(self, name: str, index: int) -> torch.Tensor:
        """Row ``index`` of tensor ``name``."""
        spec = self.tensors[name]
        dtype, width = _DTYPES[spec["dtype"]]
        shape = spec["shape"][1:]
        row_bytes = width * math.prod(shape)
        if self._handle is None:  # opened on first use, so that DataLoader workers each open their own
            self._handle = open(self.path, "rb")
        data = os.pread(self._handle.fileno(), row_bytes, self.base + spec["data_offsets"][0] + index * row_bytes)
        return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}


class ShardDataset(Dataset):
    """The items of a shard folder at one resolution: ``dataset[i]`` is (image uint8 (C, H, W),
    embeddings float16 (max_length, D), token count). Checks that the folder fits the stage:
    complete, prepared at ``image_size`` with ``channels``, and by the stage's text encoder."""

    def __init__(self, root: str | Path, image_size: int, channels: int, text_encoder):
        self.root = Path(root)
        index = read_index(self.root)
        if not index.complete:
            raise DataError(f"{self.root}: the preparation did not finish ({index.num_items} of "
                            f"{index.num_source_items} items); run prepare_dataset.py again to complete it.")
        if image_size not in index.resolutions or channels != index.channels:
            raise DataError(f"{self.root} holds {index.channels}-channel images at {index.resolutions} px, not "
                            f"{channels}-channel at {image_size} px; prepare it with this stage's config too.")
        asked = encoder_record(text_encoder, index.encoder["dim"])
        if any(index.encoder[key] != asked[key] for key in ("identity", "normalize", "max_length")):
            raise DataError(f"{self.root} was prepared with text encoder {index.encoder}, the stage asks for {asked}; "
                            "prepare it with this stage's text_encoder.")
        self.index = index
        self.image_size = image_size
        self.files = [ShardFile(self.root / shard["file"]) for shard in index.shards]
        self.starts = torch.tensor([0] + [shard["count"] for shard in index.shards]).cumsum(0)
        self.text_dim = index.encoder["dim"]
        self.prompts = None  # text comes with each batch, not from a table

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        shard = int(torch.searchsorted(self.starts, index, right=True)) - 1
        row = index - int(self.starts[shard])
        file = self.files[shard]
        return (file.row(f"images_{self.image_size}", row), file.row("embeddings", row),
                int(file.row("lengths", row)))

    def caption(self, index: int) -> str:
        shard = int(torch.searchsorted(self.starts, index, right=True)) - 1
        return json.loads(self.files[shard].metadata["captions"])[index - int(self.starts[shard])]

    def probes(self) -> EncodedText:
        from imagen.checkpoint import load_tensors

        saved = load_tensors(self.root / PROBES)
        return EncodedText(saved["embeddings"], saved["mask"])


def text_of(embeddings: torch.Tensor, lengths: torch.Tensor) -> EncodedText:
    """Stored embeddings (B, L, D) float16 and token counts (B,) -> float32 text with its mask,
    on the embeddings' device."""
    mask = torch.arange(embeddings.shape[1], device=embeddings.device) < lengths[:, None]
    return EncodedText(embeddings.float(), mask)


class EpochSampler(Sampler):
    """Indices for one process of ``world``: every epoch a permutation of all items seeded by
    ``seed`` and the epoch, of which this process takes every ``world``-th (all processes take
    equally many, so they see disjoint data), without end, starting ``start`` indices in."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start
        self.per_process = size // world
        if self.per_process == 0:
            raise DataError(f"{size} items cannot be shared by {world} processes.")

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_process)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            yield from order[self.rank::self.world][:self.per_process][offset:].tolist()
            epoch, offset = epoch + 1, 0


class ShardBatches:
    """Training batches from a shard folder through a DataLoader with workers, pinned memory and
    prefetching: the trainer's ``dataset`` for ``data.dataset: shards``."""

    def __init__(self, dataset: ShardDataset, channels: int, seed: int, workers: int, device: torch.device):
        self.dataset, self.channels, self.seed, self.workers, self.device = dataset, channels, seed, workers, device
        self.prompts = None
        self.text_dim = dataset.text_dim
        self.rank, self.world, self.start = 0, 1, 0
        self._batches = None

    def __len__(self) -> int:
        return len(self.dataset)

    def distribute(self, rank: int, world: int) -> None:
        """Take only this process's share of every epoch."""
        self.rank, self.world, self._batches = rank, world, None

    def seek(self, items: int) -> None:
        """Continue after ``items`` items of this process (a resumed run)."""
        self.start, self._batches = items, None

    def _loader(self, batch_size: int) -> Iterator:
        from torch.utils.data import DataLoader

        sampler = EpochSampler(len(self.dataset), self.seed, self.rank, self.world, self.start)
        loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                            prefetch_factor=4 if self.workers > 0 else None)
        return iter(loader)

    def sample_batch(self, batch_size: int, generator: torch.Generator | None = None):
        """The next batch of the epoch order: images (B, C, H, W) in [-1, 1] and their text.
        (``generator`` is unused: the order comes from the seeded epoch permutation.)"""
        if self._batches is None:
            self._batches = self._loader(batch_size)
        images, embeddings, lengths = next(self._batches)
        self.start += len(images)
        images = to_device(images, self.device).float() / 127.5 - 1.0
        text = text_of(to_device(embeddings, self.device), to_device(lengths, self.device))
        return images.expand(-1, self.channels, -1, -1), text

    def examples(self, count: int = 10) -> tuple[list[str], EncodedText, torch.Tensor]:
        """The first ``count`` items: captions, their text and images (for sample grids)."""
        rows = [self.dataset[i] for i in range(min(count, len(self.dataset)))]
        text = text_of(torch.stack([r[1] for r in rows]), torch.tensor([r[2] for r in rows]))
        images = torch.stack([r[0] for r in rows]).float() / 127.5 - 1.0
        return [self.dataset.caption(i) for i in range(len(rows))], text, images.expand(-1, self.channels, -1, -1)
