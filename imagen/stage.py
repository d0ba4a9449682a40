"""One cascade stage: its network and diffusion built from a stage config, and sampling it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

from imagen.config import StageConfig
from imagen.diffusion import GaussianDiffusion
from imagen.efficient_unet import EfficientUNet
from imagen.errors import ImagenError
from imagen.guidance import ClassifierFreeGuidance
from imagen.samplers import SamplerStep, sample
from imagen.super_resolution import noise_augment
from imagen.text import EncodedText
from imagen.unet import UNet


NETWORKS = {"unet": UNet, "efficient_unet": EfficientUNet}


def build_network(config: StageConfig, text_dim: int) -> nn.Module:
    """The network ``unet.type`` names, conditioned on text of width ``text_dim``; it takes a
    low-resolution input exactly when the stage has a ``super_resolution`` section."""
    network = NETWORKS[config.unet.type]
    return network(config.unet, text_dim, config.diffusion.timesteps, config.guidance.null_embedding,
                   config.super_resolution)


def build_diffusion(config: StageConfig) -> GaussianDiffusion:
    diffusion = config.diffusion
    return GaussianDiffusion.from_schedule(
        diffusion.schedule, diffusion.timesteps, diffusion.objective,
        linear_start=diffusion.linear_beta_start, linear_end=diffusion.linear_beta_end,
    )


@torch.no_grad()
def sample_stage(network: nn.Module, diffusion: GaussianDiffusion, config: StageConfig, text: EncodedText, *,
                 guidance: float | None = None, steps: int | None = None, sampler: str | None = None,
                 generator: torch.Generator | None = None, low_res: torch.Tensor | None = None,
                 aug_level: float | None = None, thresholding: str | None = None,
                 on_step: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] for the B prompts of ``text``, with classifier-free guidance.

    Super-resolution stages take ``low_res`` (B, C, h, w), noise-augmented at ``aug_level``
    (default ``super_resolution.sample_aug_level``) exactly as in training. Settings not
    given come from the stage's ``sampling`` and ``thresholding`` sections (``thresholding``
    overrides the mode only).
    """
    sampling = config.sampling
    sampler = sampler or sampling.sampler
    device = next(network.parameters()).device
    levels = None
    if config.super_resolution is not None:
        if low_res is None:
            raise ImagenError("a super-resolution stage samples from a low-resolution image: pass low_res.")
        level = config.super_resolution.sample_aug_level if aug_level is None else aug_level
        low_res = low_res.to(device)
        levels = torch.full((low_res.shape[0],), float(level), device=device)
        low_res, levels = noise_augment(diffusion, low_res, levels, generator=generator)
    guided = ClassifierFreeGuidance(network, sampling.guidance if guidance is None else guidance)
    model_fn = functools.partial(
        guided,
        text_emb=text.embeddings.to(device),
        text_mask=text.mask.to(device),
        low_res=low_res,
        aug_level=levels,
    )
    size, channels = config.unet.image_size, config.unet.channels
    images = sample(
        diffusion, model_fn, (len(text.mask), channels, size, size),
        sampler=sampler, steps=steps or sampling.steps, generator=generator, device=device,
        thresholding={**dataclasses.asdict(config.thresholding), **({"mode": thresholding} if thresholding else {})},
        eta=sampling.eta if sampler == "ddim" else 0.0, on_step=on_step,
    )
    return images.clamp(-1.0, 1.0)
