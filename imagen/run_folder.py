"""A training run's folder: what it holds, and when it may be started, resumed or replaced.

A run writes ``config.yaml`` (the resolved stage config), ``checkpoints/step_N/``,
``samples/step_N.png``, ``metrics.jsonl`` and, with ``training.tensorboard``,
``tensorboard/``, and nothing else. Before a run starts,
:func:`check_run_folder` decides from what the folder holds, without touching it:

- missing or empty: a new run starts there;
- a run with checkpoints: ``--resume`` continues it, ``--overwrite`` replaces it;
- a run that stopped before its first checkpoint (``config.yaml`` only): ``--overwrite``
  starts it anew (``--resume`` has nothing to continue);
- anything else (a file, or a folder of other files): refused, whatever the flags.

``--overwrite`` removes the old run's own files only, and only through
:func:`remove_run_files`, which the trainer calls once the new run has been built.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from imagen.checkpoint import CHECKPOINTS, list_checkpoints
from imagen.errors import ImagenError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"  # accelerate's tracker writes there (project_dir / its name)


class RunFolderError(ImagenError):
    """The run folder cannot be used as asked."""


def describe(run_dir: Path) -> str:
    """``missing``, ``empty``, ``run`` (with checkpoints), ``unfinished`` (a run's config.yaml
    but no checkpoint), ``file`` or ``foreign`` (a folder holding something else)."""
    from imagen.config import ConfigError, load_stage_config

    if not run_dir.exists():
        return "missing"
    if not run_dir.is_dir():
        return "file"
    if not any(run_dir.iterdir()):
        return "empty"
    if list_checkpoints(run_dir):
        return "run"
    config = run_dir / CONFIG_FILE
    if config.is_file():
        try:
            load_stage_config(config)
        except ConfigError:
            return "foreign"
        return "unfinished"
    return "foreign"


def refuse_results_in_a_run(output: Path) -> None:
    """Sampling and evaluation results never go into a training run's folder, where they would
    mix with (or, with --overwrite, replace) the run's own files."""
    if describe(output) in ("run", "unfinished"):
        raise RunFolderError(f"--output-dir {output} is a training run's folder; write the results to a folder of "
                             "their own.")


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse what the flags cannot do with ``run_dir``; with ``resume``, return its complete
    checkpoints, newest first (the trainer falls back along them past damaged ones)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; give one of them.")
    kind = describe(run_dir)
    if kind == "file":
        raise RunFolderError(f"--output-dir {run_dir} is a file, not a folder; choose a folder for the run.")
    if kind == "foreign":
        raise RunFolderError(
            f"--output-dir {run_dir} is not empty and holds no training run (no checkpoints/, no config.yaml of a "
            "stage); a run starts only in a new or empty folder, so choose another --output-dir."
        )
    if resume:
        if kind != "run":
            unfinished = (" (it stopped before its first checkpoint; --overwrite starts it anew)"
                          if kind == "unfinished" else "")
            raise RunFolderError(f"--resume: {run_dir} holds no complete checkpoint to resume from{unfinished}.")
        return list_checkpoints(run_dir)[::-1]
    if kind == "run" and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it (its checkpoints, "
            "samples, metrics and config.yaml are removed once the new run is ready), or choose another --output-dir."
        )
    if kind == "unfinished" and not overwrite:
        raise RunFolderError(
            f"{run_dir} holds a run that stopped before its first checkpoint (config.yaml only), so --resume cannot "
            "continue it; pass --overwrite to start it anew or choose another --output-dir."
        )
    return []


def remove_run_files(run_dir: Path) -> None:
    """Delete what a run wrote into ``run_dir`` (its config, checkpoints, sample grids, metrics
    and TensorBoard logs); anything else there stays, and so do folders left non-empty."""
    for name in (CONFIG_FILE, METRICS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    if (run_dir / TENSORBOARD).is_dir():
        shutil.rmtree(run_dir / TENSORBOARD)
    checkpoints = run_dir / CHECKPOINTS
    for folder in list(checkpoints.glob("step_*")) + list(checkpoints.glob(".step_*")):
        shutil.rmtree(folder)
    for grid in (run_dir / SAMPLES).glob("step_*.png"):
        grid.unlink()
    for folder in (checkpoints, run_dir / SAMPLES):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
