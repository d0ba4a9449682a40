"""What the scripts share: stage-config arguments, and user errors as one-paragraph messages."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from imagen.config import StageConfig, load_stage_config
from imagen.errors import ImagenError


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, repeatable ``--set key.path=value``, ``--output-dir``, ``--resume`` and ``--debug``."""
    parser.add_argument("--config", required=True, help="stage YAML file, e.g. configs/mnist_cpu/base.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set training.batch_size=64",
    )
    parser.add_argument("--output-dir", help="run folder (default: training.output_dir from the config)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    add_debug_argument(parser)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def load_config_from_args(args: argparse.Namespace) -> StageConfig:
    """The stage config named by ``--config`` with every ``--set`` applied and validated."""
    return load_stage_config(args.config, args.set)


def run_script(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a user error prints ``error: <message>`` and returns exit code 2.

    With ``--debug`` the original traceback is shown instead.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        main(arguments)
    except ImagenError as exc:
        if "--debug" in arguments:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
