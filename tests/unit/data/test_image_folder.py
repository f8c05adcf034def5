"""load_image_folder on tiny root/<class>/<image> fixtures written by the tests."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data import eval_transform, load_image_folder
from retrieval.errors import CorruptImageError, DatasetError


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)


def _flat_colour(seed: int) -> np.ndarray:
    """A one-colour image: JPEG keeps it within a few levels (noise it would smear)."""
    colour = np.random.default_rng(seed).integers(0, 256, size=3, dtype=np.uint8)
    return np.broadcast_to(colour, (6, 5, 3)).copy()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes x 3 images (PNG, JPEG, grayscale PNG with an upper-case extension) plus noise."""
    root = tmp_path / "images"
    for class_position, class_name in enumerate(["cat", "ant", "bee"]):
        class_dir = root / class_name
        class_dir.mkdir(parents=True)
        seed = 10 * class_position
        Image.fromarray(_pixels(seed)).save(class_dir / "b.png")
        Image.fromarray(_flat_colour(seed + 1)).save(class_dir / "a.jpg", quality=95)
        Image.fromarray(_pixels(seed + 2)[:, :, 0]).save(class_dir / "c.PNG")
        (class_dir / "notes.txt").write_text("not an image")
        (class_dir / ".hidden.png").write_bytes(b"editor junk")
    (root / "README.png").write_bytes(b"a file at the root is not a class")
    return root


def test_classes_are_sorted_folders_and_images_sorted_files(folder: Path) -> None:
    dataset = load_image_folder(root=folder)
    assert dataset.class_names == ["ant", "bee", "cat"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [Path(dataset.source(index)).relative_to(folder).as_posix() for index in range(3)] == [
        "ant/a.jpg",
        "ant/b.png",
        "ant/c.PNG",
    ]


def test_images_load_as_rgb_with_their_pixels(folder: Path) -> None:
    dataset = load_image_folder(root=folder)
    lossless = dataset.load_image(1)  # ant/b.png, written from _pixels(10)
    assert lossless.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(lossless), _pixels(10))
    gray = np.asarray(dataset.load_image(2))  # ant/c.PNG, a grayscale PNG
    np.testing.assert_array_equal(gray, np.repeat(_pixels(12)[:, :, :1], 3, axis=2))
    jpeg = np.asarray(dataset.load_image(0), dtype=np.int16)  # ant/a.jpg: lossy, so close, not equal
    assert jpeg.shape == (6, 5, 3)
    assert np.abs(jpeg - _flat_colour(11)).max() <= 4


def test_transform_applies_to_items(folder: Path) -> None:
    image, label, index = load_image_folder(root=folder, transform=eval_transform(image_size=16))[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert (label, index) == (1, 4)


def test_extensions_filter_case_insensitively(folder: Path) -> None:
    dataset = load_image_folder(root=folder, extensions=["png"])
    assert len(dataset) == 6
    assert all(dataset.source(index).lower().endswith(".png") for index in range(len(dataset)))


def test_corrupt_image_fails_on_load_naming_the_file(folder: Path) -> None:
    corrupt = folder / "bee" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage that is not a jpeg body")
    dataset = load_image_folder(root=folder, transform=eval_transform(image_size=8))
    position = [dataset.source(index) for index in range(len(dataset))].index(str(corrupt))
    with pytest.raises(CorruptImageError, match=re.escape(f"cannot read image {corrupt}")):
        dataset.load_image(position)
    with pytest.raises(CorruptImageError, match=re.escape(str(corrupt))):
        dataset[position]
    assert dataset[position - 1][0].shape == (3, 8, 8)


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(f"dataset root {tmp_path / 'nowhere'} does not exist")):
        load_image_folder(root=tmp_path / "nowhere")


def test_root_that_is_a_file_is_named(tmp_path: Path) -> None:
    file_path = tmp_path / "images.zip"
    file_path.write_bytes(b"zip")
    with pytest.raises(DatasetError, match=re.escape(f"dataset root {file_path} is not a directory")):
        load_image_folder(root=file_path)


def test_empty_root_has_no_class_subfolders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(f"dataset root {tmp_path} has no class subfolders")):
        load_image_folder(root=tmp_path)


def test_class_folder_without_images_is_skipped_with_a_warning(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / "empty_class").mkdir()
    with caplog.at_level(logging.WARNING, logger="retrieval.data.image_folder"):
        dataset = load_image_folder(root=folder)
    assert dataset.class_names == ["ant", "bee", "cat"]
    assert any(str(folder / "empty_class") in record.getMessage() for record in caplog.records)


def test_no_image_at_all_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "labels.csv").write_text("x")
    with pytest.raises(
        DatasetError, match=re.escape(f"dataset root {tmp_path} holds no image") + ".* 2 class subfolder"
    ):
        load_image_folder(root=tmp_path)
