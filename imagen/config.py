"""The configuration of a stage, one dataclass per YAML section: the reference for every key.

A stage file (one cascade stage) has the sections of :class:`StageConfig`; a cascade
file lists stage files in order, base first (:class:`CascadeConfig`). Files and ``--set
key.path=value`` overrides are loaded strictly by :mod:`imagen.loader`: unknown keys
(with the nearest valid one suggested), wrong types, missing required values, impossible
values and invalid YAML are refused with the file and the key path
(``unet.channel_mults``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from imagen.inputs import python_value
from imagen.io import atomic_write
from imagen.loader import ConfigError, build, read_yaml_file, require, to_dict, to_yaml

# The offline T5s that imagen.text builds in code (its TINY_T5S), named here without importing it.
TINY_T5_NAMES = ("tiny", "tiny-scenes", "tiny-scenes-pretrained")

# Seeds also seed NumPy (through accelerate), which takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def _check_probability(value: float, key: str) -> None:
    require(0.0 <= value <= 1.0, key, "a probability in [0, 1]")


def _check_seed(value: int, key: str) -> None:
    require(0 <= value <= MAX_SEED, key, f"a seed in 0..{MAX_SEED}")


# --------------------------------------------------------------------------- sections


def misspelled_offline_t5(name: str) -> str | None:
    """The offline T5 that ``name`` misspells ("tiny-scene", "Tiny"), or None. Loaded as a hub
    id such a name spends a minute in download retries offline and then fails without ever
    naming the intended encoder. Hub ids (with an owner) and existing folders are left alone."""
    if name in TINY_T5_NAMES or "/" in name or os.path.isdir(os.path.expanduser(name)):
        return None
    matches = difflib.get_close_matches(name.strip().lower(), TINY_T5_NAMES, n=1, cutoff=0.75)
    return matches[0] if matches else None


@dataclass
class TextEncoderConfig:
    """The frozen T5 encoder. ``name``: a Hugging Face T5 id, a local folder, ``tiny`` or ``tiny-scenes``
    (a small random T5 built offline, see :mod:`imagen.text`), or ``tiny-scenes-pretrained``
    (tiny-scenes pretrained offline on text, :mod:`imagen.text_pretraining`)."""

    name: str = "tiny"
    # How prompts are normalised before tokenizing, in training and sampling alike
    # (imagen.captions.normalize_prompt): none, spacing (NFKC, single spaces) or plain
    # (spacing, lowercase, no punctuation). auto: plain for the tiny T5, whose tokenizer
    # has never seen "Seven" or "7.", and spacing for a real T5, whose pretraining covers
    # case and punctuation. A saved config records the resolved choice.
    normalize: Literal["auto", "none", "spacing", "plain"] = "auto"
    max_length: int = 77
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    # Folder for the on-disk embedding cache; null keeps the cache in memory only.
    embedding_cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.normalize == "auto":
            self.normalize = "plain" if self.name in TINY_T5_NAMES else "spacing"

    def validate(self) -> None:
        require(self.name.strip() != "", "name", "a Hugging Face T5 id, a local folder or 'tiny'")
        offline_name = misspelled_offline_t5(self.name)
        require(
            offline_name is None,
            "name",
            f"an offline T5 ({', '.join(map(repr, TINY_T5_NAMES))}), a local folder or a Hugging Face id "
            f"such as 'google/t5-v1_1-small' (did you mean {offline_name!r}?)",
        )
        require(self.max_length >= 2, "max_length", "an integer >= 2 (room for a token and </s>)")
        require(
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
            "device",
            "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'",
        )


@dataclass
class UNetConfig:
    """Settings shared by both network types; ``type`` picks the subclass."""

    type: str = "unet"
    image_size: int = 64
    channels: int = 1
    base_channels: int = 128
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # Resolutions (in pixels) of the levels that get self-attention / text cross-attention.
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    cross_attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    num_head_channels: int = 64
    dropout: float = 0.0
    # How the pooled text vector added to the timestep embedding is made; none: no pooled
    # vector, text reaches the network through cross-attention only (cross_attention_resolutions
    # [] instead gives pooled-only conditioning: Imagen's Sec. 4.4 ablation).
    text_pooling: Literal["attention", "mean", "none"] = "attention"
    text_layernorm: bool = True
    # Project the encoder's tokens once to this width before pooling and attention
    # (null: use the encoder's width). With T5-XXL (4096) this saves a large
    # 4096 -> channels key/value projection in every attention block.
    text_projection_dim: int | None = None
    # Under mixed precision: float32 group norms (what CUDA autocast does), or norms in the
    # activations' bf16/fp16 with float32 statistics, which saves a cast to float32 and back
    # around each of them (imagen.nn.GroupNorm). No effect in full precision.
    group_norm_precision: Literal["float32", "activations"] = "float32"

    @property
    def halvings(self) -> int:
        """How often the network halves the input resolution, down to its lowest level."""
        return len(self.channel_mults) - 1

    def level_resolutions(self) -> list[int]:
        """Resolution of each U-Net level, highest first (each level halves it)."""
        lowest = self.image_size // 2**self.halvings
        return [lowest * 2 ** (len(self.channel_mults) - 1 - level) for level in range(len(self.channel_mults))]

    def validate(self) -> None:
        require(self.image_size >= 1, "image_size", "a positive integer")
        require(self.channels in (1, 3), "channels", "1 (grey) or 3 (RGB)")
        require(self.base_channels >= 1, "base_channels", "a positive integer")
        require(
            len(self.channel_mults) >= 1 and all(m >= 1 for m in self.channel_mults),
            "channel_mults",
            "a non-empty list of positive integers",
        )
        factor = 2**self.halvings
        require(
            self.image_size % factor == 0,
            "channel_mults",
            f"at most as many levels as unet.image_size={self.image_size} can be halved: "
            f"{len(self.channel_mults)} levels halve it {self.halvings} times, so it must be divisible by {factor}",
        )
        levels = self.level_resolutions()
        for key in ("attention_resolutions", "cross_attention_resolutions"):
            wrong = [r for r in getattr(self, key) if r not in levels]
            require(not wrong, key, f"resolutions the U-Net has (its levels are {levels}); {wrong} is not")
        require(self.num_head_channels >= 1, "num_head_channels", "a positive integer")
        require(self.text_pooling != "none" or bool(self.cross_attention_resolutions), "text_pooling",
                "attention or mean when cross_attention_resolutions is empty (else no text reaches the network)")
        require(self.text_projection_dim is None or self.text_projection_dim >= 1, "text_projection_dim",
                 "a positive integer or null (no projection)")
        for level, mult in enumerate(self.channel_mults):
            width = self.base_channels * mult
            if levels[level] in self.attention_resolutions + self.cross_attention_resolutions:
                require(
                    width % self.num_head_channels == 0,
                    "num_head_channels",
                    f"a divisor of the width of every attention level ({width} channels at resolution "
                    f"{levels[level]})",
                )
        require(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)")


@dataclass
class BaseUNetConfig(UNetConfig):
    """ADM / Improved-DDPM U-Net (the paper's base model)."""

    type: Literal["unet"] = "unet"
    num_res_blocks: int = 3
    # Down/upsample inside residual blocks (BigGAN style) instead of by conv / interpolation.
    resblock_updown: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.num_res_blocks >= 1, "num_res_blocks", "a positive integer")


