"""Frozen T5 text encoding: per-token embeddings with padding masks, and an embedding cache.

Imagen conditions every stage on the whole token sequence of a frozen T5 encoder, with
embeddings computed ahead of time. :class:`T5TextEncoder` loads any Hugging Face T5
(hub id or local folder) through ``from_pretrained``; ``tiny`` builds a small random T5
offline and loads it through the very same path (``tiny-scenes-pretrained``: one pretrained
on text alone, :mod:`imagen.text_pretraining`). :class:`TextEmbeddingCache` encodes
each unique prompt once so the encoder never runs inside a training step.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from imagen.captions import DIGIT_WORDS, normalize_prompt, shorten
from imagen.checkpoint import CheckpointError, load_tensors
from imagen.config import misspelled_offline_t5
from imagen.errors import ImagenError, PromptWarning
from imagen.io import atomic_write, cache_root, resolve_device, to_host
from imagen.text_pretraining import NUM_SENTINELS, pretrain_encoder

# The offline T5s built in code, by text_encoder.name: the folder each is built into under
# the cache (bump the version when its build changes, so stale folders and cached embeddings
# are not reused). tiny's tokenizer knows the words of digit prompts; tiny-scenes' also those
# of the scene captions (imagen.scenes), which tiny would spell out letter by letter.
# tiny-scenes-pretrained is tiny-scenes pretrained on text by span corruption.
TINY_T5S = {"tiny": "tiny-t5-v1", "tiny-scenes": "tiny-scenes-t5-v1",
            "tiny-scenes-pretrained": "tiny-scenes-pretrained-t5-v1"}
PRETRAINING_STEPS = 2000
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TextEncoderError(ImagenError):
    """The configured T5 cannot be loaded."""


class EncodedText(NamedTuple):
    """Text condition for a batch of prompts.

    embeddings: (B, L, D) float32, zero at padded positions.
    mask: (B, L) bool, True for real tokens (including the closing ``</s>``).
    """

    embeddings: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> "EncodedText":
        return EncodedText(self.embeddings.to(device), self.mask.to(device))

    def rows(self, indices: torch.Tensor | slice) -> "EncodedText":
        """The prompts at ``indices`` (a LongTensor on the same device, or a slice)."""
        return EncodedText(self.embeddings[indices], self.mask[indices])


def tiny_corpus(name: str) -> list[str]:
    """What the tokenizer of the offline T5 ``name`` learns its pieces from."""
    templates = ("{}", "the digit {}", "a handwritten {}", "an image of the number {}", "a photo of a {}", "number {}")
    digits = list(DIGIT_WORDS) + [str(d) for d in range(10)]
    corpus = [template.format(digit) for template in templates for digit in digits]
    if name in ("tiny-scenes", "tiny-scenes-pretrained"):
        from imagen.scenes import all_specs, render

        corpus += [normalize_prompt(render(spec), "plain") for spec in all_specs()]
    return corpus


def pretraining_corpus() -> list[str]:
    """The text ``tiny-scenes-pretrained`` is pretrained on: the digit prompts and every scene
    caption except the held-out ones, so held-out captions stay unseen by the encoder too."""
    from imagen.scenes import all_specs, held_out, render

    specs = all_specs()
    return tiny_corpus("tiny") + [normalize_prompt(render(spec), "plain") for spec in specs[~held_out(specs)]]


def make_tiny_t5(name: str = "tiny"):
    """A small randomly initialised T5 encoder and its tokenizer, built offline: (tokenizer, model).

    The tokenizer's pieces are trained with the ``tokenizers`` library on :func:`tiny_corpus`
    (so "seven" and "7" are single tokens; any other text falls back to characters and
    ``<unk>``) and stored as a Unigram model, like T5's own, wrapped in ``T5TokenizerFast``
    with T5's special tokens (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2). The encoder is a
    2-layer T5 v1.1-style model with seeded random weights, identical on every machine.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    corpus = tiny_corpus(name)

    # Learn the pieces with a BPE trainer (deterministic, and it keeps whole digit words),
    # then store them as a Unigram model: the model type T5 tokenizers load.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    trainer = trainers.BpeTrainer(
        # Enough pieces for every word of the corpus to be one token.
        vocab_size=160 if name == "tiny" else 400, special_tokens=specials, initial_alphabet=list(alphabet),
        show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    pieces = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    # Equal scores make Viterbi pick the fewest pieces, so whole words win over characters.
    vocab = [(token, 0.0) for token in specials] + [(token, -1.0) for token, _ in pieces if token not in specials]
    unigram = Tokenizer(models.Unigram(vocab, unk_id=2))
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=unigram, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )

    pretrained = name == "tiny-scenes-pretrained"
    config = T5Config(
        vocab_size=len(vocab) + (NUM_SENTINELS if pretrained else 0),
        d_model=128,
        d_kv=32,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config)
    if pretrained:
        model, _ = pretrain_encoder(tokenizer, model, pretraining_corpus(), PRETRAINING_STEPS)
    return tokenizer, model.eval()


