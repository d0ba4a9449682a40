"""Text-only pretraining of the offline T5 with T5's span-corruption objective.

Imagen's encoder is a T5 pretrained on text alone (C4) and then frozen: it never sees an
image. A T5 with random weights keeps which words a caption holds, but hardly their order,
so "a 3 left of a 7" and "a 7 left of a 3" look alike to the U-Net. ``tiny-scenes-pretrained``
is the offline stand-in for a pretrained T5: the ``tiny-scenes`` encoder and tokenizer,
pretrained here as an encoder-decoder on the scene grammar's text (held-out captions left
out), then frozen like any T5. Measured in the README ("Scenes"): it makes word order
readable but keeps less of which digit a token names, and the cascade learns less from it,
so the CPU scene configs keep the random ``tiny-scenes``.

Span corruption (Raffel et al. 2020, Sec. 3.1.4): some tokens of a sentence are dropped,
each run of dropped tokens is replaced by one sentinel in the encoder's input, and the
decoder writes the runs back, each after its sentinel:
``"a 3 left of a 7"`` -> input ``"a <s0> left of a <s1>"``, target ``"<s0> 3 <s1> 7"``.
The sentinels are ids past the tokenizer's vocabulary, as in T5, whose embedding table is
larger than its tokenizer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm import tqdm

NUM_SENTINELS = 8
PAD_ID, EOS_ID = 0, 1
IGNORE_INDEX = -100


def span_corrupt(
    ids: torch.Tensor, lengths: torch.Tensor, sentinel_start: int, noise_rate: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch of token rows (B, L) whose first ``lengths`` tokens are text (no
    ``</s>``): -> (inputs, targets), each closed by ``</s>``, inputs padded with ``<pad>``
    and targets with ``IGNORE_INDEX``.

    Each text token is dropped with probability ``noise_rate`` (at least one per row, so
    every row teaches something); adjacent dropped tokens form one run. Run k becomes
    sentinel ``sentinel_start + min(k, NUM_SENTINELS - 1)``. No Python loop over rows.
    """
    count, width = ids.shape
    positions = torch.arange(width)
    text = positions < lengths[:, None]
    noise = (torch.rand(count, width, generator=generator) < noise_rate) & text
    forced = (torch.rand(count, generator=generator) * lengths).long()
    noise[torch.arange(count), forced] |= ~noise.any(dim=1)
    previous = torch.cat([torch.zeros(count, 1, dtype=torch.bool), noise[:, :-1]], dim=1)
    starts = noise & ~previous
    sentinels = sentinel_start + (starts.cumsum(dim=1) - 1).clamp(0, NUM_SENTINELS - 1)
    # Two slots per position, (sentinel if a run starts here, the token): keep the slots each
    # side needs, then left-align them.
    slots = torch.stack([sentinels, ids], dim=2).view(count, 2 * width)
    input_keep = torch.stack([starts, text & ~noise], dim=2).view(count, 2 * width)
    target_keep = torch.stack([starts, noise], dim=2).view(count, 2 * width)
    return _left_align(slots, input_keep, PAD_ID), _left_align(slots, target_keep, IGNORE_INDEX)


def _left_align(slots: torch.Tensor, keep: torch.Tensor, fill: int) -> torch.Tensor:
    """The kept slots of each row, in order, then ``</s>``, padded with ``fill`` to the longest row."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    kept = keep.sum(dim=1)
    width = int(kept.max()) + 1
    rows = slots.gather(1, order)[:, :width]
    column = torch.arange(width)
    rows = torch.where(column < kept[:, None], rows, torch.full_like(rows, fill))
    rows[torch.arange(len(rows)), kept] = EOS_ID
    return rows


def pretrain_encoder(
    tokenizer,
    encoder,
    corpus: Sequence[str],
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    noise_rate: float = 0.25,
    seed: int = 0,
):
    """Pretrain ``encoder`` (a T5EncoderModel whose vocabulary has ``NUM_SENTINELS`` spare ids
    past the tokenizer's) on ``corpus`` by span corruption, with a 2-layer decoder trained
    alongside and then dropped. Returns the encoder, in eval mode (deterministic for a seed
    on a given machine and thread count), and the loss of every step."""
    from transformers import T5Config, T5ForConditionalGeneration

    sentinel_start = len(tokenizer)
    config = encoder.config
    if config.vocab_size < sentinel_start + NUM_SENTINELS:
        raise ValueError(f"the encoder's vocabulary ({config.vocab_size}) has no room for {NUM_SENTINELS} sentinels "
                         f"past the tokenizer's {sentinel_start} tokens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(T5Config(
            **{**config.to_dict(), "is_encoder_decoder": True, "num_decoder_layers": config.num_layers,
               "decoder_start_token_id": PAD_ID, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID}))
    model.encoder.load_state_dict(encoder.encoder.state_dict())
    model.shared.load_state_dict(encoder.shared.state_dict())

    batch = tokenizer(list(corpus), add_special_tokens=False, padding=True, return_tensors="pt")
    ids, lengths = batch["input_ids"], batch["attention_mask"].sum(dim=1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    losses = []
    progress = tqdm(range(steps), desc="pretraining the offline T5 (span corruption)", leave=False)
    for _ in progress:
        rows = torch.randint(len(ids), (batch_size,), generator=generator)
        inputs, targets = span_corrupt(ids[rows], lengths[rows], sentinel_start, noise_rate, generator)
        loss = model(input_ids=inputs, attention_mask=(inputs != PAD_ID).long(), labels=targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    encoder.encoder.load_state_dict(model.encoder.state_dict())
    encoder.shared.load_state_dict(model.shared.state_dict())
    return encoder.eval(), losses
