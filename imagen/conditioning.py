"""What a U-Net is conditioned on besides the noisy image: text, and for
super-resolution stages the low-resolution image and its augmentation level.

Both network types use :class:`Conditioning`, so they treat text, the null condition of
classifier-free guidance and the low-resolution input identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagen.attention import AttentionPool, check_text, masked_mean
from imagen.config import SuperResolutionConfig, UNetConfig
from imagen.nn import TimestepMLP


class Conditioning(nn.Module):
    """Builds the embedding added to every residual block and the text tokens for attention.

    - The timestep is embedded (sinusoid + MLP) to ``emb_dim``.
    - Rows with ``drop_text`` get the null condition instead of their text: a single
      valid token that is learned (``null_embedding='learned'``) or zero, all else masked.
    - With ``unet.text_projection_dim`` the tokens are projected once to that width;
      pooling and every attention block then see the projected tokens (``text_width``).
    - The text is pooled (attention pooling or masked mean, after a LayerNorm), projected
      and added to the timestep embedding, as in Imagen (``unet.text_pooling: none`` leaves
      the text to cross-attention alone, for the paper's ablation).
    - Super-resolution: the augmentation level (in [0, 1]) of the low-res input is embedded
      like a timestep and added too, so the network knows how noisy its input is.

    - Super-resolution: the low-resolution image is upsampled and concatenated to the
      noisy image as extra input channels.

    Args:
        unet: the network's config (image size, channels, pooling, LayerNorm, head width).
        text_dim: D of the T5 embeddings.
        emb_dim: width of the time embedding fed to residual blocks.
        timesteps: number of diffusion timesteps; augmentation levels are scaled to it.
    """

    def __init__(self, unet: UNetConfig, text_dim: int, emb_dim: int, timesteps: int,
                 null_embedding: str = "learned", super_resolution: SuperResolutionConfig | None = None):
        super().__init__()
        self.image_size = unet.image_size
        self.channels = unet.channels
        self.super_resolution = super_resolution
        self.text_dim = text_dim
        self.timesteps = timesteps
        self.time_embed = TimestepMLP(unet.base_channels, emb_dim)
        if null_embedding == "learned":
            self.null_token = nn.Parameter(torch.randn(text_dim) * 0.02)
        else:
            self.register_buffer("null_token", torch.zeros(text_dim), persistent=False)
        self.text_width = unet.text_projection_dim or text_dim
        self.text_projection = nn.Linear(text_dim, self.text_width) if unet.text_projection_dim else None
        self.pooling = unet.text_pooling
        if self.pooling != "none":
            self.pool_norm = nn.LayerNorm(self.text_width) if unet.text_layernorm else nn.Identity()
            self.pool = AttentionPool(self.text_width, unet.num_head_channels) if self.pooling == "attention" else None
            self.pooled_to_emb = nn.Sequential(nn.Linear(self.text_width, emb_dim), nn.SiLU(),
                                               nn.Linear(emb_dim, emb_dim))
        self.aug_embed = TimestepMLP(unet.base_channels, emb_dim) if super_resolution is not None else None

    @property
    def input_channels(self) -> int:
        """Channels of the network's first convolution: the noisy image, plus the
        upsampled low-resolution image for super-resolution."""
        return self.channels * (2 if self.super_resolution is not None else 1)

    def substitute_null(self, text: torch.Tensor, mask: torch.Tensor,
                        drop_text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the rows where ``drop_text`` is True by the null condition."""
        if drop_text is None:
            return text, mask
        assert drop_text.shape == (text.shape[0],) and drop_text.dtype == torch.bool, (
            f"drop_text must be bool (B,), got {drop_text.dtype} {tuple(drop_text.shape)}"
        )
        null_text = torch.zeros_like(text)
        null_text[:, 0] = self.null_token.to(text.dtype)
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = True
        text = torch.where(drop_text[:, None, None], null_text, text)
        mask = torch.where(drop_text[:, None], null_mask, mask)
        return text, mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                drop_text: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Check every input's shape and return, for the network's layers,
        (input image (B, input_channels, H, W), emb (B, emb_dim), text (B, L, text_width), text_mask (B, L))."""
        batch, size, channels = x.shape[0], self.image_size, self.channels
        assert x.shape[1:] == (channels, size, size), (
            f"expected x (B, {channels}, {size}, {size}), got {tuple(x.shape)}")
        assert t.shape == (batch,), f"timesteps must be (B,), got {tuple(t.shape)}"
        check_text(text, text_mask, batch, self.text_dim)
        text, text_mask = self.substitute_null(text, text_mask, drop_text)
        if self.text_projection is not None:
            # Padding stays zero: the projection's bias must not give masked tokens content.
            text = self.text_projection(text) * text_mask[..., None].to(text.dtype)
        emb = self.time_embed(t)
        if self.pooling != "none":
            normed = self.pool_norm(text)
            pooled = self.pool(normed, text_mask) if self.pool is not None else masked_mean(normed, text_mask)
            emb = emb + self.pooled_to_emb(pooled)
        if self.super_resolution is None:
            assert low_res is None and aug_level is None, (
                "low_res / aug_level given to a base network (it has no super_resolution section)"
            )
            return x, emb, text, text_mask
        low = self.super_resolution.low_res_size
        assert low_res is not None and low_res.shape == (batch, channels, low, low), (
            f"expected low_res (B, {channels}, {low}, {low}), got {None if low_res is None else tuple(low_res.shape)}"
        )
        assert aug_level is not None and aug_level.shape == (batch,), (
            "a super-resolution network needs aug_level (B,), got "
            f"{None if aug_level is None else tuple(aug_level.shape)}"
        )
        # The level is a fraction of the diffusion; embed it on the timestep scale.
        emb = emb + self.aug_embed(aug_level * (self.timesteps - 1))
        upsampled = upsample_low_res(low_res, size, self.super_resolution.upsample).to(x.dtype)
        return torch.cat([x, upsampled], dim=1), emb, text, text_mask


def upsample_low_res(low_res: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size) by bilinear or bicubic interpolation."""
    return F.interpolate(low_res, size=(size, size), mode=method, align_corners=False)