@dataclass
class EfficientUNetConfig(UNetConfig):
    """Efficient U-Net (the paper's super-resolution model, Appendix B.1)."""

    type: Literal["efficient_unet"] = "efficient_unet"
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # More residual blocks at lower resolutions: one count per level.
    num_res_blocks: list[int] = field(default_factory=lambda: [2, 4, 8, 8])
    # True: the first level halves the resolution too, as every DBlock of Appendix F's
    # pseudo-code has stride 2, so the levels run at image/2 ... image/2^n and no residual
    # block runs at full resolution. False: the first level keeps the full resolution.
    downsample_first_level: bool = False
    # null: attention only at the lowest resolution, as in the paper; []: none.
    attention_resolutions: Optional[list[int]] = None
    cross_attention_resolutions: Optional[list[int]] = None
    scale_skip_connections: bool = True
    # False drops self-attention but keeps text cross-attention (the 256->1024 model).
    self_attention: bool = True

    def __post_init__(self) -> None:
        lowest = self.level_resolutions()[-1]
        if self.attention_resolutions is None:
            self.attention_resolutions = [lowest]
        if self.cross_attention_resolutions is None:
            self.cross_attention_resolutions = [lowest]

    @property
    def halvings(self) -> int:
        return len(self.channel_mults) - 1 + int(self.downsample_first_level)

    def validate(self) -> None:
        super().validate()
        require(
            len(self.num_res_blocks) == len(self.channel_mults) and all(n >= 1 for n in self.num_res_blocks),
            "num_res_blocks",
            f"one positive count per level ({len(self.channel_mults)} levels, as in unet.channel_mults)",
        )


