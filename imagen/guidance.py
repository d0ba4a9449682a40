"""Classifier-free guidance (Ho & Salimans 2022), as Imagen uses it.

Training: each sample's text condition is replaced by the network's null
condition with probability ``cond_drop_prob`` (``draw_cond_drop`` picks the
rows; the network owns the null embedding and substitutes it where
``drop_text`` is True). Sampling: the prediction is extrapolated away from
the unconditional one, pred = w * pred_cond + (1 - w) * pred_uncond.

The same formula is used for eps and v: both objectives give eps and x0 as
per-timestep affine maps of the prediction whose coefficients are shared by
the two halves, and w + (1 - w) = 1, so guiding v is guiding eps.
"""

from collections.abc import Callable
from typing import Any

import torch


def draw_cond_drop(
    batch_size: int,
    prob: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rows whose text condition is dropped for training: BoolTensor (B,), True = use null.

    Each row is dropped independently with probability ``prob``; ``generator``
    must live on ``device``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {prob}")
    return torch.rand(batch_size, generator=generator, device=device) < prob


class ClassifierFreeGuidance:
    """Wraps a network into a guided predictor with the same signature minus drop_text.

    Call as guided(x_t (B, C, H, W), t (B,), text_emb=..., text_mask=..., low_res=..., ...)
    -> (B, C, H, W). The conditional and unconditional passes share one
    batched forward of size 2B: every tensor argument is duplicated along the
    batch dimension (None and non-tensor values pass through) and drop_text is
    False for the first half and True for the second. Weights 1 and 0 need only
    one half and run a single pass of size B.
    """

    def __init__(self, model: Callable[..., torch.Tensor], weight: float) -> None:
        self.model = model
        self.weight = weight

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if "drop_text" in cond:
            raise TypeError("ClassifierFreeGuidance sets drop_text itself; do not pass it")
        batch = x.shape[0]
        if self.weight in (0, 1):
            # Only one half counts: w=1 is purely conditional, w=0 purely unconditional.
            drop = torch.full((batch,), self.weight == 0, dtype=torch.bool, device=x.device)
            return self.model(x, t, drop_text=drop, **cond)

        def doubled(value: Any) -> Any:
            return torch.cat([value, value]) if isinstance(value, torch.Tensor) else value

        drop = torch.arange(2 * batch, device=x.device) >= batch
        doubled_cond = {name: doubled(value) for name, value in cond.items()}
        out = self.model(doubled(x), doubled(t), drop_text=drop, **doubled_cond)
        # Extrapolate in float32 even when the network ran in half precision.
        cond_out, uncond_out = out[:batch].float(), out[batch:].float()
        return self.weight * cond_out + (1 - self.weight) * uncond_out
