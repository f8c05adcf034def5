"""load_cub200 on a tiny CUB-200-2011 tree written by the test in the published layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.cub200 import load_cub200
from retrieval.data.transforms import eval_transform
from retrieval.errors import CorruptImageError, DatasetError

_CLASS_FOLDERS = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani")


def _colour(image_id: int) -> tuple[int, int, int]:
    return (image_id * 25 % 256, 255 - image_id * 20, 60 + image_id * 10)


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    """CUB_200_2011/ with 4 classes x 2 images (ids 1..8), written like the published archive.

    The lines of images.txt are written out of id order, and class 3 is labelled on
    images 7, 8 and class 4 on 5, 6, so a loader that trusted line or folder order
    would get the labels wrong.
    """
    dataset = tmp_path / "CUB_200_2011"
    rows = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (6, 4), (7, 3), (8, 3)]
    image_lines = []
    for image_id, class_id in rows:
        folder = _CLASS_FOLDERS[class_id - 1]
        file_name = f"{folder.split('.', 1)[1]}_{image_id:04d}_{100 + image_id}.jpg"
        (dataset / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12 + image_id, 10), _colour(image_id)).save(dataset / "images" / folder / file_name)
        image_lines.append(f"{image_id} {folder}/{file_name}")
    (dataset / "images.txt").write_text("\n".join(image_lines[4:] + image_lines[:4]) + "\n")
    (dataset / "image_class_labels.txt").write_text("".join(f"{image_id} {class_id}\n" for image_id, class_id in rows))
    (dataset / "classes.txt").write_text(
        "".join(f"{position} {folder}\n" for position, folder in enumerate(_CLASS_FOLDERS, start=1))
    )
    (dataset / "train_test_split.txt").write_text("".join(f"{image_id} {image_id % 2}\n" for image_id, _ in rows))
    return dataset


def test_labels_are_published_class_ids_minus_one_in_image_id_order(cub_root: Path) -> None:
    dataset = load_cub200(root=cub_root)
    assert len(dataset) == 8
    assert dataset.labels.tolist() == [0, 0, 1, 1, 3, 3, 2, 2]
    assert dataset.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove billed Ani"]
    assert Path(dataset.source(4)).relative_to(cub_root).as_posix() == (
        "images/004.Groove_billed_Ani/Groove_billed_Ani_0005_105.jpg"
    )
    for index in range(len(dataset)):
        class_folder = Path(dataset.source(index)).parent.name
        assert _CLASS_FOLDERS.index(class_folder) == dataset.labels[index]


def test_root_may_be_the_parent_of_cub_200_2011(cub_root: Path) -> None:
    from_folder = load_cub200(root=cub_root)
    from_parent = load_cub200(root=cub_root.parent)
    assert [from_parent.source(index) for index in range(8)] == [from_folder.source(index) for index in range(8)]
    np.testing.assert_array_equal(from_parent.labels, from_folder.labels)


def test_images_load_as_rgb_and_through_the_transform(cub_root: Path) -> None:
    dataset = load_cub200(root=cub_root, transform=eval_transform(image_size=16))
    image = dataset.load_image(2)  # image id 3
    assert image.mode == "RGB" and image.size == (15, 10)
    pixels = np.asarray(image, dtype=np.int16)
    assert np.abs(pixels - np.asarray(_colour(3), dtype=np.int16)).max() <= 4  # JPEG: close, not equal
    tensor, label, index = dataset[2]
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert (label, index) == (1, 2)


def test_images_are_read_only_when_loaded(cub_root: Path) -> None:
    dataset = load_cub200(root=cub_root)
    broken = Path(dataset.source(0))
    broken.write_bytes(b"\xff\xd8\xff not a jpeg body")
    with pytest.raises(CorruptImageError, match=re.escape(str(broken))):
        dataset.load_image(0)
    assert dataset.load_image(1).size == (14, 10)


def test_missing_image_names_the_file_and_the_line(cub_root: Path) -> None:
    missing = cub_root / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0004_104.jpg"
    missing.unlink()
    # images.txt lists ids 5..8 first, so image id 4 is on line 8.
    with pytest.raises(
        DatasetError, match=re.escape(f"{cub_root / 'images.txt'} line 8: image {missing} does not exist")
    ):
        load_cub200(root=cub_root)


def test_malformed_line_names_the_file_and_line_number(cub_root: Path) -> None:
    labels_file = cub_root / "image_class_labels.txt"
    lines = labels_file.read_text().splitlines()
    lines[2] = "3,2"
    labels_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{labels_file} line 3: expected '<id> <class_id>', got '3,2'")):
        load_cub200(root=cub_root)
    lines[2] = "3 two"
    labels_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{labels_file} line 3: expected '<image_id> <class_id>'")):
        load_cub200(root=cub_root)


def test_repeated_image_id_is_named(cub_root: Path) -> None:
    images_file = cub_root / "images.txt"
    images_file.write_text(images_file.read_text() + "5 004.Groove_billed_Ani/extra.jpg\n")
    with pytest.raises(DatasetError, match=re.escape(f"{images_file} line 9: id 5 repeats the id of line 1")):
        load_cub200(root=cub_root)


def test_files_that_disagree_on_ids_are_errors(cub_root: Path) -> None:
    labels_file = cub_root / "image_class_labels.txt"
    original = labels_file.read_text()
    labels_file.write_text(original.replace("8 3\n", ""))
    with pytest.raises(DatasetError, match=r"images\.txt line 4: image id 8 has no class in .*image_class_labels\.txt"):
        load_cub200(root=cub_root)
    labels_file.write_text(original + "9 1\n")
    with pytest.raises(DatasetError, match=r"labels 1 image id\(s\) that .*images\.txt does not list, e\.g\. \[9\]"):
        load_cub200(root=cub_root)
    labels_file.write_text(original.replace("8 3\n", "8 5\n"))
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt line 8: class id 5 is not in .*classes\.txt"):
        load_cub200(root=cub_root)


def test_class_ids_must_run_from_one_without_gaps(cub_root: Path) -> None:
    classes_file = cub_root / "classes.txt"
    classes_file.write_text(classes_file.read_text().replace("2 002.Laysan_Albatross", "7 002.Laysan_Albatross"))
    with pytest.raises(DatasetError, match=re.escape(f"{classes_file}: class ids must be 1..4 with none missing")):
        load_cub200(root=cub_root)


def test_missing_listing_file_and_wrong_root_are_named(cub_root: Path, tmp_path: Path) -> None:
    (cub_root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"CUB-200-2011 file {cub_root / 'classes.txt'} does not exist")):
        load_cub200(root=cub_root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DatasetError, match=re.escape(f"expected {elsewhere / 'images.txt'} or")):
        load_cub200(root=elsewhere)
    with pytest.raises(DatasetError, match="does not exist"):
        load_cub200(root=tmp_path / "nowhere")