@dataclass
class EDMConfig:
    """The EDM formulation's settings (Karras et al. 2022; the paper's names in brackets), used
    when ``diffusion.formulation`` is edm. Defaults are the paper's (the s_* ones its ImageNet-64
    settings)."""

    sigma_data: float = 0.5  # standard deviation of the data, for the preconditioning
    p_mean: float = -1.2  # [P_mean] training noise levels: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2  # [P_std]
    sigma_min: float = 0.002  # sampling noise levels run from sigma_max down to sigma_min, then 0,
    sigma_max: float = 80.0  # spaced by rho
    rho: float = 7.0
    # heun_stochastic only: noise added back per step [S_churn] while sigma is in [s_tmin, s_tmax],
    # scaled by s_noise (Algorithm 2).
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003

    def validate(self) -> None:
        require(self.sigma_data > 0, "sigma_data", "a positive number")
        require(self.p_std > 0, "p_std", "a positive number")
        require(self.sigma_min > 0, "sigma_min", "a positive number")
        require(self.sigma_max > self.sigma_min, "sigma_max", "a number above sigma_min")
        require(self.rho > 0, "rho", "a positive number")
        require(self.s_churn >= 0, "s_churn", "a number >= 0")
        require(0 <= self.s_tmin <= self.s_tmax, "s_tmin", "a number in [0, s_tmax]")
        require(self.s_noise >= 0, "s_noise", "a number >= 0")


# The samplers of each formulation (imagen.samplers, imagen.elucidated), its default first.
SAMPLERS_BY_FORMULATION = {"ddpm": ("dpmpp_2m_sde", "ddpm", "ddim", "dpmpp_2m"), "edm": ("heun", "heun_stochastic")}
SAMPLER_NAMES = SAMPLERS_BY_FORMULATION["ddpm"] + SAMPLERS_BY_FORMULATION["edm"]


