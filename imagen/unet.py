"""The base U-Net: ADM / Improved-DDPM with Imagen's text conditioning.

Levels of BigGAN residual blocks with scale-shift time conditioning; attention blocks at
the configured resolutions (pixel self-attention and/or text tokens appended to the keys
and values); a pooled text embedding added to the timestep embedding. With a
``super_resolution`` section the same network takes an explicit ``low_res`` image
(upsampled and concatenated to its input) and the ``aug_level`` of that image.
"""

from __future__ import annotations

import torch
from torch import nn

from imagen.attention import AttentionBlock
from imagen.conditioning import Conditioning
from imagen.config import BaseUNetConfig, SuperResolutionConfig
from imagen.nn import Downsample, ResBlock, Upsample, group_norm, set_group_norm_precision, zero_module


class ConditionedSequential(nn.ModuleList):
    """Runs layers in order, giving each what it takes: residual blocks the embedding,
    attention blocks the text, resampling layers only the feature map."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, text, text_mask)
            else:
                x = layer(x)
        return x


def attention_at(resolution: int, channels: int, config, text_dim: int,
                 self_attention_allowed: bool = True) -> list[AttentionBlock]:
    """The attention block a level at ``resolution`` gets (none, or one), per the config."""
    wants_self = self_attention_allowed and resolution in config.attention_resolutions
    wants_text = resolution in config.cross_attention_resolutions
    if not (wants_self or wants_text):
        return []
    return [AttentionBlock(channels, config.num_head_channels, text_dim if wants_text else None,
                           self_attention=wants_self, text_layernorm=config.text_layernorm)]


class UNet(nn.Module):
    """ADM U-Net predicting the diffusion objective (eps or v) for a noisy image.

    forward(x (B, C, H, W), t (B,), *, text_emb (B, L, D), text_mask (B, L) bool,
    drop_text (B,) bool | None, low_res (B, C, h, w) | None, aug_level (B,) | None) -> (B, C, H, W)
    """

    def __init__(self, config: BaseUNetConfig, text_dim: int, timesteps: int, null_embedding: str = "learned",
                 super_resolution: SuperResolutionConfig | None = None):
        super().__init__()
        self.config = config
        base, mults = config.base_channels, config.channel_mults
        emb_dim = 4 * base
        self.conditioning = Conditioning(config, text_dim, emb_dim, timesteps, null_embedding, super_resolution)
        text_width = self.conditioning.text_width
        self.input_conv = nn.Conv2d(self.conditioning.input_channels, base, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        skip_channels, channels, resolution = [base], base, config.image_size
        for level, mult in enumerate(mults):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(channels, base * mult, emb_dim, config.dropout)]
                channels = base * mult
                layers += attention_at(resolution, channels, config, text_width)
                self.down_blocks.append(ConditionedSequential(layers))
                skip_channels.append(channels)
            if level < len(mults) - 1:
                down = (ResBlock(channels, channels, emb_dim, config.dropout, direction="down")
                        if config.resblock_updown else Downsample(channels))
                self.down_blocks.append(ConditionedSequential([down]))
                skip_channels.append(channels)
                resolution //= 2

        self.middle = ConditionedSequential(
            [ResBlock(channels, channels, emb_dim, config.dropout)]
            + attention_at(resolution, channels, config, text_width)
            + [ResBlock(channels, channels, emb_dim, config.dropout)]
        )

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for index in range(config.num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), base * mult, emb_dim, config.dropout)]
                channels = base * mult
                layers += attention_at(resolution, channels, config, text_width)
                if level > 0 and index == config.num_res_blocks:
                    layers.append(ResBlock(channels, channels, emb_dim, config.dropout, direction="up")
                                  if config.resblock_updown else Upsample(channels))
                    resolution *= 2
                self.up_blocks.append(ConditionedSequential(layers))

        self.output = nn.Sequential(group_norm(channels), nn.SiLU(),
                                    zero_module(nn.Conv2d(channels, config.channels, 3, padding=1)))
        set_group_norm_precision(self, config.group_norm_precision)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, text_emb: torch.Tensor, text_mask: torch.Tensor,
                drop_text: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None) -> torch.Tensor:
        x, emb, text, text_mask = self.conditioning(x, t, text_emb, text_mask, drop_text, low_res, aug_level)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, text, text_mask)
            skips.append(h)
        h = self.middle(h, emb, text, text_mask)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, text, text_mask)
        return self.output(h)
