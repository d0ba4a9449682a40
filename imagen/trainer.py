"""The training loop shared by every cascade stage.

accelerate handles mixed precision and multi-process runs. :meth:`Trainer.from_config`
builds what a stage trains on: the dataset (kept on the training device), the text
embeddings of every prompt (computed once; the encoder is then released, and the loop
looks embeddings up in a table on the device), the network and its diffusion. A run
folder holds ``config.yaml`` (the resolved config), ``checkpoints/step_N/`` (safetensors
+ JSON, written atomically), ``samples/step_N.png`` sample grids and ``metrics.jsonl``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imagen import scenes
from imagen.captions import DIGIT_WORDS, digit_prompts
from imagen.checkpoint import (
    CheckpointError,
    checkpoint_folder,
    flatten_state,
    latest_checkpoint,
    load_state,
    load_tensors,
    load_weights_strictly,
    save_checkpoint,
    unflatten_state,
)
from imagen.config import (
    ConfigError,
    StageConfig,
    checked_config,
    config_to_dict,
    config_to_yaml,
    load_stage_config,
    save_config,
)
from imagen.data import MNISTScenesDataset, MNISTTextDataset, build_dataset
from imagen.errors import ImagenError
from imagen.io import resolve_device, resolve_mixed_precision, save_png, seeded_generator, to_device, to_host
from imagen.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    SAMPLES,
    TENSORBOARD,
    check_run_folder,
    remove_run_files,
)
from imagen.stage import Diffusion, build_diffusion, build_network, sample_stage, training_losses
from imagen.super_resolution import downsample
from imagen.text import EncodedText, EncoderMismatchError, TextEmbeddingCache, check_text_probes, probe_embeddings
from imagen.throughput import check_memory, peak_memory_mb

# Settings that define what the network is trained to output; a resumed run may not change them.
OUTPUT_DEFINING_KEYS = ("diffusion.formulation", "diffusion.objective", "diffusion.schedule", "diffusion.timesteps",
                        "diffusion.linear_beta_start", "diffusion.linear_beta_end", "diffusion.edm.sigma_data")


class TrainingError(ImagenError):
    """Training cannot go on (a run folder in the way, a non-finite loss, ...)."""


class EMA:
    """Exponential moving average of a network's weights, kept in float32 in its own copy.

    With warmup the decay at optimizer step n is min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, network: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.network = copy.deepcopy(network).float().eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: nn.Module, step: int) -> None:
        """ema <- d * ema + (1 - d) * weights; buffers are copied."""
        # One multi-tensor kernel per group, not two launches per tensor: a GPU step of a 500-tensor
        # U-Net otherwise spends milliseconds launching the average.
        averaged = list(self.network.parameters())
        torch._foreach_lerp_(averaged, [p.detach().float() for p in network.parameters()], 1.0 - self.decay_at(step))
        buffers = list(self.network.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(network.buffers()))


