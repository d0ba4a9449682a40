"""Captioned digit scenes: a 2x2 grid of MNIST digits, captions from a small grammar, and
what each caption means.

A **layout** is a LongTensor (B, 4), one entry per cell (0 top left, 1 top right, 2 bottom
left, 3 bottom right): -1 for an empty cell, else the digit. A **spec** is a LongTensor
(B, 8) that fixes a caption: its ``family``, ``template``, ``form`` (0: digits as words,
1: as numerals), one family-dependent ``slot`` (a cell, a relation or a count) and up to
four digits ``a, b, c, d``. From a spec come its text (:func:`render`), its row in the
list of every caption (:func:`caption_index`, arithmetic, so batches need no lookups) and
its meaning, a predicate a layout satisfies or not (:func:`satisfies`):

==========  ==================================  ======================================
family      e.g.                                holds when
==========  ==================================  ======================================
place       "a 7 in the top left"               cell ``slot`` holds ``a``
relation    "a 3 to the left of a 7"            in some row (left/right) or column
                                                (above/below) ``a`` and ``b`` stand so
layout      "3 and 7 on top, 1 and 0 below"     the four cells hold ``a, b, c, d``
count       "two fours", "exactly three 6s"     exactly ``slot`` cells hold ``a``
==========  ==================================  ======================================

A relation leaves every other cell free. Held out of training, to measure compositional
generalisation: the spatial facts of :data:`HELD_OUT_FACTS` in any relation caption (both
phrasings: "a 3 left of a 7" is "a 7 right of a 3"), and the relation template
:data:`HELD_OUT_TEMPLATE` ("left of a 7 is a 3") for every fact. :func:`draw_specs` never
draws them unless asked to.
"""

from __future__ import annotations

import torch

from imagen.captions import DIGIT_WORDS

FAMILIES = ("place", "relation", "layout", "count")
PLACE, RELATION, LAYOUT, COUNT = range(4)
FAMILY, TEMPLATE, FORM, SLOT, A, B, C, D = range(8)
CELLS = 4
RELATIONS = ("left of", "right of", "above", "below")
LEFT, RIGHT, ABOVE, BELOW = range(4)

# Cells as the captions name them (top/upper, bottom/lower).
_ROW = (("top", "upper"), ("bottom", "lower"))
_COLUMN = ("left", "right")
PLACE_TEMPLATES = (
    "{a_} {a} in the {top} {side}",
    "{a} in the {top} {side} corner",
    "there is {a_} {a} in the {upper} {side}",
    "the {top} {side} cell holds {a_} {a}",
)
# Per relation: two phrasings; templates use one of them.
_RELATION_PHRASES = (("to the left of", "left of"), ("to the right of", "right of"), ("above", "over"),
                     ("below", "under"))
RELATION_TEMPLATES = (
    "{a_} {a} {phrase0} {b_} {b}",
    "{a_} {a} {phrase1} {b_} {b}",
    "{phrase1} {b_} {b} is {a_} {a}",
)
HELD_OUT_TEMPLATE = 2
LAYOUT_TEMPLATES = (
    "{a} and {b} on top, {c} and {d} below",
    "{c} and {d} at the bottom, {a} and {b} at the top",
)
COUNT_TEMPLATES = ("{k} {plural}", "exactly {k} {plural}")
TEMPLATES = (PLACE_TEMPLATES, RELATION_TEMPLATES, LAYOUT_TEMPLATES, COUNT_TEMPLATES)
COUNT_WORDS = ("one", "two", "three", "four")
PLURALS = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines")
# Spatial facts (a, relation, b) never described by a relation caption in training.
HELD_OUT_FACTS = ((3, LEFT, 7), (5, ABOVE, 2), (1, BELOW, 9), (8, RIGHT, 0), (6, LEFT, 4), (2, ABOVE, 8))
_OPPOSITE = {LEFT: RIGHT, RIGHT: LEFT, ABOVE: BELOW, BELOW: ABOVE}

