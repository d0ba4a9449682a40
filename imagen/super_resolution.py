"""Low-resolution inputs of super-resolution stages and Imagen's noise conditioning augmentation.

Training corrupts the low-res image with the stage's own forward process at a random
level in ``super_resolution.train_aug_range``; sampling uses the fixed level
``super_resolution.sample_aug_level``. Both go through :func:`noise_augment`, and the
level actually applied is what the network is told (its ``aug_level`` argument).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagen.diffusion import GaussianDiffusion, append_dims


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """High-res images (B, C, H, W) in [-1, 1] -> antialiased (B, C, size, size) in [-1, 1]."""
    low = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return low.clamp(-1.0, 1.0)


def draw_aug_levels(batch: int, aug_range: list[float], *, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Training levels (B,), uniform in [low, high]."""
    low, high = aug_range
    return low + (high - low) * torch.rand(batch, device=device, generator=generator)


def noise_augment(diffusion: GaussianDiffusion, low_res: torch.Tensor, aug_level: torch.Tensor, *,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt ``low_res`` (B, C, h, w) with the forward process at ``aug_level`` (B,) in [0, 1].

    The level is a fraction of the diffusion: level l noises to timestep round(l * (T - 1)).
    Level 0 leaves the image untouched. Returns (augmented low_res, the level applied
    (B,), quantised to that timestep) so the network is told exactly what was done.
    """
    last = diffusion.num_timesteps - 1
    t = (aug_level.clamp(0.0, 1.0) * last).round().long()
    noise = torch.randn(low_res.shape, device=low_res.device, dtype=low_res.dtype, generator=generator)
    noised = diffusion.q_sample(low_res, t, noise)
    untouched = append_dims(t == 0, low_res.ndim)
    return torch.where(untouched, low_res, noised), t.to(low_res.dtype) / last
