"""Sample the whole cascade: text prompts -> base stage -> every super-resolution stage -> images.

    python sample_imagen.py --checkpoint runs/base --checkpoint runs/sr --prompts seven 3 --output-dir out

Each checkpoint folder holds the config.yaml its stage was trained with. For now this
checks that the stages form a valid cascade: trained stages do not exist yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagen.cli import add_debug_argument, run_script
from imagen.config import check_stage_order, load_stage_config
from imagen.errors import ImagenError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="a stage's run folder, base first (repeat per stage)")
    parser.add_argument("--prompts", nargs="+", default=[], help="text prompts")
    parser.add_argument("--output-dir", help="where images go")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    configs = []
    for folder in map(Path, args.checkpoint):
        if not (folder / "config.yaml").is_file():
            raise ImagenError(f"--checkpoint {folder}: no config.yaml there; expected a stage's run folder.")
        configs.append(load_stage_config(folder / "config.yaml"))
    check_stage_order(configs, [str(Path(c) / "config.yaml") for c in args.checkpoint])
    sys.exit("sample_imagen.py: sampling is not implemented yet (no stage can be trained yet); nothing was written.")


if __name__ == "__main__":
    sys.exit(run_script(main))
