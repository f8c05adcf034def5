"""Stanford Cars (196 models, 16,185 images) in its two published layouts.

The retrieval protocol uses every image and splits by class: models 1-98 train and
99-196 test, i.e. class ids 0-97 / 98-195, the registry's default `class_ranges` split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from retrieval.data.base import ImageDataset
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

# What loadmat raises on a file that is not a MATLAB 5 file: MatReadError (bad header),
# NotImplementedError (a v7.3 HDF5 file), and IndexError/ValueError/TypeError/OSError
# from truncated or garbage bytes.
_UNREADABLE_MAT_ERRORS = (scipy.io.matlab.MatReadError, NotImplementedError, IndexError, ValueError, TypeError, OSError)

ALL_ANNOTATIONS_NAME = "cars_annos.mat"
DEVKIT_FOLDER_NAME = "devkit"
TEST_LABELS_NAME = "cars_test_annos_withlabels.mat"


def _read_mat(path: Path, *, variables: Sequence[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"Stanford Cars file {path} does not exist")
    try:
        # Default loadmat options: a MATLAB struct array `1 x N` comes back as a structured
        # array `[1, N]` whose fields hold `[1, 1]` numbers and `[1]` strings.
        contents = scipy.io.loadmat(str(path))
    except _UNREADABLE_MAT_ERRORS as error:
        raise DatasetError(f"cannot read MATLAB file {path}: {type(error).__name__}: {error}") from error
    for variable in variables:
        if variable not in contents:
            raise DatasetError(f"{path} has no variable {variable!r} (it holds {sorted(contents)})")
    return {variable: contents[variable] for variable in variables}


def _strings(cells: np.ndarray) -> list[str]:
    return [str(np.ravel(cell)[0]) if np.size(cell) else "" for cell in np.ravel(cells)]


def _struct_field(annotations: np.ndarray, *, field: str, path: Path) -> np.ndarray:
    names = annotations.dtype.names or ()
    if field not in names:
        raise DatasetError(f"{path}: 'annotations' has no field {field!r} (fields: {list(names)})")
    return np.ravel(annotations[field])


def _class_ids(annotations: np.ndarray, *, num_classes: int, path: Path) -> list[int]:
    """Converts the 1-based `class` field `[N]` to 0-based class ids, checking the range."""
    class_ids: list[int] = []
    for entry, cell in enumerate(_struct_field(annotations, field="class", path=path), start=1):
        values = np.ravel(cell)
        is_class_id = (
            values.size == 1
            and np.issubdtype(values.dtype, np.number)
            and float(values[0]).is_integer()
            and 1 <= values[0] <= num_classes
        )
        if not is_class_id:
            raise DatasetError(
                f"{path} annotation {entry}: class must be one integer in 1..{num_classes}, got {values.tolist()}"
            )
        class_ids.append(int(values[0]) - 1)
    return class_ids


def _check_images_exist(image_paths: Sequence[Path], *, annotations_path: Path) -> None:
    for entry, image_path in enumerate(image_paths, start=1):
        if not image_path.is_file():
            raise DatasetError(f"{annotations_path} annotation {entry}: image {image_path} does not exist")


def _load_all_annotations(root: Path) -> tuple[list[Path], list[int], list[str]]:
    path = root / ALL_ANNOTATIONS_NAME
    contents = _read_mat(path, variables=("annotations", "class_names"))
    class_names = _strings(contents["class_names"])
    annotations = contents["annotations"]
    image_paths = [root / name for name in _strings(_struct_field(annotations, field="relative_im_path", path=path))]
    class_ids = _class_ids(annotations, num_classes=len(class_names), path=path)
    _check_images_exist(image_paths, annotations_path=path)
    return image_paths, class_ids, class_names


def _load_devkit(root: Path) -> tuple[list[Path], list[int], list[str]]:
    devkit = root / DEVKIT_FOLDER_NAME
    class_names = _strings(_read_mat(devkit / "cars_meta.mat", variables=("class_names",))["class_names"])
    test_labels_candidates = (root / TEST_LABELS_NAME, devkit / TEST_LABELS_NAME)
    test_labels_path = next((path for path in test_labels_candidates if path.is_file()), None)
    if test_labels_path is None:
        raise DatasetError(
            f"Stanford Cars devkit layout in {root}: the class-split protocol needs the test labels too, "
            f"expected {test_labels_candidates[0]} or {test_labels_candidates[1]}"
        )
    image_paths: list[Path] = []
    class_ids: list[int] = []
    for annotations_path, images_folder in (
        (devkit / "cars_train_annos.mat", root / "cars_train"),
        (test_labels_path, root / "cars_test"),
    ):
        annotations = _read_mat(annotations_path, variables=("annotations",))["annotations"]
        split_paths = [
            images_folder / name for name in _strings(_struct_field(annotations, field="fname", path=annotations_path))
        ]
        _check_images_exist(split_paths, annotations_path=annotations_path)
        class_ids.extend(_class_ids(annotations, num_classes=len(class_names), path=annotations_path))
        image_paths.extend(split_paths)
    return image_paths, class_ids, class_names


def load_stanford_cars(*, root: str | Path, transform: ImageTransform | None = None) -> ImageDataset:
    """Loads Stanford Cars from either of its published layouts.

    The layout deep-metric-learning code uses (car_ims.tgz + cars_annos.mat)::

        root/
        ├── cars_annos.mat        annotations: 1 x N struct (relative_im_path "car_ims/000001.jpg",
        │                         bbox_x1, bbox_y1, bbox_x2, bbox_y2, class 1..196, test 0/1);
        │                         class_names: 1 x 196 cell
        └── car_ims/
            ├── 000001.jpg
            └── ...

    or the devkit layout (cars_train.tgz, cars_test.tgz, car_devkit.tgz and the test
    labels released later)::

        root/
        ├── devkit/
        │   ├── cars_meta.mat                    class_names: 1 x 196 cell
        │   ├── cars_train_annos.mat             annotations: bbox_x1..bbox_y2, class, fname "00001.jpg"
        │   └── cars_test_annos_withlabels.mat   same fields (may instead lie in root/)
        ├── cars_train/
        │   ├── 00001.jpg
        │   └── ...
        └── cars_test/
            ├── 00001.jpg
            └── ...

    `cars_annos.mat` wins when both are present. Items follow the annotation order
    (devkit: train images, then test images); class id = `class` - 1; class names are
    the published model names ("AM General Hummer SUV 2000"). The `test` flag and the
    boxes are not used: the retrieval protocol splits by class and uses whole images.

    Args:
        root: The dataset folder.
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Returns:
        The dataset: labels `[N]` in `[0, number of class names)`.

    Raises:
        DatasetError: Neither layout is found; a .mat file is missing, unreadable or
            lacks a variable or field; a class is outside 1..number of class names; or
            an annotated image does not exist (the message names the .mat file and the
            annotation number).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root_path} does not exist or is not a directory")
    if (root_path / ALL_ANNOTATIONS_NAME).is_file():
        layout = ALL_ANNOTATIONS_NAME
        image_paths, class_ids, class_names = _load_all_annotations(root_path)
    elif (root_path / DEVKIT_FOLDER_NAME).is_dir():
        layout = DEVKIT_FOLDER_NAME
        image_paths, class_ids, class_names = _load_devkit(root_path)
    else:
        raise DatasetError(
            f"dataset root {root_path} is not a Stanford Cars folder: expected {root_path / ALL_ANNOTATIONS_NAME} "
            f"(with car_ims/) or {root_path / DEVKIT_FOLDER_NAME}/ (with cars_train/ and cars_test/)"
        )
    if not image_paths:
        raise DatasetError(f"Stanford Cars root {root_path} annotates no image")
    logger.info(
        "Stanford Cars %s (%s layout): %d images in %d classes", root_path, layout, len(image_paths), len(class_names)
    )
    return ImageDataset.from_files(paths=image_paths, labels=class_ids, class_names=class_names, transform=transform)
