"""Throughput accounting: model FLOPs of a training step, model FLOPs utilisation, peak memory.

MFU = achieved model FLOP/s / the device's dense peak for the precision in use. Model FLOPs
are the network's forward and backward (counted by ``torch.utils.flop_counter``, not the
optimizer), so the number compares across frameworks and hardware.
"""

from __future__ import annotations

import contextlib
import os
import resource

import torch

from imagen.config import StageConfig

# Dense peak TFLOP/s per precision (vendor datasheets), matched against the device name in order.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


# Memory bandwidth in TB/s (the same datasheets; the A100's is its 80 GB SXM model's), matched the same way.
PEAK_BANDWIDTH_TBPS = [("H100 PCIe", 2.0), ("H100", 3.35), ("H200", 4.8), ("A100", 2.039)]


def datasheet_entry(table: list, device_name: str):
    """The first entry of ``table`` whose GPU name is in ``device_name``, else None."""
    return next((entry for name, entry in table if name in device_name), None)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of a known GPU for ``precision`` (bf16, fp16, tf32, fp32), else None."""
    peaks = datasheet_entry(PEAK_TFLOPS, device_name)
    return peaks[precision] if peaks is not None else None


def peak_bandwidth_tbps(device_name: str) -> float | None:
    """The memory bandwidth of a known GPU in TB/s, else None."""
    return datasheet_entry(PEAK_BANDWIDTH_TBPS, device_name)


def compute_precision(mixed_precision: str, device: torch.device, allow_tf32: bool) -> str:
    """What the matrix units run at: the autocast dtype, else tf32 or fp32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if device.type == "cuda" and allow_tf32 else "fp32"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def training_flops_per_image(config: StageConfig, text_dim: int, device: torch.device | str = "meta") -> float:
    """Model FLOPs (forward and backward) of one image in a training step of the stage,
    counted over one step of a batch of two on ``device``.

    On the meta device nothing is allocated, so even paper-scale stages are counted in
    seconds on a CPU; there attention is counted as its plain matrix products, which
    gives slightly more than the fused kernels a real device runs (3% on the CPU base
    stage), so count on the training device when it is at hand.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from imagen.stage import build_network

    batch = 2
    with torch.device(device):
        network = build_network(config, text_dim)
    with FlopCounterMode(display=False) as counter:
        training_pass(network, config, text_dim, batch, device)
    return counter.get_total_flops() / batch


def training_pass(network: torch.nn.Module, config: StageConfig, text_dim: int, batch: int,
                  device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> None:
    """One training step's forward (under autocast to ``autocast_dtype`` when given) and backward,
    on a batch of zeros: what is counted of it (FLOPs, bytes) does not depend on the values."""
    from imagen.stage import build_diffusion, training_losses
    from imagen.text import EncodedText

    length, size, channels = config.text_encoder.max_length, config.unet.image_size, config.unet.channels
    with torch.device(device):
        images = torch.zeros(batch, channels, size, size)
        text = EncodedText(torch.zeros(batch, length, text_dim), torch.ones(batch, length, dtype=torch.bool))
    # A plain context without autocast: torch.autocast refuses the meta device even when disabled.
    precision = (torch.autocast(torch.device(device).type, autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    with precision:
        losses = training_losses(network, build_diffusion(config), config, images, text)
    losses["loss"].mean().backward()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else the process's maximum resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_memory_bytes(device: torch.device) -> int:
    """What the device holds in all: a GPU's memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config: StageConfig, text_dim: int, device: torch.device) -> None:
    """Refuse a stage that can never fit on ``device``, before anything is allocated.

    The floor counted is the float32 weights, their gradients, Adam's two moments and the
    EMA copy (five times the parameters), plus one batch of images. Real training needs
    several times that (activations), so only the clearly impossible is refused.
    """
    from imagen.errors import ImagenError
    from imagen.stage import build_network

    training, unet = config.training, config.unet
    try:
        with torch.device("meta"):  # shapes only, whatever the size
            parameters = sum(p.numel() for p in build_network(config, text_dim).parameters())
    except (RuntimeError, OverflowError, MemoryError) as error:
        raise ImagenError(f"unet.base_channels={unet.base_channels} with unet.channel_mults={unet.channel_mults}: "
                          f"the network is too large to build ({error}).") from None
    batch = training.batch_size * unet.channels * unet.image_size**2
    needed = 4 * (5 * parameters + batch)
    available = device_memory_bytes(device) if device.type != "meta" else needed
    if needed > available:
        raise ImagenError(
            f"unet.base_channels={unet.base_channels} and training.batch_size={training.batch_size} need at least "
            f"{needed / 2**30:,.1f} GiB ({parameters:,} parameters with gradients, Adam state and EMA, and one batch "
            f"of images), but the {device.type} has {available / 2**30:,.1f} GiB; choose smaller values."
        )
