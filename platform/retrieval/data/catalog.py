"""The data layer's side of the dataset table: the loader of a dataset name, by kind.

`retrieval.config.DATASETS` is the one place a dataset name is written; each row names its
loader as a `"module:function"` string, imported here when the dataset is first loaded (so
the configuration layer never imports the data layer). Every loader of one kind is called
the same way, with keyword arguments only:

- `image`: `loader(root=...) -> ImageDataset` (a bundled dataset: `loader()`);
- `landmark`: `loader(root=...) -> LandmarkBenchmark`;
- `image_text`: `loader(root=..., split=CrossModalSplitSpec) -> LoadedCrossModal` (bundled:
  `loader(split=...)`).

A loader whose own signature differs (e.g. `load_revisited(root=, name=)`) gets a small
adapter beside it in its module, and the row names the adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from retrieval.config import DATASETS, KIND_WORDS, CrossModalSplitSpec, DatasetInfo, DatasetKind, dataset_names
from retrieval.data.base import ImageDataset
from retrieval.errors import DatasetError

if TYPE_CHECKING:
    from retrieval.data.cross_modal import LoadedCrossModal
    from retrieval.data.landmarks import LandmarkBenchmark

_Loaded = TypeVar("_Loaded")


def dataset_info(name: str) -> DatasetInfo:
    """The row of `DATASETS` for `name`.

    Raises:
        DatasetError: `name` is not in the table; the message lists the names that are.
    """
    info = DATASETS.get(name)
    if info is None:
        raise DatasetError(f"unknown dataset name {name!r}; expected one of {list(DATASETS)}")
    return info


def resolve_loader(path: str) -> Callable[..., Any]:
    """Imports the `"module:function"` a table row names and returns the function.

    Raises:
        DatasetError: The module cannot be imported, or has no such callable.
    """
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DatasetError(f"dataset loader {path!r}: cannot import module {module_name!r}: {error}") from error
    loader = getattr(module, attribute, None)
    if not callable(loader):
        raise DatasetError(f"dataset loader {path!r}: module {module_name!r} has no callable {attribute!r}")
    return loader


def loader_for(name: str, kind: DatasetKind) -> Callable[..., Any]:
    """The loader of dataset `name`, which must be of `kind`.

    Raises:
        DatasetError: `name` is unknown, is of another kind (the message names the dataset,
            its kind and the datasets of the kind asked for), or its loader cannot be imported.
    """
    info = dataset_info(name)
    if info.kind != kind:
        raise DatasetError(
            f"dataset {name!r} is not {KIND_WORDS[kind]} (kind {kind!r}) but {KIND_WORDS[info.kind]} "
            f"(kind {info.kind!r}); the datasets of kind {kind!r} are {list(dataset_names(kind))}"
        )
    return resolve_loader(info.loader)


def _root_argument(name: str, root: str | Path | None) -> dict[str, str | Path]:
    """`{"root": root}` for a dataset read from a folder, `{}` for a bundled one (which ignores `root`)."""
    info = dataset_info(name)
    if info.bundled:
        return {}
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a root folder {info.root} (see {info.loader}), got root=None")
    return {"root": root}


def _checked(name: str, loaded: object, expected: type[_Loaded]) -> _Loaded:
    if not isinstance(loaded, expected):
        raise DatasetError(
            f"the loader of dataset {name!r} ({dataset_info(name).loader}) returned a {type(loaded).__name__}, "
            f"not a {expected.__name__}"
        )
    return loaded


def load_image_dataset(name: str, *, root: str | Path | None = None) -> ImageDataset:
    """Loads the image dataset `name` (kind `image`) from `root` (ignored by a bundled dataset).

    Raises:
        DatasetError: `name` is unknown or not an image dataset, `root` is missing, or the
            loader rejects the data.
    """
    loader = loader_for(name, "image")
    return _checked(name, loader(**_root_argument(name, root)), ImageDataset)


def load_landmark_dataset(name: str, *, root: str | Path | None) -> LandmarkBenchmark:
    """Loads the landmark benchmark `name` (kind `landmark`) from `root`.

    Raises:
        DatasetError: `name` is unknown or not a landmark benchmark, `root` is missing, or the
            loader rejects the data.
    """
    from retrieval.data.landmarks import LandmarkBenchmark

    loader = loader_for(name, "landmark")
    return _checked(name, loader(**_root_argument(name, root)), LandmarkBenchmark)


def load_image_text_dataset(name: str, *, root: str | Path | None, split: CrossModalSplitSpec) -> LoadedCrossModal:
    """Loads the image-text dataset `name` (kind `image_text`) from `root`, with the job's split settings.

    Raises:
        DatasetError: `name` is unknown or not an image-text dataset, `root` is missing, or the
            loader rejects the data.
    """
    from retrieval.data.cross_modal import LoadedCrossModal

    loader = loader_for(name, "image_text")
    loaded = loader(**_root_argument(name, root), split=split)
    return _checked(name, loaded, LoadedCrossModal)
