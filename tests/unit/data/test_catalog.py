"""The data layer loads every dataset through the loader its row of `retrieval.config.DATASETS` names."""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrieval.config import DATASETS, CrossModalSplitSpec, DatasetInfo, DatasetSpec, JobSpec
from retrieval.data.base import ImageDataset
from retrieval.data.catalog import (
    dataset_info,
    load_image_dataset,
    load_image_text_dataset,
    load_landmark_dataset,
    loader_for,
    resolve_loader,
)
from retrieval.data.cross_modal import cross_modal_datasets_from_spec
from retrieval.data.from_spec import benchmark_from_spec, datasets_from_spec
from retrieval.data.landmarks import LANDMARK_BENCHMARKS, load_landmark_benchmark
from retrieval.errors import DatasetError

# The keyword arguments a loader of each kind is called with (a bundled dataset's loader gets no root).
_UNIFORM_ARGUMENTS = {
    "image": {"root": "/data"},
    "landmark": {"root": "/data"},
    "image_text": {"root": "/data", "split": CrossModalSplitSpec()},
}

_FAKE_LOADERS = '''
import numpy as np

from retrieval.data.base import ArrayImageLoader, ImageDataset
from retrieval.data.cross_modal import LoadedCrossModal
from retrieval.data.digit_pairs import load_digit_pairs

CALLS = []


def load_shapes(*, root):
    """Six 4x4 images of three classes whose grey level is read from root/levels.txt."""
    CALLS.append(root)
    levels = [int(word) for word in open(f"{root}/levels.txt").read().split()]
    pixels = [np.full((4, 4), level, dtype=np.uint8) for level in levels]
    return ImageDataset(
        loaders=[ArrayImageLoader(pixels=image) for image in pixels],
        labels=np.arange(len(levels)) % 3,
        class_names=["dark", "mid", "light"],
        sources=[f"shapes:{position}" for position in range(len(levels))],
        transform=None,
    )


def load_small_pairs(*, split):
    CALLS.append(split.size)
    return LoadedCrossModal(dataset=load_digit_pairs(size=split.size, seed=split.seed))


def load_nothing(*, root):
    return [root]
'''


@pytest.fixture
def fake_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module `fake_dataset_loaders` importable from tmp_path/modules; returns a data root with levels.txt."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "fake_dataset_loaders.py").write_text(textwrap.dedent(_FAKE_LOADERS))
    monkeypatch.syspath_prepend(str(modules))
    root = tmp_path / "shapes"
    root.mkdir()
    (root / "levels.txt").write_text("0 100 200 10 110 210")
    yield root
    sys.modules.pop("fake_dataset_loaders", None)


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_row_names_a_loader_callable_the_way_its_kind_is_called(name: str) -> None:
    info = DATASETS[name]
    loader = resolve_loader(info.loader)
    assert callable(loader) and loader is loader_for(name, info.kind)
    arguments = dict(_UNIFORM_ARGUMENTS[info.kind])
    if info.bundled:
        del arguments["root"]
    inspect.signature(loader).bind(**arguments)  # raises TypeError if the loader cannot be called so


def test_the_landmark_benchmarks_are_the_table_s() -> None:
    assert tuple(name for name, info in DATASETS.items() if info.kind == "landmark") == LANDMARK_BENCHMARKS


def test_an_unknown_name_lists_the_table(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset name 'mnist'; expected one of \['digits', 'image_folder'"):
        dataset_info("mnist")
    with pytest.raises(DatasetError, match="unknown dataset name 'mnist'"):
        load_image_dataset("mnist")
    with pytest.raises(DatasetError, match=r"unknown landmark benchmark 'cub200'; expected one of \['roxford5k'"):
        load_landmark_benchmark(name="cub200", root=tmp_path)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        (
            "roxford5k",
            "image",
            "dataset 'roxford5k' is not an image dataset (kind 'image') but a landmark benchmark (kind 'landmark'); "
            "the datasets of kind 'image' are ['digits', 'image_folder', 'cub200'",
        ),
        ("digits", "image_text", "dataset 'digits' is not an image-text dataset (kind 'image_text') but an image"),
        ("coco", "landmark", "dataset 'coco' is not a landmark benchmark (kind 'landmark') but an image-text dataset"),
    ],
)
def test_a_loader_asked_for_the_wrong_kind_names_the_dataset_and_both_kinds(name: str, kind: str, message: str) -> None:
    with pytest.raises(DatasetError) as raised:
        loader_for(name, kind)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_a_landmark_benchmark_is_never_split_for_training(tmp_path: Path) -> None:
    spec = DatasetSpec(name="holidays", root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"'holidays' is a landmark benchmark .* train on another dataset"):
        datasets_from_spec(spec)
    with pytest.raises(DatasetError, match="'cub200' is not an image-text dataset"):
        load_image_text_dataset("cub200", root=tmp_path, split=CrossModalSplitSpec())
    with pytest.raises(DatasetError, match="'digits' is not a landmark benchmark with a root folder"):
        benchmark_from_spec(DatasetSpec(name="digits"))


