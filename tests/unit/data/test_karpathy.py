"""Flickr30K and MS-COCO from tiny Karpathy split JSON files written by the test in the real layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import DatasetSpec
from retrieval.data.cross_modal import cross_modal_datasets_from_spec
from retrieval.data.karpathy import load_karpathy
from retrieval.errors import CorruptImageError, DatasetError


def _colour(number: int) -> tuple[int, int, int]:
    return (number * 41 % 256, 200 - number * 13 % 200, 30 + number * 17 % 220)


def _sentence(text: str, *, image_id: int, sentence_id: int) -> dict[str, Any]:
    return {"tokens": text.lower().rstrip(".").split(), "raw": text, "imgid": image_id, "sentid": sentence_id}


def _entry(image_id: int, filename: str, split: str, texts: list[str], **extra: Any) -> dict[str, Any]:
    sentences = [
        _sentence(text, image_id=image_id, sentence_id=5 * image_id + position) for position, text in enumerate(texts)
    ]
    return {
        "sentids": [sentence["sentid"] for sentence in sentences],
        "imgid": image_id,
        "sentences": sentences,
        "split": split,
        "filename": filename,
        **extra,
    }


def _five(image_id: int) -> list[str]:
    return [f"Image {image_id} caption {position}." for position in range(5)]


_FLICKR_SPLITS = ["train", "train", "val", "test", "train", "test"]


@pytest.fixture
def flickr_root(tmp_path: Path) -> Path:
    """dataset_flickr30k.json + flickr30k-images/ with 6 images: 3 train, 1 val, 2 test."""
    root = tmp_path / "flickr30k"
    (root / "flickr30k-images").mkdir(parents=True)
    images = []
    for image_id, split in enumerate(_FLICKR_SPLITS):
        filename = f"{1000092795 + image_id}.jpg"
        Image.new("RGB", (12, 9 + image_id), _colour(image_id)).save(root / "flickr30k-images" / filename)
        images.append(_entry(image_id, filename, split, _five(image_id)))
    # Image 1: a sentence with an empty raw text falls back to its tokens; a blank one is dropped.
    images[1]["sentences"][2] = {"tokens": ["two", "dogs", "play"], "raw": "", "imgid": 1, "sentid": 7}
    images[1]["sentences"][3] = {"tokens": [], "raw": "   ", "imgid": 1, "sentid": 8}
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


_COCO_SPLITS = ["train", "restval", "val", *["test"] * 10, "restval"]


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """dataset_coco.json + train2014/ and val2014/ with 14 images: 1 train, 2 restval, 1 val, 10 test."""
    root = tmp_path / "coco"
    images = []
    for image_id, split in enumerate(_COCO_SPLITS):
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{image_id:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), _colour(image_id)).save(root / folder / filename)
        texts = _five(image_id) + (["Sixth.", "Seventh."] if image_id == 3 else [])
        images.append(_entry(image_id, filename, split, texts, filepath=folder, cocoid=100 + image_id))
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_flickr30k_reads_images_captions_and_the_karpathy_split(flickr_root: Path) -> None:
    loaded = load_karpathy(name="flickr30k", root=flickr_root)
    dataset = loaded.dataset
    assert len(dataset) == 6
    assert Path(dataset.source(3)) == flickr_root / "flickr30k-images" / "1000092798.jpg"
    assert dataset.captions_of(0) == _five(0)
    assert dataset.captions_of(1) == ["Image 1 caption 0.", "Image 1 caption 1.", "two dogs play", "Image 1 caption 4."]
    assert (dataset.tags, dataset.labels, dataset.tag_dim, dataset.num_labels) == (None, None, None, None)
    assert loaded.packaged_split is not None
    assert loaded.packaged_split.train.tolist() == [0, 1, 4]
    assert loaded.packaged_split.query.tolist() == [3, 5]
    assert loaded.packaged_split.retrieval.tolist() == [3, 5]
    texts, owners = dataset.texts()
    assert len(texts) == 29 and owners.tolist() == [0] * 5 + [1] * 4 + [2] * 5 + [3] * 5 + [4] * 5 + [5] * 5
    image = dataset.load_image(5)
    assert image.size == (12, 14)
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(_colour(5), dtype=np.int16)).max() <= 4


def test_coco_keeps_five_captions_and_folds_the_test_images(coco_root: Path) -> None:
    loaded = load_karpathy(name="coco", root=coco_root)
    dataset = loaded.dataset
    assert Path(dataset.source(0)) == coco_root / "train2014" / "COCO_train2014_000000000000.jpg"
    assert Path(dataset.source(3)) == coco_root / "val2014" / "COCO_val2014_000000000003.jpg"
    assert dataset.captions_of(3) == _five(3)  # the 6th and 7th sentences are left out
    assert loaded.packaged_split is not None
    assert loaded.packaged_split.train.tolist() == [0, 1, 13]
    assert loaded.packaged_split.query.tolist() == list(range(3, 13))
    without_restval = load_karpathy(name="coco", root=coco_root, restval=False).packaged_split
    assert without_restval is not None and without_restval.train.tolist() == [0]
    for fold in range(5):
        split = load_karpathy(name="coco", root=coco_root, coco_test="1k", coco_fold=fold).packaged_split
        assert split is not None
        # Five equal folds of the test images in JSON order (1,000 each on the real 5,000).
        assert split.query.tolist() == split.retrieval.tolist() == [3 + 2 * fold, 4 + 2 * fold]


def test_the_spec_splits_captions_into_train_and_test_with_their_transforms(coco_root: Path) -> None:
    spec = DatasetSpec.model_validate(
        {"name": "coco", "root": str(coco_root), "image_size": 8, "cross_modal": {"coco_test": "1k", "coco_fold": 2}}
    )
    splits = cross_modal_datasets_from_spec(spec)
    assert [Path(splits.query.source(index)).name for index in range(2)] == [
        "COCO_val2014_000000000007.jpg",
        "COCO_val2014_000000000008.jpg",
    ]
    assert [splits.retrieval.source(index) for index in range(2)] == [splits.query.source(index) for index in range(2)]
    assert len(splits.train) == 3
    assert splits.query[1][0].shape == (3, 8, 8)
    torch.testing.assert_close(splits.query[1][0], splits.query[1][0])
    assert splits.query.texts()[0][:5] == _five(7)


def test_flickr30k_from_the_spec(flickr_root: Path) -> None:
    splits = cross_modal_datasets_from_spec(DatasetSpec(name="flickr30k", root=str(flickr_root), augment=False))
    assert (len(splits.train), len(splits.query), len(splits.retrieval)) == (3, 2, 2)
    assert splits.train.captions[2] == _five(4)


def _rewrite(root: Path, name: str, change: Any) -> None:
    path = root / name
    contents = json.loads(path.read_text())
    change(contents)
    path.write_text(json.dumps(contents))


def test_an_image_without_captions_is_an_error_naming_it(flickr_root: Path) -> None:
    def blank_captions(contents: dict[str, Any]) -> None:
        contents["images"][4]["sentences"] = [{"raw": "", "tokens": []}]

    _rewrite(flickr_root, "dataset_flickr30k.json", blank_captions)
    with pytest.raises(DatasetError, match=r"images\[4\] \(1000092799\.jpg\) has no non-empty caption"):
        load_karpathy(name="flickr30k", root=flickr_root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda contents: contents.update(dataset="coco"), "declares dataset 'coco', expected 'flickr30k'"),
        (lambda contents: contents["images"][2].update(split="dev"), r"images\[2\] .* has split 'dev'"),
        (lambda contents: contents["images"][0].pop("filename"), r"images\[0\] has no 'filename'"),
        (lambda contents: contents["images"][0].pop("sentences"), r"images\[0\] .* has no 'sentences' list"),
        (lambda contents: contents.pop("images"), "has no 'images' list"),
        (
            lambda contents: [image.update(split="val") for image in contents["images"] if image["split"] == "test"],
            "has no image in split 'test'",
        ),
    ],
)
def test_a_malformed_json_is_an_error_naming_the_entry(flickr_root: Path, change: Any, message: str) -> None:
    _rewrite(flickr_root, "dataset_flickr30k.json", change)
    with pytest.raises(DatasetError, match=message):
        load_karpathy(name="flickr30k", root=flickr_root)


def test_missing_files_are_named(flickr_root: Path, coco_root: Path) -> None:
    (flickr_root / "flickr30k-images" / "1000092796.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed in .*dataset_flickr30k\.json are missing.*1000092796"):
        load_karpathy(name="flickr30k", root=flickr_root)
    with pytest.raises(DatasetError, match=r"missing Karpathy split file .*dataset_coco\.json"):
        load_karpathy(name="coco", root=flickr_root)
    (coco_root / "dataset_coco.json").write_text("{ not json")
    with pytest.raises(DatasetError, match=r"cannot parse .*dataset_coco\.json as JSON"):
        load_karpathy(name="coco", root=coco_root)


def test_a_coco_entry_without_filepath_is_named(coco_root: Path) -> None:
    _rewrite(coco_root, "dataset_coco.json", lambda contents: contents["images"][5].pop("filepath"))
    with pytest.raises(DatasetError, match=r"images\[5\] \(COCO_val2014_000000000005\.jpg\) has no 'filepath'"):
        load_karpathy(name="coco", root=coco_root)


def test_a_corrupt_image_raises_when_read_naming_the_file(flickr_root: Path) -> None:
    (flickr_root / "flickr30k-images" / "1000092800.jpg").write_bytes(b"GIF89a truncated")
    dataset = load_karpathy(name="flickr30k", root=flickr_root).dataset
    with pytest.raises(CorruptImageError, match=r"cannot read image .*1000092800\.jpg"):
        dataset.load_image(5)
    assert dataset.load_image(4).size == (12, 13)