# How many captions each family has, in caption_index order within the family.
_FAMILY_SIZES = (
    len(PLACE_TEMPLATES) * 2 * CELLS * 10,
    len(RELATION_TEMPLATES) * 2 * len(RELATIONS) * 100,
    len(LAYOUT_TEMPLATES) * 2 * 10**4,
    len(COUNT_TEMPLATES) * 2 * CELLS * 10,
)
_FAMILY_OFFSETS = tuple(sum(_FAMILY_SIZES[:i]) for i in range(len(FAMILIES)))
NUM_CAPTIONS = sum(_FAMILY_SIZES)


def _digit(digit: int, form: int) -> str:
    return str(digit) if form else DIGIT_WORDS[digit]


def _article(digit: int) -> str:
    return "an" if digit == 8 else "a"


def render(spec: torch.Tensor | list[int]) -> str:
    """The caption text of one spec (8 integers)."""
    family, template, form, slot, a, b, c, d = (int(v) for v in spec)
    if family == PLACE:
        row, column = divmod(slot, 2)
        return PLACE_TEMPLATES[template].format(a_=_article(a), a=_digit(a, form), top=_ROW[row][0],
                                                upper=_ROW[row][1], side=_COLUMN[column])
    if family == RELATION:
        phrase0, phrase1 = _RELATION_PHRASES[slot]
        return RELATION_TEMPLATES[template].format(a_=_article(a), a=_digit(a, form), b_=_article(b),
                                                   b=_digit(b, form), phrase0=phrase0, phrase1=phrase1)
    if family == LAYOUT:
        return LAYOUT_TEMPLATES[template].format(a=_digit(a, form), b=_digit(b, form), c=_digit(c, form),
                                                 d=_digit(d, form))
    if family == COUNT:
        count = slot
        if count == 1:
            noun = _digit(a, form)
        else:
            noun = PLURALS[a] if form == 0 else f"{a}s"
        return COUNT_TEMPLATES[template].format(k=COUNT_WORDS[count - 1], plural=noun)
    raise ValueError(f"unknown caption family {family}")


def caption_index(specs: torch.Tensor) -> torch.Tensor:
    """Row of each spec (B, 8) in :func:`all_specs` order: (B,) long, on the specs' device."""
    family, template, form, slot = specs[:, FAMILY], specs[:, TEMPLATE], specs[:, FORM], specs[:, SLOT]
    a, b, c, d = specs[:, A], specs[:, B], specs[:, C], specs[:, D]
    within = torch.stack([
        ((template * 2 + form) * CELLS + slot) * 10 + a,
        (((template * 2 + form) * len(RELATIONS) + slot) * 10 + a) * 10 + b,
        (template * 2 + form) * 10**4 + ((a * 10 + b) * 10 + c) * 10 + d,
        ((template * 2 + form) * CELLS + (slot - 1)) * 10 + a,
    ], dim=1).gather(1, family[:, None]).squeeze(1)
    return torch.tensor(_FAMILY_OFFSETS, device=specs.device)[family] + within


def all_specs() -> torch.Tensor:
    """Every caption's spec (NUM_CAPTIONS, 8), in caption_index order."""
    rows = []
    for template in range(len(PLACE_TEMPLATES)):
        for form in range(2):
            for cell in range(CELLS):
                rows += [[PLACE, template, form, cell, a, 0, 0, 0] for a in range(10)]
    for template in range(len(RELATION_TEMPLATES)):
        for form in range(2):
            for relation in range(len(RELATIONS)):
                rows += [[RELATION, template, form, relation, a, b, 0, 0] for a in range(10) for b in range(10)]
    digits = torch.cartesian_prod(*[torch.arange(10)] * 4)
    for template in range(len(LAYOUT_TEMPLATES)):
        for form in range(2):
            block = torch.zeros(10**4, 8, dtype=torch.long)
            block[:, FAMILY], block[:, TEMPLATE], block[:, FORM] = LAYOUT, template, form
            block[:, A:] = digits
            rows += block.tolist()
    for template in range(len(COUNT_TEMPLATES)):
        for form in range(2):
            for count in range(1, CELLS + 1):
                rows += [[COUNT, template, form, count, a, 0, 0, 0] for a in range(10)]
    return torch.tensor(rows, dtype=torch.long)


