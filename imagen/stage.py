"""One cascade stage: its network and diffusion built from a stage config, and how the stage
is trained (:func:`training_losses`) and sampled (:func:`sample_stage`).

Both sides apply Imagen's conditioning the same way: classifier-free guidance (conditions
dropped in training, guided at sampling) and, for super-resolution stages, noise
conditioning augmentation of the low-resolution input, whose level the network is told.
The stage's ``diffusion.formulation`` picks the process: a :class:`GaussianDiffusion` (ddpm)
or an :class:`ElucidatedDiffusion` (edm); both train and sample through the same calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import torch
from torch import nn

from imagen import elucidated, samplers
from imagen.config import SAMPLERS_BY_FORMULATION, StageConfig
from imagen.diffusion import GaussianDiffusion
from imagen.efficient_unet import EfficientUNet
from imagen.elucidated import ElucidatedDiffusion
from imagen.errors import ImagenError
from imagen.guidance import ClassifierFreeGuidance, draw_cond_drop
from imagen.io import resolve_mixed_precision
from imagen.samplers import Inpainting, SamplerStep
from imagen.super_resolution import downsample, draw_aug_levels, noise_augment
from imagen.text import EncodedText
from imagen.unet import UNet

NETWORKS = {"unet": UNet, "efficient_unet": EfficientUNet}


def build_network(config: StageConfig, text_dim: int) -> nn.Module:
    """The network ``unet.type`` names, conditioned on text of width ``text_dim``; it takes a
    low-resolution input exactly when the stage has a ``super_resolution`` section."""
    network = NETWORKS[config.unet.type]
    return network(config.unet, text_dim, config.diffusion.timesteps, config.guidance.null_embedding,
                   config.super_resolution)


Diffusion = GaussianDiffusion | ElucidatedDiffusion


def build_diffusion(config: StageConfig) -> Diffusion:
    """The stage's process, per ``diffusion.formulation``."""
    if config.diffusion.formulation == "edm":
        return ElucidatedDiffusion(**dataclasses.asdict(config.diffusion.edm))
    diffusion = config.diffusion
    return _gaussian_diffusion(diffusion.schedule, diffusion.timesteps, diffusion.objective,
                               diffusion.linear_beta_start, diffusion.linear_beta_end)


def augmentation_process(diffusion: Diffusion, config: StageConfig) -> GaussianDiffusion:
    """The process noise conditioning augmentation corrupts with: the variance-preserving forward
    process of ``diffusion.schedule`` under either formulation (the ddpm stage's own process)."""
    if isinstance(diffusion, GaussianDiffusion):
        return diffusion
    settings = config.diffusion
    return _gaussian_diffusion(settings.schedule, settings.timesteps, "eps", settings.linear_beta_start,
                               settings.linear_beta_end)


@functools.lru_cache(maxsize=8)
def _gaussian_diffusion(schedule: str, timesteps: int, objective: str, linear_start: float,
                        linear_end: float) -> GaussianDiffusion:
    # Cached: an EDM super-resolution stage asks for its augmentation process at every step.
    return GaussianDiffusion.from_schedule(schedule, timesteps, objective, linear_start=linear_start,
                                           linear_end=linear_end)


def check_stage_settings(configs: Sequence[StageConfig], samplers: Sequence[str | None],
                         steps: Sequence[int | None]) -> None:
    """Refuse a per-stage sampler of another formulation than the stage's, or more steps than a
    ddpm stage has timesteps, before anything is sampled."""
    for index, (config, sampler, count) in enumerate(zip(configs, samplers, steps)):
        diffusion = config.diffusion
        choices = SAMPLERS_BY_FORMULATION[diffusion.formulation]
        if sampler is not None and sampler not in choices:
            raise ImagenError(f"sampler {sampler}: stage {index} was trained with the {diffusion.formulation} "
                              f"formulation, which samples with {', '.join(choices)}.")
        if count is not None and diffusion.formulation == "ddpm" and count > diffusion.timesteps:
            raise ImagenError(f"steps {count}: stage {index} has only {diffusion.timesteps} timesteps.")


