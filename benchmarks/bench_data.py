"""How fast training shards stream, against how fast a training step consumes them.

    python benchmarks/bench_data.py --config configs/mnist/base.yaml --shards DIR [--workers 0 1 2 4] \\
        [--batches 50] [--step-images-per-s N]

For each worker count: images/s of the DataLoader that training uses (images and their
embeddings, decoded to float and the text mask built), after one warm-up batch, and the
peak resident memory of the process. Beside them, the images/s a training step of the same
config would take: the given --step-images-per-s (a GPU measurement), else the model FLOPs
per image (imagen.throughput) at an H100's dense bf16 peak, an upper bound no real step
reaches. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from imagen.cli import add_debug_argument, load_config_from_args, run_script
from imagen.errors import ImagenError

H100_BF16_TFLOPS = 989.4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the stage whose batches to read")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--shards", required=True, help="a shard folder prepared for the config")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    parser.add_argument("--step-images-per-s", type=float, help="a measured training step's images/s")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.batches < 1 or min(args.workers) < 0:
        raise ImagenError("--batches must be positive and --workers 0 or more.")
    config = load_config_from_args(args)

    import torch

    from imagen.shards import ShardBatches, ShardDataset
    from imagen.throughput import peak_memory_mb, training_flops_per_image

    dataset = ShardDataset(args.shards, config.unet.image_size, config.unet.channels, config.text_encoder)
    batch = config.training.batch_size
    results = []
    for workers in args.workers:
        batches = ShardBatches(dataset, config.unet.channels, seed=0, workers=workers, device=torch.device("cpu"))
        batches.sample_batch(batch)  # starts the workers
        start = time.perf_counter()
        for _ in range(args.batches):
            batches.sample_batch(batch)
        elapsed = time.perf_counter() - start
        results.append({"workers": workers, "images_per_s": args.batches * batch / elapsed,
                        "peak_memory_mb": peak_memory_mb(torch.device("cpu"))})
        del batches
    flops = training_flops_per_image(config, dataset.text_dim)
    step = args.step_images_per_s or H100_BF16_TFLOPS * 1e12 / flops
    print(json.dumps({
        "config": args.config, "image_size": config.unet.image_size, "batch_size": batch,
        "items": len(dataset), "text_dim": dataset.text_dim, "max_length": config.text_encoder.max_length,
        "loader": results,
        "step_images_per_s": step,
        "step_source": "measured" if args.step_images_per_s else "model FLOPs at the H100 dense bf16 peak (MFU 100%)",
        "flops_per_image": flops,
        "loader_keeps_up": {str(r["workers"]): r["images_per_s"] >= step for r in results},
    }, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
