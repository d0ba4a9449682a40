"""Turn a captioned source into training shards, once: images at every resolution the stages
need and the text encoder's embeddings (see imagen/shards.py for the format).

    python prepare_dataset.py --config configs/paper/sr_256.yaml [--config configs/paper/base_64.yaml] \\
        --source FOLDER_OR_DATASET --output DIR [--set key=value ...]
    python train_sr_mnist.py --config configs/paper/sr_256.yaml --set data.dataset=shards --set data.root=DIR

--source is a folder of images with a .txt caption beside each (photo.png + photo.txt,
subfolders too), or a Hugging Face datasets dataset: a folder written by save_to_disk, or
a hub id (then --split, default train). Its --image-column and --text-column are found by
themselves when unambiguous. Every --config (stage files, or one cascade file) adds its
resolution; all must use one text encoder. A run that was interrupted resumes where it
stopped when run again; a folder prepared otherwise is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagen.cli import add_debug_argument, run_script
from imagen.errors import ImagenError


def dataset_source(source: str, split: str, image_column: str | None, text_column: str | None):
    """A Hugging Face dataset as (items, load): items are row numbers."""
    try:
        import datasets
    except ImportError:
        raise ImagenError(f"--source {source}: reading a Hugging Face dataset needs the datasets package "
                          "(pip install datasets).") from None
    try:
        if Path(source).is_dir():
            data = datasets.load_from_disk(source)
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        reason = " ".join(str(error).split())[:300]
        raise ImagenError(f"--source {source}: cannot load it as a Hugging Face dataset ({reason}); "
                          "give a folder of images with .txt captions, a folder written by save_to_disk, or a hub id "
                          "reachable from here.") from None
    columns = data.column_names
    images = [c for c in columns if isinstance(data.features[c], datasets.Image)]
    texts = [c for c in columns if getattr(data.features[c], "dtype", None) in ("string", "large_string")]
    image_column = image_column or (images[0] if len(images) == 1 else None)
    text_column = text_column or (texts[0] if len(texts) == 1 else None)
    if image_column not in columns or text_column not in columns:
        raise ImagenError(f"--source {source}: name the columns with --image-column and --text-column (columns: "
                          f"{', '.join(columns)}; image columns {images}, text columns {texts}).")
    return data, image_column, text_column


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="a stage file, or a cascade file; repeat for every stage the shards serve")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of every stage config, e.g. --set text_encoder.name=tiny")
    parser.add_argument("--source", required=True, help="an image folder with .txt captions, or a datasets dataset")
    parser.add_argument("--output", required=True, help="the shard folder")
    parser.add_argument("--split", default="train", help="the split of a Hugging Face dataset (default train)")
    parser.add_argument("--image-column", help="the dataset's image column (default: the only one)")
    parser.add_argument("--text-column", help="the dataset's caption column (default: the only text column)")
    parser.add_argument("--shard-size", type=int, default=1024, help="items per shard file (default 1024)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        raise ImagenError(f"--shard-size {args.shard_size}: expected a positive integer.")

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ImagenError(f"--output {output} is a file, not a folder; give the folder for the shards.")

    from imagen.config import load_cascade_config, load_stage_config
    from imagen.data import caption_folder_items, read_image, square_pixels
    from imagen.loader import read_yaml_file
    from imagen.shards import INDEX, prepare_shards, read_index

    stages = []
    for path in args.config:
        raw = read_yaml_file(path)
        if isinstance(raw, dict) and "stages" in raw:  # a cascade file: every stage it names
            stages += [load_stage_config(stage, args.set) for stage in load_cascade_config(path).stage_paths]
        else:
            stages.append(load_stage_config(path, args.set))
    channels = stages[0].unet.channels
    source = Path(args.source)
    saved_dataset = (source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file()
    if source.is_dir() and not saved_dataset:
        items = caption_folder_items(source)

        def load(item):
            path, caption = item
            return read_image(path, channels), caption
    else:
        data, image_column, text_column = dataset_source(args.source, args.split, args.image_column, args.text_column)
        items = range(len(data))  # row numbers; slices of a range are ranges

        def load(row):
            record = data[row]
            return square_pixels(record[image_column], channels), str(record[text_column])

    where = str(source.resolve()) if source.exists() else args.source
    finished_before = (output / INDEX).is_file() and read_index(output).complete
    index = prepare_shards(items, load, output, stages, where, args.shard_size)
    what = (f"{index.num_items} items in {len(index.shards)} shards "
            f"({', '.join(f'{size}px' for size in index.resolutions)}, text encoder {index.encoder['name']})")
    if finished_before:  # the folder matched the source's path and item count; contents are not compared
        print(f"already prepared: {output} holds {what}; nothing written. Prepare into a new folder to pick up "
              "edited images or captions.")
    else:
        print(f"wrote {what} to {output}")


if __name__ == "__main__":
    sys.exit(run_script(main))