def build_tiny_t5(folder: str | Path, name: str = "tiny") -> Path:
    """Save :func:`make_tiny_t5` to ``folder`` with ``save_pretrained``, so that it loads
    through ``from_pretrained`` exactly as a real checkpoint does."""
    folder = Path(folder)
    tokenizer, model = make_tiny_t5(name)
    # Build beside the target and rename, so a crash never leaves a half-written model.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        # Another process (e.g. a second training rank) finished the same build first.
        if not (folder / "config.json").is_file():
            raise
    return folder


def tiny_t5_folder(name: str = "tiny") -> Path:
    """The folder of the offline T5 ``name`` in the cache, built on first use."""
    folder = cache_root() / TINY_T5S[name]
    if not (folder / "config.json").is_file():
        build_tiny_t5(folder, name)
    return folder


def encoder_identity(name: str) -> str:
    """A stable name for the encoder's weights, used to key cached embeddings.

    A hub id names its weights; a local folder is identified by its path and the bytes of
    its ``config.json`` and the sizes of its weight files, so editing it invalidates the cache.
    """
    if name in TINY_T5S:
        return TINY_T5S[name]
    folder = Path(name)
    if folder.is_dir():
        digest = hashlib.sha256(str(folder.resolve()).encode())
        config = folder / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return f"folder-{digest.hexdigest()[:16]}"
    return name


def load_t5(source: str, dtype: torch.dtype):
    """The tokenizer and T5 encoder of ``source``, a folder or a hub id. A hub id already in the
    local Hugging Face cache loads from it without the network: offline, each of its files
    would otherwise spend about half a minute in connection retries."""
    from transformers import AutoTokenizer, T5EncoderModel

    def load(local_files_only: bool):
        return (AutoTokenizer.from_pretrained(source, local_files_only=local_files_only),
                T5EncoderModel.from_pretrained(source, local_files_only=local_files_only, dtype=dtype))

    try:
        return load(local_files_only=True)
    except OSError:  # not (wholly) in the cache: download it
        return load(local_files_only=False)


