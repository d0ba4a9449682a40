"""Captioned digit scenes: the grammar, the meaning of captions, held-out combinations, the
canvas dataset and the scene evaluator."""

import json
import os
import subprocess

import pytest
import torch
import yaml

from imagen import scenes
from imagen.data import MNISTScenesDataset
from imagen.scene_evaluation import evaluation_specs, read_layouts, scene_metrics
from imagen.scenes import ABOVE, BELOW, COUNT, LAYOUT, LEFT, PLACE, RELATION, RIGHT

from conftest import REPO_ROOT, python

_ = -1  # an empty cell


def spec(family, slot=0, a=0, b=0, c=0, d=0, template=0, form=0):
    return [family, template, form, slot, a, b, c, d]


# (caption spec, layout, satisfied?) on hand-made grids: cells are top left, top right, bottom left, bottom right.
CASES = [
    (spec(PLACE, 0, 7), [7, _, _, _], True),
    (spec(PLACE, 0, 7), [_, 7, _, _], False),
    (spec(PLACE, 3, 4), [1, 2, 3, 4], True),
    # "a 3 to the left of a 7": either row, nothing said of the other cells.
    (spec(RELATION, LEFT, 3, 7), [3, 7, _, _], True),
    (spec(RELATION, LEFT, 3, 7), [_, _, 3, 7], True),
    (spec(RELATION, LEFT, 3, 7), [3, 7, 9, 9], True),
    (spec(RELATION, LEFT, 3, 7), [7, 3, _, _], False),
    (spec(RELATION, LEFT, 3, 7), [3, _, 7, _], False),  # above, not left of
    (spec(RELATION, LEFT, 3, 7), [3, _, _, 7], False),  # diagonal
    (spec(RELATION, RIGHT, 8, 0), [0, 8, _, _], True),
    (spec(RELATION, RIGHT, 8, 0), [8, 0, _, _], False),
    # "a 5 above a 2": either column.
    (spec(RELATION, ABOVE, 5, 2), [5, _, 2, _], True),
    (spec(RELATION, ABOVE, 5, 2), [_, 5, _, 2], True),
    (spec(RELATION, ABOVE, 5, 2), [2, _, 5, _], False),
    (spec(RELATION, ABOVE, 5, 2), [5, 2, _, _], False),
    (spec(RELATION, BELOW, 1, 9), [9, _, 1, _], True),
    (spec(RELATION, BELOW, 1, 9), [1, _, 9, _], False),
    (spec(RELATION, LEFT, 4, 4), [4, 4, _, _], True),  # a digit beside itself
    (spec(LAYOUT, 0, 3, 7, 1, 0), [3, 7, 1, 0], True),
    (spec(LAYOUT, 0, 3, 7, 1, 0), [3, 7, 0, 1], False),
    (spec(LAYOUT, 0, 3, 7, 1, 0), [3, 7, 1, _], False),
    # "two fours": exactly two.
    (spec(COUNT, 2, 4), [4, 4, _, 1], True),
    (spec(COUNT, 2, 4), [4, _, 4, _], True),
    (spec(COUNT, 2, 4), [4, 4, 4, _], False),
    (spec(COUNT, 2, 4), [4, _, _, _], False),
    (spec(COUNT, 4, 6), [6, 6, 6, 6], True),
]


def test_captions_mean_exactly_what_they_say_on_hand_made_grids():
    specs = torch.tensor([case[0] for case in CASES])
    layouts = torch.tensor([case[1] for case in CASES])
    expected = torch.tensor([case[2] for case in CASES])
    assert torch.equal(scenes.satisfies(specs, layouts), expected)


def test_the_grammar_renders_every_family_in_words_and_numerals():
    assert scenes.render(spec(PLACE, 0, 7, form=1)) == "a 7 in the top left"
    assert scenes.render(spec(PLACE, 3, 8, template=1)) == "eight in the bottom right corner"
    assert scenes.render(spec(PLACE, 2, 8, template=2, form=1)) == "there is an 8 in the lower left"
    assert scenes.render(spec(RELATION, LEFT, 3, 7, form=1)) == "a 3 to the left of a 7"
    assert scenes.render(spec(RELATION, ABOVE, 5, 2, template=1)) == "a five over a two"
    assert scenes.render(spec(RELATION, BELOW, 1, 9, template=1, form=1)) == "a 1 under a 9"
    assert scenes.render(spec(RELATION, RIGHT, 8, 0, template=1)) == "an eight right of a zero"
    assert scenes.render(spec(RELATION, LEFT, 3, 7, template=2, form=1)) == "left of a 7 is a 3"
    assert scenes.render(spec(LAYOUT, 0, 3, 7, 1, 0, form=1)) == "3 and 7 on top, 1 and 0 below"
    assert (scenes.render(spec(LAYOUT, 0, 3, 7, 1, 0, template=1))
            == "one and zero at the bottom, three and seven at the top")
    assert scenes.render(spec(COUNT, 2, 4)) == "two fours"
    assert scenes.render(spec(COUNT, 3, 6, template=1, form=1)) == "exactly three 6s"
    assert scenes.render(spec(COUNT, 1, 6)) == "one six"


