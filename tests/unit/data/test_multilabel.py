"""MIRFlickr-25K and NUS-WIDE loaders on tiny fixtures in their raw and `.mat` layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from retrieval.config import DatasetSpec
from retrieval.data.cross_modal import CrossModalDataset, cross_modal_datasets_from_spec
from retrieval.data.multilabel import load_mirflickr25k, load_nus_wide
from retrieval.errors import CorruptImageError, DatasetError


def _colour(number: int) -> tuple[int, int, int]:
    return (number * 37 % 256, 255 - number * 23 % 256, 40 + number * 19 % 200)


def _matrices(dataset: CrossModalDataset) -> tuple[np.ndarray, np.ndarray]:
    assert dataset.tags is not None and dataset.labels is not None
    return dataset.tags, dataset.labels


# --------------------------------------------------------------------------- MIRFlickr-25K raw

# Image number -> its tags (one per line in tags<N>.txt, as in the download).
_MIRFLICKR_TAGS = {
    1: ["sky", "dog", "sky"],
    2: ["dog", "beach"],
    3: ["sky", "rare"],
    4: ["dog", "sky"],
    5: ["beach", "sky"],
    6: ["rare2"],
    7: [],
}
# Concept -> image numbers; image 4 has no label, image 6 only tags below min_tag_count,
# image 7 no tag at all.
_MIRFLICKR_ANNOTATIONS = {"animals": [1, 2, 5, 6], "sky": [1, 3, 5, 7], "clouds": [3]}


@pytest.fixture
def mirflickr_root(tmp_path: Path) -> Path:
    """mirflickr/ + mirflickr25k_annotations_v080/ with 7 images, written like the download."""
    images = tmp_path / "mirflickr"
    (images / "meta" / "tags").mkdir(parents=True)
    for number, tags in _MIRFLICKR_TAGS.items():
        Image.new("RGB", (10 + number, 8), _colour(number)).save(images / f"im{number}.jpg")
        (images / "meta" / "tags" / f"tags{number}.txt").write_text("".join(f"{tag}\n" for tag in tags))
    (images / "README.txt").write_text("not an image\n")
    annotations = tmp_path / "mirflickr25k_annotations_v080"
    annotations.mkdir()
    for concept, numbers in _MIRFLICKR_ANNOTATIONS.items():
        (annotations / f"{concept}.txt").write_text("".join(f"{number}\n" for number in numbers))
    # The "relevant" duplicates and the readme are not concepts.
    (annotations / "animals_r1.txt").write_text("4\n")
    (annotations / "README.txt").write_text("annotations of the MIRFlickr set\n")
    return tmp_path


def test_mirflickr_raw_keeps_labelled_tagged_images_with_a_frequent_tag_vocabulary(mirflickr_root: Path) -> None:
    loaded = load_mirflickr25k(root=mirflickr_root, min_tag_count=2)
    dataset = loaded.dataset
    assert loaded.packaged_split is None
    # Kept: labelled and with a vocabulary tag (image 4: no label; 6: only a rare tag; 7: no tag).
    assert [Path(dataset.source(index)).name for index in range(len(dataset))] == [
        "im1.jpg",
        "im2.jpg",
        "im3.jpg",
        "im5.jpg",
    ]
    assert dataset.label_names == ["animals", "clouds", "sky"]
    assert dataset.tag_names == ["beach", "dog", "sky"]  # each in >= 2 images; "rare" is in one
    tags, labels = _matrices(dataset)
    assert labels.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert tags.tolist() == [[0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]]
    assert dataset.captions == [["sky dog"], ["dog beach"], ["sky"], ["beach sky"]]
    image = dataset.load_image(2)
    assert image.size == (13, 8)
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(_colour(3), dtype=np.int16)).max() <= 4


def test_mirflickr_raw_can_keep_untagged_images_with_an_empty_text(mirflickr_root: Path) -> None:
    dataset = load_mirflickr25k(root=mirflickr_root, min_tag_count=2, drop_untagged=False).dataset
    names = [Path(dataset.source(index)).name for index in range(len(dataset))]
    assert names == ["im1.jpg", "im2.jpg", "im3.jpg", "im5.jpg", "im6.jpg", "im7.jpg"]
    assert dataset.captions[-2:] == [[""], [""]]
    assert not _matrices(dataset)[0][-2:].any()


def test_mirflickr_raw_errors_name_the_file(mirflickr_root: Path) -> None:
    (mirflickr_root / "mirflickr" / "meta" / "tags" / "tags5.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*tags5\.txt"):
        load_mirflickr25k(root=mirflickr_root, min_tag_count=2)
    (mirflickr_root / "mirflickr" / "meta" / "tags" / "tags5.txt").write_text("sky\n")
    (mirflickr_root / "mirflickr25k_annotations_v080" / "sky.txt").write_text("1\n99\n")
    with pytest.raises(DatasetError, match=r"sky\.txt line 2: image 99 has no file .*im99\.jpg"):
        load_mirflickr25k(root=mirflickr_root, min_tag_count=2)
    (mirflickr_root / "mirflickr25k_annotations_v080" / "sky.txt").write_text("1\nim3\n")
    with pytest.raises(DatasetError, match=r"sky\.txt line 2: expected an image number, got 'im3'"):
        load_mirflickr25k(root=mirflickr_root, min_tag_count=2)
    (mirflickr_root / "mirflickr25k_annotations_v080" / "sky.txt").write_text("1\n3\n5\n7\n")
    with pytest.raises(DatasetError, match=r"no tag .* occurs in at least min_tag_count=50 images"):
        load_mirflickr25k(root=mirflickr_root, min_tag_count=50)


def test_a_corrupt_image_fails_when_read_and_names_its_file(mirflickr_root: Path) -> None:
    (mirflickr_root / "mirflickr" / "im2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = load_mirflickr25k(root=mirflickr_root, min_tag_count=2).dataset
    with pytest.raises(CorruptImageError, match=r"cannot read image .*im2\.jpg"):
        dataset.load_image(1)
    assert dataset.load_image(0).size == (11, 8)


def test_the_spec_reads_the_raw_layout_with_the_real_sets_tag_threshold(mirflickr_root: Path) -> None:
    spec = DatasetSpec.model_validate(
        {
            "name": "mirflickr25k",
            "root": str(mirflickr_root),
            "image_size": 8,
            "cross_modal": {"query_size": 1, "train_size": 2, "seed": 0},
        }
    )
    # The spec loads with the real set's min_tag_count=20: no tag is that frequent here.
    with pytest.raises(DatasetError, match="min_tag_count=20"):
        cross_modal_datasets_from_spec(spec)


# --------------------------------------------------------------------------- NUS-WIDE raw

_NUS_FILES = [("actor", "0001_1.jpg"), ("beach", "0002_2.jpg"), ("beach", "0003_3.jpg"), ("sky", "0004_4.jpg")]
_NUS_TAGS = [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
# Concept -> one 0/1 per image: "sky" (3 images) and "water" (2) are the most frequent, "zoo" (2)
# loses the tie with "water" by name, "animal" has 1.
_NUS_LABELS = {"animal": [1, 0, 0, 0], "sky": [0, 1, 1, 1], "water": [1, 0, 1, 0], "zoo": [0, 1, 0, 1]}


@pytest.fixture
def nus_root(tmp_path: Path) -> Path:
    """ImageList/, NUS_WID_Tags/, Groundtruth/AllLabels/ and Flickr/ for 4 images, as in the download."""
    (tmp_path / "ImageList").mkdir()
    (tmp_path / "ImageList" / "Imagelist.txt").write_text(
        "".join(f"C:\\ImageData\\Flickr\\{folder}\\{name}\r\n" for folder, name in _NUS_FILES)
    )
    for number, (folder, name) in enumerate(_NUS_FILES):
        (tmp_path / "Flickr" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (9, 7 + number), _colour(number)).save(tmp_path / "Flickr" / folder / name)
    (tmp_path / "NUS_WID_Tags").mkdir()
    (tmp_path / "NUS_WID_Tags" / "AllTags1k.txt").write_text(
        "".join("\t".join(str(value) for value in row) + "\t\n" for row in _NUS_TAGS)
    )
    (tmp_path / "NUS_WID_Tags" / "TagList1k.txt").write_text("cat\nsea\nsun\nblue\n")
    (tmp_path / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for concept, column in _NUS_LABELS.items():
        (tmp_path / "Groundtruth" / "AllLabels" / f"Labels_{concept}.txt").write_text(
            "".join(f"{value}\n" for value in column)
        )
    return tmp_path


def test_nus_wide_raw_keeps_the_most_frequent_concepts_and_tagged_images(nus_root: Path) -> None:
    dataset = load_nus_wide(root=nus_root, num_concepts=2).dataset
    assert dataset.label_names == ["sky", "water"]
    assert dataset.tag_names == ["cat", "sea", "sun", "blue"]
    # Image 2 (0003_3.jpg) has labels but no tag: dropped.
    assert [Path(dataset.source(index)).relative_to(nus_root).as_posix() for index in range(len(dataset))] == [
        "Flickr/actor/0001_1.jpg",
        "Flickr/beach/0002_2.jpg",
        "Flickr/sky/0004_4.jpg",
    ]
    tags, labels = _matrices(dataset)
    assert labels.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert tags.tolist() == [_NUS_TAGS[0], _NUS_TAGS[1], _NUS_TAGS[3]]
    assert dataset.captions == [["cat blue"], ["sea"], ["sun blue"]]
    assert dataset.load_image(2).size == (9, 10)


def test_nus_wide_raw_keeps_only_images_with_a_chosen_label(nus_root: Path) -> None:
    dataset = load_nus_wide(root=nus_root, num_concepts=1, drop_untagged=False).dataset
    assert dataset.label_names == ["sky"]
    assert [Path(dataset.source(index)).name for index in range(len(dataset))] == [
        "0002_2.jpg",
        "0003_3.jpg",
        "0004_4.jpg",
    ]
    assert dataset.captions[1] == [""]


def test_nus_wide_raw_errors_name_the_file(nus_root: Path) -> None:
    (nus_root / "Flickr" / "sky" / "0004_4.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"1 image\(s\) listed in .*Imagelist\.txt are missing, e\.g\. .*0004_4\.jpg"
    ):
        load_nus_wide(root=nus_root)
    (nus_root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("1\t0\t0\t1\n0\t1\t0\t0\n0\t0\t0\t0\n")
    with pytest.raises(DatasetError, match=r"AllTags1k\.txt has 3 rows for the 4 images"):
        load_nus_wide(root=nus_root)
    (nus_root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("1\t0\t0\t1\n0\t1\t0\t0\n0\t0\t0\t0\n0\t0\t2\t1\n")
    with pytest.raises(DatasetError, match=r"AllTags1k\.txt line 4: expected only 0/1 values, found b'2'"):
        load_nus_wide(root=nus_root)
    (nus_root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("1\t0\t0\t1\n0\t1\t0\n0\t0\t0\t0\n0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"AllTags1k\.txt: expected 4 rows of 3 0/1 values each, found 15"):
        load_nus_wide(root=nus_root)


# --------------------------------------------------------------------------- .mat packagings


def _pixels(count: int) -> np.ndarray:
    """Distinct uint8 images `[count, 5, 6, 3]`."""
    return (np.arange(count * 5 * 6 * 3).reshape(count, 5, 6, 3) * 7 % 251).astype(np.uint8)


def _write_all_mat(root: Path, prefix: str, images: np.ndarray, *, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Writes `<prefix>-{iall,yall,lall}.mat` for `count` items; returns `(tags [count, 7], labels [count, 3])`."""
    rng = np.random.default_rng(0)
    tags = (rng.random((count, 7)) < 0.4).astype(np.float64)
    labels = (rng.random((count, 3)) < 0.5).astype(np.uint8)
    scipy.io.savemat(root / f"{prefix}-iall.mat", {"IAll": images})
    scipy.io.savemat(root / f"{prefix}-yall.mat", {"YAll": tags})
    scipy.io.savemat(root / f"{prefix}-lall.mat", {"LAll": labels})
    return tags, labels


