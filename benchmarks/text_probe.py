"""How much of a scene can be read from a frozen text encoder's outputs, without training a
diffusion model: a few minutes per encoder on a CPU.

A probe reads the frozen token embeddings the way the U-Net does (LayerNorm, then cross-
attention, here from one learned query per cell) and predicts each cell (empty or a digit).
It is trained on the scene training sampler's (caption, layout) pairs; then a layout is drawn
cell by cell from its predictions for seeded evaluation captions and checked against the
caption's meaning (imagen.scenes.satisfies), seen and held-out captions apart. Cells drawn
independently cannot keep a relation's pair in one row, so relations and counts score below
what a generator could reach; ``cell_accuracy`` (the most likely digit of every cell a
caption fixes) has no such limit. ``digit_identity_share`` needs no probe: the share of the
variance of digit tokens' (LayerNorm-ed) embeddings that which digit they name explains.

    python benchmarks/text_probe.py --encoders tiny-scenes tiny-scenes-pretrained
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imagen import scenes
from imagen.captions import DIGIT_WORDS, normalize_prompt
from imagen.cli import add_debug_argument, check_seed, run_script
from imagen.config import TextEncoderConfig
from imagen.errors import ImagenError
from imagen.scene_evaluation import evaluation_specs
from imagen.text import TextEmbeddingCache

CLASSES = 11  # empty, then the digits


class CellProbe(nn.Module):
    """Per-cell logits (B, 4, 11) from token embeddings (B, L, D) and their mask (B, L)."""

    def __init__(self, text_dim: int, width: int = 128, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.queries = nn.Parameter(torch.randn(scenes.CELLS, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, CLASSES))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(embeddings)
        queries = self.queries.expand(len(tokens), -1, -1)
        read, _ = self.attention(queries, tokens, tokens, key_padding_mask=~mask)
        return self.head(read)


def encode_all_captions(name: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Every scene caption's token embeddings and mask, in caption_index order, as training
    encodes them (imagen.text.TextEmbeddingCache), and the digit identity share of its digit tokens."""
    cache = TextEmbeddingCache.from_config(TextEncoderConfig(name=name, max_length=max_length, device="cpu"))
    prompts = [normalize_prompt(scenes.render(spec), cache.normalize) for spec in scenes.all_specs()]
    text = cache.encode(prompts)
    tokenizer = cache.encoder.tokenizer
    token_ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                          return_tensors="pt")["input_ids"]
    return text.embeddings, text.mask, digit_identity_share(tokenizer, token_ids, text.embeddings)


def digit_identity_share(tokenizer, token_ids: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Between-digit variance over total variance of the embeddings of tokens that are a whole
    digit (word or numeral): near 1 when a digit token's embedding says which digit it is."""
    digit_of = torch.full((len(tokenizer) + 1,), -1)
    for digit in range(10):
        for text in (str(digit), normalize_prompt(DIGIT_WORDS[digit], "plain")):
            pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1:
                digit_of[pieces[0]] = digit
    digits = digit_of[token_ids.clamp(max=len(tokenizer))]
    tokens = F.layer_norm(embeddings[digits >= 0], embeddings.shape[-1:])
    labels = digits[digits >= 0]
    if len(labels) == 0:
        return float("nan")
    centred = tokens - tokens.mean(dim=0)
    means = torch.stack([centred[labels == d].mean(dim=0) if (labels == d).any() else torch.zeros_like(centred[0])
                         for d in range(10)])
    between = (means.pow(2).sum(dim=1) * torch.bincount(labels, minlength=10)).sum()
    return (between / centred.pow(2).sum()).item()


def probe_encoder(name: str, args: argparse.Namespace) -> dict:
    embeddings, mask, identity_share = encode_all_captions(name, args.max_length)
    torch.manual_seed(args.seed)
    probe = CellProbe(embeddings.shape[-1])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in tqdm(range(args.steps), desc=f"probe {name}", leave=False):
        specs = scenes.draw_specs(args.batch_size, generator)
        layouts = scenes.draw_layouts(specs, generator)
        rows = scenes.caption_index(specs)
        logits = probe(embeddings[rows], mask[rows])
        loss = F.cross_entropy(logits.reshape(-1, CLASSES), (layouts + 1).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    specs = evaluation_specs(args.num_captions, seed=args.seed)
    with torch.no_grad():
        rows = scenes.caption_index(specs)
        probabilities = probe(embeddings[rows], mask[rows]).softmax(dim=-1)
    draws = torch.multinomial(probabilities.reshape(-1, CLASSES), 1, generator=generator).view(-1, scenes.CELLS) - 1
    satisfied = scenes.satisfies(specs, draws).float()
    held = scenes.held_out(specs)
    fixed = scenes.determined_cells(specs)
    likeliest = probabilities.argmax(dim=-1) - 1
    return {
        "encoder": name,
        "seen_satisfaction": satisfied[~held].mean().item(),
        "held_out_satisfaction": satisfied[held].mean().item(),
        "family_satisfaction": {family: satisfied[~held & (specs[:, scenes.FAMILY] == index)].mean().item()
                                for index, family in enumerate(scenes.FAMILIES)},
        "cell_accuracy": (likeliest == fixed)[fixed >= 0].float().mean().item(),
        "digit_identity_share": identity_share,
        "final_loss": loss.item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["tiny-scenes", "tiny-scenes-pretrained"],
                        help="text_encoder.name values: offline T5s, hub ids or local folders")
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000, help="probe training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-captions", type=int, default=2000,
                        help="evaluation captions (a multiple of 5: four fifths seen, one fifth held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    check_seed(args.seed)
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--max-length", args.max_length, 2)):
        if value < least:
            raise ImagenError(f"{flag} {value}: expected an integer >= {least}.")
    if args.num_captions < 5 or args.num_captions % 5:
        raise ImagenError(f"--num-captions {args.num_captions}: expected a positive multiple of 5 (four fifths "
                          "seen captions, one fifth held-out ones).")
    results = [probe_encoder(name, args) for name in args.encoders]
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    print("| encoder | seen | held-out | place | relation | layout | count | cell accuracy | digit identity share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        families = " | ".join(f"{r['family_satisfaction'][family]:.3f}" for family in scenes.FAMILIES)
        print(f"| {r['encoder']} | {r['seen_satisfaction']:.3f} | {r['held_out_satisfaction']:.3f} | {families} "
              f"| {r['cell_accuracy']:.3f} | {r['digit_identity_share']:.2f} |")


if __name__ == "__main__":
    sys.exit(run_script(main))