def training_losses(network: Callable[..., torch.Tensor], diffusion: Diffusion, config: StageConfig,
                    images: torch.Tensor, text: EncodedText, *,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The stage's per-sample losses on a batch (see ``GaussianDiffusion.training_losses`` and
    ``ElucidatedDiffusion.training_losses``; both return "loss" and "noise_quartile").

    images: (B, C, H, W) in [-1, 1] at the stage's resolution; text: its prompts (B, L, D).
    Each row's text is replaced by the null condition with probability
    ``guidance.cond_drop_prob``. A super-resolution stage learns from the images'
    downsample to ``low_res_size``, noise-augmented at a level drawn from
    ``train_aug_range``, exactly as :func:`sample_stage` augments its input.
    ``generator`` (on the images' device) draws every random number.
    """
    cond = {"text_emb": text.embeddings, "text_mask": text.mask,
            "drop_text": draw_cond_drop(images.shape[0], config.guidance.cond_drop_prob, device=images.device,
                                        generator=generator)}
    super_resolution = config.super_resolution
    if super_resolution is not None:
        levels = draw_aug_levels(images.shape[0], super_resolution.train_aug_range, device=images.device,
                                 generator=generator)
        cond["low_res"], cond["aug_level"] = noise_augment(
            augmentation_process(diffusion, config), downsample(images, super_resolution.low_res_size), levels,
            generator=generator)
    if isinstance(diffusion, ElucidatedDiffusion):
        return diffusion.training_losses(network, images, generator=generator, **cond)
    return diffusion.training_losses(network, images, generator=generator,
                                     min_snr_gamma=config.diffusion.min_snr_gamma, **cond)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``sampling.mixed_precision`` setting on ``device``; None: full precision."""
    precision = resolve_mixed_precision(setting, device, key="sampling.mixed_precision")
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@torch.no_grad()
def sample_stage(network: nn.Module, diffusion: Diffusion, config: StageConfig, text: EncodedText, *,
                 guidance: float | None = None, steps: int | None = None, sampler: str | None = None,
                 generator: torch.Generator | None = None, low_res: torch.Tensor | None = None,
                 aug_level: float | None = None, thresholding: str | None = None,
                 init: torch.Tensor | None = None, strength: float = 1.0, inpaint: Inpainting | None = None,
                 on_step: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] for the B prompts of ``text``, with classifier-free guidance.

    Super-resolution stages take ``low_res`` (B, C, h, w), noise-augmented at ``aug_level``
    (default ``super_resolution.sample_aug_level``) exactly as in training. Settings not
    given come from the stage's ``sampling`` and ``thresholding`` sections (``thresholding``
    overrides the mode only). The network runs under ``sampling.mixed_precision``; the
    sampler's arithmetic stays in float32. Inputs may live anywhere: they are moved to the
    network's device, where the images are returned. ``init`` (B, C, H, W) in [-1, 1] with
    ``strength`` < 1 edits those images instead of sampling from noise (SDEdit, see
    ``imagen.samplers.sample``); ``inpaint`` keeps part of an image (``imagen.samplers.Inpainting``,
    at this stage's size). ``sampler`` must belong to the stage's formulation.
    """
    sampling = config.sampling
    sampler = sampler or sampling.sampler
    check_stage_settings([config], [sampler], [steps])
    device = next(network.parameters()).device
    levels = None
    if config.super_resolution is not None:
        if low_res is None:
            raise ImagenError("a super-resolution stage samples from a low-resolution image: pass low_res.")
        size, batch = config.super_resolution.low_res_size, len(text.mask)
        if tuple(low_res.shape) != (batch, config.unet.channels, size, size):
            raise ImagenError(f"low_res {tuple(low_res.shape)}: expected ({batch}, {config.unet.channels}, {size}, "
                              f"{size}), one image per prompt at super_resolution.low_res_size "
                              "(imagen.super_resolution.downsample resizes as training does).")
        level = config.super_resolution.sample_aug_level if aug_level is None else aug_level
        low_res = low_res.to(device)
        levels = torch.full((low_res.shape[0],), float(level), device=device)
        low_res, levels = noise_augment(augmentation_process(diffusion, config), low_res, levels,
                                        generator=generator)
    guided = functools.partial(
        ClassifierFreeGuidance(network, sampling.guidance if guidance is None else guidance),
        text_emb=text.embeddings.to(device),
        text_mask=text.mask.to(device),
        low_res=low_res,
        aug_level=levels,
    )
    dtype = autocast_dtype(sampling.mixed_precision, device)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if dtype is None:
            return guided(x, t)
        with torch.autocast(device.type, dtype=dtype):
            return guided(x, t).float()

    size, channels = config.unet.image_size, config.unet.channels
    run = elucidated.sample if isinstance(diffusion, ElucidatedDiffusion) else samplers.sample
    images = run(
        diffusion, model_fn, (len(text.mask), channels, size, size),
        sampler=sampler, steps=steps or sampling.steps, generator=generator, device=device,
        thresholding={**dataclasses.asdict(config.thresholding), **({"mode": thresholding} if thresholding else {})},
        init=None if init is None else init.to(device), strength=strength,
        on_step=on_step, **({"eta": sampling.eta} if sampler == "ddim" else {}),
        **({"inpaint": Inpainting(inpaint.image.to(device), inpaint.keep.to(device), inpaint.resample)}
           if inpaint is not None else {}),
    )
    return images.clamp(-1.0, 1.0)