class T5TextEncoder:
    """A frozen T5 encoder and its tokenizer.

    Args:
        name: a Hugging Face T5 id (``google/t5-v1_1-xxl``, ``t5-small``, ...), a local
            folder saved with ``save_pretrained``, or ``tiny``.
        max_length: prompts are padded (and truncated, with a warning) to this many tokens.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the encoder's weights.
        device: ``auto``, ``cpu``, ``cuda``, ...
    """

    def __init__(self, name: str, max_length: int = 77, dtype: str = "float32", device: str = "auto"):
        self.name = name
        self.max_length = max_length
        self.device = resolve_device(device, "text_encoder.device")
        source = tiny_t5_folder(name) if name in TINY_T5S else os.path.expanduser(name)
        if name.startswith(("/", "./", "../", "~")) and not Path(source).is_dir():
            raise TextEncoderError(
                f"The T5 text encoder folder {name!r} (text_encoder.name) does not exist. Set text_encoder.name "
                "to a folder written by save_pretrained (config.json, weights and tokenizer files), a Hugging "
                "Face T5 id, or tiny for a small random T5 built offline."
            )
        offline_name = misspelled_offline_t5(name)
        if offline_name is not None:
            raise TextEncoderError(
                f"Unknown T5 text encoder {name!r} (text_encoder.name): did you mean {offline_name!r}? The "
                f"offline T5s are {', '.join(map(repr, TINY_T5S))}; any other name is a local folder or a "
                "Hugging Face id such as 'google/t5-v1_1-small'."
            )
        try:
            self.tokenizer, self.model = load_t5(source, TORCH_DTYPES[dtype])
        except Exception as exc:  # from_pretrained raises many types (OSError, ValueError, HTTP errors)
            reason = " ".join(str(exc).split())[:400].rstrip(".")
            raise TextEncoderError(
                f"Could not load the T5 text encoder {name!r} (text_encoder.name): {reason}. "
                "Without internet access a hub id cannot be downloaded: download the model on a machine "
                "with access (e.g. T5EncoderModel.from_pretrained(...).save_pretrained(DIR) and the same for "
                "its tokenizer), then set text_encoder.name to that local folder, or use "
                "text_encoder.name: tiny for a small random T5 built offline."
            ) from None
        # Frozen: never trained, never in train mode (dropout off), never in a trained state_dict.
        self.model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        """D, the width of each token embedding."""
        return self.model.config.d_model

    def encode(self, prompts: Sequence[str]) -> EncodedText:
        """Encode ``prompts`` -> embeddings (B, max_length, D) float32 on the CPU, mask (B, max_length).

        Prompts longer than ``max_length`` tokens are truncated, and text the tokenizer does
        not know becomes ``<unk>``; both with a warning that names the prompt.
        """
        prompts = list(prompts)
        tokenized = self.tokenizer(prompts, truncation=False, return_offsets_mapping=True)
        for prompt, ids, offsets in zip(prompts, tokenized["input_ids"], tokenized["offset_mapping"]):
            if len(ids) > self.max_length:
                warnings.warn(f"prompt {shorten(prompt)} has {len(ids)} tokens; it is truncated to "
                              f"text_encoder.max_length={self.max_length}.", PromptWarning, stacklevel=2)
            unknown = [prompt[start:end] for token, (start, end) in zip(ids, offsets)
                       if token == self.tokenizer.unk_token_id]
            if unknown:
                warnings.warn(f"prompt {shorten(prompt)}: the {self.name} tokenizer does not know "
                              f"{', '.join(repr(part) for part in unknown[:5])}, which it reads as <unk>.",
                              PromptWarning, stacklevel=2)
        batch = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        with torch.no_grad():
            hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        # T5 still writes values at padded positions; zero them so nothing downstream can use them.
        embeddings = hidden.float() * mask[..., None]
        return EncodedText(to_host(embeddings), to_host(mask))