@dataclass
class DiffusionConfig:
    # ddpm: discrete-time Gaussian diffusion (the paper's); edm: Karras et al.'s formulation,
    # set in ``edm``. schedule and timesteps also define noise conditioning augmentation's
    # forward process under edm.
    formulation: Literal["ddpm", "edm"] = "ddpm"
    schedule: Literal["cosine", "linear"] = "cosine"
    timesteps: int = 1000
    # What the network predicts under ddpm: the noise (the paper) or v = sqrt(ab)*eps - sqrt(1-ab)*x0.
    objective: Literal["eps", "v"] = "eps"
    # Min-SNR-gamma loss weighting under ddpm (Hang et al. 2023); null = unweighted.
    min_snr_gamma: Optional[float] = None
    linear_beta_start: float = 1e-4
    linear_beta_end: float = 0.02
    edm: EDMConfig = field(default_factory=EDMConfig)

    def validate(self) -> None:
        require(self.timesteps >= 2, "timesteps", "an integer >= 2")
        require(self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", "a positive number or null")
        require(self.min_snr_gamma is None or self.formulation == "ddpm", "min_snr_gamma",
                "null under formulation edm, which weights its loss by the preconditioning")
        require(self.objective == "eps" or self.formulation == "ddpm", "objective",
                "eps (the default) under formulation edm, whose network output is set by the preconditioning")
        require(0 < self.linear_beta_start < 1, "linear_beta_start", "a number in (0, 1)")
        require(
            self.linear_beta_start < self.linear_beta_end < 1,
            "linear_beta_end",
            "a number in (linear_beta_start, 1)",
        )


@dataclass
class GuidanceConfig:
    """Classifier-free guidance training: how often the text is replaced by the null condition."""

    cond_drop_prob: float = 0.1
    null_embedding: Literal["learned", "zeros"] = "learned"

    def validate(self) -> None:
        _check_probability(self.cond_drop_prob, "cond_drop_prob")


@dataclass
class ThresholdingConfig:
    """Applied to the predicted x0 at every sampling step."""

    mode: Literal["none", "static", "dynamic"] = "dynamic"
    percentile: float = 99.5
    # Upper cap on the dynamic threshold s (the paper has none; DeepFloyd IF uses 1.5).
    max_threshold: Optional[float] = None

    def validate(self) -> None:
        require(0.0 < self.percentile <= 100.0, "percentile", "a percentile in (0, 100]")
        require(
            self.max_threshold is None or self.max_threshold >= 1.0,
            "max_threshold",
            "null or a number >= 1 (s is never below 1)",
        )


@dataclass
class SamplingConfig:
    """Defaults for sampling this stage; every one can be overridden per run."""

    # ddpm formulation: dpmpp_2m_sde, ddpm, ddim, dpmpp_2m; edm: heun, heun_stochastic.
    # null: the formulation's first (a saved config records the choice).
    sampler: Optional[Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "heun", "heun_stochastic"]] = None
    # Sampling steps; a heun step evaluates the network twice (the last one once).
    steps: int = 50
    guidance: float = 5.0
    # DDIM stochasticity: 0 is deterministic DDIM, 1 matches DDPM's variance.
    eta: float = 0.0
    batch_size: int = 64
    # Precision of the network while sampling; auto: bf16 autocast on a GPU that supports it,
    # full precision otherwise (the sampler's own arithmetic is always float32).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "a positive integer")
        require(self.guidance >= 0.0, "guidance", "a guidance weight >= 0 (1 = conditional only)")
        require(0.0 <= self.eta <= 1.0, "eta", "a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)")
        require(self.batch_size >= 1, "batch_size", "a positive integer")


@dataclass
class SuperResolutionConfig:
    """Present only in super-resolution stages."""

    low_res_size: int
    upsample: Literal["bilinear", "bicubic"] = "bilinear"
    # Noise conditioning augmentation: training draws the level uniformly from this
    # range (a fraction of the diffusion timesteps); sampling uses sample_aug_level.
    train_aug_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    sample_aug_level: float = 0.2

    def validate(self) -> None:
        require(self.low_res_size >= 1, "low_res_size", "a positive integer")
        aug_range = self.train_aug_range
        require(
            len(aug_range) == 2 and 0.0 <= aug_range[0] <= aug_range[1] <= 1.0,
            "train_aug_range",
            "a list [low, high] with 0 <= low <= high <= 1",
        )
        _check_probability(self.sample_aug_level, "sample_aug_level")


@dataclass
class DataConfig:
    # mnist: single digits with their word or numeral; mnist_scenes: 2x2 canvases of digits with
    # captions about places, relations, layouts and counts (imagen.scenes); caption_folder:
    # images with .txt captions, read per step (small sets); shards: a folder made by
    # prepare_dataset.py, streamed by a DataLoader (any size).
    dataset: Literal["mnist", "mnist_scenes", "caption_folder", "shards"] = "mnist"
    # mnist: the torchvision root (holding MNIST/raw); caption_folder: the image folder;
    # shards: the shard folder.
    root: str = "data"
    # DataLoader worker processes reading shards (0: in the training process).
    workers: int = 4
    # Fetch MNIST into root when it is not there yet (needs internet once).
    download: bool = True
    split: Literal["train", "test"] = "train"
    # MNIST prompts: the digit as a word ("seven"), a numeral ("7") or either at random.
    prompt_style: Literal["words", "numerals", "both"] = "both"
    seed: int = 0

    def validate(self) -> None:
        require(self.root.strip() != "", "root", "a folder path")
        require(self.workers >= 0, "workers", "an integer >= 0")
        _check_seed(self.seed, "seed")


