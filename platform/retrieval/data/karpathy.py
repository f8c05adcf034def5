"""Flickr30K and MS-COCO captions in the Karpathy split JSON (thesis ch. 4).

Layouts (the files of Karpathy's `caption_datasets.zip` beside the images):

- Flickr30K: `root/dataset_flickr30k.json`, images in `root/flickr30k-images/<filename>`;
- MS-COCO: `root/dataset_coco.json`, images in `root/<filepath>/<filename>` (`train2014/`,
  `val2014/`).

The JSON is `{"images": [{"filename", "filepath" (COCO), "split": "train" | "val" | "test" |
"restval", "sentences": [{"raw", "tokens", ...}, ...], "imgid", ...}, ...], "dataset": ...}`.
An image's captions are its `raw` sentences, stripped; a sentence with an empty `raw` falls
back to its joined `tokens`, and one with neither is dropped (logged). An image left with no
caption is an error. Some COCO images have 6 or 7 sentences: the first 5 are kept, so every
image has five, as the R@K protocol assumes. Images are not opened until used; a missing
image file is an error at load time, a corrupt one raises `CorruptImageError` (naming the
file) when it is read.

Splits: train (+ restval when asked) trains; the test images are the queries and the
retrieval set. COCO's "1k" protocol scores one of five equal folds of the test images, in
JSON order (folds of 1,000 on the 5,000 test images of the real file).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.config import CrossModalSplitSpec
from retrieval.data.base import ImageFileLoader
from retrieval.data.cross_modal import CrossModalDataset, CrossModalSplitIndices, LoadedCrossModal
from retrieval.data.transforms import ImageTransform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

KarpathyName = Literal["flickr30k", "coco"]
JSON_NAMES: dict[str, str] = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
FLICKR30K_IMAGES = "flickr30k-images"
MAX_CAPTIONS = 5
COCO_FOLDS = 5
KARPATHY_SPLITS: tuple[str, ...] = ("train", "val", "test", "restval")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"missing Karpathy split file {path}")
    try:
        contents = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot parse {path} as JSON: {error}") from error
    if not isinstance(contents, dict) or not isinstance(contents.get("images"), list):
        raise DatasetError(f"{path} has no 'images' list (expected the Karpathy split format)")
    return contents


def _captions(entry: dict[str, Any], *, where: str) -> list[str]:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        raise DatasetError(f"{where} has no 'sentences' list")
    captions: list[str] = []
    for sentence in sentences:
        text = str(sentence.get("raw", "") or "").strip() if isinstance(sentence, dict) else ""
        if not text and isinstance(sentence, dict):
            text = " ".join(str(token) for token in sentence.get("tokens", []) or []).strip()
        if text:
            captions.append(text)
        else:
            logger.warning("%s: dropped an empty sentence", where)
    if not captions:
        raise DatasetError(f"{where} has no non-empty caption")
    return captions[:MAX_CAPTIONS]


def _split_indices(
    splits: list[str],
    *,
    name: str,
    restval: bool,
    coco_test: Literal["5k", "1k"],
    coco_fold: int,
    path: Path,
) -> CrossModalSplitIndices:
    split_array = np.asarray(splits)
    train_splits = ("train", "restval") if restval else ("train",)
    train = np.flatnonzero(np.isin(split_array, train_splits)).astype(np.int64)
    test = np.flatnonzero(split_array == "test").astype(np.int64)
    if name == "coco" and coco_test == "1k":
        if not 0 <= coco_fold < COCO_FOLDS:
            raise DatasetError(f"coco_fold must lie in [0, {COCO_FOLDS}), got {coco_fold}")
        test = np.array_split(test, COCO_FOLDS)[coco_fold].astype(np.int64)
    if train.size == 0:
        raise DatasetError(f"{path} has no image in split(s) {list(train_splits)}")
    if test.size == 0:
        fold = f" (fold {coco_fold} of the 1k protocol)" if name == "coco" and coco_test == "1k" else ""
        raise DatasetError(f"{path} has no image in split 'test'{fold}")
    return CrossModalSplitIndices(train=train, query=test, retrieval=test)


def load_karpathy(
    *,
    name: KarpathyName,
    root: str | Path,
    restval: bool = True,
    coco_test: Literal["5k", "1k"] = "5k",
    coco_fold: int = 0,
    transform: ImageTransform | None = None,
) -> LoadedCrossModal:
    """Loads Flickr30K or MS-COCO from the Karpathy JSON, with its split.

    Args:
        name: "flickr30k" or "coco".
        root: Folder holding the JSON and the images (see the module docstring).
        restval: Train on the "restval" images too (COCO's usual 113k training images;
            Flickr30K has none).
        coco_test: COCO only: "5k" scores all test images, "1k" the fold `coco_fold`.
        coco_fold: COCO "1k": which of the five folds of the test images, in [0, 5).
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Returns:
        The dataset of every image of the JSON, in JSON order (captions: 1..5 per image,
        tags and labels None) and its split: train, and query = retrieval = the test images.

    Raises:
        DatasetError: The JSON is missing or malformed (the message names the file and the
            image entry), an image has no caption, an image file is missing, or a split is empty.
    """
    if name not in JSON_NAMES:
        raise DatasetError(f"unknown Karpathy dataset {name!r}; expected one of {list(JSON_NAMES)}")
    root_path = Path(root)
    json_path = root_path / JSON_NAMES[name]
    contents = _read_json(json_path)
    declared = contents.get("dataset")
    if declared is not None and declared != name:
        raise DatasetError(f"{json_path} declares dataset {declared!r}, expected {name!r}")
    paths: list[Path] = []
    captions: list[list[str]] = []
    splits: list[str] = []
    for position, entry in enumerate(contents["images"]):
        where = f"{json_path} images[{position}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DatasetError(f"{where} has no 'filename'")
        where = f"{where} ({entry['filename']})"
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            raise DatasetError(f"{where} has split {split!r}; expected one of {list(KARPATHY_SPLITS)}")
        if name == "coco":
            if not isinstance(entry.get("filepath"), str):
                raise DatasetError(f"{where} has no 'filepath' (e.g. 'val2014')")
            folder = root_path / entry["filepath"]
        else:
            folder = root_path / FLICKR30K_IMAGES
        paths.append(folder / entry["filename"])
        captions.append(_captions(entry, where=where))
        splits.append(split)
    if not paths:
        raise DatasetError(f"{json_path} lists no image")
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in {json_path} are missing, e.g. {[str(path) for path in missing[:3]]}"
        )
    indices = _split_indices(
        splits, name=name, restval=restval, coco_test=coco_test, coco_fold=coco_fold, path=json_path
    )
    logger.info(
        "%s at %s: %d images, %d train, %d test", name, root_path, len(paths), len(indices.train), len(indices.query)
    )
    dataset = CrossModalDataset(
        loaders=[ImageFileLoader(path=path) for path in paths],
        captions=captions,
        tags=None,
        labels=None,
        label_names=[],
        tag_names=[],
        sources=[str(path) for path in paths],
        transform=transform,
    )
    return LoadedCrossModal(dataset=dataset, packaged_split=indices)


def load_flickr30k_for_job(*, root: str | Path, split: CrossModalSplitSpec) -> LoadedCrossModal:
    """The `flickr30k` row of the dataset table: `load_karpathy` with the job's `restval` setting."""
    return load_karpathy(name="flickr30k", root=root, restval=split.restval)


def load_coco_for_job(*, root: str | Path, split: CrossModalSplitSpec) -> LoadedCrossModal:
    """The `coco` row of the dataset table: `load_karpathy` with the job's `restval`, `coco_test` and `coco_fold`."""
    return load_karpathy(
        name="coco", root=root, restval=split.restval, coco_test=split.coco_test, coco_fold=split.coco_fold
    )
