"""Stanford Dogs (120 breeds, 20,580 ImageNet images) in its published layout.

The retrieval protocol splits by class: with the registry's default `class_ranges`
split, the first 60 breeds (sorted by folder name) train and the last 60 test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io

from retrieval.data.base import ImageDataset
from retrieval.data.image_folder import IMAGE_EXTENSIONS
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

# What loadmat raises on a file that is not a MATLAB 5 file: MatReadError (bad header),
# NotImplementedError (a v7.3 HDF5 file), and IndexError/ValueError/TypeError/OSError
# from truncated or garbage bytes.
_UNREADABLE_MAT_ERRORS = (scipy.io.matlab.MatReadError, NotImplementedError, IndexError, ValueError, TypeError, OSError)

IMAGES_FOLDER_NAME = "Images"
FILE_LIST_NAME = "file_list.mat"


def _class_folders(images_root: Path) -> list[Path]:
    folders = sorted(entry for entry in images_root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise DatasetError(f"{images_root} has no breed folders (expected {images_root}/<wnid>-<breed>/<image>.jpg)")
    for folder in folders:
        if "-" not in folder.name:
            raise DatasetError(f"breed folder {folder} is not named '<wnid>-<breed>' (e.g. 'n02085620-Chihuahua')")
    return folders


def _breed_name(folder_name: str) -> str:
    # "n02085620-Chihuahua" -> "Chihuahua"; "n02085782-Japanese_spaniel" -> "Japanese spaniel".
    return folder_name.split("-", 1)[1].replace("_", " ")


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _read_file_list(path: Path) -> tuple[list[str], np.ndarray]:
    """Returns the relative paths `[N]` and the 1-based labels `[N]` of file_list.mat."""
    try:
        contents = scipy.io.loadmat(str(path))
    except _UNREADABLE_MAT_ERRORS as error:
        raise DatasetError(f"cannot read MATLAB file {path}: {type(error).__name__}: {error}") from error
    for key in ("file_list", "labels"):
        if key not in contents:
            raise DatasetError(f"{path} has no variable {key!r} (it holds {sorted(contents)})")
    # loadmat gives a cell column `[N, 1]` of 1-element string arrays, and labels `[N, 1]`.
    relative_paths = [str(np.ravel(entry)[0]) for entry in np.ravel(contents["file_list"])]
    labels = np.ravel(contents["labels"])
    if len(labels) != len(relative_paths):
        raise DatasetError(f"{path} lists {len(relative_paths)} files but {len(labels)} labels")
    if labels.size and not np.array_equal(labels, np.round(labels)):
        raise DatasetError(f"{path}: labels must be whole numbers (1-based class ids)")
    return relative_paths, labels.astype(np.int64)


def load_stanford_dogs(*, root: str | Path, transform: ImageTransform | None = None) -> ImageDataset:
    """Loads Stanford Dogs from the layout of its published archives (images.tar, lists.tar).

    Expected tree::

        root/
        ├── Images/                         from images.tar
        │   ├── n02085620-Chihuahua/
        │   │   ├── n02085620_10074.jpg
        │   │   └── ...
        │   └── ...                         120 folders "<wnid>-<breed>"
        └── file_list.mat                   from lists.tar; optional

    Class ids are the breed folders in sorted name order (the order of the published
    1-based labels); the class name is the breed part of the folder name, underscores
    read as spaces ("n02085782-Japanese_spaniel" -> "Japanese spaniel").

    When `file_list.mat` exists, its `file_list` (paths relative to `Images/`) gives the
    images and their order, and its `labels` (1-based) must agree with each file's
    folder; images on disk that it does not list are left out, with a warning. Without
    it, every image in the breed folders is used, sorted by path. train_list.mat and
    test_list.mat are not read: the retrieval protocol splits by class.

    Args:
        root: The folder holding `Images/`.
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Returns:
        The dataset: labels `[N]` in `[0, number of breed folders)`.

    Raises:
        DatasetError: `root` or `Images/` is missing; a breed folder is not named
            "<wnid>-<breed>"; no image is found; or file_list.mat is unreadable, lacks a
            variable, names a missing file or gives a label that disagrees with the
            file's folder (the message names the entry number).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root_path} does not exist or is not a directory")
    images_root = root_path / IMAGES_FOLDER_NAME
    if not images_root.is_dir():
        raise DatasetError(f"Stanford Dogs root {root_path} has no {IMAGES_FOLDER_NAME}/ folder (from images.tar)")
    folders = _class_folders(images_root)
    class_names = [_breed_name(folder.name) for folder in folders]
    class_of_folder = {folder.name: class_id for class_id, folder in enumerate(folders)}

    image_paths: list[Path] = []
    labels: list[int] = []
    file_list_path = root_path / FILE_LIST_NAME
    if file_list_path.is_file():
        relative_paths, listed_labels = _read_file_list(file_list_path)
        for entry, (relative_path, listed_label) in enumerate(zip(relative_paths, listed_labels, strict=True), start=1):
            image_path = images_root / relative_path
            if not image_path.is_file():
                raise DatasetError(f"{file_list_path} entry {entry}: image {image_path} does not exist")
            folder_name = Path(relative_path).parts[0]
            class_id = class_of_folder.get(folder_name)
            if class_id is None or class_id != listed_label - 1:
                expected = folders[listed_label - 1].name if 1 <= listed_label <= len(folders) else "no folder"
                raise DatasetError(
                    f"{file_list_path} entry {entry}: label {listed_label} is breed folder {expected!r} "
                    f"but the file {relative_path!r} lies in {folder_name!r}"
                )
            image_paths.append(image_path)
            labels.append(class_id)
        unlisted = sum(len(_images_in(folder)) for folder in folders) - len(set(image_paths))
        if unlisted > 0:
            logger.warning("%d image(s) under %s are not in %s and are left out", unlisted, images_root, file_list_path)
    else:
        for class_id, folder in enumerate(folders):
            folder_images = _images_in(folder)
            if not folder_images:
                logger.warning("breed folder %s holds no image", folder)
            image_paths.extend(folder_images)
            labels.extend([class_id] * len(folder_images))
    if not image_paths:
        raise DatasetError(f"Stanford Dogs root {root_path} holds no image under {images_root}")

    logger.info("Stanford Dogs %s: %d images in %d breeds", root_path, len(image_paths), len(class_names))
    return ImageDataset.from_files(paths=image_paths, labels=labels, class_names=class_names, transform=transform)