@dataclass
class TrainingConfig:
    batch_size: int = 64
    max_steps: int = 10000
    # Wall-clock budget of one training run (setup included), in minutes; when it runs out,
    # training writes a checkpoint and a sample grid and exits normally (--resume goes on).
    max_minutes: Optional[float] = None
    lr: float = 1e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 1000
    optimizer: Literal["adamw", "adam", "adafactor"] = "adamw"
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: Optional[float] = 1.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.9999
    # Ramp the EMA decay up as min(ema_decay, (1 + step) / (10 + step)) so early averages
    # are not dominated by the random initialisation. The ramp is slow: it reaches 0.99 at
    # step 890, 0.999 at step 8990 and 0.9999 at step 89990, so a short run averages over
    # about step / 9 recent steps whatever ema_decay says (0.9955 at step 2000).
    ema_warmup: bool = True
    # auto: bf16 autocast on a GPU that supports it, full precision otherwise.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # TensorFloat-32 matmuls and convolutions on NVIDIA GPUs (no effect on CPU).
    allow_tf32: bool = True
    # Keep activations and weights in channels-last memory order (NHWC).
    channels_last: bool = False
    checkpoint_every: int = 1000
    sample_every: int = 1000
    log_every: int = 50
    # Older checkpoints beyond this many are deleted once a newer one is complete.
    keep_checkpoints: int = 3
    # Guidance weights of the sample grids written every sample_every steps.
    sample_guidance: list[float] = field(default_factory=lambda: [1.0, 3.0, 5.0])
    tensorboard: bool = False
    seed: int = 0
    output_dir: str = "runs/stage"
    # torch.compile the network's training forward (the first steps are slow while it compiles).
    compile: bool = False

    def validate(self) -> None:
        for key in ("batch_size", "max_steps", "grad_accum_steps", "checkpoint_every", "sample_every", "log_every",
                    "keep_checkpoints"):
            require(getattr(self, key) >= 1, key, "a positive integer")
        require(self.max_minutes is None or 0 < self.max_minutes < math.inf, "max_minutes",
                 "a positive, finite number of minutes or null (no time limit)")
        require(self.lr > 0, "lr", "a positive learning rate")
        require(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        require(
            len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
            "adam_betas",
            "a list of two numbers in [0, 1)",
        )
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "a positive number or null")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", "a number in [0, 1)")
        require(self.output_dir.strip() != "", "output_dir", "a folder path")
        _check_seed(self.seed, "seed")
        require(
            len(self.sample_guidance) >= 1 and all(w >= 0 for w in self.sample_guidance),
            "sample_guidance",
            "a non-empty list of guidance weights >= 0",
        )


