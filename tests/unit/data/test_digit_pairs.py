"""The bundled digit_pairs set: real glyphs, labels, captions and noisy tags, all from a seed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from retrieval.data.cross_modal import CrossModalDataset
from retrieval.data.digit_pairs import DIGIT_WORDS, DISTRACTOR_TAGS, TAG_NAMES, load_digit_pairs
from retrieval.data.transforms import eval_transform
from retrieval.errors import DatasetError

_SIZE = 400


def _matrices(dataset: CrossModalDataset) -> tuple[np.ndarray, np.ndarray]:
    """`(tags [N, 16], labels [N, 10])`: digit_pairs always has both."""
    assert dataset.tags is not None and dataset.labels is not None
    return dataset.tags, dataset.labels


@pytest.fixture(scope="module")
def pairs() -> CrossModalDataset:
    return load_digit_pairs(size=_SIZE, seed=7)


def _glyph_rows(source: str) -> list[int]:
    name, _index, rows = source.split(":")
    assert name == "digit_pairs"
    return [int(row) for row in rows.split("-")]


def test_shapes_and_names(pairs: CrossModalDataset) -> None:
    dataset = pairs
    assert len(dataset) == _SIZE
    tags, labels = _matrices(dataset)
    assert labels.shape == (_SIZE, 10) and tags.shape == (_SIZE, len(TAG_NAMES))
    assert dataset.label_names == [str(digit) for digit in range(10)]
    assert dataset.tag_names == [*DIGIT_WORDS, *DISTRACTOR_TAGS]
    image = dataset.load_image(0)
    assert (image.mode, image.size) == ("L", (24, 8))


def test_images_are_the_real_glyphs_named_in_the_source_and_labels_are_their_digits(pairs: CrossModalDataset) -> None:
    dataset = pairs
    bunch = load_digits()
    glyphs = np.floor(bunch.images * 255 / 16 + 0.5).astype(np.uint8)
    labels = _matrices(dataset)[1]
    counts = set()
    for index in range(_SIZE):
        rows = _glyph_rows(dataset.source(index))
        digits = [int(bunch.target[row]) for row in rows]
        counts.add(len(rows))
        assert len(set(digits)) == len(digits), "the digits of one item are distinct"
        expected = np.zeros((8, 24), dtype=np.uint8)
        left = 4 if len(rows) == 2 else 0
        for slot, row in enumerate(rows):
            expected[:, left + 8 * slot : left + 8 * slot + 8] = glyphs[row]
        np.testing.assert_array_equal(np.asarray(dataset.load_image(index)), expected)
        assert sorted(np.flatnonzero(labels[index]).tolist()) == sorted(digits)
    assert counts == {2, 3}


def _mentioned_digits(caption: str) -> list[int]:
    """The digits a caption names, in the order it names them (words or numerals)."""
    mentioned = []
    for token in re.findall(r"[a-z]+|\d", caption):
        if token.isdigit():
            mentioned.append(int(token))
        elif token in DIGIT_WORDS:
            mentioned.append(DIGIT_WORDS.index(token))
    return mentioned


def test_five_distinct_captions_name_exactly_the_digits_present(pairs: CrossModalDataset) -> None:
    dataset = pairs
    labels = _matrices(dataset)[1]
    targets = load_digits().target
    reordered = numerals = 0
    for index in range(_SIZE):
        captions = dataset.captions_of(index)
        assert len(captions) == 5 and len(set(captions)) == 5
        present = sorted(np.flatnonzero(labels[index]).tolist())
        left_to_right = [int(targets[row]) for row in _glyph_rows(dataset.source(index))]
        for caption in captions:
            mentioned = _mentioned_digits(caption)
            assert sorted(mentioned) == present, caption
            reordered += mentioned != left_to_right
            numerals += bool(re.search(r"\d", caption))
            assert " a eight" not in caption and not caption.startswith("a eight"), caption
    texts, owners = dataset.texts()
    assert len(texts) == 5 * _SIZE and owners.tolist() == np.repeat(np.arange(_SIZE), 5).tolist()
    # Wording and order vary: a fair share of captions names the digits out of left-to-right order
    # or as numerals.
    assert reordered > 0.15 * 5 * _SIZE and numerals > 0.15 * 5 * _SIZE


def test_tags_are_informative_but_noisy(pairs: CrossModalDataset) -> None:
    dataset = pairs
    tags, labels = _matrices(dataset)
    digit_tags = tags[:, :10]
    assert not (digit_tags * (1 - labels)).any(), "a digit tag is only ever one of the digits present"
    assert digit_tags.sum(axis=1).min() >= 1, "every item keeps at least one digit tag"
    drop_rate = 1 - digit_tags.sum() / labels.sum()
    distractor_rate = tags[:, 10:].mean()
    assert 0.04 < drop_rate < 0.16 and 0.06 < distractor_rate < 0.14
    clean = load_digit_pairs(size=50, seed=7, tag_drop_probability=0.0, distractor_probability=0.0)
    clean_tags, clean_labels = _matrices(clean)
    np.testing.assert_array_equal(clean_tags[:, :10], clean_labels)
    assert not clean_tags[:, 10:].any()


def test_same_seed_same_items_other_seed_other_items() -> None:
    first = load_digit_pairs(size=30, seed=11)
    second = load_digit_pairs(size=30, seed=11)
    other = load_digit_pairs(size=30, seed=12)
    assert first.captions == second.captions
    assert [first.source(index) for index in range(30)] == [second.source(index) for index in range(30)]
    np.testing.assert_array_equal(_matrices(first)[0], _matrices(second)[0])
    for index in range(30):
        np.testing.assert_array_equal(np.asarray(first.load_image(index)), np.asarray(second.load_image(index)))
    assert first.captions != other.captions


def test_items_go_through_the_transform() -> None:
    dataset = load_digit_pairs(size=20, seed=0, transform=eval_transform(image_size=32))
    image, index = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and index == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"size": 0}, "size must be >= 1, got 0"),
        ({"size": 5, "tag_drop_probability": 1.0}, r"tag_drop_probability must lie in \[0, 1\), got 1.0"),
        ({"size": 5, "distractor_probability": -0.1}, r"distractor_probability must lie in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_rejected(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_digit_pairs(seed=0, **arguments)  # type: ignore[arg-type]
