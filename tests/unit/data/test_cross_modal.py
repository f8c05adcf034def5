"""CrossModalDataset, the DCMH random split and the split entry point (on the bundled digit_pairs)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import DatasetSpec
from retrieval.data.base import ArrayImageLoader
from retrieval.data.cross_modal import CrossModalDataset, cross_modal_datasets_from_spec, random_query_split
from retrieval.data.transforms import eval_transform
from retrieval.errors import DatasetError


def _tiny_dataset(*, transform: object = None) -> CrossModalDataset:
    """Three 4x6 images of constant grey 10, 20, 30 with 2, 1 and 3 captions."""
    return CrossModalDataset(
        loaders=[ArrayImageLoader(pixels=np.full((4, 6), value, dtype=np.uint8)) for value in (10, 20, 30)],
        captions=[["a b", "c"], ["d"], ["e", "f", "g"]],
        tags=np.array([[1, 0], [0, 1], [1, 1]]),
        labels=np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]]),
        label_names=["x", "y", "z"],
        tag_names=["t0", "t1"],
        sources=["s0", "s1", "s2"],
        transform=transform,  # type: ignore[arg-type]
    )


def test_texts_flatten_captions_in_image_order_with_their_owner() -> None:
    texts, owners = _tiny_dataset().texts()
    assert texts == ["a b", "c", "d", "e", "f", "g"]
    assert owners.dtype == np.int64
    assert owners.tolist() == [0, 0, 1, 2, 2, 2]


def test_tags_and_labels_are_float32_read_only_with_their_widths() -> None:
    dataset = _tiny_dataset()
    assert dataset.tags is not None and dataset.labels is not None
    assert dataset.tags.dtype == np.float32 and dataset.labels.dtype == np.float32
    assert (dataset.tag_dim, dataset.num_labels) == (2, 3)
    with pytest.raises(ValueError):
        dataset.labels[0, 0] = 5.0
    caption_only = CrossModalDataset(
        loaders=[ArrayImageLoader(pixels=np.zeros((2, 2), dtype=np.uint8))],
        captions=[["one"]],
        tags=None,
        labels=None,
        label_names=[],
        tag_names=[],
        sources=["only"],
    )
    assert (caption_only.tag_dim, caption_only.num_labels, caption_only.tags, caption_only.labels) == (
        None,
        None,
        None,
        None,
    )


def test_subset_keeps_captions_tags_labels_and_sources_in_the_given_order() -> None:
    part = _tiny_dataset().subset([2, 0, 2])
    assert len(part) == 3
    assert [part.source(index) for index in range(3)] == ["s2", "s0", "s2"]
    assert part.captions == [["e", "f", "g"], ["a b", "c"], ["e", "f", "g"]]
    assert part.labels is not None and part.labels.tolist() == [[0, 1, 1], [1, 0, 0], [0, 1, 1]]
    assert part.tags is not None and part.tags.tolist() == [[1, 1], [1, 0], [1, 1]]
    assert np.asarray(part.load_image(1)).max() == 10
    assert part.texts()[1].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert len(_tiny_dataset().subset([])) == 0
    with pytest.raises(IndexError, match="index 3 is out of range for a dataset of 3 images"):
        _tiny_dataset().subset([0, 3])


def test_captions_index_to_fresh_lists_and_compare_to_lists() -> None:
    dataset = _tiny_dataset()
    captions = dataset.captions
    assert len(captions) == 3 and captions[2] == ["e", "f", "g"] and captions[-1] == ["e", "f", "g"]
    assert captions[:2] == [["a b", "c"], ["d"]]
    assert list(captions) == [["a b", "c"], ["d"], ["e", "f", "g"]]
    assert captions != [["a b", "c"], ["d"]] and captions != "abc"
    captions[0].append("changed")
    assert dataset.captions_of(0) == ["a b", "c"], "the dataset's captions cannot be changed through the view"


def test_items_are_transformed_images_with_their_index_and_need_a_transform() -> None:
    with pytest.raises(DatasetError, match="no transform"):
        _tiny_dataset()[0]
    dataset = _tiny_dataset().with_transform(eval_transform(image_size=8, mean=(0, 0, 0), std=(1, 1, 1)))
    image, index = dataset[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and index == 2
    torch.testing.assert_close(image, torch.full((3, 8, 8), 30 / 255))
    assert dataset[-1][1] == 2
    assert isinstance(dataset.load_image(0), Image.Image)
    restored = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(restored[1][0], dataset[1][0])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"captions": [["a"], ["b"]]}, "loaders, captions and sources must have the same length, got 3, 2 and 3"),
        ({"captions": [["a"], [], ["c"]]}, r"image 1 \(s1\) has no caption"),
        ({"captions": [["a"], "bc", ["c"]]}, r"captions\[1\] \(s1\) is a string"),
        ({"tags": np.zeros((2, 2))}, r"tags must have shape \[N, D\] with N = 3 images, got shape \(2, 2\)"),
        ({"labels": np.full((3, 3), np.nan)}, "labels holds non-finite values"),
        ({"label_names": ["x"]}, "label_names has 1 names for 3 columns"),
        ({"tags": None}, "tag_names has 2 names for 0 columns"),
    ],
)
def test_inconsistent_inputs_are_rejected_with_a_message(changes: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "loaders": [ArrayImageLoader(pixels=np.zeros((2, 2), dtype=np.uint8))] * 3,
        "captions": [["a"], ["b"], ["c"]],
        "tags": np.zeros((3, 2)),
        "labels": np.zeros((3, 3)),
        "label_names": ["x", "y", "z"],
        "tag_names": ["t0", "t1"],
        "sources": ["s0", "s1", "s2"],
    }
    arguments.update(changes)
    with pytest.raises(DatasetError, match=message):
        CrossModalDataset(**arguments)  # type: ignore[arg-type]


def test_random_query_split_matches_a_permutation_reference() -> None:
    parts = random_query_split(num_items=50, query_size=7, train_size=20, seed=3)
    rng = np.random.default_rng(3)
    order = rng.permutation(50)
    assert parts.query.tolist() == sorted(order[:7].tolist())
    assert parts.retrieval.tolist() == sorted(order[7:].tolist())
    assert parts.train.tolist() == sorted(rng.choice(np.sort(order[7:]), size=20, replace=False).tolist())
    assert set(parts.train.tolist()) <= set(parts.retrieval.tolist())
    assert not set(parts.query.tolist()) & set(parts.retrieval.tolist())
    again = random_query_split(num_items=50, query_size=7, train_size=20, seed=3)
    assert again.train.tolist() == parts.train.tolist()
    other = random_query_split(num_items=50, query_size=7, train_size=20, seed=4)
    assert other.query.tolist() != parts.query.tolist()


def test_random_query_split_names_the_sizes_that_do_not_fit() -> None:
    with pytest.raises(DatasetError, match="query_size=10 leaves no retrieval item in a dataset of 10 items"):
        random_query_split(num_items=10, query_size=10, train_size=1, seed=0)
    with pytest.raises(DatasetError, match=r"train_size=9 exceeds the retrieval set of 8 items .*query_size=2"):
        random_query_split(num_items=10, query_size=2, train_size=9, seed=0)
    parts = random_query_split(num_items=10, query_size=9, train_size=1, seed=0)
    assert (len(parts.query), len(parts.retrieval), len(parts.train)) == (9, 1, 1)


def _digit_pairs_spec(**cross_modal: object) -> DatasetSpec:
    return DatasetSpec.model_validate(
        {"name": "digit_pairs", "image_size": 16, "cross_modal": {"size": 100, **cross_modal}}
    )


def test_spec_splits_digit_pairs_with_the_train_and_eval_transforms() -> None:
    splits = cross_modal_datasets_from_spec(_digit_pairs_spec(query_size=10, train_size=40, seed=5))
    assert (len(splits.query), len(splits.retrieval), len(splits.train)) == (10, 90, 40)
    query_sources = {splits.query.source(index) for index in range(10)}
    retrieval_sources = {splits.retrieval.source(index) for index in range(90)}
    train_sources = {splits.train.source(index) for index in range(40)}
    assert not query_sources & retrieval_sources and train_sources <= retrieval_sources
    expected = random_query_split(num_items=100, query_size=10, train_size=40, seed=5)
    assert sorted(int(source.split(":")[1]) for source in query_sources) == expected.query.tolist()
    # Eval transform: deterministic; training transform: random crop/rotation (augment defaults to True).
    torch.testing.assert_close(splits.query[0][0], splits.query[0][0])
    assert splits.query[0][0].shape == (3, 16, 16)
    torch.manual_seed(0)
    first = splits.train[0][0]
    assert any(not torch.equal(first, splits.train[0][0]) for _ in range(5))
    unaugmented = cross_modal_datasets_from_spec(
        DatasetSpec.model_validate(
            {"name": "digit_pairs", "augment": False, "cross_modal": {"size": 100, "query_size": 10, "train_size": 40}}
        )
    )
    torch.testing.assert_close(unaugmented.train[0][0], unaugmented.train[0][0])


def test_spec_split_is_reproducible_from_the_seed() -> None:
    first = cross_modal_datasets_from_spec(_digit_pairs_spec(query_size=10, train_size=40, seed=1))
    second = cross_modal_datasets_from_spec(_digit_pairs_spec(query_size=10, train_size=40, seed=1))
    assert first.train.captions == second.train.captions
    assert [first.query.source(index) for index in range(10)] == [second.query.source(index) for index in range(10)]


def test_spec_defaults_do_not_fit_a_small_digit_pairs_and_say_so() -> None:
    # The DCMH defaults (2,000 queries, 10,000 train) need a larger set than 100 items.
    with pytest.raises(DatasetError, match="query_size=2000 leaves no retrieval item in a dataset of 100 items"):
        cross_modal_datasets_from_spec(_digit_pairs_spec())


def test_spec_of_an_image_only_dataset_is_rejected() -> None:
    with pytest.raises(DatasetError, match="'digits' is not an image-text dataset"):
        cross_modal_datasets_from_spec(DatasetSpec(name="digits"))
