"""Measuring how well a cascade reads scene captions: canvases are read back cell by cell and
checked against the meaning of their caption (:mod:`imagen.scenes`).

    evaluator = SceneEvaluator(stages, classifier, info, "../shared/data", num_images=500)
    report = evaluator.evaluate([1, 3, 5])   # one result per guidance weight of the base stage

Reading a canvas: each of its four cells is cropped; a cell is empty when fewer than
``EMPTY_SHARE`` of its pixels carry ink (brighter than a quarter of full white: share of
bright pixels rather than mean intensity, since a thin "1" has little of the latter), and
otherwise the evaluation classifier reads its digit. The prompts are seeded draws from the
grammar: four fifths training captions (every family equally likely), one fifth held-out
relation captions (held-out facts and the held-out template). The same specs drawn as real
canvases from the MNIST test split give the evaluator's own ceiling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange

from imagen import scenes
from imagen.cascade import Cascade, Stage, per_stage
from imagen.classifier import ClassifierInfo, DigitClassifier, EvaluationError, classify
from imagen.data import MNISTScenesDataset
from imagen.evaluation import classifier_record, stage_settings, sweep
from imagen.io import to_host

INK = -0.5  # a pixel in [-1, 1] brighter than this carries ink
EMPTY_SHARE = 0.03  # real digits have at least 4% ink pixels at every cell size from 8 to 32 px


def read_layouts(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """The layout (B, 4) a reader sees in canvases (B, C, H, W) in [-1, 1]: -1 for an empty
    cell, else the digit the classifier reads there."""
    cells = rearrange(images, "b c (rows h) (columns w) -> (b rows columns) c h w", rows=2, columns=2)
    ink = (cells > INK).float().mean(dim=(1, 2, 3))
    digits, _ = classify(classifier, cells)
    read = torch.where(to_host(ink) >= EMPTY_SHARE, digits, torch.full_like(digits, -1))
    return read.view(-1, scenes.CELLS)


def scene_metrics(specs: torch.Tensor, layouts: torch.Tensor) -> dict:
    """How the read ``layouts`` (B, 4) meet the captions ``specs`` (B, 8): the share satisfied
    overall, for seen and held-out captions and per family; per-cell accuracy over the cells
    a caption fixes (places, layouts) with its confusion matrix (rows: the digit asked for,
    columns: the digit read, the last column empty); count accuracy of count captions."""
    satisfied = scenes.satisfies(specs, layouts).float()
    held = scenes.held_out(specs)

    def share(mask: torch.Tensor) -> float | None:
        return float(satisfied[mask].mean()) if mask.any() else None

    fixed = scenes.determined_cells(specs)
    asked = fixed >= 0
    confusion = torch.zeros(10, 11, dtype=torch.long)
    confusion.index_put_((fixed[asked], torch.where(layouts[asked] < 0, 10, layouts[asked])),
                         torch.ones(int(asked.sum()), dtype=torch.long), accumulate=True)
    counted = specs[:, scenes.FAMILY] == scenes.COUNT
    read_counts = (layouts == specs[:, scenes.A:scenes.A + 1]).sum(dim=1)
    return {
        "satisfaction": float(satisfied.mean()),
        "seen_satisfaction": share(~held),
        "held_out_satisfaction": share(held),
        "family_satisfaction": {name: share((specs[:, scenes.FAMILY] == index) & ~held)
                                for index, name in enumerate(scenes.FAMILIES)},
        "held_out_fact_satisfaction": share(held & (specs[:, scenes.TEMPLATE] != scenes.HELD_OUT_TEMPLATE)),
        "held_out_template_satisfaction": share(held & (specs[:, scenes.TEMPLATE] == scenes.HELD_OUT_TEMPLATE)),
        "cell_accuracy": float((layouts[asked] == fixed[asked]).float().mean()) if asked.any() else None,
        "count_accuracy": share(counted),
        "count_mean_abs_error": float((read_counts[counted] - specs[counted, scenes.SLOT]).abs().float().mean())
        if counted.any() else None,
        "confusion_matrix": confusion.tolist(),
    }


def evaluation_specs(count: int, seed: int) -> torch.Tensor:
    """``count`` caption specs (a multiple of 5): four fifths drawn as training draws them,
    one fifth held-out relation captions, from a generator seeded with ``seed``."""
    if count < 5 or count % 5:
        raise EvaluationError(f"--num-images {count}: expected a positive multiple of 5 for scenes (four fifths "
                              "seen captions, one fifth held-out ones).")
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([scenes.draw_specs(count - count // 5, generator),
                      scenes.draw_specs(count // 5, generator, held_out_only=True)])


class SceneEvaluator:
    """Samples canvases for scene captions through ``stages`` (base first) and scores them.

    The swept guidance weight applies to the base stage; later stages keep ``guidance``
    (one value for all stages or one per stage, None: config). Same interface as
    :class:`imagen.evaluation.Evaluator`.
    """

    def __init__(self, stages: Sequence[Stage], classifier: DigitClassifier, info: ClassifierInfo,
                 data_root: str | Path, num_images: int = 500, *, seed: int = 0,
                 guidance: Sequence[float | None] | None = None, steps: Sequence[int | None] | None = None,
                 sampler: Sequence[str | None] | None = None, batch_size: int | None = None, progress: bool = True):
        stages = stages.stages if isinstance(stages, Cascade) else stages
        self.mode, self.chosen = "scenes", list(range(len(stages)))
        self.cascade = Cascade(stages)
        self.classifier, self.info, self.seed = classifier, info, seed
        self.progress, self.batch_size = progress, batch_size
        self.specs = evaluation_specs(num_images, seed)
        self.prompts = [scenes.render(spec) for spec in self.specs]
        self.guidance, self.steps, self.sampler = (per_stage(values, len(stages), name) for values, name in
                                                   ((guidance, "guidance"), (steps, "steps"), (sampler, "sampler")))
        last = self.cascade.stages[-1].config.unet
        self.resolution = last.image_size
        test = MNISTScenesDataset(data_root, last.image_size, last.channels, split="test")
        generator = torch.Generator().manual_seed(seed + 1)
        real = test.compose(scenes.draw_layouts(self.specs, generator), generator)
        self.ceiling = scene_metrics(self.specs, read_layouts(classifier, real))

    def generate(self, weight: float) -> torch.Tensor:
        guidance = [weight, *self.guidance[1:]]
        return self.cascade.sample(self.prompts, guidance=guidance, steps=self.steps, sampler=self.sampler,
                                   seed=self.seed, batch_size=self.batch_size, progress=self.progress).images

    def score(self, images: torch.Tensor) -> dict:
        return scene_metrics(self.specs, read_layouts(self.classifier, images))

    def evaluate(self, weights: Sequence[float], on_images=None, unconditional: bool = True) -> dict:
        """The report: one result per weight and the best weight (the highest satisfaction of
        seen captions). ``unconditional`` is accepted for the CLI and unused: scenes have no
        class balance to measure."""
        results = sweep(self, weights, on_images)
        best = max(results, key=lambda r: (r["seen_satisfaction"], -r["guidance"]))
        return {
            "mode": self.mode,
            "stages": stage_settings(self.cascade.stages, self.guidance, self.steps, self.sampler),
            "swept_stage": 0,
            "classifier": classifier_record(self.info),
            "num_images": len(self.prompts),
            "num_held_out": int(scenes.held_out(self.specs).sum()),
            "seed": self.seed,
            "resolution": self.resolution,
            "held_out_facts": [f"{a} {scenes.RELATIONS[kind]} {b}" for a, kind, b in scenes.HELD_OUT_FACTS],
            "held_out_template": scenes.RELATION_TEMPLATES[scenes.HELD_OUT_TEMPLATE],
            "ceiling": self.ceiling,
            "results": results,
            "best": {"guidance": best["guidance"], "seen_satisfaction": best["seen_satisfaction"],
                     "held_out_satisfaction": best["held_out_satisfaction"],
                     "rule": "highest satisfaction of seen captions"},
        }
