"""Attention over image pixels and text tokens, and attention pooling of text.

Text enters attention as Imagen does it: the (LayerNorm-ed) text tokens are projected to
keys and values and appended to the pixels' own keys and values, so one softmax covers
both. Without self-attention the same block is pure cross-attention (the paper's
256->1024 model). Padded text tokens are masked out of every softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from imagen.nn import group_norm, zero_module


def check_text(text: torch.Tensor, mask: torch.Tensor, batch: int, dim: int) -> None:
    """Text must be (B, L, D) tokens with a (B, L) bool mask: catches tokens/features transposes."""
    assert text.ndim == 3 and text.shape[0] == batch and text.shape[2] == dim, (
        f"text embeddings must be (B={batch}, L, D={dim}), got {tuple(text.shape)}"
    )
    assert mask.shape == text.shape[:2] and mask.dtype == torch.bool, (
        f"text mask must be bool (B, L)={tuple(text.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
    )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b n (heads d) -> b heads n d", heads=heads)


class AttentionBlock(nn.Module):
    """Residual multi-head attention for a feature map (B, C, H, W).

    Keys/values come from the pixels (``self_attention``) and/or from text tokens
    (``text_dim`` set); at least one of the two is required.
    """

    def __init__(self, channels: int, num_head_channels: int, text_dim: int | None = None,
                 self_attention: bool = True, text_layernorm: bool = True):
        super().__init__()
        assert self_attention or text_dim is not None, "an attention block needs pixels or text to attend to"
        assert channels % num_head_channels == 0, f"{channels} channels do not split into heads of {num_head_channels}"
        self.channels = channels
        self.heads = channels // num_head_channels
        self.self_attention = self_attention
        self.text_dim = text_dim
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels) if self_attention else None
        if text_dim is not None:
            self.text_norm = nn.LayerNorm(text_dim) if text_layernorm else nn.Identity()
            self.text_to_kv = nn.Linear(text_dim, 2 * channels)
        self.out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        assert channels == self.channels, f"expected {self.channels} channels, got {channels}"
        pixels = rearrange(self.norm(x), "b c h w -> b (h w) c")
        keys, values, masks = [], [], []
        if self.self_attention:
            k, v = self.to_kv(pixels).chunk(2, dim=-1)
            keys.append(k)
            values.append(v)
            masks.append(torch.ones(batch, height * width, dtype=torch.bool, device=x.device))
        if self.text_dim is not None:
            assert text is not None and text_mask is not None, "this block attends to text: pass text and text_mask"
            check_text(text, text_mask, batch, self.text_dim)
            k, v = self.text_to_kv(self.text_norm(text)).chunk(2, dim=-1)
            keys.append(k.to(pixels.dtype))
            values.append(v.to(pixels.dtype))
            masks.append(text_mask)
        q = _split_heads(self.to_q(pixels), self.heads)
        k = _split_heads(torch.cat(keys, dim=1), self.heads)
        v = _split_heads(torch.cat(values, dim=1), self.heads)
        mask = torch.cat(masks, dim=1)[:, None, None, :]  # (B, 1, 1, N_keys), broadcast over heads and queries
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attended = rearrange(attended, "b heads n d -> b n (heads d)")
        return x + rearrange(self.out(attended), "b (h w) c -> b c h w", h=height, w=width)


class AttentionPool(nn.Module):
    """Pool text tokens (B, L, D) -> (B, D) with a learned query attending over the unmasked tokens."""

    def __init__(self, dim: int, num_head_channels: int = 64):
        super().__init__()
        self.heads = max(1, dim // num_head_channels) if dim % num_head_channels == 0 else 1
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        q = _split_heads(self.query.expand(batch, -1, -1).to(tokens.dtype), self.heads)
        pooled = F.scaled_dot_product_attention(
            q, _split_heads(k, self.heads), _split_heads(v, self.heads), attn_mask=mask[:, None, None, :]
        )
        return self.out(rearrange(pooled, "b heads 1 d -> b (heads d)"))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens: (B, L, D), (B, L) -> (B, D)."""
    kept = torch.where(mask[..., None], tokens, torch.zeros_like(tokens))
    return kept.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)