def build_optimizer(network: nn.Module, config: StageConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer; ``fused`` selects the single-kernel CUDA Adam/AdamW."""
    training = config.training
    if training.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Fixed learning rate from our schedule, not Adafactor's relative step size.
        return Adafactor(network.parameters(), lr=training.lr, weight_decay=training.weight_decay,
                         relative_step=False, scale_parameter=False, warmup_init=False)
    optimizer = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
    return optimizer(network.parameters(), lr=training.lr, betas=tuple(training.adam_betas),
                     weight_decay=training.weight_decay, **({"fused": True} if fused else {}))


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimizer state tensor shaped like its parameter that parameter's strides.
    Checkpoints store them contiguous, and CUDA's fused Adam refuses moments laid out otherwise
    than their (channels_last) parameters."""
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def lr_factor(step: int, config: StageConfig) -> float:
    """Linear warmup to the base learning rate, then cosine decay to zero (or constant)."""
    training = config.training
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    if training.lr_schedule == "constant":
        return 1.0
    progress = (step - training.warmup_steps) / max(1, training.max_steps - training.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class GridExamples:
    """What the sample grids show: prompts (N), their text, and for super-resolution the
    ground-truth images (N, C, H, W) whose downsamples are the inputs."""

    prompts: list[str]
    text: EncodedText
    images: torch.Tensor | None = None


def grid_examples(dataset, super_resolution: bool) -> tuple[list[str], torch.Tensor | None]:
    """Prompts (and for super-resolution the ground-truth images) of the sample grids.

    Base stages: all ten digits as words then as numerals (MNIST), ten scene captions of
    every family, held-out ones among them (MNIST scenes), else the first ten captions.
    Super-resolution stages: one real image of each digit with its word, ten canvases with
    their captions, or the first ten captioned images.
    """
    if isinstance(dataset, MNISTScenesDataset):
        specs = scenes.GRID_SPECS
        images = dataset.compose(scenes.draw_layouts(specs, torch.Generator().manual_seed(0)),
                                 torch.Generator().manual_seed(1))
        return [scenes.render(spec) for spec in specs], images if super_resolution else None
    if not super_resolution:
        if isinstance(dataset, MNISTTextDataset):
            return digit_prompts("words") + digit_prompts("numerals"), None
        return dataset.prompts[:10], None
    if isinstance(dataset, MNISTTextDataset):
        indices = [int((dataset.labels == digit).nonzero()[0]) for digit in range(10)]
        prompts = [DIGIT_WORDS[digit] for digit in range(10)]
    else:
        indices = list(range(min(10, len(dataset))))
        prompts = [dataset[i][1] for i in indices]
    return prompts, dataset.get_batch(indices)[0]


def encode_prompts(config: StageConfig, dataset) -> tuple[EncodedText, GridExamples, EncodedText]:
    """The text of every distinct prompt of ``dataset`` (rows in ``dataset.prompts`` order), the
    grid examples and the encoder's probe embeddings (its fingerprint), encoded once; the
    encoder is released afterwards."""
    cache = TextEmbeddingCache.from_config(config.text_encoder)
    grid_prompts, grid_images = grid_examples(dataset, config.is_super_resolution)
    cache.precompute(dataset.prompts + grid_prompts)
    table = cache.encode(dataset.prompts)
    grid = GridExamples(grid_prompts, cache.encode(grid_prompts), grid_images)
    probes = probe_embeddings(cache)
    cache.release_encoder()  # the encoder never runs inside a training step
    return table, grid, probes


def make_accelerator(config: StageConfig, run_dir: Path):
    """accelerate's view of this process: mixed precision, gradient accumulation, process group.
    The trainer places tensors itself (``device_placement=False``), on the device it is given."""
    from accelerate import Accelerator

    training = config.training
    try:
        return Accelerator(
            # Several processes without GPUs (accelerate launch on CPU machines) form a gloo group
            # only when accelerate is told to use the CPU.
            cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
            mixed_precision=resolve_mixed_precision(training.mixed_precision, resolve_device("auto"),
                                                    key="training.mixed_precision"),
            gradient_accumulation_steps=training.grad_accum_steps,
            device_placement=False,
            log_with="tensorboard" if training.tensorboard else None,
            project_dir=str(run_dir),
        )
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        raise TrainingError(
            f"training.mixed_precision {training.mixed_precision}: this Python process already trained with another "
            "precision, and accelerate keeps one per process. Train with the same precision, or restart the process "
            "(in a notebook, the kernel) to change it."
        ) from None


class Trainer:
    """Trains one stage: ``train()`` runs to ``training.max_steps`` optimizer steps, or until
    ``training.max_minutes`` have passed since ``started``.

    It is handed what it trains: the network (on the CPU; the trainer moves it), the
    diffusion, the dataset, the text table (one row per ``dataset.prompts`` entry; None for a
    dataset whose batches bring their text) and the grid examples. :meth:`from_config` builds
    all of them from a stage config, as the training scripts do. ``device`` defaults to
    accelerate's (this process's GPU, or the CPU).
    """

    def __init__(self, config: StageConfig, run_dir: str | Path, *, network: nn.Module,
                 diffusion: Diffusion, dataset, text_table: EncodedText | None, grid: GridExamples,
                 text_probes: EncodedText | None = None, accelerator=None, device: torch.device | str | None = None,
                 started: float | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        training = config.training
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config, self.run_dir)
        self.device = torch.device(device) if device is not None else self.accelerator.device
        started = time.monotonic() if started is None else started
        self.deadline = None if training.max_minutes is None else started + 60.0 * training.max_minutes
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = training.allow_tf32
            torch.backends.cudnn.allow_tf32 = training.allow_tf32
        self.memory_format = torch.channels_last if training.channels_last else torch.contiguous_format

        self.dataset = dataset
        self.text_table = text_table.to(self.device) if text_table is not None else None
        self.grid = grid
        self.text_probes = text_probes  # saved with every checkpoint, compared on loading
        self.text_dim = grid.text.embeddings.shape[-1]
        self.diffusion = diffusion
        network = network.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(network, training.ema_decay, training.ema_warmup)
        optimizer = build_optimizer(network, config, fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
        self.network, self.optimizer = self.accelerator.prepare(network, optimizer)
        # The compiled forward shares the network's parameters; saving and EMA use the plain module.
        self.forward = torch.compile(self.network) if training.compile else self.network
        rank = self.accelerator.process_index
        if hasattr(dataset, "distribute"):  # a streamed dataset gives each process its own share
            dataset.distribute(rank, self.accelerator.num_processes)
        # Batches (CPU) and noise/timesteps/dropping (device) draw from their own seeded generators,
        # whose seeds differ for every seed and rank.
        self.data_generator = torch.Generator().manual_seed(training.seed * 7919 + 2 * rank)
        self.noise_generator = seeded_generator(self.device, training.seed * 104729 + 2 * rank + 1)
        self.step = 0
        self.first_bad_loss = torch.zeros(2, device=self.device)  # (step, loss) of the first non-finite loss
        self.interval = self._new_interval()
        self.epoch = 0  # the dataset starts at epoch 0; MNIST redraws word/numeral prompts per epoch

    @classmethod
    def from_config(cls, config: StageConfig, run_dir: str | Path | None = None, resume: bool = False,
                    overwrite: bool = False, device: torch.device | str | None = None) -> "Trainer":
        """Everything a stage trains on, built from its config (validated again, for changes made
        in code): a new run in ``run_dir`` (default ``training.output_dir``), or with ``resume``
        the run there continued from its latest checkpoint. The trainer keeps a validated copy:
        later changes go to ``trainer.config``."""
        from accelerate.utils import set_seed

        started = time.monotonic()  # training.max_minutes counts the setup too
        config = checked_config(config)
        run_dir = Path(config.training.output_dir if run_dir is None else run_dir)
        # Nothing in run_dir changes until the new run is built: an old run is replaced only then.
        resume_from = check_run_folder(run_dir, resume, overwrite)
        accelerator = make_accelerator(config, run_dir)
        set_seed(config.training.seed)
        device = torch.device(device) if device is not None else accelerator.device
        dataset = build_dataset(config.data, config.unet.image_size, config.unet.channels, device,
                                config.text_encoder)
        if dataset.prompts is None:  # shards: every batch brings its text, the encoder is never loaded
            prompts, text, images = dataset.examples()
            text_table, grid, probes = None, GridExamples(prompts, text, images if config.is_super_resolution
                                                          else None), dataset.dataset.probes()
            text_dim = dataset.text_dim
        else:
            text_table, grid, probes = encode_prompts(config, dataset)
            text_dim = text_table.embeddings.shape[-1]
        check_memory(config, text_dim, device)
        trainer = cls(config, run_dir, network=build_network(config, text_dim), diffusion=build_diffusion(config),
                      dataset=dataset, text_table=text_table, grid=grid, text_probes=probes, accelerator=accelerator,
                      device=device, started=started)
        trainer.check_batch()
        if resume_from:
            trainer.resume(resume_from)
        elif accelerator.is_main_process:
            if overwrite:
                remove_run_files(run_dir)
            save_config(config, run_dir / CONFIG_FILE)
        return trainer

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Write ``checkpoints/step_N`` (main process only)."""
        folder = checkpoint_folder(self.run_dir, self.step)
        self.check_weights()  # on every process, so that all stop together
        if not self.accelerator.is_main_process:
            return folder
        optimizer_tensors, optimizer_skeleton = flatten_state(self.optimizer.state_dict())
        rng = {"torch": torch.get_rng_state(), "data": self.data_generator.get_state(),
               "noise": self.noise_generator.get_state()}  # generator states are CPU byte tensors, also for CUDA
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        state = {
            "step": self.step,
            "noise_device": self.noise_generator.device.type,
            "text_dim": self.text_dim,
            "unet_type": self.config.unet.type,
            "optimizer": optimizer_skeleton,
            "scheduler": self.scheduler.state_dict(),
        }
        tensors = {
            "model": self.accelerator.unwrap_model(self.network).state_dict(),
            "ema": self.ema.network.state_dict(),
            "optimizer": optimizer_tensors,
            "rng": rng,
        }
        if self.text_probes is not None:
            tensors["text_probes"] = dict(self.text_probes._asdict())
        config = checked_config(self.config, "trainer.config")  # a change made in code, refused before any write
        saved = save_checkpoint(folder, tensors, state, {CONFIG_FILE: config_to_yaml(config)},
                                keep=config.training.keep_checkpoints)
        save_config(config, self.run_dir / CONFIG_FILE)  # the run's config is its latest checkpoint's
        return saved

    def resume(self, checkpoints: list[Path]) -> Path:
        """Continue from the newest of ``checkpoints`` (newest first) that loads. A damaged one
        is skipped with a message saying why and renamed ``damaged_step_N``: kept for the user,
        but no longer taken for the run's latest checkpoint by sampling or pruning."""
        reasons = []
        for folder in checkpoints:
            try:
                self.load(folder)
            except CheckpointError as error:
                reasons.append(f"{folder.name}: {error}")
                continue
            for damaged, reason in zip(checkpoints, reasons):
                kept = damaged.with_name(f"damaged_{damaged.name}")
                if self.accelerator.is_main_process:
                    damaged.rename(kept)
                self.accelerator.print(f"skipped the damaged checkpoint {damaged.name}, renamed {kept} ({reason})")
            self.accelerator.print(f"resuming from {folder} (step {self.step})")
            return folder
        raise TrainingError(f"--resume: no checkpoint of {self.run_dir} can be loaded. " + " ".join(reasons))

    def load(self, folder: Path) -> None:
        """Continue from checkpoint ``folder``: weights, EMA, optimizer, schedule, random state.
        Anything unreadable in it is a CheckpointError (resume then falls back); a checkpoint
        made with another text encoder is refused. Settings changed since are applied: the
        learning rate, weight decay and betas come from the current config."""
        self.check_encoder(folder)
        try:
            state = load_state(folder)
            saved = load_stage_config(folder / CONFIG_FILE)
            load_weights_strictly(self.accelerator.unwrap_model(self.network), folder / "model.safetensors")
            load_weights_strictly(self.ema.network, folder / "ema.safetensors")
            optimizer_tensors = load_tensors(folder / "optimizer.safetensors")
            self.optimizer.load_state_dict(unflatten_state(optimizer_tensors, state["optimizer"]))
            match_parameter_layouts(self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            rng = load_tensors(folder / "rng.safetensors")
            torch.set_rng_state(rng["torch"])
            self.data_generator.set_state(rng["data"])
        except (ConfigError, KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{folder}: cannot be loaded ({type(error).__name__}: {error}).") from None
        before, now = _flat(config_to_dict(saved)), _flat(config_to_dict(self.config))
        changed = [key for key, value in now.items() if before.get(key) != value]
        redefining = [key for key in changed if key in OUTPUT_DEFINING_KEYS]
        if redefining:
            changes = ", ".join(f"{key} ({before.get(key)} -> {now[key]})" for key in redefining)
            raise TrainingError(
                f"{folder}: resuming would change {changes}, "
                "which changes what the network's output means, so the trained weights would be wrong for it. "
                "Resume with the run's own settings, or start a new run in another --output-dir.")
        if changed:
            changes = ", ".join(f"{key} {before.get(key)} -> {now[key]}" for key in changed)
            self.accelerator.print(f"resuming with changed settings: {changes}")
        self.step = state["step"]
        if hasattr(self.dataset, "seek"):  # a streamed dataset continues its order where it stopped
            training = self.config.training
            self.dataset.seek(self.step * training.batch_size * training.grad_accum_steps)
        self.apply_optimizer_settings()
        self.restore_device_random_state(rng, state.get("noise_device"))

    def apply_optimizer_settings(self) -> None:
        """The learning rate schedule, weight decay and Adam betas of the current config, over the
        optimizer state just loaded (which holds the values it was saved with)."""
        training = self.config.training
        self.scheduler.base_lrs = [training.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = training.lr
            group["lr"] = training.lr * lr_factor(self.step, self.config)
            group["weight_decay"] = training.weight_decay
            if "betas" in group:
                group["betas"] = tuple(training.adam_betas)

    def restore_device_random_state(self, rng: dict, saved_on: str | None) -> None:
        """The noise generator's and CUDA's random state, when they were saved on this kind of
        device; a checkpoint moved between CPU and GPU draws fresh, seeded noise instead."""
        here = self.noise_generator.device.type
        if saved_on not in (None, here):
            self.noise_generator.manual_seed(self.config.training.seed * 104729 + self.step)
            self.accelerator.print(f"the checkpoint's random state was saved on a {saved_on} device; this {here} run "
                                   "continues with fresh seeded noise, so it does not repeat the original exactly.")
            return
        try:
            self.noise_generator.set_state(rng["noise"])
        except RuntimeError as error:
            raise CheckpointError(f"the checkpoint's noise generator state does not fit ({error}).") from None
        if torch.cuda.is_available() and "cuda0" in rng:
            states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
            torch.cuda.set_rng_state_all(states)

    # ------------------------------------------------------------------ sampling

    def write_sample_grid(self) -> Path:
        """``samples/step_N.png`` from the EMA weights with a fixed seed, one row per line:

        base: per guidance weight, the ten digits as words, then as numerals (MNIST);
        super-resolution: the low-res input, the output per guidance weight, the ground truth.
        """
        rows = []
        low_res = None
        if self.grid.images is not None:
            size = self.config.unet.image_size
            low_res = downsample(self.grid.images, self.config.super_resolution.low_res_size)
            rows.append(F.interpolate(low_res, size=(size, size), mode="nearest"))
        for weight in self.config.training.sample_guidance:
            rows.append(sample_stage(self.ema.network, self.diffusion, self.config, self.grid.text, guidance=weight,
                                     generator=seeded_generator(self.device, self.config.training.seed),
                                     low_res=low_res))
        if self.grid.images is not None:
            rows.append(self.grid.images)
        path = self.run_dir / SAMPLES / f"step_{self.step:08d}.png"
        save_png(rows, path, columns=10)  # the rows may live on different devices; save_png joins them on the host
        return path

    # ------------------------------------------------------------------ training

    def next_batch(self) -> tuple[torch.Tensor, EncodedText]:
        """The next training batch on the training device: images (B, C, H, W), their text."""
        training = self.config.training
        epoch = self.step * training.batch_size * training.grad_accum_steps // len(self.dataset)
        if epoch != self.epoch and isinstance(self.dataset, MNISTTextDataset):
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        images, text = self.dataset.sample_batch(training.batch_size, self.data_generator)
        # Text comes as rows of the table (prompt indices) or, from shards, with the batch. MNIST,
        # scenes and shards hand over device tensors already; a caption folder's are copied here.
        text = self.text_table.rows(to_device(text, self.device)) if self.text_table is not None else text
        return to_device(images, self.device).contiguous(memory_format=self.memory_format), text

    def _micro_step(self) -> dict[str, torch.Tensor]:
        images, text = self.next_batch()
        with self.accelerator.autocast():
            losses = training_losses(self.forward, self.diffusion, self.config, images, text,
                                     generator=self.noise_generator)
        loss = losses["loss"].float().mean()
        # Remember the first non-finite loss on the device; check_finite() reads it only when a
        # log line or checkpoint is due, so steps never wait for the accelerator.
        first = self.first_bad_loss[0] == 0
        bad = first & ~torch.isfinite(loss)
        # torch.full, not torch.tensor: a copy from the host would make the host wait for the GPU.
        self.first_bad_loss = torch.where(bad, torch.stack([torch.full((), self.step + 1.0, device=loss.device),
                                                            loss.detach()]), self.first_bad_loss)
        self.accelerator.backward(loss)
        return losses

    def check_encoder(self, folder: Path) -> None:
        """Refuse a checkpoint whose text encoder gives other embeddings than this run's."""
        if self.text_probes is None:
            return
        try:
            check_text_probes(folder, self.config.text_encoder.name, self.text_probes)
        except EncoderMismatchError as error:  # every checkpoint of the run shares the encoder: no fallback
            raise TrainingError(str(error)) from None

    def check_weights(self) -> None:
        """Stop, before anything is written, if a weight of the network or its EMA is NaN or infinite."""
        network = self.accelerator.unwrap_model(self.network)
        parameters = list(network.parameters()) + list(self.ema.network.parameters())
        bad = torch.stack([(~torch.isfinite(p)).sum() for p in parameters]).sum()  # one read of the device
        if int(to_host(bad)):
            raise TrainingError(
                f"the weights became NaN or infinite by step {self.step} (the loss may still have been finite); "
                f"training stopped without writing a checkpoint. {self._kept()} Try a lower training.lr, "
                "training.grad_clip, or mixed_precision: no."
            )

    def _kept(self) -> str:
        kept = latest_checkpoint(self.run_dir)
        return f"The newest good checkpoint, {kept}, is kept." if kept else "No checkpoint had been written yet."

    def check_batch(self) -> None:
        """Assemble one batch the way training does, so a dataset that cannot give one fails
        before anything is written (from a generator of its own: the run's is not advanced)."""
        if self.text_table is None:  # shards: reading one item checks the folder without taking a batch
            self.dataset.dataset[0]
            return
        images, prompt_indices = self.dataset.sample_batch(self.config.training.batch_size, torch.Generator())
        self.text_table.rows(prompt_indices.to(self.device))
        images.to(self.device)

    def check_finite(self) -> None:
        """Stop, before anything is written, if a loss since the start was NaN or infinite."""
        step, value = to_host(self.first_bad_loss).tolist()
        if step:
            raise TrainingError(
                f"the loss became {value} at step {int(step)}; training stopped without writing a checkpoint. "
                f"{self._kept()} Try a lower training.lr or mixed_precision: no."
            )

    def out_of_time(self) -> bool:
        """Whether ``training.max_minutes`` have passed. With several processes the main one
        decides, at log steps only, so that every process stops after the same step."""
        if self.deadline is None:
            return False
        expired = time.monotonic() >= self.deadline
        if self.accelerator.num_processes == 1:
            return expired
        if self.step % self.config.training.log_every:
            return False
        from accelerate.utils import broadcast

        decision = broadcast(torch.tensor([float(expired)], device=self.accelerator.device), from_process=0)
        return bool(to_host(decision)[0])

    @staticmethod
    def _new_interval() -> dict:
        """What the next log line averages; losses stay tensors on the device until then."""
        return {"loss": [], "noise_quartile": [], "grad_norm": [], "images": 0, "start": time.perf_counter()}

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum_steps`` micro-batches, then the EMA update."""
        training = self.config.training
        accelerator = self.accelerator
        interval = self.interval
        for _ in range(training.grad_accum_steps):
            with accelerator.accumulate(self.network):
                losses = self._micro_step()
                if accelerator.sync_gradients:  # the last micro-batch of this optimizer step
                    clip = training.grad_clip if training.grad_clip is not None else float("inf")
                    interval["grad_norm"].append(accelerator.clip_grad_norm_(self.network.parameters(), clip))
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            interval["loss"].append(losses["mse"].detach().float())
            interval["noise_quartile"].append(losses["noise_quartile"])
            interval["images"] += losses["loss"].numel() * accelerator.num_processes
        self.step += 1
        self.ema.update(accelerator.unwrap_model(self.network), self.step)

    def train(self, until: int | None = None) -> None:
        """Train to ``training.max_steps`` or, if given, stop early after step ``until`` (with a
        checkpoint there), or when ``training.max_minutes`` run out (with a checkpoint and a
        sample grid there); the learning-rate schedule always follows ``max_steps``."""
        training = self.config.training
        accelerator = self.accelerator
        stop = training.max_steps if until is None else min(until, training.max_steps)
        if training.tensorboard:
            accelerator.init_trackers(TENSORBOARD)
        self.network.train()
        self.interval = self._new_interval()
        if self.step >= training.max_steps:
            accelerator.print(f"the run is at step {self.step}, training.max_steps {training.max_steps}: nothing to "
                              "train (raise training.max_steps with --set to train it on).")
        progress = tqdm(total=training.max_steps, initial=self.step, desc="train", unit="step",
                        disable=not accelerator.is_main_process, dynamic_ncols=True)
        while self.step < stop:
            self.train_step()
            progress.update(1)
            out_of_time = self.out_of_time()
            last = self.step == stop or out_of_time
            if self.step % training.log_every == 0 or last:
                self.check_finite()
                record = self._log(self.interval, time.perf_counter() - self.interval["start"])
                progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                self.interval = self._new_interval()
            if self.step % training.checkpoint_every == 0 or last:
                self.check_finite()
                self.save()
            if accelerator.is_main_process and (self.step % training.sample_every == 0
                                                or self.step == training.max_steps or out_of_time):
                self.write_sample_grid()
            if out_of_time:
                accelerator.print(f"training.max_minutes={training.max_minutes:g} reached after step {self.step}: "
                                  f"checkpoint and sample grid written; --resume continues the run.")
                break
        progress.close()
        accelerator.end_training()

    def _log(self, interval: dict, elapsed: float) -> dict:
        losses, quartile = to_host(torch.cat(interval["loss"])), to_host(torch.cat(interval["noise_quartile"]))
        grad_norms = [to_host(torch.as_tensor(g)).float() for g in interval["grad_norm"]]
        record = {
            "step": self.step,
            "loss": float(losses.mean()),
            **{f"loss_q{q}": float(losses[quartile == q].mean()) for q in range(4) if (quartile == q).any()},
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(torch.stack(grad_norms).mean()) if grad_norms else 0.0,
            "img_per_s": interval["images"] / max(elapsed, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.accelerator.is_main_process:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.config.training.tensorboard:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
