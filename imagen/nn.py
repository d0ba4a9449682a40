"""Small layers shared by both U-Nets: timestep embedding, normalisation, zero init."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t (B,) -> (B, dim)."""
    assert t.ndim == 1, f"timesteps must be (B,), got {tuple(t.shape)}"
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose precision under autocast is ``precision``, the same on every device.

    - ``float32``: normalise in float32 and return float32, as CUDA's autocast does with every
      norm (CPU autocast would keep bf16).
    - ``activations``: normalise in the dtype the activations arrive in. For bf16 and fp16
      inputs PyTorch's kernels accumulate the statistics in float32 either way; the output,
      the affine weights and their gradients are in the low precision, as a convolution's are
      under autocast. It saves the cast to float32 and back around every norm: on an H200,
      casts took 13% of a bf16 training step's kernel time and the float32 norms 15%.

    Outside autocast both are ``nn.GroupNorm``. :func:`set_group_norm_precision` sets it.
    """

    PRECISIONS = ("float32", "activations")
    precision = "float32"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, precision={self.precision}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        try:  # not torch.amp.is_autocast_available: torch 2.11 cannot compile it and breaks the graph there
            autocast = torch.is_autocast_enabled(device)
        except RuntimeError:  # a device type without autocast, such as meta
            autocast = False
        if not autocast:
            return super().forward(x)
        dtype = torch.float32 if self.precision == "float32" else x.dtype
        with torch.autocast(device, enabled=False):  # else CUDA's autocast would cast to float32 again
            return nn.functional.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype),
                                            self.bias.to(dtype), self.eps)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups (ADM's choice) but at least 4 channels per group,
    so narrow CPU-sized networks do not degrade to per-channel normalisation."""
    groups = max(g for g in range(1, 33) if channels % g == 0 and channels // g >= min(4, channels))
    return GroupNorm(groups, channels)


def set_group_norm_precision(network: nn.Module, precision: str) -> None:
    """Give every :class:`GroupNorm` of ``network`` the precision ``unet.group_norm_precision`` names."""
    if precision not in GroupNorm.PRECISIONS:
        raise ValueError(f"group norm precision {precision!r}: expected one of {GroupNorm.PRECISIONS}")
    for module in network.modules():
        if isinstance(module, GroupNorm):
            module.precision = precision


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches then start as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class TimestepMLP(nn.Module):
    """Timestep (or augmentation level) -> sinusoidal features -> MLP, as in ADM: (B,) -> (B, dim)."""

    def __init__(self, base_channels: int, dim: int):
        super().__init__()
        self.base_channels = base_channels
        self.mlp = nn.Sequential(nn.Linear(base_channels, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base_channels))


def resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """Halve (``down``, average pooling) or double (``up``, nearest) the resolution."""
    if direction == "down":
        return nn.functional.avg_pool2d(x, 2)
    if direction == "up":
        return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """BigGAN-style residual block with scale-shift (adaptive group norm) conditioning.

    ``emb`` (B, emb_dim) sets a per-channel scale and shift after the second norm;
    ``direction`` resamples inside the block (both branches) instead of in a separate layer.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 direction: str | None = None):
        super().__init__()
        self.direction = direction
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = resample(nn.functional.silu(self.norm1(x)), self.direction)
        h = self.conv1(h)
        scale, shift = self.emb_proj(nn.functional.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(nn.functional.silu(h)))
        return self.skip(resample(x, self.direction)) + h


class Downsample(nn.Module):
    """Strided 3x3 convolution (used when resampling is not done inside residual blocks)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(resample(x, "up"))
