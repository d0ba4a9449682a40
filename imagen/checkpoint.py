"""Checkpoints and other files that must never be half-written.

Everything goes through a temporary file or folder and a rename. Checkpoints hold tensors
in safetensors and everything else as JSON or YAML, so loading one never unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from imagen.errors import ImagenError
from imagen.io import to_host, umask_mode

CHECKPOINTS = "checkpoints"
_STEP_FOLDER = re.compile(r"^step_(\d{8})$")
# Written last: a checkpoint folder without it is incomplete and never loaded.
STATE_FILE = "state.json"


class CheckpointError(ImagenError):
    """A checkpoint that is missing, incomplete or does not fit the network."""


def checkpoint_folder(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_FOLDER.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_FOLDER.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict, files: dict[str, str],
                    keep: int | None = None) -> Path:
    """Write a checkpoint folder atomically: ``tensors`` as ``<name>.safetensors``, ``files``
    as text files, ``state`` as JSON; then delete all but the ``keep`` newest checkpoints.

    Everything goes to a hidden staging folder that is renamed into place only when
    complete, so a crash at any moment leaves the previous checkpoints intact.
    """
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    for leftover in folder.parent.glob(".step_*"):  # staging folders of a process killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(staging, umask_mode(0o777))
        for name, named_tensors in tensors.items():
            contiguous = {key: to_host(value).contiguous() for key, value in named_tensors.items()}
            save_file(contiguous, str(staging / f"{name}.safetensors"))
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():  # a stale copy of the same step (e.g. a resumed run repeating it)
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(folder.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (no pickle involved)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found.")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); {DAMAGED}") from None


# What to do about a damaged checkpoint, said by every error about one.
DAMAGED = ("the checkpoint is damaged (e.g. a truncated copy); use an earlier checkpoints/step_N folder of the "
           "run, or --resume, which falls back to the newest intact checkpoint.")
REQUIRED_STATE = ("step", "text_dim")


def load_state(folder: str | os.PathLike) -> dict:
    """A checkpoint's ``state.json``, checked to hold what loading needs."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {STATE_FILE}).")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}); {DAMAGED}") from None
    missing = [key for key in REQUIRED_STATE if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; {DAMAGED}")
    return state


def load_weights_strictly(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into ``module``; any missing, unexpected or
    differently shaped weight is an error, never a partial load."""
    tensors = load_tensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or reshaped:
        details = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped))
            if keys
        )
        raise CheckpointError(
            f"{path}: the weights do not fit the network built from the config ({details}). "
            "The checkpoint comes from a different architecture or stage."
        )
    check_finite_weights(tensors, path)
    module.load_state_dict(tensors, strict=True)


def check_finite_weights(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse weights with NaN or infinite values: they come from a run that diverged."""
    floats = [t for t in tensors.values() if t.is_floating_point()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in floats)
    if bad:
        total = sum(t.numel() for t in floats)
        raise CheckpointError(
            f"{source}: {bad} of {total} weights are NaN or infinite: the run had diverged when this checkpoint "
            "was written, and sampling from it gives blank images. Use an earlier checkpoints/step_N folder, "
            "or --resume, which falls back to the newest checkpoint with finite weights."
        )


def flatten_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state dict (e.g. an optimizer's) into tensors for safetensors and the
    JSON-able rest, so no pickle is ever needed. Inverse: :func:`unflatten_state`."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, key: str):
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, "root")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton) -> dict:
    def walk(value):
        if isinstance(value, dict) and "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if isinstance(value, dict) and "__dict__" in value:
            return {k: walk(v) for k, v in value["__dict__"]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(skeleton)
