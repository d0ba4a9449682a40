"""What the scripts share: stage-config arguments, and user errors as one-paragraph messages."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from imagen.config import MAX_SEED, StageConfig, load_cascade_config, load_stage_config
from imagen.errors import ImagenError, PromptWarning


def add_stage_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--config`` (``example`` its example), repeatable ``--set key.path=value``, ``--output-dir``,
    ``--resume``, ``--overwrite`` and ``--debug``."""
    parser.add_argument("--config", required=True, help=f"stage YAML file, e.g. {example}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set training.batch_size=64",
    )
    parser.add_argument("--output-dir", help="run folder (default: training.output_dir from the config)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in the run folder and start anew")
    add_debug_argument(parser)


def add_stage_sources(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """The trained stages a script reads: ``flag`` (run or checkpoint folders, base first) or
    ``--cascade FILE``, whose stages' ``training.output_dir`` folders are used."""
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument(flag, **kwargs)
    sources.add_argument("--cascade", help="a cascade file, e.g. configs/mnist_cpu/cascade.yaml: sample the run "
                         "folders its stages train into (their training.output_dir)")


def stage_folders(args: argparse.Namespace, flag: str) -> list[str]:
    """The folders given by ``flag`` or, with ``--cascade``, the cascade's run folders."""
    if args.cascade is None:
        return list(getattr(args, flag.lstrip("-")))
    return [str(folder) for folder in load_cascade_config(args.cascade).run_folders]


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def load_config_from_args(args: argparse.Namespace) -> StageConfig:
    """The stage config named by ``--config`` with every ``--set`` applied and validated."""
    return load_stage_config(args.config, args.set)


def per_stage_values(text: str | None, name: str, kind: type, choices=None) -> list | None:
    """'5' -> [5]; '5,3' -> [5, 3]; validated."""
    if text is None:
        return None
    values = []
    for item in text.split(","):
        try:
            value = kind(item.strip())
        except ValueError:
            raise ImagenError(f"{name} {text}: {item.strip()!r} is not a valid {kind.__name__}; give one value or "
                              "a comma-separated value per stage.") from None
        if choices is not None and value not in choices:
            raise ImagenError(f"{name} {text}: unknown {value!r}; expected one of {', '.join(choices)}.")
        if kind is int and value < 1:
            raise ImagenError(f"{name} {text}: step counts must be positive integers.")
        if kind is float and not (math.isfinite(value) and value >= 0):
            raise ImagenError(f"{name} {text}: guidance weights must be finite numbers >= 0.")
        values.append(value)
    return values


def check_seed(seed: int, name: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ImagenError(f"{name} {seed}: expected a seed in 0..{MAX_SEED}.")


# A prompt file with many odd prompts would bury the run's output in warnings.
MAX_PROMPT_WARNINGS = 10


def run_script(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a user error prints ``error: <message>`` and returns exit code 2.

    With ``--debug`` the original traceback is shown instead. A :class:`PromptWarning` prints as
    one line; after the first :data:`MAX_PROMPT_WARNINGS`, the rest are counted in one last line.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug, python_show = "--debug" in arguments, warnings.showwarning
    prompt_warnings = 0

    def show_prompt_warnings_briefly(message, category, filename, lineno, file=None, line=None) -> None:
        """A prompt warning as one line (it names the prompt); any other keeps Python's format and origin."""
        nonlocal prompt_warnings
        if not issubclass(category, PromptWarning):
            python_show(message, category, filename, lineno, file, line)
            return
        prompt_warnings += 1
        if prompt_warnings <= MAX_PROMPT_WARNINGS:
            print(f"warning: {message}", file=file or sys.stderr)

    if not debug:
        warnings.showwarning = show_prompt_warnings_briefly
    error = None
    try:
        main(arguments)
    except ImagenError as exc:
        if debug:
            raise
        error = exc
    finally:  # the count is printed on a crash or Ctrl-C too
        warnings.showwarning = python_show
        if prompt_warnings > MAX_PROMPT_WARNINGS:
            print(f"warning: {prompt_warnings - MAX_PROMPT_WARNINGS} more prompt warnings not shown "
                  f"({prompt_warnings} in all; --debug shows every one).", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def train_stage(argv: Sequence[str] | None, description: str, super_resolution: bool) -> None:
    """The body of both training scripts: parse, load the config, check the stage kind, train."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_arguments(parser, "configs/mnist_cpu/sr.yaml" if super_resolution else "configs/mnist_cpu/base.yaml")
    args = parser.parse_args(argv)
    config = load_config_from_args(args)
    if config.is_super_resolution and not super_resolution:
        raise ImagenError(
            f"{args.config} is a super-resolution stage (it has a super_resolution section); "
            "train it with train_sr_mnist.py."
        )
    if super_resolution and not config.is_super_resolution:
        raise ImagenError(
            f"{args.config} is a base stage (it has no super_resolution section); train it with train_base_mnist.py."
        )
    from imagen.trainer import Trainer  # heavy imports only once the arguments are valid

    run_dir = Path(args.output_dir or config.training.output_dir)
    Trainer.from_config(config, run_dir, resume=args.resume, overwrite=args.overwrite).train()
    print(f"done: {run_dir}")
