"""Does a fast sampler match 1000-step ancestral sampling? Both measured with evaluate_imagen.py.

    python benchmarks/sampler_parity.py --checkpoints runs/quality_cpu/base runs/quality_cpu/sr \\
        --data-root ../shared/data --guidance 2,3 --fast dpmpp_2m_sde:50 ddpm:50 --seeds 0 1 \\
        --output-dir runs/sampler_parity

Evaluates the whole cascade once per SAMPLER:STEPS setting (the reference, default ddpm:1000,
and each --fast one) and seed, every stage sampled with that setting, into
OUT/<sampler>_<steps>_seed<k>/ (an evaluate_imagen.py report; a report already there is
reused, so an interrupted run resumes). Prints one JSON object: per setting, prompt accuracy
and classifier-FID per seed and their means, and for the fast settings the differences to
the reference: accuracy in points and FID as a ratio. The bar of issue 9: accuracy within
1 point, FID within 10%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from imagen.cli import add_debug_argument, run_script
from imagen.config import SAMPLER_NAMES
from imagen.errors import ImagenError

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_setting(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if sampler not in SAMPLER_NAMES or not steps.isdigit() or int(steps) < 1:
        raise ImagenError(f"{text!r}: expected SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLER_NAMES)} "
                          f"and STEPS a positive integer, e.g. dpmpp_2m_sde:50.")
    return sampler, int(steps)


def evaluate(args, sampler: str, steps: int, seed: int) -> dict:
    folder = Path(args.output_dir) / f"{sampler}_{steps}_seed{seed}"
    report_path = folder / "report.json"
    if not report_path.is_file():
        command = [sys.executable, str(REPO_ROOT / "evaluate_imagen.py"), "--mode", "cascade",
                   "--checkpoints", *args.checkpoints, "--num-images", str(args.num_images),
                   "--guidance-sweep", args.guidance.split(",")[0], "--guidance", args.guidance,
                   "--sampler", sampler, "--steps", str(steps), "--seed", str(seed), "--no-unconditional",
                   "--output-dir", str(folder)]
        if args.data_root:
            command += ["--data-root", args.data_root]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        # Its progress and messages go to stderr: stdout carries only this script's JSON.
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            raise ImagenError(f"evaluate_imagen.py failed for {sampler}:{steps} seed {seed} (its error is above).")
    result = json.loads(report_path.read_text())["results"][0]
    return {"prompt_accuracy": result["prompt_accuracy"], "fid": result["fid"], "seconds": result["seconds"]}


def summarize(runs: list[dict]) -> dict:
    return {"runs": runs,
            "prompt_accuracy": sum(r["prompt_accuracy"] for r in runs) / len(runs),
            "fid": sum(r["fid"] for r in runs) / len(runs),
            "seconds": sum(r["seconds"] for r in runs) / len(runs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the stages' run folders, base first")
    parser.add_argument("--data-root", help="the MNIST folder (default: the stages' data.root)")
    parser.add_argument("--guidance", default="2,3", help="one weight per stage (default 2,3: the CPU configs')")
    parser.add_argument("--reference", default="ddpm:1000", help="SAMPLER:STEPS of the reference (default ddpm:1000)")
    parser.add_argument("--fast", nargs="+", default=["dpmpp_2m_sde:50"], help="SAMPLER:STEPS settings to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--num-images", type=int, default=100, help="per seed, a multiple of 20 (default 100)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--output-dir", required=True)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    reference, fast = parse_setting(args.reference), [parse_setting(text) for text in args.fast]
    report = {"reference": args.reference, "num_images": args.num_images, "seeds": args.seeds, "settings": {}}
    for sampler, steps in [reference, *fast]:
        runs = [{"seed": seed, **evaluate(args, sampler, steps, seed)} for seed in args.seeds]
        report["settings"][f"{sampler}:{steps}"] = summarize(runs)
    base = report["settings"][args.reference]
    for name, setting in report["settings"].items():
        if name != args.reference:
            setting["accuracy_points_vs_reference"] = 100 * (setting["prompt_accuracy"] - base["prompt_accuracy"])
            setting["fid_ratio_vs_reference"] = setting["fid"] / base["fid"]
            setting["matches_reference"] = (setting["accuracy_points_vs_reference"] >= -1
                                            and setting["fid_ratio_vs_reference"] <= 1.1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
