"""CUB-200-2011 (Caltech-UCSD Birds, 200 species, 11,788 images) in its published layout.

The fine-grained retrieval protocol trains on classes 1-100 and tests on 101-200; with
class id = published class id - 1 these are class ids 0-99 and 100-199, which is the
registry's default `class_ranges` split (first half / second half of the class ids).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from retrieval.data.base import ImageDataset
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

CUB_FOLDER_NAME = "CUB_200_2011"

# "001.Black_footed_Albatross": a zero-padded number, a dot, then the name with "_" for spaces.
_CLASS_PREFIX = re.compile(r"^[0-9]+\.")
_INTEGER = re.compile(r"[0-9]+")


def _resolve_root(root: str | Path) -> Path:
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DatasetError(f"dataset root {root_path} does not exist")
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root_path} is not a directory")
    for candidate in (root_path, root_path / CUB_FOLDER_NAME):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetError(
        f"dataset root {root_path} is not a CUB-200-2011 folder: expected {root_path / 'images.txt'} "
        f"or {root_path / CUB_FOLDER_NAME / 'images.txt'}"
    )


def _read_id_table(path: Path, *, value_description: str) -> list[tuple[int, int, str]]:
    """Reads a "<integer id> <value>" file as `(line number, id, value)`; blank lines are skipped."""
    if not path.is_file():
        raise DatasetError(f"CUB-200-2011 file {path} does not exist")
    rows: list[tuple[int, int, str]] = []
    seen: dict[int, int] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not _INTEGER.fullmatch(fields[0]):
            raise DatasetError(f"{path} line {line_number}: expected '<id> {value_description}', got {line.strip()!r}")
        row_id = int(fields[0])
        if row_id in seen:
            raise DatasetError(f"{path} line {line_number}: id {row_id} repeats the id of line {seen[row_id]}")
        seen[row_id] = line_number
        rows.append((line_number, row_id, fields[1].strip()))
    if not rows:
        raise DatasetError(f"CUB-200-2011 file {path} lists nothing")
    return rows


def _readable_class_name(folder_name: str) -> str:
    return _CLASS_PREFIX.sub("", folder_name).replace("_", " ")


def load_cub200(*, root: str | Path, transform: ImageTransform | None = None) -> ImageDataset:
    """Loads CUB-200-2011 from the layout of its published archive (CUB_200_2011.tgz).

    Expected tree (`root` is either `CUB_200_2011/` or the folder holding it)::

        CUB_200_2011/
        ├── images.txt               "<image_id> <relative path>", e.g. "1 001.Black_footed_Albatross/x.jpg"
        ├── image_class_labels.txt   "<image_id> <class_id>", class_id in 1..200
        ├── classes.txt              "<class_id> <class folder>", e.g. "1 001.Black_footed_Albatross"
        └── images/
            ├── 001.Black_footed_Albatross/
            │   ├── Black_Footed_Albatross_0046_18.jpg
            │   └── ...
            └── ...

    Other files of the archive (train_test_split.txt, bounding_boxes.txt, parts/,
    attributes/) are not read: the retrieval protocol splits by class, not by them.

    Items are in image id order; class id = published class id - 1 and the class name
    is the folder name without its number, underscores read as spaces
    ("001.Black_footed_Albatross" -> "Black footed Albatross"). Images are opened only
    when loaded.

    Args:
        root: The `CUB_200_2011` folder or its parent.
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Returns:
        The dataset: labels `[N]` in `[0, number of classes)`.

    Raises:
        DatasetError: The root or one of the three files is missing; a line is malformed
            or repeats an id (the message names the file and line number); the files
            disagree on image or class ids; class ids are not 1..K; or a listed image
            file does not exist (the message names the file and the images.txt line).
    """
    dataset_root = _resolve_root(root)
    images_file = dataset_root / "images.txt"
    labels_file = dataset_root / "image_class_labels.txt"
    classes_file = dataset_root / "classes.txt"
    image_rows = _read_id_table(images_file, value_description="<relative path>")
    label_rows = _read_id_table(labels_file, value_description="<class_id>")
    class_rows = _read_id_table(classes_file, value_description="<class name>")

    class_ids = sorted(class_id for _, class_id, _ in class_rows)
    if class_ids != list(range(1, len(class_ids) + 1)):
        missing = sorted(set(range(1, max(class_ids) + 1)) - set(class_ids))
        raise DatasetError(
            f"{classes_file}: class ids must be 1..{len(class_ids)} with none missing, "
            f"got range [{class_ids[0]}, {class_ids[-1]}] missing {missing[:10]}"
        )
    class_names = [""] * len(class_ids)
    for _, class_id, folder_name in class_rows:
        class_names[class_id - 1] = _readable_class_name(folder_name)

    class_of_image: dict[int, int] = {}
    for line_number, image_id, value in label_rows:
        if not _INTEGER.fullmatch(value):
            raise DatasetError(
                f"{labels_file} line {line_number}: expected '<image_id> <class_id>', got class {value!r}"
            )
        class_id = int(value)
        if not 1 <= class_id <= len(class_names):
            raise DatasetError(
                f"{labels_file} line {line_number}: class id {class_id} is not in {classes_file} "
                f"(ids 1..{len(class_names)})"
            )
        class_of_image[image_id] = class_id
    listed_images = {image_id for _, image_id, _ in image_rows}
    unknown_images = sorted(set(class_of_image) - listed_images)
    if unknown_images:
        raise DatasetError(
            f"{labels_file} labels {len(unknown_images)} image id(s) that {images_file} does not list, "
            f"e.g. {unknown_images[:5]}"
        )

    image_paths: list[Path] = []
    labels: list[int] = []
    for line_number, image_id, relative_path in sorted(image_rows, key=lambda row: row[1]):
        if image_id not in class_of_image:
            raise DatasetError(f"{images_file} line {line_number}: image id {image_id} has no class in {labels_file}")
        image_path = dataset_root / "images" / relative_path
        if not image_path.is_file():
            raise DatasetError(f"{images_file} line {line_number}: image {image_path} does not exist")
        image_paths.append(image_path)
        labels.append(class_of_image[image_id] - 1)

    logger.info("CUB-200-2011 %s: %d images in %d classes", dataset_root, len(image_paths), len(class_names))
    return ImageDataset.from_files(paths=image_paths, labels=labels, class_names=class_names, transform=transform)