@pytest.mark.parametrize(
    "layout",
    ["n3hw", "nhw3", "hw3n", "float01"],
)
def test_dcmh_all_mat_images_tags_and_labels_in_every_axis_order(tmp_path: Path, layout: str) -> None:
    pixels = _pixels(6)
    stored = {
        "n3hw": pixels.transpose(0, 3, 1, 2),
        "nhw3": pixels,
        "hw3n": pixels.transpose(1, 2, 3, 0),
        "float01": pixels.astype(np.float32) / 255.0,
    }[layout]
    tags, labels = _write_all_mat(tmp_path, "mirflickr25k", stored)
    loaded = load_mirflickr25k(root=tmp_path)
    dataset = loaded.dataset
    assert loaded.packaged_split is None and len(dataset) == 6
    for index in range(6):
        np.testing.assert_array_equal(np.asarray(dataset.load_image(index)), pixels[index])
    loaded_tags, loaded_labels = _matrices(dataset)
    np.testing.assert_array_equal(loaded_tags, tags)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert dataset.tag_names == [f"tag_{column}" for column in range(7)]
    assert dataset.label_names == ["label_0", "label_1", "label_2"]
    assert dataset.captions_of(0) == [" ".join(f"tag_{column}" for column in np.flatnonzero(tags[0]))]
    assert dataset.source(4).endswith("mirflickr25k-iall.mat:4")


