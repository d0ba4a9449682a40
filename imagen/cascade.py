"""The whole cascade: trained stages loaded from their run folders and sampled end to end.

    cascade = Cascade.from_checkpoints(["runs/mnist_cpu/base", "runs/mnist_cpu/sr"])
    out = cascade.sample(["seven", "3"], guidance=[3.0, 3.0], seed=0)
    out.images      # (2, 1, 32, 32) in [-1, 1]: the last stage's output
    out.stages[0]   # (2, 1, 16, 16): the base stage's output, fed to stage 1 as its low_res

Each stage is rebuilt from the config.yaml saved in its checkpoint and loaded strictly;
stages that do not chain (size or channels) are refused before anything is sampled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imagen.checkpoint import (
    CHECKPOINTS,
    STATE_FILE,
    CheckpointError,
    checkpoint_folder,
    latest_checkpoint,
    load_state,
    load_weights_strictly,
)
from imagen.config import MAX_SEED, StageConfig, check_stage_order, load_stage_config
from imagen.diffusion import THRESHOLD_MODES
from imagen.errors import ImagenError
from imagen.inputs import check_number, check_prompts, checked_images, python_value
from imagen.io import resolve_device, seeded_generator
from imagen.samplers import Inpainting
from imagen.stage import Diffusion, build_diffusion, build_network, check_stage_settings, sample_stage
from imagen.super_resolution import downsample
from imagen.text import EncodedText, TextEmbeddingCache, check_text_probes, probe_embeddings

T = TypeVar("T")


@dataclass
class Stage:
    """One trained stage, ready to sample."""

    checkpoint: Path
    step: int
    config: StageConfig
    network: nn.Module
    diffusion: Diffusion


def load_stage(path: str | Path, device: torch.device | str = "auto", weights: str = "ema") -> Stage:
    """A stage from a run folder (its latest checkpoint) or from one ``checkpoints/step_N`` folder.

    ``weights``: ``ema`` (default) or ``model`` (the raw training weights).
    """
    if weights not in ("ema", "model"):
        raise ImagenError(f"weights {weights!r}: expected 'ema' (the averaged weights) or 'model' (the raw ones).")
    device = resolve_device(device, "device")
    path = Path(path)
    step = re.fullmatch(r"step_(\d+)", path.name)
    if step and path.parent.name == CHECKPOINTS and not path.exists():  # step_1550 names step_00001550
        path = checkpoint_folder(path.parent.parent, int(step[1]))
    if not path.is_dir():
        problem = "is a file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint folder {path} {problem} (expected a run folder or one of its "
                              "checkpoints/step_NNNNNNNN folders).")
    checkpoint = path if (path / STATE_FILE).is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (expected checkpoints/step_N/ with {STATE_FILE}, written by "
            "training)."
        )
    config = load_stage_config(checkpoint / "config.yaml")
    state = load_state(checkpoint)
    network = build_network(config, state["text_dim"])
    load_weights_strictly(network, checkpoint / f"{weights}.safetensors")
    return Stage(checkpoint, state["step"], config, network.to(device).eval(), build_diffusion(config))


def per_stage(value: T | Sequence[T] | None, count: int, name: str) -> list[T | None]:
    """One setting per stage: None (each stage's default), a single value (or a list of one), or a
    list of ``count``."""
    value = python_value(value)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ImagenError(f"{name}: got {len(value)} values for a cascade of {count} stages; give one value "
                              f"or exactly one per stage.")
        return list(value)
    return [value] * count


def inpainting_at(size: int, images: torch.Tensor, masks: torch.Tensor, resample: int) -> Inpainting:
    """What a stage of ``size`` keeps of ``images`` (B, C, H, W): the images resized to it
    (antialiased when shrinking), and every pixel whose share of the mask (1: draw) is
    below one half."""
    images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    drawn = F.interpolate(masks.float(), size=(size, size), mode="area") >= 0.5
    return Inpainting(images.clamp(-1.0, 1.0), (~drawn).float(), resample)


@dataclass
class CascadeOutput:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1], the last stage's output
    stages: list[torch.Tensor]  # each stage's output, base first


class Cascade:
    """A base stage followed by super-resolution stages, each taking the previous output."""

    def __init__(self, stages: Sequence[Stage], super_resolution_first: bool = False):
        """``super_resolution_first``: the chain starts at a super-resolution stage and
        :meth:`sample` takes its ``low_res`` images (to evaluate SR stages on real inputs)."""
        check_stage_order([stage.config for stage in stages], [str(stage.checkpoint) for stage in stages],
                          super_resolution_first, start_hint="; to start at a super-resolution stage, give its input "
                          "images (sample_imagen.py --low-res, or Cascade(stages, super_resolution_first=True))")
        self.stages = list(stages)
        self._text_caches: dict[tuple, TextEmbeddingCache] = {}
        self._checked: set[Path] = set()  # checkpoints whose text encoder was compared with this machine's

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], device: str = "auto", weights: str = "ema") -> "Cascade":
        """The stages in ``paths`` (run or checkpoint folders), base first. A chain that starts at
        a super-resolution stage is ``Cascade([load_stage(...)], super_resolution_first=True)``."""
        if isinstance(paths, (str, Path)):
            raise ImagenError(f"paths: expected a list of run folders, base stage first, got the single path "
                              f"{str(paths)!r}; one stage is written [path].")
        target = resolve_device(device, "device")
        return cls([load_stage(path, target, weights) for path in paths])

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].network.parameters()).device

    def encode(self, stage: Stage, prompts: Sequence[str]) -> EncodedText:
        """Text for one stage; stages sharing an encoder share its cache. The first time, the
        stage's checkpoint is checked to have been trained with this very encoder."""
        encoder = stage.config.text_encoder
        key = (encoder.name, encoder.max_length, encoder.dtype, encoder.normalize)
        if key not in self._text_caches:
            self._text_caches[key] = TextEmbeddingCache.from_config(encoder)
        cache = self._text_caches[key]
        if stage.checkpoint not in self._checked:
            check_text_probes(stage.checkpoint, encoder.name, probe_embeddings(cache))
            self._checked.add(stage.checkpoint)
        return cache.encode(prompts)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], *, guidance=None, steps=None, sampler=None, thresholding=None,
               sample_aug_level=None, seed: int = 0, batch_size: int | None = None,
               low_res: torch.Tensor | None = None, init_images: torch.Tensor | None = None,
               strength: float = 1.0, inpaint_images: torch.Tensor | None = None,
               inpaint_masks: torch.Tensor | None = None, inpaint_resample: int = 1,
               progress: bool = False) -> CascadeOutput:
        """Images for ``prompts``. Every setting is one value for all stages or a list with one per
        stage; None keeps each stage's ``sampling`` defaults. The same seed, settings and batch
        size give identical images. ``low_res`` (N, C, h, w) feeds a chain that starts at a
        super-resolution stage. ``init_images`` (N, C, H, W), with ``strength`` in [0, 1], make
        the base stage edit them (image-to-image) rather than sample from noise; the later
        stages run as usual. ``inpaint_images`` (N, C, H, W) and ``inpaint_masks`` (N, 1, H, W),
        1 where to draw, make every stage keep the rest of the image (RePaint;
        ``inpaint_resample`` repeats each step with the ddpm sampler). Images are square, in
        [-1, 1], one per prompt, on any device, and resized to the size their stage takes
        (antialiased bicubic as in training; inpainting bilinear); anything else is refused
        with an :class:`ImagenError`."""
        count = len(self.stages)
        first_stage = self.stages[0].config
        check_prompts(prompts, self.stages)
        seed, batch_size, strength, inpaint_resample = map(python_value, (seed, batch_size, strength, inpaint_resample))
        check_number(seed, "seed", 0, MAX_SEED, integer=True)
        if batch_size is not None:
            check_number(batch_size, "batch_size", 1, integer=True)
        check_number(strength, "strength", 0.0, 1.0)
        if strength != 1.0 and init_images is None:
            raise ImagenError(f"strength {strength} says how much of init_images to redraw, but none are given.")
        check_number(inpaint_resample, "inpaint_resample", 1, integer=True)
        if inpaint_resample > 1 and inpaint_images is None:
            raise ImagenError(f"inpaint_resample {inpaint_resample} repeats the steps of inpainting, but no "
                              "inpaint_images are given.")
        if (low_res is not None) != (first_stage.super_resolution is not None):
            raise ImagenError("low_res images are given exactly when the first stage is a super-resolution stage.")
        if init_images is not None and low_res is not None:
            raise ImagenError("image-to-image edits the base stage's images: give init_images or low_res, not both.")
        if (inpaint_images is None) != (inpaint_masks is None):
            raise ImagenError("inpaint_images and inpaint_masks go together: the images and where to draw in them.")
        channels = first_stage.unet.channels
        # Resized as training makes low-res images (downsample, which enlarges too).
        if low_res is not None:
            low_res = checked_images(low_res, "low_res", len(prompts), channels)
            if low_res.shape[-1] != first_stage.super_resolution.low_res_size:
                low_res = downsample(low_res, first_stage.super_resolution.low_res_size)
        if init_images is not None:
            init_images = checked_images(init_images, "init_images", len(prompts), channels)
            if init_images.shape[-1] != first_stage.unet.image_size:
                init_images = downsample(init_images, first_stage.unet.image_size)
        if inpaint_images is not None:
            inpaint_images = checked_images(inpaint_images, "inpaint_images", len(prompts), channels)
            inpaint_masks = checked_images(inpaint_masks, "inpaint_masks", len(prompts), 1, low=0.0)
        guidance, steps, sampler = (per_stage(guidance, count, "guidance"), per_stage(steps, count, "steps"),
                                    per_stage(sampler, count, "sampler"))
        thresholding = per_stage(thresholding, count, "thresholding")
        first = 0 if low_res is not None else 1  # the first stage that takes low_res
        aug_levels = [None] * first + per_stage(sample_aug_level, count - first, "sample_aug_level")
        for index in range(count):
            for name, values, low, high, integer in (("guidance", guidance, 0.0, math.inf, False),
                                                     ("steps", steps, 1, math.inf, True),
                                                     ("sample_aug_level", aug_levels, 0.0, 1.0, False)):
                if values[index] is not None:
                    check_number(values[index], name, low, high, integer, where=f" (stage {index})")
            if thresholding[index] is not None and thresholding[index] not in THRESHOLD_MODES:
                raise ImagenError(f"thresholding {thresholding[index]!r} (stage {index}): expected one of "
                                  f"{', '.join(THRESHOLD_MODES)}.")
        # NumPy scalars inside a list pass the checks but not every torch call.
        guidance, aug_levels = ([None if v is None else float(v) for v in values] for values in (guidance, aug_levels))
        steps = [None if v is None else int(v) for v in steps]
        check_stage_settings([stage.config for stage in self.stages], sampler, steps)
        samplers = [chosen or stage.config.sampling.sampler for chosen, stage in zip(sampler, self.stages)]
        if inpaint_resample > 1 and set(samplers) != {"ddpm"}:
            raise ImagenError(f"inpaint_resample {inpaint_resample} runs the ddpm formulation's ancestral sampler, but "
                              f"the stages sample with {', '.join(samplers)}: pass sampler='ddpm' (ddpm stages only).")
        outputs: list[torch.Tensor] = [] if low_res is None else [low_res]
        for index, stage in enumerate(self.stages):
            text = self.encode(stage, prompts)
            size = batch_size or stage.config.sampling.batch_size
            batches = range(0, len(prompts), size)
            edits = index == 0 and init_images is not None
            stage_steps = steps[index] or stage.config.sampling.steps
            total = (round(strength * stage_steps) if edits else stage_steps) * len(batches)
            bar = tqdm(total=total, desc=f"stage {index} ({stage.config.unet.image_size}px)", disable=not progress,
                       unit="step", dynamic_ncols=True)
            images = []
            for start in batches:
                generator = seeded_generator(self.device, seed + 1_000_003 * index + start)
                chunk = slice(start, start + size)
                images.append(sample_stage(
                    stage.network, stage.diffusion, stage.config, EncodedText(text.embeddings[chunk], text.mask[chunk]),
                    guidance=guidance[index], steps=steps[index], sampler=sampler[index],
                    thresholding=thresholding[index], generator=generator,
                    low_res=outputs[-1][chunk] if outputs else None,
                    aug_level=aug_levels[index],
                    init=init_images[chunk] if edits else None, strength=strength if edits else 1.0,
                    inpaint=None if inpaint_images is None else inpainting_at(
                        stage.config.unet.image_size, inpaint_images[chunk], inpaint_masks[chunk], inpaint_resample),
                    on_step=lambda _: bar.update(1),
                ))
            bar.close()
            outputs.append(torch.cat(images))
        if low_res is not None:
            outputs = outputs[1:]
        return CascadeOutput(outputs[-1], outputs)
