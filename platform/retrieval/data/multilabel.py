"""MIRFlickr-25K and NUS-WIDE: images with tag vectors and multi-hot labels (thesis ch. 3).

Each loader reads whichever of three layouts it finds under `root`, in this order:

1. The raw download.
   - MIRFlickr-25K: `mirflickr/im<N>.jpg`, `mirflickr/meta/tags/tags<N>.txt` (one tag per
     line) and `mirflickr25k_annotations_v080/<concept>.txt` (image numbers, one per line).
     The `<concept>_r1.txt` files (the "relevant" subset of a concept, a duplicate of part of
     `<concept>.txt`) are skipped, as the DCMH papers do: this gives their 24 labels.
   - NUS-WIDE: `ImageList/Imagelist.txt` (one `...\\Flickr\\<folder>\\<file>.jpg` per line;
     the image is `Flickr/<folder>/<file>.jpg`), `NUS_WID_Tags/AllTags1k.txt` (a 0/1 row of
     1,000 tags per image; names from `NUS_WID_Tags/TagList1k.txt` when present) and
     `Groundtruth/AllLabels/Labels_<concept>.txt` (one 0/1 per image); the `num_concepts`
     most frequent concepts are kept (10 by default: NUS-WIDE-TC10).
   Following DCMH ("remove the pairs without textual tags or labels"), an image is kept only
   when it has at least one label and, with `drop_untagged` (default), at least one tag of
   the vocabulary. An image's text is its vocabulary tags joined by spaces.
2. The DCMH-style `.mat` packaging of the whole set: `<prefix>-iall.mat` ('IAll' images),
   `<prefix>-yall.mat` ('YAll' tags `[N, V]`) and `<prefix>-lall.mat` ('LAll' labels `[N, C]`)
   (e.g. `mirflickr25k-*.mat`, `nus-wide-tc10-*.mat`); split with the seed like the raw set.
3. One `.mat` holding its own split: `I_tr/T_tr/L_tr`, `I_db/T_db/L_db`, `I_te/T_te/L_te`
   (train, retrieval, query). That split is kept.

`.mat` images may be `[N, 3, H, W]`, `[N, H, W, 3]` or MATLAB's `[H, W, 3, N]`; uint8, or
floats in [0, 1] (scaled by 255) or [0, 255]. The packagings carry no tag or label names,
so they are called "tag_<j>" and "label_<j>", and an item's text is its "tag_<j>" words.
MATLAB v7.3 files (HDF5, how the large `-iall.mat` files usually come) need `h5py`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from retrieval.config import CrossModalSplitSpec
from retrieval.data.base import ArrayImageLoader, ImageFileLoader
from retrieval.data.cross_modal import CrossModalDataset, CrossModalSplitIndices, LoadedCrossModal
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

# What loadmat raises on a file that is not a readable MATLAB 5 file (as in stanford_dogs.py).
_UNREADABLE_MAT_ERRORS = (scipy.io.matlab.MatReadError, NotImplementedError, IndexError, ValueError, TypeError, OSError)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A v7.3 MAT-file is HDF5 behind a 512-byte MATLAB header.
_MAT73_HDF5_OFFSET = 512

MIRFLICKR_IMAGES = "mirflickr"
MIRFLICKR_TAGS = "mirflickr/meta/tags"
MIRFLICKR_ANNOTATIONS = "mirflickr25k_annotations_v080"
NUS_IMAGE_LIST = "ImageList/Imagelist.txt"
NUS_TAGS = "NUS_WID_Tags/AllTags1k.txt"
NUS_TAG_NAMES = "NUS_WID_Tags/TagList1k.txt"
NUS_LABELS = "Groundtruth/AllLabels"
NUS_IMAGES = "Flickr"
SPLIT_MAT_KEYS: tuple[str, ...] = ("I_tr", "T_tr", "L_tr", "I_db", "T_db", "L_db", "I_te", "T_te", "L_te")

_MIRFLICKR_IMAGE_NAME = re.compile(r"^im(\d+)\.jpg$")


# --------------------------------------------------------------------------- .mat packagings


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as stream:
        header = stream.read(_MAT73_HDF5_OFFSET + len(_HDF5_SIGNATURE))
    return header[:8] == _HDF5_SIGNATURE or header[_MAT73_HDF5_OFFSET:] == _HDF5_SIGNATURE


def _read_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Reads `keys` from a MATLAB file, each in MATLAB's axis order (`[N, C]` stays `[N, C]`)."""
    if _is_hdf5(path):
        try:
            import h5py  # type: ignore[import-not-found,unused-ignore]
        except ImportError as error:
            raise DatasetError(
                f"{path} is a MATLAB v7.3 (HDF5) file, which needs the h5py package; install h5py "
                "or re-save the file with MATLAB's -v7 option"
            ) from error
        with h5py.File(path, "r") as mat_file:
            missing = [key for key in keys if key not in mat_file]
            if missing:
                raise DatasetError(f"{path} has no variable(s) {missing}; it holds {sorted(mat_file.keys())}")
            # HDF5 stores MATLAB's column-major arrays with their axes reversed.
            return {key: np.asarray(mat_file[key][()]).transpose() for key in keys}
    contents: dict[str, Any]
    try:
        contents = scipy.io.loadmat(str(path), variable_names=list(keys))
    except _UNREADABLE_MAT_ERRORS as error:
        raise DatasetError(f"cannot read MATLAB file {path}: {type(error).__name__}: {error}") from error
    missing = [key for key in keys if key not in contents]
    if missing:
        present = sorted(name for name, *_ in scipy.io.whosmat(str(path)))
        raise DatasetError(f"{path} has no variable(s) {missing}; it holds {present}")
    return {key: np.asarray(contents[key]) for key in keys}


