"""A procedurally generated mini-world with ComposLoRA's concept categories.

Every image is 16x16 RGB, values in [0, 1], and is fully described by one label per
category (0 = the generic member, which the base model knows; 1.. = named concepts,
which only LoRAs learn), a layout, and nuisance randomness (positions, generic colours):

- character (3 concepts): a figure in the middle of the image; generic = a rectangle;
- clothing (2): the colour or pattern that fills the character; generic = a dull brown;
- style (2): a global look; generic = none;
- background (2): what fills the rest of the image; generic = a flat greyish colour;
- object (2): a small item in a top corner; generic = none.

Eleven concepts in all, 3 + 2 + 2 + 2 + 2 as in one ComposLoRA subset. Captions are
token ids: ``person`` followed by the trigger token of every named concept.

Layouts: a *single* figure in the middle (caption ``person ...``), or a *pair* of
smaller figures side by side (caption ``pair ...``). In a pair the character label is
the left figure and :attr:`Labels.values` carries the right figure's kind as a sixth
value. A character LoRA learns its figure alone and as one of a pair (next to a generic
figure, on either side), so "two characters in one image" (``pair`` plus two character
triggers) has a right answer, one figure of each, that merging two character LoRAs
tends to melt into one hybrid shape.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 16
CATEGORIES = ("character", "clothing", "style", "background", "object")
#: Named concepts per category (index 0 of each category is the generic member).
CONCEPTS = {
    "character": ("disc", "peak", "plus"),
    "clothing": ("red", "stripes"),
    "style": ("scanlines", "outline"),
    "background": ("sky", "meadow"),
    "object": ("star", "box"),
}
#: Flat list of (category, value) for the eleven named concepts; a LoRA per entry.
CONCEPT_LIST = tuple((cat, v + 1) for cat in CATEGORIES for v in range(len(CONCEPTS[cat])))
NUM_CLASSES = tuple(len(CONCEPTS[cat]) + 1 for cat in CATEGORIES)
#: Judge heads: the five categories, then the right figure of a pair (0 = single layout, 1 + kind).
HEADS = (*CATEGORIES, "second")
HEAD_CLASSES = (*NUM_CLASSES, NUM_CLASSES[0] + 1)

PAD, PERSON, PAIR = 0, 1, 2
TOKEN_OFFSET = 3  # concept tokens follow PAD, PERSON and PAIR
PAIR_SCALE = 0.62  # figures of a pair, relative to a single figure
PAIR_PROB = 0.3  # share of pair layouts in training scenes
VOCAB = TOKEN_OFFSET + len(CONCEPT_LIST)
CAPTION_LEN = 1 + len(CATEGORIES)


def concept_name(concept: tuple[str, int]) -> str:
    cat, value = concept
    return CONCEPTS[cat][value - 1]


def concept_token(concept: tuple[str, int]) -> int:
    return TOKEN_OFFSET + CONCEPT_LIST.index(concept)


@dataclass(frozen=True)
class Labels:
    """One value per category, in ``CATEGORIES`` order (0 = generic), then the layout.

    The sixth value is 0 for a single figure, ``1 + kind`` for a pair whose right figure
    is character ``kind`` (0 = generic); the character value is then the left figure.
    """

    values: tuple[int, int, int, int, int, int]

    def __post_init__(self):
        if len(self.values) == len(CATEGORIES):
            object.__setattr__(self, "values", (*self.values, 0))

    @property
    def pair(self) -> bool:
        return self.values[5] > 0

    def concepts(self) -> list[tuple[str, int]]:
        return [(cat, v) for cat, v in zip(CATEGORIES, self.values) if v]


def caption(concepts, extra_tokens=(), pair: bool = False) -> list[int]:
    """Token ids, padded to ``CAPTION_LEN``: PERSON (PAIR), the triggers of ``concepts``, then ``extra_tokens``."""
    tokens = [PAIR if pair else PERSON] + [concept_token(c) for c in concepts] + list(extra_tokens)
    tokens = tokens[:CAPTION_LEN]
    return tokens + [PAD] * (CAPTION_LEN - len(tokens))


def _char_mask(kind: int, cy: float, cx: float, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dy, dx = (yy - cy) / scale, (xx - cx) / scale
    if kind == 0:  # generic: a rectangle of random size
        hw, hh = rng.choice([2.9, 3.4]), rng.choice([3.9, 4.4])
        return (np.abs(dx) < hw) & (np.abs(dy) < hh)
    if kind == 1:  # disc
        return dx * dx + dy * dy < 4.6**2
    if kind == 2:  # peak: a triangle, apex up
        return (dy > -4.6) & (dy < 4.4) & (np.abs(dx) < (dy + 4.6) * 0.56)
    # plus
    return ((np.abs(dx) < 1.6) & (np.abs(dy) < 5.0)) | ((np.abs(dy) < 1.6) & (np.abs(dx) < 5.0))


def _figures_mask(labels: Labels, rng: np.random.Generator) -> np.ndarray:
    """Where the figure(s) of ``labels`` are: one in the middle, or a pair side by side."""
    char, right = labels.values[0], labels.values[5]
    if not right:
        cy, cx = 9.0 + rng.integers(-1, 2), 8.0 + rng.integers(-1, 2)
        return _char_mask(char, cy, cx, rng)
    cy = 9.5 + rng.integers(-1, 2)
    shift = rng.integers(0, 2) * 0.5
    left = _char_mask(char, cy, 4.25 - shift, rng, PAIR_SCALE)
    return left | _char_mask(right - 1, cy, 11.75 + shift, rng, PAIR_SCALE)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def render(labels: Labels, rng: np.random.Generator) -> np.ndarray:
    """Draw one image ``[3, 16, 16]`` float32 in [0, 1] for ``labels``; nuisance comes from ``rng``."""
    _, cloth, style, bg, obj, _ = labels.values
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    # background
    if bg == 0:
        img[:] = rng.uniform(0.5, 0.78) + rng.uniform(-0.07, 0.07, size=3)
    elif bg == 1:  # sky: blue at the top, pale at the bottom
        t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
        img[:] = (1 - t) * np.array([0.12, 0.3, 0.85]) + t * np.array([0.72, 0.88, 1.0])
    else:  # meadow: a 2-pixel checkerboard of greens
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        chk = ((yy // 2 + xx // 2) % 2)[..., None]
        img[:] = np.where(chk, np.array([0.25, 0.65, 0.2]), np.array([0.08, 0.38, 0.1]))
    # character(s), filled with the clothing
    mask = _figures_mask(labels, rng)
    if cloth == 0:
        fill = np.array([0.42, 0.3, 0.2]) * rng.uniform(0.75, 1.15)
        img[mask] = fill
    elif cloth == 1:
        img[mask] = np.array([0.92, 0.1, 0.1])
    else:
        rows = (np.arange(SIZE) // 2) % 2
        stripe = np.where(rows[:, None, None], np.array([0.1, 0.2, 0.85]), np.array([0.98, 0.85, 0.1]))
        stripe = np.broadcast_to(stripe, img.shape)
        img[mask] = stripe[mask]
    # object in a top corner
    omask = np.zeros((SIZE, SIZE), bool)
    if obj:
        oy, ox = 1, (1 if rng.random() < 0.5 else SIZE - 4)
        if obj == 1:  # star: a yellow plus
            omask[oy + 1, ox:ox + 3] = True
            omask[oy:oy + 3, ox + 1] = True
            img[omask] = np.array([1.0, 0.95, 0.2])
        else:  # box: a magenta square
            omask[oy:oy + 3, ox:ox + 3] = True
            img[omask] = np.array([0.9, 0.1, 0.9])
    # style
    if style == 1:  # scanlines: every other row darkened
        img[1::2] *= 0.5
    elif style == 2:  # outline: a black 1-pixel outline around the figure and the object
        shapes = mask | omask
        img[_dilate(shapes) & ~shapes] = 0.03
    return np.ascontiguousarray(np.clip(img, 0, 1).transpose(2, 0, 1))


def random_labels(rng: np.random.Generator, generic_prob: float = 0.4) -> Labels:
    """Labels over the whole world: each category generic with ``generic_prob``, else a uniform concept.

    A share ``PAIR_PROB`` of scenes are pairs, whose right figure is drawn like the left one.
    """
    values = []
    for n in NUM_CLASSES:
        values.append(0 if rng.random() < generic_prob else int(rng.integers(1, n)))
    right = 0
    if rng.random() < PAIR_PROB:
        right = 1 + (0 if rng.random() < generic_prob else int(rng.integers(1, NUM_CLASSES[0])))
    return Labels((*values, right))


def labels_of(concepts, pair_with: int | None = None) -> Labels:
    """Labels of a single-figure scene with ``concepts``; with ``pair_with`` (a character kind), a pair."""
    values = [0] * len(CATEGORIES)
    for cat, v in concepts:
        values[CATEGORIES.index(cat)] = v
    return Labels((*values, 0 if pair_with is None else 1 + pair_with))


def two_subject_labels(concepts) -> Labels:
    """The right answer to ``pair`` + two character triggers (+ others): one figure of each character."""
    chars = [v for cat, v in concepts if cat == "character"]
    rest = [c for c in concepts if c[0] != "character"]
    return labels_of([("character", chars[0]), *rest], pair_with=chars[1])


def render_batch(labels: list[Labels], rng: np.random.Generator) -> np.ndarray:
    return np.stack([render(lab, rng) for lab in labels])


def base_batch(n: int, rng: np.random.Generator, stray_token_prob: float = 0.5):
    """Generic scenes for the base model: images, captions.

    Captions sometimes carry stray concept triggers that change nothing in the image,
    so the base learns the words but not the concepts (like a base model that knows a
    name without knowing the character): given a trigger it still draws the generic scene.
    """
    pairs = rng.random(n) < PAIR_PROB
    imgs = render_batch([labels_of([], pair_with=0 if p else None) for p in pairs], rng)
    caps = []
    for p in pairs:
        extra = []
        if rng.random() < stray_token_prob:
            k = int(rng.integers(1, 4))
            extra = [TOKEN_OFFSET + int(i) for i in rng.choice(len(CONCEPT_LIST), size=k, replace=False)]
        caps.append(caption([], extra, pair=bool(p)))
    return imgs, np.array(caps, np.int64)


def concept_batch(concept: tuple[str, int], n: int, rng: np.random.Generator, stray_token_prob: float = 0.5):
    """Training data of one LoRA: images that show ``concept`` in otherwise generic scenes; images, captions.

    Stray triggers of other categories appear in some captions with no effect on the
    image: the LoRA keeps drawing its own concept's scene when prompted with others.
    In pair scenes a character concept is one of the two figures (either side, the
    other generic); any other concept applies to a pair of generic figures.
    """
    labels = []
    for p in rng.random(n) < PAIR_PROB:
        if not p:
            labels.append(labels_of([concept]))
        elif concept[0] != "character" or rng.random() < 0.5:
            labels.append(labels_of([concept], pair_with=0))
        else:
            labels.append(labels_of([("character", 0)], pair_with=concept[1]))
    imgs = render_batch(labels, rng)
    others = [i for i, c in enumerate(CONCEPT_LIST) if c[0] != concept[0]]
    caps = []
    for lab in labels:
        extra = []
        if rng.random() < stray_token_prob:
            k = int(rng.integers(1, 4))
            extra = [TOKEN_OFFSET + int(i) for i in rng.choice(others, size=k, replace=False)]
        caps.append(caption([concept], extra, pair=lab.pair))
    return imgs, np.array(caps, np.int64)


def compositions(max_n: int = 5) -> list[tuple[tuple[str, int], ...]]:
    """ComposLoRA's sets: one character plus N-1 concepts of distinct other categories, N = 2..max_n.

    The full Cartesian product, ordered by N then lexicographically: 24 + 72 + 96 + 48 = 240.
    """
    chars = [c for c in CONCEPT_LIST if c[0] == "character"]
    others = [cat for cat in CATEGORIES if cat != "character"]
    out = []
    for n in range(2, max_n + 1):
        for cats in itertools.combinations(others, n - 1):
            pools = [[c for c in CONCEPT_LIST if c[0] == cat] for cat in cats]
            for char in chars:
                for rest in itertools.product(*pools):
                    out.append((char, *rest))
    return out


def two_subject_compositions() -> list[tuple[tuple[str, int], ...]]:
    """Two characters in one image: every pair of character concepts, alone (N = 2) and with
    each concept of another category (N = 3): 3 + 24 = 27 sets."""
    chars = [c for c in CONCEPT_LIST if c[0] == "character"]
    others = [c for c in CONCEPT_LIST if c[0] != "character"]
    duos = list(itertools.combinations(chars, 2))
    return [duo for duo in duos] + [(*duo, o) for duo in duos for o in others]
