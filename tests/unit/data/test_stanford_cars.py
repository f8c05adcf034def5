"""load_stanford_cars on tiny trees in both published layouts, .mat files written with scipy.io.savemat."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from retrieval.data.stanford_cars import load_stanford_cars
from retrieval.errors import DatasetError

_CLASS_NAMES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Audi R8 Coupe 2012")


def _struct_array(records: list[dict[str, int | str]]) -> np.ndarray:
    """A MATLAB `1 x N` struct array, as the published .mat files hold it.

    Numbers are stored as `[1, 1]` uint8 / uint16 matrices and names as char arrays,
    like the real files, so loadmat returns the same nested arrays for both.
    """
    fields = list(records[0])
    array = np.zeros((1, len(records)), dtype=[(field, object) for field in fields])
    for position, record in enumerate(records):
        array[0, position] = tuple(
            value if isinstance(value, str) else np.array([[value]], dtype=np.uint16 if value > 255 else np.uint8)
            for value in record.values()
        )
    return array


def _cell_row(strings: tuple[str, ...]) -> np.ndarray:
    cells = np.empty((1, len(strings)), dtype=object)
    for position, text in enumerate(strings):
        cells[0, position] = text
    return cells


def _write_image(path: Path, *, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, 8), (width * 9 % 256, 40, 200)).save(path)


def _box(width: int) -> dict[str, int | str]:
    return {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": width - 1, "bbox_y2": 7}


@pytest.fixture
def annos_root(tmp_path: Path) -> Path:
    """cars_annos.mat + car_ims/: 8 images, 2 per class, classes interleaved, half marked test."""
    classes = [1, 3, 2, 4, 1, 3, 2, 4]
    records: list[dict[str, int | str]] = []
    for number, class_id in enumerate(classes, start=1):
        relative_path = f"car_ims/{number:06d}.jpg"
        _write_image(tmp_path / relative_path, width=10 + number)
        records.append({"relative_im_path": relative_path, **_box(10 + number), "class": class_id, "test": number % 2})
    scipy.io.savemat(
        tmp_path / "cars_annos.mat", {"annotations": _struct_array(records), "class_names": _cell_row(_CLASS_NAMES)}
    )
    return tmp_path


def _write_devkit(root: Path, *, test_labels_in: str) -> None:
    """devkit/ + cars_train/ + cars_test/: 4 train and 3 test images."""
    devkit = root / "devkit"
    devkit.mkdir(parents=True)
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": _cell_row(_CLASS_NAMES)})
    for split, classes, annotations_path in (
        ("cars_train", [2, 1, 4, 3], devkit / "cars_train_annos.mat"),
        ("cars_test", [4, 1, 2], root / test_labels_in / "cars_test_annos_withlabels.mat"),
    ):
        records: list[dict[str, int | str]] = []
        for number, class_id in enumerate(classes, start=1):
            _write_image(root / split / f"{number:05d}.jpg", width=20 + number)
            records.append({**_box(20 + number), "class": class_id, "fname": f"{number:05d}.jpg"})
        scipy.io.savemat(annotations_path, {"annotations": _struct_array(records)})
    # The unlabelled test annotations the devkit ships: no 'class' field, and not read.
    scipy.io.savemat(
        devkit / "cars_test_annos.mat", {"annotations": _struct_array([{**_box(21), "fname": "00001.jpg"}])}
    )


def test_cars_annos_layout_labels_names_and_order(annos_root: Path) -> None:
    dataset = load_stanford_cars(root=annos_root)
    assert len(dataset) == 8
    assert dataset.labels.tolist() == [0, 2, 1, 3, 0, 2, 1, 3]
    assert dataset.class_names == list(_CLASS_NAMES)
    assert dataset.source(2) == str(annos_root / "car_ims" / "000003.jpg")
    image = dataset.load_image(2)
    assert image.mode == "RGB" and image.size == (13, 8)  # whole image: the boxes are not applied


@pytest.mark.parametrize("test_labels_in", ["devkit", "."])
def test_devkit_layout_is_train_then_test_images(tmp_path: Path, test_labels_in: str) -> None:
    _write_devkit(tmp_path, test_labels_in=test_labels_in)
    dataset = load_stanford_cars(root=tmp_path)
    assert dataset.labels.tolist() == [1, 0, 3, 2, 3, 0, 1]
    assert dataset.class_names == list(_CLASS_NAMES)
    assert [Path(dataset.source(index)).relative_to(tmp_path).as_posix() for index in (0, 3, 4, 6)] == [
        "cars_train/00001.jpg",
        "cars_train/00004.jpg",
        "cars_test/00001.jpg",
        "cars_test/00003.jpg",
    ]
    assert dataset.load_image(6).size == (23, 8)


def test_devkit_without_test_labels_names_both_places(tmp_path: Path) -> None:
    _write_devkit(tmp_path, test_labels_in="devkit")
    (tmp_path / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"expected {tmp_path / 'cars_test_annos_withlabels.mat'} or "
            f"{tmp_path / 'devkit' / 'cars_test_annos_withlabels.mat'}"
        ),
    ):
        load_stanford_cars(root=tmp_path)


def test_missing_image_names_the_annotation(annos_root: Path) -> None:
    missing = annos_root / "car_ims" / "000005.jpg"
    missing.unlink()
    with pytest.raises(
        DatasetError, match=re.escape(f"{annos_root / 'cars_annos.mat'} annotation 5: image {missing} does not exist")
    ):
        load_stanford_cars(root=annos_root)


def test_class_outside_the_class_names_is_named(tmp_path: Path) -> None:
    _write_image(tmp_path / "car_ims" / "000001.jpg", width=12)
    annotations = _struct_array([{"relative_im_path": "car_ims/000001.jpg", **_box(12), "class": 5, "test": 0}])
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": _cell_row(_CLASS_NAMES)})
    with pytest.raises(DatasetError, match=r"annotation 1: class must be one integer in 1\.\.4, got \[5\]"):
        load_stanford_cars(root=tmp_path)


def test_missing_variable_and_field_are_named(tmp_path: Path) -> None:
    annotations = _struct_array([{"relative_im_path": "car_ims/000001.jpg", **_box(12), "test": 0}])
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    with pytest.raises(DatasetError, match=r"cars_annos\.mat has no variable 'class_names'"):
        load_stanford_cars(root=tmp_path)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": _cell_row(_CLASS_NAMES)})
    with pytest.raises(DatasetError, match=r"cars_annos\.mat: 'annotations' has no field 'class'"):
        load_stanford_cars(root=tmp_path)


def test_folder_in_neither_layout_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=re.escape(f"expected {tmp_path / 'cars_annos.mat'} (with car_ims/) or {tmp_path / 'devkit'}/"),
    ):
        load_stanford_cars(root=tmp_path)
    with pytest.raises(DatasetError, match="does not exist or is not a directory"):
        load_stanford_cars(root=tmp_path / "nowhere")
