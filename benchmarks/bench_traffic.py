"""Memory traffic of one bf16 training step, for each ``unet.group_norm_precision``.

    python benchmarks/bench_traffic.py --config configs/mnist/base.yaml --batch 8
    python benchmarks/bench_traffic.py --config configs/mnist/sr_256.yaml --batch 2

A training step of memory-bound kernels (casts, norms, activations, additions) takes as long as
its bytes take to move, so the bytes each operation reads and writes tell what a setting saves
on a GPU without one. The step (``imagen.throughput.training_pass``: forward and backward, bf16
autocast) runs on the CPU; every ATen operation below autograd and autocast is counted with the
size of its tensor inputs and outputs, so autocast's casts count too; views and bare
allocations, which move nothing, are left out. The group norms take the same precision on
every device (``imagen.nn.GroupNorm``), so the counts are those of CUDA's autocast there; other
operations follow CPU autocast's lists, which keep the convolutions, matrix products and
attention in bf16 as CUDA's do. A count is an upper bound on a real device's traffic: it
ignores caches and fusion.

Prints one JSON object per precision: the step's total GiB, the number of dtype casts, and
the GiB of the operations the norms' precision changes (casts, group norm, SiLU, each with
its backward).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from imagen.cli import add_debug_argument, load_config_from_args, run_script
from imagen.errors import ImagenError
from imagen.throughput import training_pass

TINY_T5_WIDTH = 128  # the offline encoder's; the text width only changes the attention projections
# Besides views: a reshape that shares its input's memory, and allocations that write nothing.
MOVES_NOTHING = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
REPORTED = ("_to_copy", "native_group_norm", "native_group_norm_backward", "silu", "silu_backward")


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Bytes read and written, and calls, per ATen operation."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in MOVES_NOTHING:
            return out
        self.bytes[name] += tensor_bytes((args, kwargs)) + tensor_bytes(out)
        self.calls[name] += 1
        return out


def step_traffic(config, batch: int) -> dict:
    """The traffic of one bf16 training step of ``config`` on a batch of ``batch`` images."""
    from imagen.stage import build_network

    network = build_network(config, TINY_T5_WIDTH)
    with Traffic() as traffic:
        training_pass(network, config, TINY_T5_WIDTH, batch, "cpu", torch.bfloat16)
    gib = 2**-30
    return {"group_norm_precision": config.unet.group_norm_precision, "image_size": config.unet.image_size,
            "batch_size": batch,
            "total_gib": sum(traffic.bytes.values()) * gib, "casts": traffic.calls["_to_copy"],
            "gib_by_op": {name: traffic.bytes[name] * gib for name in REPORTED}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--batch", type=int, default=2, help="images in the step (default 2)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise ImagenError(f"--batch {args.batch}: expected a positive number of images.")
    config = load_config_from_args(args)
    for precision in ("float32", "activations"):
        changed = dataclasses.replace(config, unet=dataclasses.replace(config.unet, group_norm_precision=precision))
        print(json.dumps(step_traffic(changed, args.batch)), flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