def test_nus_wide_reads_the_tc10_all_mat_and_the_spec_splits_it_with_the_seed(tmp_path: Path) -> None:
    _write_all_mat(tmp_path, "nus-wide-tc10", _pixels(6))
    spec = DatasetSpec.model_validate(
        {
            "name": "nus_wide",
            "root": str(tmp_path),
            "image_size": 8,
            "cross_modal": {"query_size": 2, "train_size": 3, "seed": 4},
        }
    )
    splits = cross_modal_datasets_from_spec(spec)
    assert (len(splits.query), len(splits.retrieval), len(splits.train)) == (2, 4, 3)
    query_items = sorted(int(splits.query.source(index).rsplit(":", 1)[1]) for index in range(2))
    assert query_items == sorted(np.random.default_rng(4).permutation(6)[:2].tolist())
    assert splits.retrieval[0][0].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="train_size=5 exceeds the retrieval set of 4 items"):
        cross_modal_datasets_from_spec(
            spec.model_copy(update={"cross_modal": spec.cross_modal.model_copy(update={"train_size": 5})})
        )


def test_a_split_mat_keeps_its_own_query_retrieval_and_train_parts(tmp_path: Path) -> None:
    pixels = _pixels(9)
    tags = np.eye(9, 4)
    labels = (np.arange(9)[:, None] % 2 == np.arange(2)[None, :]).astype(np.float64)
    parts = {"te": slice(0, 2), "db": slice(2, 7), "tr": slice(7, 9)}
    contents = {}
    for part, rows in parts.items():
        contents[f"I_{part}"] = pixels[rows].transpose(0, 3, 1, 2)
        contents[f"T_{part}"] = tags[rows]
        contents[f"L_{part}"] = labels[rows]
    scipy.io.savemat(tmp_path / "mirflickr_deep.mat", contents)
    loaded = load_mirflickr25k(root=tmp_path)
    assert loaded.packaged_split is not None
    assert loaded.packaged_split.query.tolist() == [0, 1]
    assert loaded.packaged_split.retrieval.tolist() == [2, 3, 4, 5, 6]
    assert loaded.packaged_split.train.tolist() == [7, 8]
    spec = DatasetSpec.model_validate(
        {"name": "mirflickr25k", "root": str(tmp_path), "image_size": 8, "augment": False}
    )
    # The default query_size (2,000) and train_size (10,000) do not apply: the packaging's split is kept.
    splits = cross_modal_datasets_from_spec(spec)
    assert (len(splits.query), len(splits.retrieval), len(splits.train)) == (2, 5, 2)
    for part, dataset in (("te", splits.query), ("db", splits.retrieval), ("tr", splits.train)):
        for position, image_pixels in enumerate(pixels[parts[part]]):
            np.testing.assert_array_equal(np.asarray(dataset.load_image(position)), image_pixels)
        np.testing.assert_array_equal(_matrices(dataset)[0], tags[parts[part]])
        np.testing.assert_array_equal(_matrices(dataset)[1], labels[parts[part]])


