"""`digit_pairs`: a bundled multi-label image-text set built from scikit-learn's real digits.

Each item is an 8 x 24 grayscale image of two or three real 8x8 digit glyphs side by side
(two glyphs are centred with a 4-pixel blank margin on each side, so every image has the
same size and the transform scales all glyphs alike). The digits of one item are distinct
(so the multi-hot label loses nothing) and each glyph is a different scikit-learn image.

- labels: multi-hot over the 10 digits present `[N, 10]`;
- captions: 5 per image, from varied templates (word order and wording vary; some use
  numerals: "a three next to a seven", "the digits 3 and 7", "a seven beside a three");
- tags: a noisy tag vector over the digit words and a few distractor words: each present
  digit's word is dropped with `tag_drop_probability` (at least one is always kept) and each
  distractor is added with `distractor_probability`, so tags are informative but noisy.

Everything is drawn from one `numpy.random.default_rng(seed)`: the same seed and size
give the same items. The source of item `i` is "digit_pairs:<i>:<glyph rows>", the rows of
`sklearn.datasets.load_digits()` its glyphs come from, left to right, joined by "-".
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.datasets import load_digits

from retrieval.config import CrossModalSplitSpec
from retrieval.data.base import ArrayImageLoader
from retrieval.data.cross_modal import CrossModalDataset, LoadedCrossModal
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DISTRACTOR_TAGS: tuple[str, ...] = ("handwritten", "scan", "ink", "paper", "number", "sketch")
TAG_NAMES: tuple[str, ...] = (*DIGIT_WORDS, *DISTRACTOR_TAGS)
CAPTIONS_PER_IMAGE = 5
GLYPH_SIDE = 8
IMAGE_WIDTH = 3 * GLYPH_SIDE

# load_digits() stores each pixel as a count of set bits in a 4x4 block: 0..16 (as digits.py).
_DIGITS_MAX_VALUE = 16.0

# Placeholders: {w1} the word of the first (leftmost) digit, {n1} its numeral, {a1} "a"/"an"
# before the word. Templates name the digits in several orders so the text does not
# simply mirror the image from left to right. No template uses a count word ("two digits"):
# it would read as a digit that is not there.
_TWO_DIGIT_TEMPLATES: tuple[str, ...] = (
    "{a1} {w1} next to {a2} {w2}",
    "{w1} and {w2}",
    "the digits {n1} and {n2}",
    "{a2} {w2} beside {a1} {w1}",
    "{a1} {w1} on the left and {a2} {w2} on the right",
    "a pair of digits: {n1} and {n2}",
    "a handwritten {w1} followed by {a2} {w2}",
    "{n2} and {n1} side by side",
)
_THREE_DIGIT_TEMPLATES: tuple[str, ...] = (
    "{a1} {w1}, {a2} {w2} and {a3} {w3}",
    "{w1}, {w2} and {w3}",
    "the digits {n1}, {n2} and {n3}",
    "digits {w3}, {w1} and {w2} in a row",
    "{a2} {w2} between {a1} {w1} and {a3} {w3}",
    "{n1} {n2} {n3} written side by side",
    "a row of digits: {n2}, {n3} and {n1}",
    "handwritten {w1}, {w2} and {w3}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _captions(digits: list[int], rng: np.random.Generator) -> list[str]:
    templates = _TWO_DIGIT_TEMPLATES if len(digits) == 2 else _THREE_DIGIT_TEMPLATES
    fields: dict[str, str] = {}
    for position, digit in enumerate(digits, start=1):
        fields[f"w{position}"] = DIGIT_WORDS[digit]
        fields[f"n{position}"] = str(digit)
        fields[f"a{position}"] = _article(DIGIT_WORDS[digit])
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    return [templates[int(template)].format(**fields) for template in chosen]


def _check_probability(value: float, *, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise DatasetError(f"{name} must lie in [0, 1), got {value}")


def load_digit_pairs(
    *,
    size: int,
    seed: int,
    transform: ImageTransform | None = None,
    tag_drop_probability: float = 0.1,
    distractor_probability: float = 0.1,
) -> CrossModalDataset:
    """Builds `size` digit_pairs items, deterministically from `seed`.

    Args:
        size: Number of items N.
        seed: Seed of every random choice (digit count, digits, glyphs, captions, tag noise).
        transform: Maps a PIL image (mode "L", 24 x 8) to a tensor `[3, H, W]`; None serves
            raw images only.
        tag_drop_probability: Chance that a present digit's tag is left out.
        distractor_probability: Chance that each distractor tag is added.

    Returns:
        A dataset with captions (5 per image), tags `[N, 16]` over `TAG_NAMES` and
        labels `[N, 10]` over "0".."9".

    Raises:
        DatasetError: `size` < 1 or a probability outside [0, 1).
    """
    if size < 1:
        raise DatasetError(f"digit_pairs size must be >= 1, got {size}")
    _check_probability(tag_drop_probability, name="tag_drop_probability")
    _check_probability(distractor_probability, name="distractor_probability")
    bunch = load_digits()
    glyphs = np.rint(bunch.images * (255.0 / _DIGITS_MAX_VALUE)).astype(np.uint8)
    rows_of_digit = [np.flatnonzero(bunch.target == digit) for digit in range(10)]
    rng = np.random.default_rng(seed)

    pixels = np.zeros((size, GLYPH_SIDE, IMAGE_WIDTH), dtype=np.uint8)
    labels = np.zeros((size, 10), dtype=np.float32)
    tags = np.zeros((size, len(TAG_NAMES)), dtype=np.float32)
    captions: list[list[str]] = []
    sources: list[str] = []
    for index in range(size):
        count = int(rng.integers(2, 4))
        digits = [int(digit) for digit in rng.choice(10, size=count, replace=False)]
        rows = [int(rng.choice(rows_of_digit[digit])) for digit in digits]
        left = (IMAGE_WIDTH - count * GLYPH_SIDE) // 2
        for slot, row in enumerate(rows):
            start = left + slot * GLYPH_SIDE
            pixels[index, :, start : start + GLYPH_SIDE] = glyphs[row]
        labels[index, digits] = 1.0
        kept = [digit for digit in digits if rng.random() >= tag_drop_probability]
        if not kept:
            kept = [digits[int(rng.integers(count))]]
        tags[index, kept] = 1.0
        distractors = rng.random(len(DISTRACTOR_TAGS)) < distractor_probability
        tags[index, len(DIGIT_WORDS) :] = distractors
        captions.append(_captions(digits, rng))
        sources.append(f"digit_pairs:{index}:{'-'.join(str(row) for row in rows)}")
    logger.debug("built %d digit_pairs items (seed %d)", size, seed)
    return CrossModalDataset(
        loaders=[ArrayImageLoader(pixels=item_pixels) for item_pixels in pixels],
        captions=captions,
        tags=tags,
        labels=labels,
        label_names=[str(digit) for digit in range(10)],
        tag_names=TAG_NAMES,
        sources=sources,
        transform=transform,
    )


def load_digit_pairs_for_job(*, split: CrossModalSplitSpec) -> LoadedCrossModal:
    """The `digit_pairs` row of the dataset table: `split.size` items from `split.seed`, split by the seed too."""
    return LoadedCrossModal(dataset=load_digit_pairs(size=split.size, seed=split.seed))