@dataclass
class StageConfig:
    """One cascade stage: everything needed to train and sample it."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: Union[BaseUNetConfig, EfficientUNetConfig] = field(default_factory=BaseUNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    thresholding: ThresholdingConfig = field(default_factory=ThresholdingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    super_resolution: Optional[SuperResolutionConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if self.sampling.sampler is None:
            self.sampling.sampler = SAMPLERS_BY_FORMULATION[self.diffusion.formulation][0]

    @property
    def is_super_resolution(self) -> bool:
        return self.super_resolution is not None

    def validate(self) -> None:
        formulation = self.diffusion.formulation
        require(self.sampling.sampler in SAMPLERS_BY_FORMULATION[formulation], "sampling.sampler",
                f"a sampler of the {formulation} formulation (diffusion.formulation): "
                f"{', '.join(SAMPLERS_BY_FORMULATION[formulation])}")
        require(
            formulation == "edm" or self.sampling.steps <= self.diffusion.timesteps,
            "sampling.steps",
            f"at most diffusion.timesteps ({self.diffusion.timesteps})",
        )
        if self.super_resolution is not None:
            require(
                self.super_resolution.low_res_size < self.unet.image_size,
                "super_resolution.low_res_size",
                f"a size below unet.image_size ({self.unet.image_size})",
            )


@dataclass
class CascadeConfig:
    """A cascade file: its stage files in order (paths relative to the cascade file), base first."""

    stages: list[str]


# Keys that configs saved by earlier versions hold, with the one value each could have; they
# are dropped on loading so that older checkpoints stay loadable.
RETIRED_KEYS = {("diffusion", "loss"): "mse"}


def stage_config_from_dict(raw: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> StageConfig:
    """Validate a raw mapping (as read from YAML) into a :class:`StageConfig`."""
    if isinstance(raw, dict):
        raw = {name: dict(section) if isinstance(section, dict) else section for name, section in raw.items()}
        for (section, key), value in RETIRED_KEYS.items():
            if isinstance(raw.get(section), dict) and raw[section].get(key, value) == value:
                raw[section].pop(key, None)
    return build(StageConfig, raw, source, overrides)


def load_stage_config(path: str | Path, overrides: Sequence[str] = ()) -> StageConfig:
    """Load and validate one stage file, applying ``--set`` overrides first."""
    return stage_config_from_dict(read_yaml_file(path), str(path), overrides)


@dataclass
class LoadedCascade:
    """A cascade file resolved into its stages, base first."""

    path: Path
    stage_paths: list[Path]
    stages: list[StageConfig]

    @property
    def run_folders(self) -> list[Path]:
        """Where each stage trains by default (its ``training.output_dir``), base first."""
        return [Path(stage.training.output_dir) for stage in self.stages]


def check_stage_order(stages: Sequence[StageConfig], names: Sequence[str],
                      super_resolution_first: bool = False, start_hint: str = "") -> None:
    """Each stage must take exactly what the previous one produces; the first is a base stage
    unless ``super_resolution_first`` (``start_hint``: how the caller may start at another)."""
    if super_resolution_first and not stages[0].is_super_resolution:
        raise ConfigError(f"{names[0]}: expected a super-resolution stage (with a super_resolution section) first.")
    if stages[0].is_super_resolution and not super_resolution_first:
        raise ConfigError(f"{names[0]}: the first cascade stage must be a base stage (no super_resolution "
                          f"section){start_hint}.")
    for index in range(1, len(stages)):
        previous, stage = stages[index - 1], stages[index]
        if stage.super_resolution is None:
            raise ConfigError(
                f"{names[index]}: cascade stage {index} must be a super-resolution stage "
                "(it needs a super_resolution section with low_res_size)."
            )
        if stage.super_resolution.low_res_size != previous.unet.image_size:
            raise ConfigError(
                f"{names[index]}: super_resolution.low_res_size is {stage.super_resolution.low_res_size}, but the "
                f"previous stage ({names[index - 1]}) produces {previous.unet.image_size}x"
                f"{previous.unet.image_size} images; they must match."
            )
        if stage.unet.channels != previous.unet.channels:
            raise ConfigError(
                f"{names[index]}: unet.channels is {stage.unet.channels}, but the previous stage "
                f"({names[index - 1]}) produces {previous.unet.channels}-channel images; they must match."
            )


def load_cascade_config(path: str | Path) -> LoadedCascade:
    """Load a cascade file and every stage file it lists (relative to the cascade file)."""
    path = Path(path)
    cascade = build(CascadeConfig, read_yaml_file(path), str(path))
    if not cascade.stages:
        raise ConfigError(f"{path}: invalid value for 'stages': expected at least one stage file, got an empty list.")
    stage_paths = [path.parent / stage for stage in cascade.stages]
    stages = [load_stage_config(stage_path) for stage_path in stage_paths]
    check_stage_order(stages, [str(p) for p in stage_paths])
    return LoadedCascade(path, stage_paths, stages)


def config_to_dict(config: Any) -> dict:
    """Plain dict of a config (lists, numbers, strings), ready for YAML or JSON."""
    return to_dict(config)


def config_to_yaml(config: Any) -> str:
    return to_yaml(config)


def plain_values(value: Any) -> Any:
    """``value`` as YAML would give it back: tuples as lists, NumPy and torch values as Python ones."""
    if isinstance(value, dict):
        return {key: plain_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(item) for item in value]
    return python_value(value)


def checked_config(config: StageConfig, source: str = "<config changed in code>") -> StageConfig:
    """``config`` rebuilt and validated from scratch, exactly as a YAML file is: fields set in
    code (``config.training.batch_size = -5``) are not checked on assignment. Raises
    :class:`ConfigError` naming the key and what was expected."""
    return stage_config_from_dict(plain_values(config_to_dict(config)), source)


def save_config(config: StageConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), loadable by :func:`load_stage_config`;
    an invalid one is refused before anything is written."""
    atomic_write(path, config_to_yaml(checked_config(config, f"{path} (being saved)")))
