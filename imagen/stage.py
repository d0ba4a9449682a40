"""One cascade stage: its network and diffusion built from a stage config, and sampling it."""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from imagen.config import StageConfig
from imagen.diffusion import GaussianDiffusion
from imagen.errors import ImagenError
from imagen.guidance import ClassifierFreeGuidance
from imagen.samplers import sample
from imagen.text import EncodedText
from imagen.unet import UNet


def build_network(config: StageConfig, text_dim: int) -> nn.Module:
    """The network ``unet.type`` names, conditioned on text of width ``text_dim``."""
    if config.unet.type != "unet":
        raise ImagenError(f"unet.type {config.unet.type!r}: this network type is not implemented yet.")
    return UNet(config.unet, text_dim, config.diffusion.timesteps, config.guidance.null_embedding,
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
                 aug_level: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] for the B prompts of ``text``, with classifier-free guidance.

    Settings not given come from the stage's ``sampling`` and ``thresholding`` sections.
    """
    sampling = config.sampling
    sampler = sampler or sampling.sampler
    device = next(network.parameters()).device
    guided = ClassifierFreeGuidance(network, sampling.guidance if guidance is None else guidance)
    model_fn = functools.partial(
        guided,
        text_emb=text.embeddings.to(device),
        text_mask=text.mask.to(device),
        low_res=low_res,
        aug_level=aug_level,
    )
    size, channels = config.unet.image_size, config.unet.channels
    images = sample(
        diffusion, model_fn, (len(text.mask), channels, size, size),
        sampler=sampler, steps=steps or sampling.steps, generator=generator, device=device,
        thresholding=dataclasses.asdict(config.thresholding),
        eta=sampling.eta if sampler == "ddim" else 0.0,
    )
    return images.clamp(-1.0, 1.0)
