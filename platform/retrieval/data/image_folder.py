"""Images in the `root/<class>/<image>` layout (torchvision's ImageFolder layout).

Used for any dataset a user has on disk in one folder per class. Images are read
lazily with Pillow, as RGB, when an item is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from retrieval.data.base import ImageDataset
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _normalized_extensions(extensions: Iterable[str] | None) -> frozenset[str]:
    chosen = IMAGE_EXTENSIONS if extensions is None else tuple(extensions)
    normalized = frozenset(
        (extension if extension.startswith(".") else f".{extension}").lower() for extension in chosen
    )
    if not normalized:
        raise DatasetError("extensions must name at least one image file extension")
    return normalized


def _is_hidden(path: Path, *, root: Path) -> bool:
    # Dot-files are editor, OS or sync metadata (e.g. macOS "._photo.jpg"), never images.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def load_image_folder(
    *,
    root: str | Path,
    transform: ImageTransform | None = None,
    extensions: Iterable[str] | None = None,
) -> ImageDataset:
    """Loads `root/<class>/<image>`: one subfolder per class, images at any depth in it.

    Classes are the subfolders with at least one image, in sorted name order (class id =
    position); images are the files whose extension (case-insensitive) is in
    `extensions`, sorted by path. Hidden files and folders (name starting with ".") are
    ignored. A class folder without images is skipped with a warning.

    Args:
        root: The dataset's root folder.
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.
        extensions: File extensions to accept, e.g. (".png",); default `IMAGE_EXTENSIONS`.

    Returns:
        The dataset; images are opened only when loaded, and a corrupt one raises
        `CorruptImageError` naming the file at that point.

    Raises:
        DatasetError: `root` is missing or not a folder, has no class subfolders, or
            holds no image at all; the message names `root`.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DatasetError(f"dataset root {root_path} does not exist")
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root_path} is not a directory")
    accepted = _normalized_extensions(extensions)
    class_dirs = sorted(entry for entry in root_path.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"dataset root {root_path} has no class subfolders (expected root/<class>/<image>)")

    class_names: list[str] = []
    image_paths: list[Path] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        class_images = sorted(
            path
            for path in class_dir.rglob("*")
            if path.suffix.lower() in accepted and path.is_file() and not _is_hidden(path, root=class_dir)
        )
        if not class_images:
            logger.warning(
                "skipping class folder %s: it holds no image with extensions %s", class_dir, sorted(accepted)
            )
            continue
        class_id = len(class_names)
        class_names.append(class_dir.name)
        image_paths.extend(class_images)
        labels.extend([class_id] * len(class_images))

    if not image_paths:
        raise DatasetError(
            f"dataset root {root_path} holds no image with extensions {sorted(accepted)} "
            f"in its {len(class_dirs)} class subfolder(s)"
        )
    logger.info("image folder %s: %d images in %d classes", root_path, len(image_paths), len(class_names))
    return ImageDataset.from_files(paths=image_paths, labels=labels, class_names=class_names, transform=transform)