def _images_nhwc(images: np.ndarray, *, num_items: int, name: str) -> np.ndarray:
    """Image stack `[N, 3, H, W]`, `[N, H, W, 3]` or `[H, W, 3, N]` -> uint8 `[N, H, W, 3]`."""
    if images.ndim != 4:
        raise DatasetError(f"{name}: images must be a 4-d array of {num_items} RGB images, got shape {images.shape}")
    if images.shape[0] != num_items:
        if images.shape[-1] != num_items:
            raise DatasetError(
                f"{name}: images of shape {images.shape} do not hold {num_items} images "
                "(the number of label rows) on their first or last axis"
            )
        images = np.moveaxis(images, -1, 0)
    if images.shape[-1] != 3:
        if images.shape[1] != 3:
            raise DatasetError(f"{name}: images of shape {images.shape} have no colour axis of size 3")
        images = np.moveaxis(images, 1, -1)
    if images.dtype == np.uint8:
        return images
    values = images.astype(np.float32)
    if values.size and not np.isfinite(values).all():
        raise DatasetError(f"{name}: images hold non-finite values")
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _matrix(values: np.ndarray, *, num_items: int, name: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != num_items:
        raise DatasetError(f"{name} must have shape [N, D] with N = {num_items}, got shape {matrix.shape}")
    return matrix


def _tag_texts(tags: np.ndarray, tag_names: list[str]) -> list[list[str]]:
    return [[" ".join(tag_names[column] for column in np.flatnonzero(row))] for row in tags]


def _dataset_from_arrays(
    *,
    images: np.ndarray,
    tags: np.ndarray,
    labels: np.ndarray,
    source_prefix: str,
    transform: ImageTransform | None,
) -> CrossModalDataset:
    tag_names = [f"tag_{column}" for column in range(tags.shape[1])]
    return CrossModalDataset(
        loaders=[ArrayImageLoader(pixels=image) for image in images],
        captions=_tag_texts(tags, tag_names),
        tags=tags,
        labels=labels,
        label_names=[f"label_{column}" for column in range(labels.shape[1])],
        tag_names=tag_names,
        sources=[f"{source_prefix}:{index}" for index in range(len(images))],
        transform=transform,
    )


def _load_all_mat(prefix_path: Path, *, transform: ImageTransform | None) -> LoadedCrossModal:
    paths = {kind: prefix_path.with_name(f"{prefix_path.name}-{kind}.mat") for kind in ("iall", "yall", "lall")}
    labels = np.asarray(_read_mat(paths["lall"], ("LAll",))["LAll"], dtype=np.float32)
    if labels.ndim != 2:
        raise DatasetError(f"LAll in {paths['lall']} must have shape [N, C], got shape {labels.shape}")
    num_items = labels.shape[0]
    tags = _matrix(_read_mat(paths["yall"], ("YAll",))["YAll"], num_items=num_items, name=f"YAll in {paths['yall']}")
    images = _images_nhwc(
        _read_mat(paths["iall"], ("IAll",))["IAll"], num_items=num_items, name=f"IAll in {paths['iall']}"
    )
    logger.info("read %d items from the .mat packaging %s-*.mat", num_items, prefix_path)
    return LoadedCrossModal(
        dataset=_dataset_from_arrays(
            images=images, tags=tags, labels=labels, source_prefix=str(paths["iall"]), transform=transform
        )
    )


def _load_split_mat(path: Path, *, transform: ImageTransform | None) -> LoadedCrossModal:
    contents = _read_mat(path, SPLIT_MAT_KEYS)
    parts = []
    # Queries first, then the retrieval set, then the training items.
    for part in ("te", "db", "tr"):
        labels = np.asarray(contents[f"L_{part}"], dtype=np.float32)
        if labels.ndim != 2:
            raise DatasetError(f"L_{part} in {path} must have shape [N, C], got shape {labels.shape}")
        num_items = labels.shape[0]
        tags = _matrix(contents[f"T_{part}"], num_items=num_items, name=f"T_{part} in {path}")
        images = _images_nhwc(contents[f"I_{part}"], num_items=num_items, name=f"I_{part} in {path}")
        parts.append((images, tags, labels))
    widths = {(tags.shape[1], labels.shape[1]) for _, tags, labels in parts}
    if len(widths) != 1:
        raise DatasetError(f"the te/db/tr parts of {path} have different tag or label widths: {sorted(widths)}")
    sizes = [len(labels) for _, _, labels in parts]
    dataset = _dataset_from_arrays(
        images=np.concatenate([images for images, _, _ in parts]),
        tags=np.concatenate([tags for _, tags, _ in parts]),
        labels=np.concatenate([labels for _, _, labels in parts]),
        source_prefix=str(path),
        transform=transform,
    )
    offsets = np.cumsum([0, *sizes])
    split = CrossModalSplitIndices(
        query=np.arange(offsets[0], offsets[1], dtype=np.int64),
        retrieval=np.arange(offsets[1], offsets[2], dtype=np.int64),
        train=np.arange(offsets[2], offsets[3], dtype=np.int64),
    )
    logger.info("read %s: %d queries, %d retrieval, %d train items (packaged split)", path, *sizes)
    return LoadedCrossModal(dataset=dataset, packaged_split=split)


def _find_split_mat(root: Path) -> Path | None:
    for path in sorted(root.glob("*.mat")):
        if path.name.endswith(("-iall.mat", "-yall.mat", "-lall.mat")):
            continue
        if _is_hdf5(path):
            # whosmat cannot list a v7.3 file; _read_mat names what is missing if it is not one.
            return path
        try:
            names = {name for name, *_ in scipy.io.whosmat(str(path))}
        except _UNREADABLE_MAT_ERRORS:
            continue
        if set(SPLIT_MAT_KEYS) <= names:
            return path
    return None


def _load_mat_layouts(
    root: Path, *, prefixes: tuple[str, ...], raw_files: list[str], transform: ImageTransform | None
) -> LoadedCrossModal:
    for prefix in prefixes:
        prefix_path = root / prefix
        if all(prefix_path.with_name(f"{prefix}-{kind}.mat").is_file() for kind in ("iall", "yall", "lall")):
            return _load_all_mat(prefix_path, transform=transform)
    split_mat = _find_split_mat(root) if root.is_dir() else None
    if split_mat is not None:
        return _load_split_mat(split_mat, transform=transform)
    packaged = [f"{prefix}-{{iall,yall,lall}}.mat" for prefix in prefixes]
    raise DatasetError(
        f"found no known layout under {root}: looked for the raw files {raw_files}, the .mat files "
        f"{packaged}, and a .mat holding {list(SPLIT_MAT_KEYS)}"
    )


# --------------------------------------------------------------------------- raw layouts


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _read_binary_matrix(path: Path, *, columns: int | None) -> np.ndarray:
    """Reads whitespace-separated 0/1 values, one row per non-blank line -> uint8 `[rows, columns]`.

    Parsed from the bytes directly: NUS-WIDE's AllTags1k.txt holds 270 million values, far
    too many for a per-value text parser.
    """
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    data = path.read_bytes()
    values = np.frombuffer(data, dtype=np.uint8)
    allowed_bytes = np.zeros(256, dtype=bool)
    allowed_bytes[np.frombuffer(b"01 \t\r\n", dtype=np.uint8)] = True
    allowed = allowed_bytes[values]
    if not allowed.all():
        position = int(np.argmin(allowed))
        line = data.count(b"\n", 0, position) + 1
        raise DatasetError(f"{path} line {line}: expected only 0/1 values, found {data[position : position + 1]!r}")
    digits = values[(values == ord("0")) | (values == ord("1"))] - ord("0")
    rows = sum(1 for line in data.split(b"\n") if line.strip())
    width = columns if columns is not None else (digits.size // rows if rows else 0)
    if rows == 0 or digits.size != rows * width:
        raise DatasetError(
            f"{path}: expected {rows} rows of {width} 0/1 values each, found {digits.size} values in all"
        )
    return digits.reshape(rows, width)


def _load_mirflickr_raw(
    root: Path, *, min_tag_count: int, drop_untagged: bool, transform: ImageTransform | None
) -> LoadedCrossModal:
    images_folder = root / MIRFLICKR_IMAGES
    numbers = sorted(
        int(match.group(1))
        for match in (_MIRFLICKR_IMAGE_NAME.match(path.name) for path in images_folder.iterdir())
        if match is not None
    )
    if not numbers:
        raise DatasetError(f"{images_folder} holds no im<N>.jpg image")
    known = set(numbers)
    annotation_files = sorted(
        path
        for path in (root / MIRFLICKR_ANNOTATIONS).glob("*.txt")
        if not path.stem.endswith("_r1") and not path.stem.lower().startswith("readme")
    )
    if not annotation_files:
        raise DatasetError(f"{root / MIRFLICKR_ANNOTATIONS} holds no <concept>.txt annotation file")
    concepts = [path.stem for path in annotation_files]
    row_of = {number: row for row, number in enumerate(numbers)}
    all_labels = np.zeros((len(numbers), len(concepts)), dtype=np.float32)
    for column, path in enumerate(annotation_files):
        for line_number, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            if not line.strip().isdigit():
                raise DatasetError(f"{path} line {line_number}: expected an image number, got {line.strip()!r}")
            number = int(line)
            if number not in known:
                raise DatasetError(
                    f"{path} line {line_number}: image {number} has no file {images_folder}/im{number}.jpg"
                )
            all_labels[row_of[number], column] = 1.0
    image_tags: list[list[str]] = []
    for number in numbers:
        words = [word.strip() for word in _read_lines(root / MIRFLICKR_TAGS / f"tags{number}.txt")]
        image_tags.append(list(dict.fromkeys(word for word in words if word)))
    counts = Counter(word for words in image_tags for word in words)
    vocabulary = sorted(word for word, count in counts.items() if count >= min_tag_count)
    if not vocabulary:
        raise DatasetError(
            f"no tag under {root / MIRFLICKR_TAGS} occurs in at least min_tag_count={min_tag_count} images"
        )
    column_of = {word: column for column, word in enumerate(vocabulary)}
    all_tags = np.zeros((len(numbers), len(vocabulary)), dtype=np.float32)
    texts: list[list[str]] = []
    for row, words in enumerate(image_tags):
        kept_words = [word for word in words if word in column_of]
        all_tags[row, [column_of[word] for word in kept_words]] = 1.0
        texts.append([" ".join(kept_words)])
    keep = all_labels.any(axis=1)
    if drop_untagged:
        keep &= all_tags.any(axis=1)
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise DatasetError(f"no MIRFlickr image under {root} has both a label and a vocabulary tag")
    logger.info(
        "MIRFlickr-25K at %s: kept %d of %d images (%d labels, %d tags occurring >= %d times)",
        root,
        rows.size,
        len(numbers),
        len(concepts),
        len(vocabulary),
        min_tag_count,
    )
    paths = [images_folder / f"im{numbers[row]}.jpg" for row in rows]
    return LoadedCrossModal(
        dataset=CrossModalDataset(
            loaders=[ImageFileLoader(path=path) for path in paths],
            captions=[texts[row] for row in rows],
            tags=all_tags[rows],
            labels=all_labels[rows],
            label_names=concepts,
            tag_names=vocabulary,
            sources=[str(path) for path in paths],
            transform=transform,
        )
    )


def _nus_image_path(root: Path, line: str, *, line_number: int) -> Path:
    # Imagelist.txt names Windows paths ("C:\ImageData\Flickr\actor\0001_2124494179.jpg").
    parts = [part for part in re.split(r"[\\/]", line.strip()) if part]
    if len(parts) < 2:
        raise DatasetError(
            f"{root / NUS_IMAGE_LIST} line {line_number}: expected '...\\Flickr\\<folder>\\<file>.jpg', got {line!r}"
        )
    return root / NUS_IMAGES / parts[-2] / parts[-1]


def _load_nus_wide_raw(
    root: Path, *, num_concepts: int, drop_untagged: bool, transform: ImageTransform | None
) -> LoadedCrossModal:
    lines = [(number, line) for number, line in enumerate(_read_lines(root / NUS_IMAGE_LIST), start=1) if line.strip()]
    image_paths = [_nus_image_path(root, line, line_number=number) for number, line in lines]
    all_tags = _read_binary_matrix(root / NUS_TAGS, columns=None)
    if len(all_tags) != len(image_paths):
        raise DatasetError(
            f"{root / NUS_TAGS} has {len(all_tags)} rows for the {len(image_paths)} images of {root / NUS_IMAGE_LIST}"
        )
    names_path = root / NUS_TAG_NAMES
    if names_path.is_file():
        tag_names = [line.strip() for line in _read_lines(names_path) if line.strip()]
        if len(tag_names) != all_tags.shape[1]:
            raise DatasetError(
                f"{names_path} names {len(tag_names)} tags for the {all_tags.shape[1]} columns of {root / NUS_TAGS}"
            )
    else:
        tag_names = [f"tag_{column}" for column in range(all_tags.shape[1])]
    label_files = sorted((root / NUS_LABELS).glob("Labels_*.txt"))
    if not label_files:
        raise DatasetError(f"{root / NUS_LABELS} holds no Labels_<concept>.txt file")
    if num_concepts < 1:
        raise DatasetError(f"num_concepts must be >= 1, got {num_concepts}")
    columns = []
    for path in label_files:
        column = _read_binary_matrix(path, columns=1)[:, 0]
        if len(column) != len(image_paths):
            raise DatasetError(
                f"{path} has {len(column)} rows for the {len(image_paths)} images of {root / NUS_IMAGE_LIST}"
            )
        columns.append(column)
    concepts = [path.stem.removeprefix("Labels_") for path in label_files]
    frequencies = [int(column.sum()) for column in columns]
    # Most frequent first; ties by name, so the choice is deterministic.
    chosen = sorted(range(len(concepts)), key=lambda position: (-frequencies[position], concepts[position]))
    chosen = chosen[:num_concepts]
    labels = np.stack([columns[position] for position in chosen], axis=1).astype(np.float32)
    keep = labels.any(axis=1)
    if drop_untagged:
        keep &= all_tags.any(axis=1)
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise DatasetError(f"no NUS-WIDE image under {root} has a label of the {num_concepts} most frequent concepts")
    missing = [image_paths[row] for row in rows if not image_paths[row].is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in {root / NUS_IMAGE_LIST} are missing, "
            f"e.g. {[str(path) for path in missing[:3]]}"
        )
    tags = all_tags[rows].astype(np.float32)
    logger.info("NUS-WIDE at %s: kept %d of %d images (%d concepts)", root, rows.size, len(image_paths), len(chosen))
    return LoadedCrossModal(
        dataset=CrossModalDataset(
            loaders=[ImageFileLoader(path=image_paths[row]) for row in rows],
            captions=_tag_texts(tags, tag_names),
            tags=tags,
            labels=labels[rows],
            label_names=[concepts[position] for position in chosen],
            tag_names=tag_names,
            sources=[str(image_paths[row]) for row in rows],
            transform=transform,
        )
    )


# --------------------------------------------------------------------------- entry points


def load_mirflickr25k(
    *,
    root: str | Path,
    min_tag_count: int = 20,
    drop_untagged: bool = True,
    transform: ImageTransform | None = None,
) -> LoadedCrossModal:
    """Loads MIRFlickr-25K from its raw download or a DCMH-style `.mat` packaging.

    Args:
        root: Folder holding `mirflickr/` and `mirflickr25k_annotations_v080/`, or the
            `mirflickr25k-{iall,yall,lall}.mat` files, or one `.mat` with its own split.
        min_tag_count: Raw layout: a tag enters the vocabulary when at least this many images
            carry it (20 gives DCMH's 1,386 tags).
        drop_untagged: Raw layout: also drop the images with no vocabulary tag (DCMH).
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Returns:
        The dataset (tags `[N, V]`, labels `[N, 24]` on the real set) and, for the `.mat`
        with `I_tr/I_db/I_te`, the split it carries.

    Raises:
        DatasetError: No layout is found (the message names the files looked for), or a
            file is missing or malformed.
    """
    root_path = Path(root)
    if min_tag_count < 1:
        raise DatasetError(f"min_tag_count must be >= 1, got {min_tag_count}")
    if (root_path / MIRFLICKR_IMAGES).is_dir() and (root_path / MIRFLICKR_ANNOTATIONS).is_dir():
        return _load_mirflickr_raw(
            root_path, min_tag_count=min_tag_count, drop_untagged=drop_untagged, transform=transform
        )
    return _load_mat_layouts(
        root_path,
        prefixes=("mirflickr25k",),
        raw_files=[
            f"{MIRFLICKR_IMAGES}/im<N>.jpg",
            f"{MIRFLICKR_TAGS}/tags<N>.txt",
            f"{MIRFLICKR_ANNOTATIONS}/<concept>.txt",
        ],
        transform=transform,
    )


def load_nus_wide(
    *,
    root: str | Path,
    num_concepts: int = 10,
    drop_untagged: bool = True,
    transform: ImageTransform | None = None,
) -> LoadedCrossModal:
    """Loads NUS-WIDE from its raw download or a DCMH-style `.mat` packaging.

    Args:
        root: Folder holding `ImageList/`, `NUS_WID_Tags/`, `Groundtruth/AllLabels/` and
            `Flickr/`, or the `nus-wide-tc10-{iall,yall,lall}.mat` files (also
            `nus-wide-tc21-*`, `nus-wide-*`), or one `.mat` with its own split.
        num_concepts: Raw layout: keep the labels of this many most frequent concepts (10:
            NUS-WIDE-TC10, 21: TC21) and the images with at least one of them.
        drop_untagged: Raw layout: also drop the images with none of the 1,000 tags (DCMH).
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Returns:
        The dataset and, for the `.mat` with `I_tr/I_db/I_te`, the split it carries.

    Raises:
        DatasetError: No layout is found (the message names the files looked for), a file
            is missing or malformed, or a listed image file is missing.
    """
    root_path = Path(root)
    if (root_path / NUS_IMAGE_LIST).is_file():
        return _load_nus_wide_raw(
            root_path, num_concepts=num_concepts, drop_untagged=drop_untagged, transform=transform
        )
    return _load_mat_layouts(
        root_path,
        prefixes=("nus-wide-tc10", "nus-wide-tc21", "nus-wide"),
        raw_files=[NUS_IMAGE_LIST, NUS_TAGS, f"{NUS_LABELS}/Labels_<concept>.txt", f"{NUS_IMAGES}/<folder>/<file>.jpg"],
        transform=transform,
    )


def load_mirflickr25k_for_job(*, root: str | Path, split: CrossModalSplitSpec) -> LoadedCrossModal:
    """The `mirflickr25k` row of the dataset table: `load_mirflickr25k`'s defaults (the split is made later)."""
    del split
    return load_mirflickr25k(root=root)


def load_nus_wide_for_job(*, root: str | Path, split: CrossModalSplitSpec) -> LoadedCrossModal:
    """The `nus_wide` row of the dataset table: `load_nus_wide`'s defaults (NUS-WIDE-TC10; the split is made later)."""
    del split
    return load_nus_wide(root=root)