def held_out(specs: torch.Tensor) -> torch.Tensor:
    """Whether each spec (B, 8) is held out of training: (B,) bool."""
    relation = specs[:, FAMILY] == RELATION
    fact = torch.zeros(len(specs), dtype=torch.bool, device=specs.device)
    for a, kind, b in HELD_OUT_FACTS:
        for first, second, how in ((a, b, kind), (b, a, _OPPOSITE[kind])):
            fact |= (specs[:, A] == first) & (specs[:, B] == second) & (specs[:, SLOT] == how)
    return relation & (fact | (specs[:, TEMPLATE] == HELD_OUT_TEMPLATE))


def satisfies(specs: torch.Tensor, layouts: torch.Tensor) -> torch.Tensor:
    """Whether each layout (B, 4) satisfies its caption's spec (B, 8): (B,) bool."""
    family, slot = specs[:, FAMILY], specs[:, SLOT]
    a, b = specs[:, A], specs[:, B]
    cell = layouts.gather(1, slot.clamp(0, CELLS - 1)[:, None]).squeeze(1)
    place = cell == a
    # left of: a row holds (a, b); right of: (b, a); above: a column holds a over b; below: b over a.
    pairs = {LEFT: ((0, 1), (2, 3)), RIGHT: ((1, 0), (3, 2)), ABOVE: ((0, 2), (1, 3)), BELOW: ((2, 0), (3, 1))}
    relation = torch.zeros_like(place)
    for kind, lines in pairs.items():
        holds = torch.zeros_like(place)
        for first, second in lines:
            holds |= (layouts[:, first] == a) & (layouts[:, second] == b)
        relation |= (slot == kind) & holds
    layout = (layouts == specs[:, A:]).all(dim=1)
    count = (layouts == a[:, None]).sum(dim=1) == slot
    return torch.stack([place, relation, layout, count], dim=1).gather(1, family[:, None]).squeeze(1)


def determined_cells(specs: torch.Tensor) -> torch.Tensor:
    """What each caption fixes cell by cell: (B, 4) long, the digit a cell must hold, or -2
    where the caption leaves it open (relations fix a pair but not which row or column)."""
    fixed = torch.full((len(specs), CELLS), -2, dtype=torch.long, device=specs.device)
    place = specs[:, FAMILY] == PLACE
    fixed[place, specs[place, SLOT]] = specs[place, A]
    layout = specs[:, FAMILY] == LAYOUT
    fixed[layout] = specs[layout, A:]
    return fixed


def _allowed_relations() -> torch.Tensor:
    """The (relation, a, b) triples a training relation caption may describe."""
    triples = torch.cartesian_prod(torch.arange(len(RELATIONS)), torch.arange(10), torch.arange(10))
    specs = torch.zeros(len(triples), 8, dtype=torch.long)
    specs[:, FAMILY], specs[:, SLOT], specs[:, A], specs[:, B] = RELATION, triples[:, 0], triples[:, 1], triples[:, 2]
    return triples[~held_out(specs)]


ALLOWED_RELATIONS = _allowed_relations()
HELD_OUT_RELATIONS = torch.tensor([[kind, a, b] for a, kind, b in HELD_OUT_FACTS]
                                  + [[_OPPOSITE[kind], b, a] for a, kind, b in HELD_OUT_FACTS])


def draw_specs(count: int, generator: torch.Generator, held_out_only: bool = False) -> torch.Tensor:
    """``count`` caption specs (count, 8): families, templates and forms uniform, digits uniform.

    Training specs never hold a held-out fact or template. With ``held_out_only`` every spec
    is a held-out relation caption instead: half a held-out fact in a seen template, half
    any fact in the held-out template.
    """
    def uniform(high: int, size: int = count) -> torch.Tensor:
        return torch.randint(high, (size,), generator=generator)

    specs = torch.zeros(count, 8, dtype=torch.long)
    specs[:, FORM] = uniform(2)
    specs[:, A:] = uniform(10, count * 4).view(count, 4)
    if held_out_only:
        specs[:, FAMILY] = RELATION
        fact = torch.arange(count) % 2 == 0
        chosen = HELD_OUT_RELATIONS[uniform(len(HELD_OUT_RELATIONS))]
        specs[fact, SLOT], specs[fact, A], specs[fact, B] = chosen[fact, 0], chosen[fact, 1], chosen[fact, 2]
        specs[fact, TEMPLATE] = uniform(HELD_OUT_TEMPLATE)[fact]
        specs[~fact, SLOT] = uniform(len(RELATIONS))[~fact]
        specs[~fact, TEMPLATE] = HELD_OUT_TEMPLATE
        return specs
    specs[:, FAMILY] = uniform(len(FAMILIES))
    sizes = torch.tensor([len(PLACE_TEMPLATES), HELD_OUT_TEMPLATE, len(LAYOUT_TEMPLATES), len(COUNT_TEMPLATES)])
    specs[:, TEMPLATE] = (torch.rand(count, generator=generator) * sizes[specs[:, FAMILY]]).long()
    relation = specs[:, FAMILY] == RELATION
    chosen = ALLOWED_RELATIONS[uniform(len(ALLOWED_RELATIONS))]
    specs[relation, SLOT], specs[relation, A], specs[relation, B] = (chosen[relation, 0], chosen[relation, 1],
                                                                      chosen[relation, 2])
    place = specs[:, FAMILY] == PLACE
    specs[place, SLOT] = uniform(CELLS)[place]
    counted = specs[:, FAMILY] == COUNT
    specs[counted, SLOT] = 1 + uniform(CELLS)[counted]
    return specs


