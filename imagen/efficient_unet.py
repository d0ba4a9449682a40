"""The Efficient U-Net of Imagen's super-resolution stages (Saharia et al. 2022, Appendix B.1).

Compared to the base U-Net it moves compute to low resolutions and saves memory at high
ones: more residual blocks at lower resolutions (one count per level), a DBlock
downsamples *before* its convolutions and a UBlock upsamples *after* them (with
``downsample_first_level`` the first DBlock too, as in Appendix F), the skip
connections from DBlocks to UBlocks are scaled by 1/sqrt(2), and attention runs only at
the configured (by default the lowest) resolutions; self-attention can be switched off
while text cross-attention stays (the paper's 256->1024 model).
"""

from __future__ import annotations

import torch
from torch import nn

from imagen.conditioning import Conditioning
from imagen.config import EfficientUNetConfig, SuperResolutionConfig
from imagen.nn import Downsample, ResBlock, Upsample, group_norm, set_group_norm_precision, zero_module
from imagen.unet import ConditionedSequential, attention_at


class EfficientUNet(nn.Module):
    """Same call signature as :class:`imagen.unet.UNet`:

    forward(x (B, C, H, W), t (B,), *, text_emb (B, L, D), text_mask (B, L) bool,
    drop_text (B,) bool | None, low_res (B, C, h, w) | None, aug_level (B,) | None) -> (B, C, H, W)
    """

    def __init__(self, config: EfficientUNetConfig, text_dim: int, timesteps: int, null_embedding: str = "learned",
                 super_resolution: SuperResolutionConfig | None = None):
        super().__init__()
        self.config = config
        base, mults = config.base_channels, config.channel_mults
        emb_dim = 4 * base
        self.skip_scale = 2**-0.5 if config.scale_skip_connections else 1.0
        self.conditioning = Conditioning(config, text_dim, emb_dim, timesteps, null_embedding, super_resolution)
        text_width = self.conditioning.text_width
        self.input_conv = nn.Conv2d(self.conditioning.input_channels, base, 3, padding=1)

        def level_layers(in_channels: int, out_channels: int, blocks: int, resolution: int) -> list[nn.Module]:
            layers = [ResBlock(in_channels if i == 0 else out_channels, out_channels, emb_dim, config.dropout)
                      for i in range(blocks)]
            return layers + attention_at(resolution, out_channels, config, text_width,
                                         self_attention_allowed=config.self_attention)

        self.down_blocks = nn.ModuleList()
        channels, resolution, skip_channels = base, config.image_size, []
        for level, (mult, blocks) in enumerate(zip(mults, config.num_res_blocks)):
            layers: list[nn.Module] = []
            if level > 0 or config.downsample_first_level:  # the level's convolutions run at the lower resolution
                layers.append(Downsample(channels))
                resolution //= 2
            layers += level_layers(channels, base * mult, blocks, resolution)
            channels = base * mult
            self.down_blocks.append(ConditionedSequential(layers))
            skip_channels.append(channels)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(mults))):
            out_channels = base * mults[level]
            layers = level_layers(channels + skip_channels.pop(), out_channels, config.num_res_blocks[level],
                                  resolution)
            channels = out_channels
            if level > 0 or config.downsample_first_level:  # upsample last: the convolutions ran at the lower one
                layers.append(Upsample(channels))
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
        skips = []
        for block in self.down_blocks:
            h = block(h, emb, text, text_mask)
            skips.append(h)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop() * self.skip_scale], dim=1), emb, text, text_mask)
        return self.output(h)