def test_a_missing_layout_names_every_file_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError) as error:
        load_mirflickr25k(root=tmp_path)
    for expected in (
        "mirflickr/im<N>.jpg",
        "mirflickr25k_annotations_v080",
        "mirflickr25k-{iall,yall,lall}.mat",
        "I_tr",
    ):
        assert expected in str(error.value)
    with pytest.raises(DatasetError, match=r"ImageList/Imagelist\.txt.*nus-wide-tc10-\{iall,yall,lall\}\.mat"):
        load_nus_wide(root=tmp_path)


def test_a_mat_with_the_wrong_variables_or_shapes_is_named(tmp_path: Path) -> None:
    _write_all_mat(tmp_path, "mirflickr25k", _pixels(6))
    scipy.io.savemat(tmp_path / "mirflickr25k-yall.mat", {"Tags": np.zeros((6, 2))})
    with pytest.raises(
        DatasetError, match=r"mirflickr25k-yall\.mat has no variable\(s\) \['YAll'\]; it holds \['Tags'\]"
    ):
        load_mirflickr25k(root=tmp_path)
    scipy.io.savemat(tmp_path / "mirflickr25k-yall.mat", {"YAll": np.zeros((5, 2))})
    with pytest.raises(DatasetError, match=r"YAll in .* must have shape \[N, D\] with N = 6, got shape \(5, 2\)"):
        load_mirflickr25k(root=tmp_path)
    scipy.io.savemat(tmp_path / "mirflickr25k-yall.mat", {"YAll": np.zeros((6, 2))})
    scipy.io.savemat(tmp_path / "mirflickr25k-iall.mat", {"IAll": _pixels(4)})
    with pytest.raises(DatasetError, match=r"do not hold 6 images"):
        load_mirflickr25k(root=tmp_path)
