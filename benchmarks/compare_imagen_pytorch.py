"""Training throughput of this project against lucidrains' imagen-pytorch, measured in one run.

imagen-pytorch is installed only for this benchmark, best in its own environment that reuses
this one's packages:

    python -m venv --system-site-packages .venv-bench
    .venv-bench/bin/pip install imagen-pytorch
    .venv-bench/bin/python benchmarks/compare_imagen_pytorch.py --config configs/mnist_cpu/base.yaml \\
        --set data.root=../shared/data

Both sides train the base stage of ``--config`` at its resolution and batch size on the same
MNIST batches with the same precomputed text embeddings (this project's text encoder), so no
T5 runs inside a step. imagen-pytorch's U-Net width is searched so its parameter count is
within 10% of ours. Our side is the real ``Trainer.train_step`` (with gradient clipping and
the EMA update); theirs is the bare loss/backward/step loop of an ``Imagen`` with one U-Net,
which favours them. Timed rounds alternate between the two; the median of each is reported.

imagen-pytorch reads a T5 config from the Hugging Face hub while it is being imported (a
default argument); offline, that one lookup is answered with a local ``T5Config`` whose width
equals our text embeddings', which is all it reads from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from imagen.cli import add_debug_argument, load_config_from_args, run_script
from imagen.errors import ImagenError


def import_imagen_pytorch(text_dim: int):
    import transformers

    lookup = transformers.T5Config.from_pretrained
    transformers.T5Config.from_pretrained = classmethod(
        lambda cls, *args, **kwargs: transformers.T5Config(d_model=text_dim))
    try:
        import imagen_pytorch
    except ImportError:
        raise ImagenError("imagen-pytorch is not installed; install it for this benchmark only (see the "
                          "docstring of benchmarks/compare_imagen_pytorch.py).") from None
    finally:
        transformers.T5Config.from_pretrained = lookup
    return imagen_pytorch


def their_model(imagen_pytorch, config, text_dim: int, dim: int):
    unet_config = config.unet
    attention = tuple(size in unet_config.attention_resolutions for size in unet_config.level_resolutions())
    unet = imagen_pytorch.Unet(
        dim=dim, dim_mults=tuple(unet_config.channel_mults), channels=unet_config.channels, text_embed_dim=text_dim,
        num_resnet_blocks=unet_config.num_res_blocks, layer_attns=attention, layer_cross_attns=attention,
        # As many heads of our width as we have at the deepest level (imagen-pytorch needs two or more).
        attn_dim_head=unet_config.num_head_channels,
        attn_heads=max(2, dim * max(unet_config.channel_mults) // unet_config.num_head_channels),
        max_text_len=config.text_encoder.max_length,
    )
    return imagen_pytorch.Imagen(
        unets=(unet,), image_sizes=(unet_config.image_size,), text_embed_dim=text_dim, channels=unet_config.channels,
        timesteps=config.diffusion.timesteps, cond_drop_prob=config.guidance.cond_drop_prob, auto_normalize_img=False,
    )


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a base-stage YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    config = load_config_from_args(args)
    if config.is_super_resolution:
        raise ImagenError(f"{args.config}: compare a base stage (imagen-pytorch's side is set up as a base U-Net).")

    from imagen.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-compare-") as folder:
        ours = Trainer.from_config(config, Path(folder) / "run")
        ours_parameters = parameters(ours.accelerator.unwrap_model(ours.network))
        text_dim = ours.text_table.embeddings.shape[-1]
        imagen_pytorch = import_imagen_pytorch(text_dim)
        # The width whose parameter count is closest to ours.
        candidates = {dim: parameters(their_model(imagen_pytorch, config, text_dim, dim).unets[0])
                      for dim in range(8, 129, 4)}
        dim = min(candidates, key=lambda d: abs(candidates[d] - ours_parameters))
        theirs = their_model(imagen_pytorch, config, text_dim, dim)
        optimizer = torch.optim.Adam(theirs.parameters(), lr=config.training.lr)
        their_parameters = parameters(theirs.unets[0])
        if abs(their_parameters / ours_parameters - 1) > 0.10:
            raise ImagenError(f"no imagen-pytorch width matches {ours_parameters} parameters within 10% "
                              f"(closest: dim {dim}, {their_parameters}).")
        theirs.train()

        def their_step() -> None:
            images, text = ours.next_batch()
            loss = theirs(images, text_embeds=text.embeddings, text_masks=text.mask, unet_number=1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def timed(step, count: int) -> float:
            start = time.perf_counter()
            for _ in range(count):
                step()
            return count * config.training.batch_size / (time.perf_counter() - start)

        timed(ours.train_step, args.warmup)
        timed(their_step, args.warmup)
        rounds = {"ours": [], "imagen_pytorch": []}
        for _ in range(args.rounds):
            rounds["ours"].append(timed(ours.train_step, args.steps))
            rounds["imagen_pytorch"].append(timed(their_step, args.steps))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    print(json.dumps({
        "config": args.config, "image_size": config.unet.image_size, "batch_size": config.training.batch_size,
        "threads": torch.get_num_threads(), "parameters": {"ours": ours_parameters, "imagen_pytorch": their_parameters},
        "imagen_pytorch_dim": dim, "images_per_s_rounds": rounds, "images_per_s": medians,
        "speedup": medians["ours"] / medians["imagen_pytorch"],
    }, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
