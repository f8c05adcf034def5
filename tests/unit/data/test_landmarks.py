"""Landmark benchmark loaders on tiny trees written in the revisitop, Holidays and UKBench layouts."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.base import ImageDataset, ImageFileLoader, read_image
from retrieval.data.landmarks import (
    LANDMARK_BENCHMARKS,
    CroppedImageFileLoader,
    LandmarkBenchmark,
    QueryGroundTruth,
    load_holidays,
    load_landmark_benchmark,
    load_revisited,
    load_ukbench,
)
from retrieval.errors import DatasetError

_DATABASE = ["all_souls_000000", "all_souls_000013", "ashmolean_000007", "balliol_000051", "radcliffe_camera_000095"]
_QUERIES = ["all_souls_000013", "radcliffe_camera_000095"]


def _write_jpeg(path: Path, *, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    """A smooth gradient image `size` (width, height): JPEG keeps it close, so crops can be compared."""
    width, height = size
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 6 + seed, columns * 5, (rows + columns) * 3 + seed * 7], axis=2) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def _gnd(*, bbx: tuple[float, ...] | None = (5.0, 4.0, 25.0, 20.0)) -> dict[str, object]:
    return {
        "imlist": list(_DATABASE),
        "qimlist": list(_QUERIES),
        "gnd": [
            {"bbx": list(bbx) if bbx is not None else None, "easy": [0], "hard": [1, 2], "junk": [3]},
            {"bbx": None, "easy": [], "hard": [4], "junk": []},
        ],
    }


def _write_revisited(parent: Path, *, name: str = "roxford5k", gnd: dict[str, object] | None = None) -> Path:
    dataset = parent / name
    for seed, image_name in enumerate(_DATABASE):
        _write_jpeg(dataset / "jpg" / f"{image_name}.jpg", seed=seed, size=(40 + seed, 30))
    with (dataset / f"gnd_{name}.pkl").open("wb") as stream:
        pickle.dump(gnd if gnd is not None else _gnd(), stream)
    return dataset


def test_revisited_database_queries_and_ground_truth(tmp_path: Path) -> None:
    dataset_root = _write_revisited(tmp_path)
    benchmark = load_revisited(root=dataset_root, name="roxford5k")
    assert benchmark.name == "roxford5k"
    assert len(benchmark.database) == 5 and len(benchmark.queries) == 2
    assert benchmark.database.labels.tolist() == [0] * 5 and benchmark.database.class_names == ["database"]
    assert benchmark.queries.labels.tolist() == [0, 0] and benchmark.queries.class_names == ["query"]
    assert benchmark.database.source(3) == str(dataset_root / "jpg" / "balliol_000051.jpg")
    assert benchmark.queries.source(1) == str(dataset_root / "jpg" / "radcliffe_camera_000095.jpg")
    first, second = benchmark.ground_truth
    assert (first.easy.tolist(), first.hard.tolist(), first.junk.tolist()) == ([0], [1, 2], [3])
    assert (second.easy.tolist(), second.hard.tolist(), second.junk.tolist()) == ([], [4], [])
    assert first.easy.dtype == np.int64 and second.easy.dtype == np.int64
    assert not first.hard.flags.writeable


def test_revisited_query_is_cropped_to_its_box(tmp_path: Path) -> None:
    dataset_root = _write_revisited(tmp_path)
    benchmark = load_revisited(root=dataset_root, name="roxford5k")
    cropped = benchmark.queries.load_image(0)
    assert cropped.size == (20, 16)  # box [5, 4, 25, 20]
    whole = np.asarray(read_image(dataset_root / "jpg" / "all_souls_000013.jpg"))
    np.testing.assert_array_equal(np.asarray(cropped), whole[4:20, 5:25])
    assert benchmark.queries.load_image(1).size == (44, 30)  # no box: the whole image
    assert benchmark.database.load_image(1).size == (41, 30)  # database images are never cropped


def test_crop_box_is_rounded_and_clamped_to_the_image(tmp_path: Path) -> None:
    path = tmp_path / "image.jpg"
    _write_jpeg(path, seed=3, size=(40, 30))
    assert CroppedImageFileLoader(path=path, box=(-8.0, -2.0, 100.0, 100.0))().size == (40, 30)
    assert CroppedImageFileLoader(path=path, box=(2.4, 3.6, 10.5, 12.2))().size == (8, 8)  # (2, 4, 10, 12)
    # Loaders travel to DataLoader and Ray workers by pickle.
    travelled = pickle.loads(pickle.dumps(CroppedImageFileLoader(path=path, box=(1.0, 2.0, 11.0, 7.0))))
    assert travelled().size == (10, 5)
    with pytest.raises(DatasetError, match=re.escape(f"query box [50.0, 1.0, 60.0, 9.0] of {path} holds no pixel")):
        CroppedImageFileLoader(path=path, box=(50.0, 1.0, 60.0, 9.0))()


def test_revisited_root_may_be_the_parent_and_paris_loads_by_name(tmp_path: Path) -> None:
    _write_revisited(tmp_path, name="rparis6k")
    benchmark = load_landmark_benchmark(name="rparis6k", root=tmp_path)
    assert benchmark.name == "rparis6k"
    assert benchmark.database.source(0) == str(tmp_path / "rparis6k" / "jpg" / "all_souls_000000.jpg")
    with pytest.raises(DatasetError, match=re.escape(f"expected {tmp_path / 'gnd_roxford5k.pkl'} or")):
        load_revisited(root=tmp_path, name="roxford5k")


def test_revisited_errors_name_the_file_and_the_query(tmp_path: Path) -> None:
    bad = _gnd()
    bad["gnd"][1]["hard"] = [4, 5]  # type: ignore[index]
    dataset_root = _write_revisited(tmp_path, gnd=bad)
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{dataset_root / 'gnd_roxford5k.pkl'} query 1 ('radcliffe_camera_000095'): 'hard' index range [4, 5] "
            "is outside the 5 database images"
        ),
    ):
        load_revisited(root=dataset_root, name="roxford5k")


def test_revisited_bad_box_and_missing_key_are_named(tmp_path: Path) -> None:
    dataset_root = _write_revisited(tmp_path, gnd=_gnd(bbx=(5.0, 4.0, 3.0)))
    with pytest.raises(DatasetError, match=r"query 0 \('all_souls_000013'\): 'bbx' must be 4 finite numbers"):
        load_revisited(root=dataset_root, name="roxford5k")
    with (dataset_root / "gnd_roxford5k.pkl").open("wb") as stream:
        pickle.dump({"imlist": _DATABASE, "gnd": []}, stream)
    with pytest.raises(DatasetError, match=r"gnd_roxford5k\.pkl has no key 'qimlist'"):
        load_revisited(root=dataset_root, name="roxford5k")
    (dataset_root / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cannot read ground truth .*gnd_roxford5k\.pkl"):
        load_revisited(root=dataset_root, name="roxford5k")


def test_revisited_missing_image_is_named(tmp_path: Path) -> None:
    dataset_root = _write_revisited(tmp_path)
    missing = dataset_root / "jpg" / "ashmolean_000007.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match=re.escape(f"1 image(s) listed in {dataset_root / 'gnd_roxford5k.pkl'}")):
        load_revisited(root=dataset_root, name="roxford5k")


def _write_holidays(folder: Path, names: list[str]) -> None:
    for seed, name in enumerate(names):
        _write_jpeg(folder / f"{name}.jpg", seed=seed, size=(16 + seed, 12))


_HOLIDAYS = ["100000", "100001", "100002", "100100", "100101", "100200"]


def test_holidays_queries_are_the_00_images_of_each_group(tmp_path: Path) -> None:
    _write_holidays(tmp_path / "jpg", list(reversed(_HOLIDAYS)))
    benchmark = load_holidays(root=tmp_path)
    assert [Path(benchmark.database.source(index)).stem for index in range(6)] == _HOLIDAYS
    assert [Path(benchmark.queries.source(index)).stem for index in range(3)] == ["100000", "100100", "100200"]
    assert [truth.easy.tolist() for truth in benchmark.ground_truth] == [[1, 2], [4], []]
    assert [truth.junk.tolist() for truth in benchmark.ground_truth] == [[0], [3], [5]]
    assert all(truth.hard.size == 0 for truth in benchmark.ground_truth)
    assert (
        benchmark.queries.load_image(1).size == benchmark.database.load_image(3).size == (18, 12)
    )  # written third of six, reversed
    assert benchmark.database.class_names == ["database"] and benchmark.queries.class_names == ["query"]


def test_holidays_images_may_lie_in_root_itself(tmp_path: Path) -> None:
    _write_holidays(tmp_path, _HOLIDAYS[:3])
    benchmark = load_landmark_benchmark(name="holidays", root=tmp_path)
    assert (len(benchmark.database), len(benchmark.queries)) == (3, 1)


def test_holidays_group_without_query_and_bad_names_are_errors(tmp_path: Path) -> None:
    _write_holidays(tmp_path / "jpg", [*_HOLIDAYS, "100301"])
    with pytest.raises(DatasetError, match=r"1 group\(s\) have none, e\.g\. \['1003'\]"):
        load_holidays(root=tmp_path)
    (tmp_path / "jpg" / "100301.jpg").unlink()
    _write_holidays(tmp_path / "jpg", ["IMG_0001"])
    with pytest.raises(DatasetError, match=r"named with six digits .*e\.g\. \['IMG_0001'\]"):
        load_holidays(root=tmp_path)


def _write_ukbench(folder: Path, numbers: range | list[int]) -> None:
    for number in numbers:
        _write_jpeg(folder / f"ukbench{number:05d}.jpg", seed=number, size=(10 + number, 8))


def test_ukbench_every_image_is_a_query_with_its_group_of_four(tmp_path: Path) -> None:
    _write_ukbench(tmp_path / "full", range(8))
    benchmark = load_ukbench(root=tmp_path)
    assert len(benchmark.database) == len(benchmark.queries) == len(benchmark.ground_truth) == 8
    for number, truth in enumerate(benchmark.ground_truth):
        group = [member for member in range(8) if member // 4 == number // 4]
        assert truth.easy.tolist() == group and number in truth.easy.tolist()
        assert truth.hard.size == 0 and truth.junk.size == 0
    assert benchmark.queries.source(5) == benchmark.database.source(5) == str(tmp_path / "full" / "ukbench00005.jpg")
    assert benchmark.queries.load_image(5).size == (15, 8)


def test_ukbench_missing_numbers_and_incomplete_groups_are_errors(tmp_path: Path) -> None:
    _write_ukbench(tmp_path, [0, 1, 2, 3, 4, 6, 7])
    with pytest.raises(DatasetError, match=r"lacks 1 number\(s\), e\.g\. ukbench00005\.jpg"):
        load_ukbench(root=tmp_path)
    _write_ukbench(tmp_path, [5])
    (tmp_path / "ukbench00007.jpg").unlink()
    (tmp_path / "ukbench00006.jpg").unlink()
    with pytest.raises(DatasetError, match="has 6 images, not a multiple of 4"):
        load_ukbench(root=tmp_path)


def test_unknown_benchmark_and_missing_root_are_named(tmp_path: Path) -> None:
    assert LANDMARK_BENCHMARKS == ("roxford5k", "rparis6k", "holidays", "ukbench")
    with pytest.raises(DatasetError, match=r"unknown landmark benchmark 'oxford5k'; expected one of \['roxford5k'"):
        load_landmark_benchmark(name="oxford5k", root=tmp_path)
    with pytest.raises(DatasetError, match=r"unknown revisited dataset 'holidays'"):
        load_revisited(root=tmp_path, name="holidays")
    with pytest.raises(DatasetError, match=re.escape(f"dataset root {tmp_path / 'nowhere'} does not exist")):
        load_ukbench(root=tmp_path / "nowhere")


def test_benchmark_checks_ground_truth_against_its_datasets(tmp_path: Path) -> None:
    path = tmp_path / "100000.jpg"
    _write_jpeg(path, seed=0)
    images = ImageDataset(
        loaders=[ImageFileLoader(path=path)],
        labels=np.zeros(1, dtype=np.int64),
        class_names=["x"],
        sources=["a"],
        transform=None,
    )
    truth = QueryGroundTruth(easy=np.array([1]), hard=np.array([], dtype=np.int64), junk=np.array([], dtype=np.int64))
    with pytest.raises(DatasetError, match=r"query 0 easy indices must lie in \[0, 1\), got range \[1, 1\]"):
        LandmarkBenchmark(name="tiny", database=images, queries=images, ground_truth=[truth])
    with pytest.raises(DatasetError, match="1 queries but 0 ground truths"):
        LandmarkBenchmark(name="tiny", database=images, queries=images, ground_truth=[])