class TextEmbeddingCache:
    """Serves T5 embeddings per prompt, encoding each unique prompt once.

    Every prompt is first normalised (``normalize``, see ``imagen.captions.normalize_prompt``),
    so prompts that read the same share one entry. Embeddings live in memory and, with
    ``disk_dir``, also as one safetensors file per prompt keyed by encoder identity, dtype,
    max_length and normalised prompt, so later runs never load the encoder at all. The
    encoder is created lazily by ``load_encoder`` on the first prompt that is in neither
    place, and :meth:`release_encoder` frees it.
    """

    def __init__(
        self,
        load_encoder: Callable[[], T5TextEncoder],
        identity: str,
        max_length: int,
        disk_dir: str | Path | None = None,
        encode_batch_size: int = 64,
        normalize: str = "none",
    ):
        self._load_encoder = load_encoder
        self.normalize = normalize
        self._encoder: T5TextEncoder | None = None
        self.identity = identity
        self.max_length = max_length
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.encode_batch_size = encode_batch_size
        self._memory: dict[str, torch.Tensor] = {}  # prompt -> (tokens, D) without padding

    @classmethod
    def from_config(cls, config) -> "TextEmbeddingCache":
        """Build from a :class:`imagen.config.TextEncoderConfig`."""
        return cls(
            load_encoder=lambda: T5TextEncoder(config.name, config.max_length, config.dtype, config.device),
            identity=f"{encoder_identity(config.name)}|{config.dtype}",
            max_length=config.max_length,
            disk_dir=config.embedding_cache_dir,
            normalize=config.normalize,
        )

    @property
    def encoder(self) -> T5TextEncoder:
        if self._encoder is None:
            self._encoder = self._load_encoder()
        return self._encoder

    def release_encoder(self) -> None:
        """Drop the encoder (all cached embeddings stay available)."""
        self._encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _disk_path(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.identity}|{self.max_length}|{prompt}".encode()).hexdigest()[:40]
        return self.disk_dir / f"{key}.safetensors"

    def _read_disk(self, prompt: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self._disk_path(prompt)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata().get("prompt") != prompt:
                return None
            return handle.get_tensor("embeddings")

    def _write_disk(self, prompt: str, tokens: torch.Tensor) -> None:
        from safetensors.torch import save

        payload = save({"embeddings": tokens.contiguous()}, metadata={"prompt": prompt, "encoder": self.identity})
        atomic_write(self._disk_path(prompt), payload)

    def precompute(self, prompts: Sequence[str]) -> None:
        """Make sure every prompt is cached, encoding the missing ones in batches."""
        missing = [p for p in dict.fromkeys(normalize_prompt(p, self.normalize) for p in prompts)
                   if p not in self._memory]
        if self.disk_dir is not None:
            for prompt in list(missing):
                tokens = self._read_disk(prompt)
                if tokens is not None:
                    self._memory[prompt] = tokens
                    missing.remove(prompt)
        for start in range(0, len(missing), self.encode_batch_size):
            chunk = missing[start : start + self.encode_batch_size]
            encoded = self.encoder.encode(chunk)
            for prompt, embeddings, mask in zip(chunk, encoded.embeddings, encoded.mask):
                tokens = embeddings[: int(mask.sum())].clone()
                self._memory[prompt] = tokens
                if self.disk_dir is not None:
                    self._write_disk(prompt, tokens)

    def encode(self, prompts: Sequence[str]) -> EncodedText:
        """Embeddings (B, max_length, D) and mask (B, max_length) for ``prompts``, from the cache."""
        prompts = list(prompts)
        self.precompute(prompts)
        stored = [self._memory[normalize_prompt(p, self.normalize)] for p in prompts]
        dim = stored[0].shape[-1] if stored else 0
        embeddings = torch.zeros(len(prompts), self.max_length, dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for row, tokens in enumerate(stored):
            embeddings[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return EncodedText(embeddings, mask)


# Prompts whose embeddings identify the encoder a checkpoint was trained with.
PROBE_PROMPTS = ("seven", "3", "a handwritten nine", "the digit 0")
# Cosine similarity of each probe's embeddings below which two encoders differ: precision
# changes (bf16 against float32) stay above 0.999, other weights or tokenizers fall far below.
SAME_ENCODER = 0.99


def probe_embeddings(cache: TextEmbeddingCache) -> EncodedText:
    """The encoder's embeddings of :data:`PROBE_PROMPTS`, cut to the longest probe's tokens."""
    with warnings.catch_warnings():  # a short max_length truncates them: the same then and now
        warnings.simplefilter("ignore")
        probes = cache.encode(PROBE_PROMPTS)
    length = int(probes.mask.sum(dim=1).max())
    return EncodedText(probes.embeddings[:, :length].contiguous(), probes.mask[:, :length].contiguous())


def encoder_difference(saved: EncodedText, current: EncodedText) -> str | None:
    """Why the probe embeddings ``saved`` with a checkpoint and ``current`` ones come from
    different encoders, or None when they agree."""
    if saved.mask.shape != current.mask.shape or not torch.equal(saved.mask, current.mask):
        return (f"the probe prompts split into {saved.mask.sum(dim=1).tolist()} tokens then and "
                f"{current.mask.sum(dim=1).tolist()} now: the tokenizer differs")
    for prompt, before, after, mask in zip(PROBE_PROMPTS, saved.embeddings, current.embeddings, saved.mask):
        similarity = float(torch.nn.functional.cosine_similarity(before[mask].flatten(), after[mask].flatten(), dim=0))
        if similarity < SAME_ENCODER:
            return f"the embeddings of {prompt!r} have cosine similarity {similarity:.3f} to those it was trained with"
    return None


PROBES_FILE = "text_probes.safetensors"


class EncoderMismatchError(CheckpointError):
    """A checkpoint meets another text encoder than the one it was trained with."""


def check_text_probes(checkpoint: Path, name: str, current: EncodedText) -> None:
    """Refuse ``checkpoint`` when the probe embeddings saved with it (``text_probes.safetensors``)
    differ from ``current``, this machine's encoder's. Checkpoints from before probes pass."""

    path = Path(checkpoint) / PROBES_FILE
    if not path.is_file():
        return
    saved = load_tensors(path)
    difference = encoder_difference(EncodedText(saved["embeddings"], saved["mask"]), current)
    if difference:
        raise EncoderMismatchError(
            f"{checkpoint} was trained with text encoder {name!r}, but this machine's {name!r} is a different "
            f"model: {difference}. The checkpoint would draw images for the wrong text. Use the encoder it was "
            f"trained with: for {name}, copy the training machine's {TINY_T5S.get(name, 'tiny-t5-v1')} folder from "
            "its $IMAGEN_CACHE_DIR (default ~/.cache/imagen-mnist) into this machine's, or install the transformers "
            "and tokenizers versions that built it; for a Hugging Face T5, the same revision (a cached hub "
            "model is loaded as cached: `hf download ID --revision REV` fetches another)."
        )
