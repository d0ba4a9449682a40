"""Memory traffic of one bf16 training step, for each ``unet.group_norm_precision``, and the
fastest a GPU could run it.

    python benchmarks/bench_traffic.py --config configs/mnist/base.yaml --batch 8
    python benchmarks/bench_traffic.py --config configs/mnist/sr_256.yaml --batch 2 --gpu H200

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

Prints one JSON object per precision: the step's total GiB, the number of dtype casts, the
GiB of the operations the norms' precision changes (casts, group norm, SiLU, each with its
backward), the model TFLOPs (``torch.utils.flop_counter``'s formulas: convolutions, matrix
products, attention), and a roofline for ``--gpu``: each operation takes at least its FLOPs
at the bf16 dense peak or its bytes at the memory bandwidth, whichever is longer, so their sum
is a floor on an eager step's kernel time and ``mfu_bound`` a ceiling on its MFU. Real kernels
reach neither peak, and a GPU that caches or fuses (``torch.compile``) moves fewer bytes.
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
from torch.utils.flop_counter import flop_registry

from imagen.cli import add_debug_argument, load_config_from_args, run_script
from imagen.errors import ImagenError
from imagen.throughput import PEAK_BANDWIDTH_TBPS, peak_bandwidth_tbps, peak_tflops, training_pass

TINY_T5_WIDTH = 128  # the offline encoder's; the text width only changes the attention projections
# Besides views: a reshape that shares its input's memory, and allocations that write nothing.
MOVES_NOTHING = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
REPORTED = ("_to_copy", "native_group_norm", "native_group_norm_backward", "silu", "silu_backward")
aten = torch.ops.aten
# The CPU's attention kernels take the CUDA flash kernels' arguments, so those formulas count them.
FLOP_FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[aten._scaled_dot_product_flash_attention_backward],
}


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Bytes read and written, and calls, per ATen operation; each call's bytes and FLOPs."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = collections.Counter(), collections.Counter()
        self.bytes_and_flops: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in MOVES_NOTHING:
            return out
        moved = tensor_bytes((args, kwargs)) + tensor_bytes(out)
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        self.bytes[name] += moved
        self.calls[name] += 1
        self.bytes_and_flops.append((moved, formula(*args, **kwargs, out_val=out) if formula else 0))
        return out


def roofline(bytes_and_flops: list[tuple[int, int]], gpu: str) -> dict:
    """Each operation at the faster of its two limits on ``gpu``: the floor of an eager step."""
    flops_per_s, bytes_per_s = peak_tflops(gpu, "bf16") * 1e12, peak_bandwidth_tbps(gpu) * 1e12
    compute_s = [flops / flops_per_s for _, flops in bytes_and_flops]
    memory_s = [moved / bytes_per_s for moved, _ in bytes_and_flops]
    total = sum(map(max, compute_s, memory_s))
    memory_bound = sum(memory for compute, memory in zip(compute_s, memory_s) if memory > compute)
    return {"gpu": gpu, "ms": total * 1e3, "ms_memory_bound": memory_bound * 1e3, "mfu_bound": sum(compute_s) / total}


def step_traffic(config, batch: int, gpu: str) -> dict:
    """The traffic of one bf16 training step of ``config`` on a batch of ``batch`` images."""
    from imagen.stage import build_network

    network = build_network(config, TINY_T5_WIDTH)
    with Traffic() as traffic:
        training_pass(network, config, TINY_T5_WIDTH, batch, "cpu", torch.bfloat16)
    gib = 2**-30
    return {"group_norm_precision": config.unet.group_norm_precision, "image_size": config.unet.image_size,
            "batch_size": batch,
            "total_gib": sum(traffic.bytes.values()) * gib, "casts": traffic.calls["_to_copy"],
            "gib_by_op": {name: traffic.bytes[name] * gib for name in REPORTED},
            "tflop": sum(flops for _, flops in traffic.bytes_and_flops) / 1e12,
            "roofline": roofline(traffic.bytes_and_flops, gpu)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--batch", type=int, default=2, help="images in the step (default 2)")
    parser.add_argument("--gpu", default="H100", choices=[name for name, _ in PEAK_BANDWIDTH_TBPS],
                        help="the GPU of the roofline (default H100, the SXM model)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise ImagenError(f"--batch {args.batch}: expected a positive number of images.")
    config = load_config_from_args(args)
    for precision in ("float32", "activations"):
        changed = dataclasses.replace(config, unet=dataclasses.replace(config.unet, group_norm_precision=precision))
        print(json.dumps(step_traffic(changed, args.batch, args.gpu)), flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