def test_every_caption_has_one_row_and_they_are_all_distinct():
    specs = scenes.all_specs()
    assert len(specs) == scenes.NUM_CAPTIONS > 40_000
    assert torch.equal(scenes.caption_index(specs), torch.arange(len(specs)))
    texts = [scenes.render(s) for s in specs[::7]]
    assert len(set(texts)) == len(texts)


def test_held_out_combinations_are_never_drawn_for_training():
    generator = torch.Generator().manual_seed(0)
    specs = torch.cat([scenes.draw_specs(50_000, generator) for _ in range(4)])
    assert not scenes.held_out(specs).any()
    relations = specs[specs[:, scenes.FAMILY] == RELATION]
    assert (relations[:, scenes.TEMPLATE] != scenes.HELD_OUT_TEMPLATE).all()
    for a, kind, b in scenes.HELD_OUT_FACTS:  # neither phrasing of a held-out fact
        same = (relations[:, scenes.A] == a) & (relations[:, scenes.B] == b) & (relations[:, scenes.SLOT] == kind)
        assert not same.any()
    # Every family, template, form, relation and seen fact does occur.
    assert torch.bincount(specs[:, scenes.FAMILY]).min() > 40_000
    assert len({tuple(row) for row in relations[:, [scenes.SLOT, scenes.A, scenes.B]].tolist()}) == \
        400 - 2 * len(scenes.HELD_OUT_FACTS)
    held = scenes.draw_specs(1000, generator, held_out_only=True)
    assert scenes.held_out(held).all()
    fronted = held[:, scenes.TEMPLATE] == scenes.HELD_OUT_TEMPLATE
    assert 400 < int(fronted.sum()) < 600  # held-out template and held-out facts, half each
    layouts = scenes.draw_layouts(held, generator)
    assert scenes.satisfies(held, layouts).all()


def test_drawn_layouts_satisfy_their_captions_and_hold_a_digit():
    generator = torch.Generator().manual_seed(1)
    specs = scenes.draw_specs(20_000, generator)
    layouts = scenes.draw_layouts(specs, generator)
    assert scenes.satisfies(specs, layouts).all()
    assert ((layouts >= 0).sum(dim=1) >= 1).all() and ((layouts >= -1) & (layouts <= 9)).all()
    digits = (layouts >= 0).sum(dim=1)
    assert set(digits.tolist()) == {1, 2, 3, 4}


@pytest.fixture(scope="module")
def canvases(mnist_root):
    return MNISTScenesDataset(mnist_root, 32, split="test")