def test_a_missing_root_names_what_the_folder_holds_and_the_loader() -> None:
    with pytest.raises(DatasetError) as raised:
        load_landmark_dataset("ukbench", root=None)
    assert str(raised.value) == (
        "dataset 'ukbench' needs a root folder in its published layout (see retrieval.data.landmarks:load_ukbench), "
        "got root=None"
    )


def test_a_new_image_row_is_loaded_and_split_through_its_loader(
    fake_loaders: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        DATASETS,
        "shapes",
        DatasetInfo(
            kind="image",
            loader="fake_dataset_loaders:load_shapes",
            description="grey squares",
            root="holding levels.txt",
        ),
    )
    spec = DatasetSpec.model_validate(
        {"name": "shapes", "root": str(fake_loaders), "image_size": 8, "split": {"mode": "class_ranges"}}
    )
    splits = datasets_from_spec(spec)
    # Written by the fixture at test time (no distribution provides it); the data layer imported it.
    fake_dataset_loaders = sys.modules["fake_dataset_loaders"]

    assert [str(fake_loaders)] == fake_dataset_loaders.CALLS
    # The usual class_ranges protocol over the loaded labels 0,1,2,0,1,2: class 0 trains, 1-2 are retrieved.
    assert sorted(splits.train.labels.tolist()) == [0, 0]
    assert sorted(splits.test.labels.tolist()) == [1, 1, 2, 2]
    assert splits.test.class_names == ["dark", "mid", "light"]
    assert splits.test[0][0].shape == (3, 8, 8)
    direct = load_image_dataset("shapes", root=fake_loaders)
    np.testing.assert_array_equal(np.asarray(direct.load_image(2)), np.full((4, 4), 200, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"dataset 'shapes' needs a root folder holding levels\.txt"):
        load_image_dataset("shapes")


def test_a_new_bundled_image_text_row_trains_a_cross_modal_method(
    fake_loaders: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    del fake_loaders
    monkeypatch.setitem(
        DATASETS,
        "small_pairs",
        DatasetInfo(kind="image_text", loader="fake_dataset_loaders:load_small_pairs", description="", root=None),
    )
    job = JobSpec.model_validate(
        {
            "name": "small_pairs_unit",
            "method": {"name": "cross_modal_hashing"},
            "dataset": {"name": "small_pairs", "cross_modal": {"size": 60, "query_size": 10, "train_size": 30}},
        }
    )
    splits = cross_modal_datasets_from_spec(job.dataset)
    assert (len(splits.train), len(splits.query), len(splits.retrieval)) == (30, 10, 50)
    assert splits.train.tags is not None


def test_a_loader_that_returns_the_wrong_type_is_named(fake_loaders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        DATASETS,
        "broken",
        DatasetInfo(kind="image", loader="fake_dataset_loaders:load_nothing", description="", root="anywhere"),
    )
    with pytest.raises(DatasetError, match=r"dataset 'broken' \(fake_dataset_loaders:load_nothing\) returned a list"):
        load_image_dataset("broken", root=fake_loaders)
    monkeypatch.setitem(
        DATASETS, "missing", DatasetInfo(kind="image", loader="fake_dataset_loaders:nope", description="", root=None)
    )
    with pytest.raises(DatasetError, match="module 'fake_dataset_loaders' has no callable 'nope'"):
        load_image_dataset("missing")
    monkeypatch.setitem(
        DATASETS, "absent", DatasetInfo(kind="image", loader="no_such_module_xyz:load", description="", root=None)
    )
    with pytest.raises(DatasetError, match="cannot import module 'no_such_module_xyz'"):
        load_image_dataset("absent")


def test_a_bundled_dataset_loads_without_a_root_and_ignores_one() -> None:
    digits = load_image_dataset("digits")
    assert isinstance(digits, ImageDataset) and len(digits) == 1797
    np.testing.assert_array_equal(load_image_dataset("digits", root="/ignored").labels, digits.labels)


def test_every_landmark_row_names_a_protocol_the_evaluation_scores() -> None:
    from retrieval.evaluation.landmarks import LANDMARK_PROTOCOLS
    from retrieval.evaluation.suite import PRIMARY_METRIC

    for name in LANDMARK_BENCHMARKS:
        protocol = DATASETS[name].protocol
        assert protocol in LANDMARK_PROTOCOLS and protocol in PRIMARY_METRIC, name
