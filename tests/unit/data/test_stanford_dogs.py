"""load_stanford_dogs on a tiny Images/ tree (and file_list.mat) written in the published layout."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from retrieval.data.stanford_dogs import load_stanford_dogs
from retrieval.errors import DatasetError

# Real folder names; "Shih-Tzu" checks that only the first "-" separates wnid and breed.
_BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu")


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)


@pytest.fixture
def dogs_root(tmp_path: Path) -> Path:
    """Images/<wnid>-<breed>/<wnid>_<n>.jpg: 2, 3 and 2 images, written in reverse breed order."""
    counts = {"n02086240-Shih-Tzu": 2, "n02085782-Japanese_spaniel": 3, "n02085620-Chihuahua": 2}
    for folder_name, count in counts.items():
        folder = tmp_path / "Images" / folder_name
        folder.mkdir(parents=True)
        wnid = folder_name.split("-", 1)[0]
        for number in (310, 12, 5)[:count]:
            Image.fromarray(_pixels(number)).save(folder / f"{wnid}_{number}.jpg")
    (tmp_path / "Annotation").mkdir()
    return tmp_path


def _write_file_list(root: Path, entries: list[tuple[str, int]]) -> None:
    """file_list.mat as lists.tar ships it: a cell column [N, 1] of paths and labels [N, 1] (1-based)."""
    file_list = np.empty((len(entries), 1), dtype=object)
    for position, (relative_path, _) in enumerate(entries):
        file_list[position, 0] = relative_path
    labels = np.asarray([[label] for _, label in entries], dtype=np.float64)
    annotation_list = np.empty((len(entries), 1), dtype=object)
    for position, (relative_path, _) in enumerate(entries):
        annotation_list[position, 0] = relative_path.removesuffix(".jpg")
    scipy.io.savemat(
        root / "file_list.mat", {"file_list": file_list, "annotation_list": annotation_list, "labels": labels}
    )


def test_breeds_are_sorted_folders_and_names_are_the_breed_part(dogs_root: Path) -> None:
    dataset = load_stanford_dogs(root=dogs_root)
    assert dataset.class_names == ["Chihuahua", "Japanese spaniel", "Shih-Tzu"]
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert [Path(dataset.source(index)).relative_to(dogs_root).as_posix() for index in range(3)] == [
        "Images/n02085620-Chihuahua/n02085620_12.jpg",
        "Images/n02085620-Chihuahua/n02085620_310.jpg",
        "Images/n02085782-Japanese_spaniel/n02085782_12.jpg",
    ]


def test_images_load_lazily_as_rgb(dogs_root: Path) -> None:
    dataset = load_stanford_dogs(root=dogs_root)
    image = dataset.load_image(1)
    assert image.mode == "RGB" and image.size == (11, 9)


def test_file_list_gives_the_order_and_labels(dogs_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = [
        ("n02086240-Shih-Tzu/n02086240_310.jpg", 3),
        ("n02085620-Chihuahua/n02085620_310.jpg", 1),
        ("n02085782-Japanese_spaniel/n02085782_5.jpg", 2),
        ("n02085782-Japanese_spaniel/n02085782_12.jpg", 2),
    ]
    _write_file_list(dogs_root, entries)
    with caplog.at_level(logging.WARNING, logger="retrieval.data.stanford_dogs"):
        dataset = load_stanford_dogs(root=dogs_root)
    assert dataset.labels.tolist() == [2, 0, 1, 1]
    assert [dataset.source(index) for index in range(4)] == [
        str(dogs_root / "Images" / relative_path) for relative_path, _ in entries
    ]
    assert dataset.num_classes == 3
    # 7 images on disk, 4 listed: the other 3 are left out, with a warning.
    assert any("3 image(s)" in record.getMessage() for record in caplog.records)


def test_file_list_label_that_disagrees_with_the_folder_is_named(dogs_root: Path) -> None:
    _write_file_list(
        dogs_root,
        [("n02085620-Chihuahua/n02085620_310.jpg", 1), ("n02085782-Japanese_spaniel/n02085782_5.jpg", 3)],
    )
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "entry 2: label 3 is breed folder 'n02086240-Shih-Tzu' but the file "
            "'n02085782-Japanese_spaniel/n02085782_5.jpg' lies in 'n02085782-Japanese_spaniel'"
        ),
    ):
        load_stanford_dogs(root=dogs_root)


def test_file_list_entry_without_its_image_is_named(dogs_root: Path) -> None:
    _write_file_list(dogs_root, [("n02085620-Chihuahua/n02085620_999.jpg", 1)])
    missing = dogs_root / "Images" / "n02085620-Chihuahua" / "n02085620_999.jpg"
    with pytest.raises(
        DatasetError, match=re.escape(f"{dogs_root / 'file_list.mat'} entry 1: image {missing} does not exist")
    ):
        load_stanford_dogs(root=dogs_root)


def test_file_list_without_labels_is_named(dogs_root: Path) -> None:
    scipy.io.savemat(dogs_root / "file_list.mat", {"file_list": np.empty((0, 1), dtype=object)})
    with pytest.raises(DatasetError, match=r"file_list\.mat has no variable 'labels'"):
        load_stanford_dogs(root=dogs_root)
    (dogs_root / "file_list.mat").write_bytes(b"not a MATLAB file at all")
    with pytest.raises(DatasetError, match=r"cannot read MATLAB file .*file_list\.mat"):
        load_stanford_dogs(root=dogs_root)


def test_layout_errors_are_named(dogs_root: Path, tmp_path: Path) -> None:
    (dogs_root / "Images" / "cropped").mkdir()
    with pytest.raises(DatasetError, match=r"breed folder .*cropped is not named '<wnid>-<breed>'"):
        load_stanford_dogs(root=dogs_root)
    with pytest.raises(DatasetError, match=re.escape(f"{dogs_root / 'Images'} has no Images/ folder")):
        load_stanford_dogs(root=dogs_root / "Images")
    with pytest.raises(DatasetError, match="does not exist or is not a directory"):
        load_stanford_dogs(root=tmp_path / "nowhere")
