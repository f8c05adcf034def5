"""build_datasets: the default digits protocol, the other split modes, and errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image
from pydantic import ValidationError

from retrieval.config import DatasetSpec, load_job_spec
from retrieval.data import DatasetSplits, build_datasets
from retrieval.data.from_spec import datasets_from_spec
from retrieval.errors import DatasetError

_DEFAULTS: dict[str, object] = {
    "root": None,
    "image_size": 16,
    "augment": True,
    "train_classes": None,
    "test_classes": None,
    "train_fraction": 0.5,
    "seed": 0,
}


def _build(**overrides: object) -> DatasetSplits:
    arguments = {**_DEFAULTS, **overrides}
    return build_datasets(**arguments)  # type: ignore[arg-type]


def test_digits_class_ranges_default_is_0_4_train_5_9_test() -> None:
    splits = _build(
        name="digits", split_mode="class_ranges", train_classes=[0, 1, 2, 3, 4], test_classes=[5, 6, 7, 8, 9]
    )
    assert set(splits.train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(splits.test.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.test.class_names == [str(digit) for digit in range(10)]
    halves = _build(name="digits", split_mode="class_ranges")
    np.testing.assert_array_equal(halves.train.labels, splits.train.labels)
    np.testing.assert_array_equal(halves.test.labels, splits.test.labels)


def test_missing_side_of_class_ranges_is_the_complement() -> None:
    splits = _build(name="digits", split_mode="class_ranges", test_classes=[9])
    assert set(splits.train.labels.tolist()) == set(range(9))


def test_test_split_is_deterministic_and_train_split_augments() -> None:
    splits = _build(name="digits", split_mode="class_ranges")
    image, label, _ = splits.test[0]
    assert image.shape == (3, 16, 16) and label >= 5
    torch.testing.assert_close(splits.test[0][0], image)
    torch.manual_seed(0)
    assert not torch.equal(splits.train[0][0], splits.train[0][0])
    plain = _build(name="digits", split_mode="class_ranges", augment=False)
    torch.testing.assert_close(plain.train[0][0], plain.train.with_transform(splits.test.transform)[0][0])


def test_class_fraction_and_image_fraction_modes() -> None:
    by_class = _build(name="digits", split_mode="class_fraction", train_fraction=0.7, seed=1)
    assert len(set(by_class.train.labels.tolist())) == 7
    assert not set(by_class.train.labels.tolist()) & set(by_class.test.labels.tolist())
    by_image = _build(name="digits", split_mode="image_fraction", train_fraction=0.8, seed=1)
    assert set(by_image.train.labels.tolist()) == set(by_image.test.labels.tolist()) == set(range(10))
    assert len(by_image.train) + len(by_image.test) == 1797


def test_image_folder_needs_a_root() -> None:
    with pytest.raises(DatasetError, match="needs a root folder"):
        _build(name="image_folder", split_mode="class_ranges")


def test_image_folder_root_is_loaded(tmp_path: Path) -> None:
    for class_name in ("x", "y"):
        (tmp_path / class_name).mkdir()
        for position in range(2):
            Image.new("RGB", (4, 4), (position * 100, 0, 0)).save(tmp_path / class_name / f"{position}.png")
    splits = _build(name="image_folder", root=str(tmp_path), split_mode="class_ranges")
    assert splits.train.class_names == ["x", "y"]
    assert [splits.train.source(0), splits.test.source(1)] == [
        str(tmp_path / "x" / "0.png"),
        str(tmp_path / "y" / "1.png"),
    ]


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(DatasetError, match="unknown dataset name 'mnist'"):
        _build(name="mnist", split_mode="class_ranges")
    with pytest.raises(DatasetError, match="unknown split_mode 'random'"):
        _build(name="digits", split_mode="random")


# --------------------------------------------------------------------------- published fine-grained layouts


def _write_cub(root: Path, *, num_classes: int) -> None:
    """A CUB_200_2011/ tree with 2 images per class, classes listed as '00k.Bird_k'."""
    dataset = root / "CUB_200_2011"
    image_lines: list[str] = []
    label_lines: list[str] = []
    class_lines: list[str] = []
    for class_id in range(1, num_classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        class_lines.append(f"{class_id} {folder}")
        (dataset / "images" / folder).mkdir(parents=True)
        for copy in range(2):
            image_id = len(image_lines) + 1
            Image.new("RGB", (6, 6), (class_id * 40, copy * 90, 0)).save(dataset / "images" / folder / f"{copy}.jpg")
            image_lines.append(f"{image_id} {folder}/{copy}.jpg")
            label_lines.append(f"{image_id} {class_id}")
    for file_name, lines in (
        ("images.txt", image_lines),
        ("image_class_labels.txt", label_lines),
        ("classes.txt", class_lines),
    ):
        (dataset / file_name).write_text("\n".join(lines) + "\n")


def _write_dogs(root: Path, *, num_classes: int) -> None:
    for class_position in range(num_classes):
        wnid = f"n0208{class_position:04d}"
        folder = root / "Images" / f"{wnid}-breed_{class_position}"
        folder.mkdir(parents=True)
        for number in range(2):
            Image.new("RGB", (6, 6), (class_position * 40, number * 90, 0)).save(folder / f"{wnid}_{number}.jpg")


def _write_cars(root: Path, *, num_classes: int) -> None:
    count = 2 * num_classes
    annotations = np.zeros((1, count), dtype=[("relative_im_path", object), ("class", object), ("test", object)])
    (root / "car_ims").mkdir()
    for position in range(count):
        relative_path = f"car_ims/{position + 1:06d}.jpg"
        Image.new("RGB", (6, 6), (position * 20, 0, 0)).save(root / relative_path)
        class_id = np.array([[position % num_classes + 1]], dtype=np.uint8)
        annotations[0, position] = (relative_path, class_id, np.array([[position % 2]], dtype=np.uint8))
    class_names = np.empty((1, num_classes), dtype=object)
    for position in range(num_classes):
        class_names[0, position] = f"Car Model {position + 1} 2012"
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})


@pytest.mark.parametrize(
    ("name", "writer"),
    [("cub200", _write_cub), ("stanford_dogs", _write_dogs), ("stanford_cars", _write_cars)],
)
def test_published_layouts_default_to_the_first_half_of_classes_for_training(
    tmp_path: Path, name: str, writer: Callable[..., None]
) -> None:
    writer(tmp_path, num_classes=4)
    splits = _build(name=name, root=str(tmp_path), split_mode="class_ranges")
    # The standard protocol (CUB 1-100 / 101-200, Cars 1-98 / 99-196) scaled down: 1-2 / 3-4.
    assert sorted(set(splits.train.labels.tolist())) == [0, 1]
    assert sorted(set(splits.test.labels.tolist())) == [2, 3]
    assert len(splits.train) == len(splits.test) == 4
    assert splits.train.num_classes == 4
    assert splits.test[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("name", ["cub200", "stanford_dogs", "stanford_cars"])
def test_published_layouts_need_a_root(name: str) -> None:
    with pytest.raises(DatasetError, match=f"dataset '{name}' needs a root folder in its published layout"):
        _build(name=name, split_mode="class_ranges")


def test_job_spec_with_cub200_root_builds_its_datasets(tmp_path: Path) -> None:
    _write_cub(tmp_path, num_classes=4)
    job = {
        "name": "cub_unit",
        "method": {"name": "deep_metric"},
        "dataset": {
            "name": "cub200",
            "root": str(tmp_path),
            "image_size": 16,
            "split": {"mode": "class_ranges", "train_classes": "0-1", "test_classes": "2-3"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spec = load_job_spec(path)
    assert (spec.dataset.name, spec.dataset.root) == ("cub200", str(tmp_path))
    splits = datasets_from_spec(spec.dataset)
    assert splits.test.class_names == ["Bird 1", "Bird 2", "Bird 3", "Bird 4"]
    assert sorted(set(splits.test.labels.tolist())) == [2, 3]


@pytest.mark.parametrize("name", ["cub200", "stanford_dogs", "stanford_cars"])
def test_job_spec_rejects_a_published_layout_without_root(name: str) -> None:
    with pytest.raises(ValidationError, match=f"dataset '{name}' needs 'root'"):
        DatasetSpec(name=name)  # type: ignore[arg-type]


def _sources(dataset: object) -> list[str]:
    return [dataset.source(position) for position in range(len(dataset))]  # type: ignore[attr-defined]


def test_seen_test_fraction_holds_out_images_of_every_training_class() -> None:
    whole = _build(name="digits", split_mode="class_ranges")
    splits = _build(name="digits", split_mode="class_ranges", seen_test_fraction=0.3)
    assert whole.seen_test is None
    assert splits.seen_test is not None
    train, seen = _sources(splits.train), _sources(splits.seen_test)
    assert len(set(train)) == len(train) and len(set(seen)) == len(seen)
    # The held-out images are the training classes' images that training no longer sees.
    assert not set(train) & set(seen)
    assert set(train) | set(seen) == set(_sources(whole.train))
    np.testing.assert_array_equal(splits.test.labels, whole.test.labels)
    for class_id in range(5):
        total = int(np.sum(whole.train.labels == class_id))
        assert int(np.sum(splits.seen_test.labels == class_id)) == total - round(0.7 * total)
    # Evaluated without augmentation, like the test split; seeded, so the same every time.
    image = splits.seen_test[0][0]
    torch.testing.assert_close(splits.seen_test[0][0], image)
    again = _build(name="digits", split_mode="class_ranges", seen_test_fraction=0.3)
    assert again.seen_test is not None and _sources(again.seen_test) == seen
    other_seed = _build(name="digits", split_mode="class_ranges", seen_test_fraction=0.3, seed=1)
    assert other_seed.seen_test is not None and _sources(other_seed.seen_test) != seen


def test_seen_test_fraction_reaches_the_splits_from_a_job_spec() -> None:
    spec = load_job_spec("jobs/digits_deep_metric.yaml", ["dataset.split.seen_test_fraction=0.2"])
    splits = datasets_from_spec(spec.dataset)
    assert splits.seen_test is not None
    assert set(splits.seen_test.labels.tolist()) == {0, 1, 2, 3, 4}
    assert len(splits.seen_test) + len(splits.train) + len(splits.test) == 1797


def test_seen_test_fraction_is_refused_with_image_fraction() -> None:
    with pytest.raises(ValidationError, match="seen_test_fraction applies to the class-disjoint modes"):
        DatasetSpec.model_validate({"split": {"mode": "image_fraction", "seen_test_fraction": 0.3}})
    with pytest.raises(DatasetError, match="seen_test_fraction"):
        _build(name="digits", split_mode="image_fraction", seen_test_fraction=0.3)
