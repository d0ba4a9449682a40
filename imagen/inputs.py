"""What callers hand the library, checked before any work with messages that name the
argument and say what was expected: prompts, numbers, and images with their shapes and
ranges. NumPy and torch values are taken as the Python numbers and lists they hold."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import torch

from imagen.captions import normalize_prompt, shorten
from imagen.errors import ImagenError, ImageRangeWarning


def python_value(value):
    """NumPy and torch values as Python ones: a scalar as a number, an array as a list."""
    if hasattr(value, "tolist") and getattr(value, "ndim", None) is not None:
        return value.tolist()
    return value


def checked_images(images: torch.Tensor, name: str, count: int, channels: int, low: float = -1.0) -> torch.Tensor:
    """``images`` as float (count, channels, H, H), or an error naming ``name`` and what was
    expected: square images, one per prompt, with ``channels``, finite values in [low, 1].
    Images with no negative value where [-1, 1] is expected (likely [0, 1]) get a warning."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImagenError(f"{name}: expected a tensor (N, C, H, W), got {got}.")
    number, got_channels, height, width = images.shape
    if number != count:
        hint = f" (images.expand({count}, -1, -1, -1) repeats one)" if number == 1 else ""
        raise ImagenError(f"{name}: expected {count} images, one per prompt, got {number}{hint}.")
    if got_channels != channels:
        hint = {(3, 1): " (images.mean(1, keepdim=True) makes them grey)",
                (1, 3): " (images.expand(-1, 3, -1, -1) makes them RGB)"}.get((got_channels, channels), "")
        raise ImagenError(f"{name}: expected {channels} channel(s), got {got_channels}{hint}.")
    if height != width:
        raise ImagenError(f"{name}: expected square images, got {height}x{width}; crop them first "
                          "(sample_imagen.py centre-crops image files).")
    images = images.float()
    if images.numel() == 0:
        return images
    if not torch.isfinite(images).all():
        raise ImagenError(f"{name}: holds NaN or infinite values.")
    smallest, largest = images.min().item(), images.max().item()
    # A little slack for images resized with an overshooting filter; they are clamped below.
    if smallest < low - 1e-3 or largest > 1.0 + 1e-3:
        hint = " (x / 127.5 - 1 maps 8-bit pixels there)" if low < 0 else ""
        raise ImagenError(f"{name}: expected values in [{low:g}, 1]{hint}, got [{smallest:g}, {largest:g}].")
    if low < 0 and smallest >= 0:
        # stacklevel: past Cascade.sample and torch.no_grad's wrapper, to the caller's line.
        warnings.warn(f"{name}: no value is negative; if these are [0, 1] images, x * 2 - 1 maps them to the "
                      "[-1, 1] expected (as they are, a black of 0 is read as mid-grey).", ImageRangeWarning,
                      stacklevel=4)
    return images.clamp(low, 1.0)


def check_prompts(prompts: Sequence[str], stages: Sequence, unconditional: str = "guidance 0") -> None:
    """Refuse anything but a non-empty list of prompts, and a prompt the text encoder of one of
    ``stages`` (loaded stages, :class:`imagen.cascade.Stage`) reads as nothing: that is a
    condition no stage was trained on (the null condition of guidance is another, which
    ``unconditional`` says how to ask for), so it would quietly draw something arbitrary."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ImagenError(f"prompts: expected a list of strings, got {shorten(str(prompts))} "
                          f"({type(prompts).__name__}); one prompt is written [prompt].")
    if not prompts:
        raise ImagenError("prompts: expected at least one prompt, got an empty list.")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ImagenError(f"prompts: expected strings, got {prompt!r} ({type(prompt).__name__}).")
    for stage in stages:
        mode = stage.config.text_encoder.normalize
        for prompt in prompts:
            if not normalize_prompt(prompt, mode).strip():
                raise ImagenError(f"prompt {shorten(prompt)}: the text encoder reads it as empty (text_encoder."
                                  f"normalize {mode} of {stage.checkpoint}), a condition no stage was trained on; "
                                  f"give words or numerals ({unconditional} draws unconditional samples).")


def check_number(value, name: str, low: float, high: float = math.inf, integer: bool = False,
                 where: str = "") -> None:
    """Refuse ``value`` of argument ``name`` (``where``: e.g. " (stage 1)") unless it is a finite
    number (an integer if ``integer``) in [low, high]."""
    kind = numbers.Integral if integer else numbers.Real
    if (isinstance(value, bool) or not isinstance(value, kind)
            or not (isinstance(value, numbers.Integral) or math.isfinite(value)) or not low <= value <= high):
        if high == math.inf:
            bounds = f">= {low:g}"
        else:
            bounds = f"in {low}..{high}" if integer else f"in [{low:g}, {high:g}]"
        got = "" if isinstance(value, numbers.Real) else f", got a {type(value).__name__}"
        raise ImagenError(f"{name} {value!r}{where}: expected {'an integer' if integer else 'a number'} {bounds}{got}.")