def draw_layouts(specs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random layout (B, 4) satisfying each spec (B, 8); every cell the caption leaves open
    is empty or holds a random digit (every caption fixes at least one digit)."""
    count = len(specs)
    family, slot, a, b = specs[:, FAMILY], specs[:, SLOT], specs[:, A], specs[:, B]
    # Open cells: each empty with probability 1/2, else a uniform digit.
    layouts = torch.randint(10, (count, CELLS), generator=generator)
    layouts[torch.rand(count, CELLS, generator=generator) < 0.5] = -1
    rows = torch.arange(count)
    place = family == PLACE
    layouts[rows[place], slot[place]] = a[place]
    relation = family == RELATION
    line = torch.randint(2, (count,), generator=generator)  # which row or column holds the pair
    first = torch.where(slot <= RIGHT, 2 * line, line)  # left/right: cells 2r, 2r+1; above/below: c, c+2
    second = torch.where(slot <= RIGHT, 2 * line + 1, line + 2)
    swap = (slot == RIGHT) | (slot == BELOW)
    first, second = torch.where(swap, second, first), torch.where(swap, first, second)
    layouts[rows[relation], first[relation]] = a[relation]
    layouts[rows[relation], second[relation]] = b[relation]
    full = family == LAYOUT
    layouts[full] = specs[full, A:]
    counted = family == COUNT
    others = (a[:, None] + 1 + torch.randint(9, (count, CELLS), generator=generator)) % 10  # any digit but a
    others[torch.rand(count, CELLS, generator=generator) < 0.5] = -1
    order = torch.rand(count, CELLS, generator=generator).argsort(dim=1)  # the k cells holding a come first
    holds_a = order < slot[:, None]
    layouts[counted] = torch.where(holds_a, a[:, None], others)[counted]
    return layouts


# The captions of the sample grids written during training: every family, both forms, and
# two held-out captions (a held-out fact, the held-out template) to watch generalisation.
GRID_SPECS = torch.tensor([
    [PLACE, 0, 1, 0, 7, 0, 0, 0],  # a 7 in the top left
    [PLACE, 1, 0, 3, 4, 0, 0, 0],  # four in the bottom right corner
    [RELATION, 0, 0, ABOVE, 2, 5, 0, 0],  # a two above a five
    [RELATION, 1, 1, RIGHT, 6, 1, 0, 0],  # a 6 right of a 1
    [RELATION, 0, 1, LEFT, 3, 7, 0, 0],  # a 3 to the left of a 7 (held-out fact)
    [RELATION, HELD_OUT_TEMPLATE, 1, LEFT, 4, 9, 0, 0],  # left of a 9 is a 4 (held-out template)
    [LAYOUT, 0, 1, 0, 3, 7, 1, 0],  # 3 and 7 on top, 1 and 0 below
    [LAYOUT, 1, 0, 0, 5, 6, 2, 8],  # two and eight at the bottom, five and six at the top
    [COUNT, 0, 0, 2, 4, 0, 0, 0],  # two fours
    [COUNT, 1, 1, 3, 6, 0, 0, 0],  # exactly three 6s
])