def test_scene_batches_are_reproducible_from_the_seed(canvases):
    first = canvases.sample_batch(16, torch.Generator().manual_seed(3))
    again = canvases.sample_batch(16, torch.Generator().manual_seed(3))
    other = canvases.sample_batch(16, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    images, captions = first
    assert images.shape == (16, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert captions.max() < len(canvases.prompts) == scenes.NUM_CAPTIONS


def test_canvases_tile_real_digits_into_their_cells(canvases):
    layouts = torch.tensor([[3, _, _, 9], [_, _, _, _ + 1]])  # 0 in the bottom right
    images = canvases.compose(layouts, torch.Generator().manual_seed(0))
    cells = images[:, 0].unfold(1, 16, 16).unfold(2, 16, 16)  # (B, 2, 2, 16, 16)
    ink = (cells > -0.5).float().mean(dim=(-1, -2)).flatten(1)
    assert (ink[0, [0, 3]] > 0.04).all() and (ink[0, [1, 2]] == 0).all()
    assert (ink[1, :3] == 0).all() and ink[1, 3] > 0.04


def test_the_evaluator_reaches_its_ceiling_on_real_canvases_and_chance_on_shuffled_captions(canvases, classifier):
    network, _ = classifier
    specs = evaluation_specs(400, seed=0)
    generator = torch.Generator().manual_seed(1)
    real = canvases.compose(scenes.draw_layouts(specs, generator), generator)
    layouts = read_layouts(network, real)
    ceiling = scene_metrics(specs, layouts)
    assert ceiling["seen_satisfaction"] > 0.9 and ceiling["held_out_satisfaction"] > 0.9
    assert ceiling["cell_accuracy"] > 0.95 and all(v > 0.85 for v in ceiling["family_satisfaction"].values())
    assert sum(map(sum, ceiling["confusion_matrix"])) == int((scenes.determined_cells(specs) >= 0).sum())
    shuffled = scene_metrics(specs[torch.randperm(len(specs), generator=generator)], layouts)
    assert shuffled["satisfaction"] < 0.15
    blank = scene_metrics(specs, read_layouts(network, torch.full_like(real, -1.0)))
    assert blank["satisfaction"] == 0.0 and blank["cell_accuracy"] == 0.0


@pytest.fixture(scope="module")
def scene_runs(mnist_root, tmp_path_factory):
    """Both CPU scene stages, trained for two steps by their scripts."""
    root = tmp_path_factory.mktemp("scenes")
    quick = ["--set", f"data.root={mnist_root}", "--set", "training.batch_size=4", "--set", "training.max_steps=2",
             "--set", "sampling.steps=2", "--set", "training.sample_guidance=[1]", "--set", "unet.base_channels=16",
             "--set", "unet.num_head_channels=16"]
    for script, name in (("train_base_mnist.py", "base"), ("train_sr_mnist.py", "sr")):
        result = python(script, "--config", f"configs/mnist_scenes_cpu/{name}.yaml", "--output-dir", str(root / name),
                        *quick)
        assert result.returncode == 0, result.stderr
    return root


def test_scene_stages_train_sample_free_text_and_evaluate(scene_runs, classifier, mnist_root, tmp_path):
    base, sr = str(scene_runs / "base"), str(scene_runs / "sr")
    sampled = python("sample_imagen.py", "--checkpoint", base, "--checkpoint", sr, "--prompts",
                     "a 3 to the left of a 7", "Two fours!", "--steps", "2", "--output-dir", str(tmp_path / "samples"))
    assert sampled.returncode == 0, sampled.stderr
    result = python("evaluate_imagen.py", "--checkpoints", base, sr, "--data-root", str(mnist_root),
                    "--num-images", "20", "--steps", "2", "--guidance-sweep", "1,3", "--output-dir",
                    str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "scenes" and report["num_images"] == 20 and report["num_held_out"] == 4
    assert report["resolution"] == 32 and [r["guidance"] for r in report["results"]] == [1.0, 3.0]
    assert report["ceiling"]["seen_satisfaction"] > 0.7  # 16 real canvases
    for key in ("satisfaction", "seen_satisfaction", "held_out_satisfaction", "cell_accuracy", "count_accuracy"):
        assert all(r[key] is None or 0 <= r[key] <= 1 for r in report["results"]), key
    assert set(report["results"][0]["family_satisfaction"]) == set(scenes.FAMILIES)
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"report.json", "sweep.csv", "sweep.png", "samples"}
    assert (tmp_path / "eval" / "sweep.csv").read_text().splitlines()[0].startswith("guidance,satisfaction,")
    bad = python("evaluate_imagen.py", "--checkpoints", base, "--data-root", str(mnist_root), "--num-images", "7",
                 "--output-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "multiple of 5" in bad.stderr
    # From Python: settings as one value for all stages, a Cascade for its stages, one weight.
    from imagen.cascade import Cascade
    from imagen.scene_evaluation import SceneEvaluator

    network, info = classifier
    evaluator = SceneEvaluator(Cascade.from_checkpoints([base, sr], device="cpu"), network, info, mnist_root,
                               num_images=5, guidance=2.0, steps=2, progress=False)
    report = evaluator.evaluate(3.0)
    assert [r["guidance"] for r in report["results"]] == [3.0]
    assert [s["guidance"] for s in report["stages"]] == [2.0, 2.0] and [s["steps"] for s in report["stages"]] == [2, 2]


@pytest.mark.slow
def test_the_text_conditioning_ablation_script_trains_and_scores_its_variants(scene_runs, classifier, mnist_root,
                                                                               tmp_path):
    tiny = "--set training.max_steps=2 --set training.batch_size=4 --set unet.base_channels=16 " \
           "--set unet.num_head_channels=16 --set sampling.steps=2 --set training.sample_guidance=[1]"
    variants = ["cross_attention", "pooled_mean"]
    result = subprocess.run(["bash", "benchmarks/text_ablation.sh", str(tmp_path), str(scene_runs / "sr"),
                             str(mnist_root)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "EXTRA": tiny, "NUM_IMAGES": "10", "STEPS": "2",
                                 "VARIANTS": " ".join(variants)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = (tmp_path / "summary.md").read_text().splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in rows[2:]] == variants + ["real canvases (ceiling)"]
    saved = {v: yaml.safe_load((tmp_path / v / "config.yaml").read_text())["unet"] for v in variants}
    assert saved["cross_attention"]["text_pooling"] == "none" and saved["cross_attention"]["text_layernorm"]
    assert saved["pooled_mean"]["text_pooling"] == "mean" and saved["pooled_mean"]["cross_attention_resolutions"] == []
    again = subprocess.run(["bash", "benchmarks/text_ablation.sh", str(tmp_path), str(scene_runs / "sr")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "VARIANTS": " ".join(variants)})
    assert again.returncode == 0 and "trained in" not in again.stdout  # finished variants are not redone
