"""Streaming feature extraction: a gallery of any size to a `.npy` file on disk, in bounded memory.

Batches flow from a DataLoader through the embedding function straight into a
`numpy.lib.format.open_memmap` file, so memory holds one batch of images and one batch of
features whatever the gallery's size; a manifest beside the array records what it holds.
A range `[start, stop)` of the gallery is written as a *part*; `merge_parts` assembles the
parts of several workers (see `retrieval.train.extract`) into one file.

Layout of an output folder::

    <out_dir>/features.npy             float32 or float16 `[N, D]`, row i = gallery item i
    <out_dir>/features.json            FeatureManifest (written last)
    <out_dir>/parts/part-<start>-<stop>.npy / .json   one per extracted range, until merged

Readers see either nothing or a whole file: arrays are written under a temporary name and
renamed, and the manifest, which carries the array's sha256, is written after the array.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.lib.format import open_memmap
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from retrieval.errors import IndexIntegrityError
from retrieval.index.manifest import write_text_atomically
from retrieval.index.shards import file_sha256

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.npy"
MANIFEST_FILE = "features.json"
PARTS_DIR = "parts"
FORMAT_VERSION = 1

FeatureDtype = Literal["float32", "float16"]
FEATURE_DTYPES: tuple[str, ...] = ("float32", "float16")
EmbedFunction = Callable[[torch.Tensor], torch.Tensor | np.ndarray]

# Merging copies parts in slices of this many bytes: large enough to stream at disk speed,
# small enough that a merge of any size holds only one slice of rows at a time.
_MERGE_CHUNK_BYTES = 64 << 20
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeaturePart(BaseModel):
    """One extracted range `[start, stop)` of the gallery and how long it took."""

    model_config = ConfigDict(extra="forbid")

    start: int
    stop: int
    sha256: str
    seconds: float

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def images_per_second(self) -> float:
        """Throughput of the extraction loop (loading, preprocessing, embedding, writing)."""
        return self.count / self.seconds if self.seconds > 0 else float("inf")


class FeatureManifest(BaseModel):
    """What a features (or part) file holds: rows `[start, stop)` of a gallery of `total` items.

    `parts` lists the extracted ranges the file was assembled from, in order; a file written
    by one `extract_features` call has a single part, a merged one has one per worker.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    file: str
    count: int
    dim: int
    dtype: FeatureDtype
    start: int
    stop: int
    total: int
    model: str
    source: dict[str, Any]
    sha256: str
    created_at: str
    parts: list[FeaturePart]

    @model_validator(mode="after")
    def _check_consistency(self) -> FeatureManifest:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not 0 <= self.start < self.stop <= self.total:
            raise ValueError(f"range [{self.start}, {self.stop}) does not lie in a gallery of {self.total} items")
        if self.count != self.stop - self.start:
            raise ValueError(
                f"count is {self.count} but the range [{self.start}, {self.stop}) holds {self.stop - self.start}"
            )
        bounds = [(part.start, part.stop) for part in self.parts]
        contiguous = all(left[1] == right[0] for left, right in itertools.pairwise(bounds))
        if not bounds or bounds[0][0] != self.start or bounds[-1][1] != self.stop or not contiguous:
            raise ValueError(f"parts {bounds} do not tile the range [{self.start}, {self.stop}) in order")
        return self


@dataclass(frozen=True)
class FeatureFile:
    """A written features (or part) file and its manifest.

    `manifest.parts` carries the timing of every extracted range: one per worker for a
    distributed extraction.
    """

    path: Path
    manifest_path: Path
    manifest: FeatureManifest

    @property
    def parts(self) -> list[FeaturePart]:
        return self.manifest.parts

    def load(self, *, verify: bool = True) -> np.ndarray:
        """The features `[N, D]` as a read-only memmap (checksum verified unless `verify=False`)."""
        return _open_verified(self.path, self.manifest, manifest_path=self.manifest_path, verify=verify)


def part_name(start: int, stop: int) -> str:
    """The file stem of the part holding rows `[start, stop)`; zero-padded so names sort by range."""
    return f"part-{start:012d}-{stop:012d}"


@torch.no_grad()
def extract_features(
    embed: EmbedFunction,
    dataset: Dataset[Any],
    *,
    out_dir: str | Path,
    batch_size: int,
    model: str,
    source: Mapping[str, Any],
    dtype: FeatureDtype = "float32",
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
    loader_workers: int = 0,
) -> FeatureFile:
    """Embed `dataset[start:stop]` batch by batch into a `.npy` file, holding one batch at a time.

    With the defaults (`start=0`, `stop=None`) the whole dataset goes to
    `<out_dir>/features.npy`; given a range, the rows go to a part file under
    `<out_dir>/parts/`, to be assembled by `merge_parts`. Rerunning replaces the file.

    Args:
        embed: maps a batch of images `[B, 3, H, W]` (on the CPU) to embeddings `[B, D]`, as a
            tensor or an array; it moves the batch to its own device.
        dataset: yields `(image [3, H, W], ...)` tuples (an `ImageDataset`) or bare images.
        out_dir: the output folder, created if missing.
        batch_size: images per batch; memory use grows with it, not with the gallery.
        model: the model that embeds, as recorded in the manifest (a model URI or package path).
        source: a JSON-serialisable description of the gallery (dataset spec, split, count).
        dtype: storage type; "float16" halves the file and keeps about 3 significant digits.
        start: first dataset position to extract.
        stop: one past the last position; None means the end of the dataset.
        progress: show a tqdm progress bar (only when stderr is a terminal).
        loader_workers: DataLoader worker processes for loading and preprocessing.

    Returns:
        The written file and its manifest (with this extraction's time in `parts[0]`).

    Raises:
        ValueError: an empty or out-of-range `[start, stop)`, a bad `dtype` or `batch_size`,
            an `embed` output that is not `[B, D]` with a constant `D`, or values beyond the
            float16 range when `dtype="float16"`, or a `source` that is not JSON-serialisable.
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {list(FEATURE_DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        json.dumps(dict(source))
    except (TypeError, ValueError) as error:
        # Checked now: found only after the embedding, it would leave an array without a manifest.
        raise ValueError(f"source must be JSON-serialisable: {error}") from error
    total = len(dataset)  # type: ignore[arg-type]
    is_part = not (start == 0 and stop is None)
    end = total if stop is None else stop
    if not 0 <= start < end <= total:
        raise ValueError(f"range [{start}, {end}) is empty or outside the dataset of {total} items")
    folder = Path(out_dir)
    target_dir = folder / PARTS_DIR if is_part else folder
    target_dir.mkdir(parents=True, exist_ok=True)
    stem = part_name(start, end) if is_part else Path(FEATURES_FILE).stem
    target = target_dir / f"{stem}.npy"
    manifest_path = target_dir / f"{stem}.json"
    count = end - start

    loader = DataLoader(
        Subset(dataset, range(start, end)), batch_size=batch_size, shuffle=False, num_workers=loader_workers
    )
    temp_path = _temporary_path(target)
    features: np.memmap | None = None
    written = 0
    began = time.perf_counter()
    try:
        # disable=None lets tqdm hide the bar when stderr is not a terminal (logs, Ray workers).
        with tqdm(
            total=count, unit="img", desc=f"features [{start}, {end})", disable=None if progress else True
        ) as bar:
            for batch in loader:
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                vectors = _as_feature_rows(embed(images), rows=len(images), dtype=dtype)
                if features is None:
                    features = open_memmap(temp_path, mode="w+", dtype=np.dtype(dtype), shape=(count, vectors.shape[1]))
                elif vectors.shape[1] != features.shape[1]:
                    raise ValueError(
                        f"embed returned dimension {vectors.shape[1]} at row {start + written}, "
                        f"{features.shape[1]} before"
                    )
                features[written : written + len(vectors)] = vectors
                written += len(vectors)
                bar.update(len(vectors))
        seconds = time.perf_counter() - began
        if features is None or written != count:
            raise ValueError(f"the data loader yielded {written} images for the range [{start}, {end})")
        dim = int(features.shape[1])
        features.flush()
        del features
        sha256 = file_sha256(temp_path)
        _publish(temp_path, target, manifest_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    manifest = FeatureManifest(
        file=target.name,
        count=count,
        dim=dim,
        dtype=dtype,
        start=start,
        stop=end,
        total=total,
        model=model,
        source=dict(source),
        sha256=sha256,
        created_at=_now(),
        parts=[FeaturePart(start=start, stop=end, sha256=sha256, seconds=seconds)],
    )
    write_text_atomically(manifest_path, manifest.model_dump_json(indent=2) + "\n")
    logger.info(
        "extracted features of rows [%d, %d) to %s: [%d, %d] %s, %.1f images/s",
        start,
        end,
        target,
        count,
        dim,
        dtype,
        manifest.parts[0].images_per_second,
    )
    return FeatureFile(path=target, manifest_path=manifest_path, manifest=manifest)


def read_features(out_dir: str | Path, *, verify: bool = True) -> tuple[np.ndarray, FeatureManifest]:
    """The features `[N, D]` of an output folder (a read-only memmap) and their manifest.

    Args:
        out_dir: a folder written by `extract_features` (whole dataset) or `merge_parts`.
        verify: check the array's sha256 against the manifest (reads the whole file once).

    Raises:
        IndexIntegrityError: the manifest or array is missing or malformed, the sha256 differs,
            or the array's shape or dtype is not the manifest's; the message names the file.
    """
    folder = Path(out_dir)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        hint = " (parts exist: run merge_parts first)" if any((folder / PARTS_DIR).glob("part-*.json")) else ""
        raise IndexIntegrityError(f"{manifest_path}: no features manifest{hint}")
    manifest = _read_manifest(manifest_path)
    return _open_verified(folder / manifest.file, manifest, manifest_path=manifest_path, verify=verify), manifest


def merge_parts(out_dir: str | Path, *, keep_parts: bool = False, verify: bool = True) -> FeatureFile:
    """Assemble the part files under `<out_dir>/parts/` into `<out_dir>/features.npy`, streaming.

    The parts must agree on dimension, dtype, gallery size, model and source, and cover
    `[0, N)` exactly once. Rows are copied in slices, so memory stays bounded whatever `N`.

    Args:
        out_dir: the folder whose `parts/` subfolder holds the parts.
        keep_parts: keep the part files after a successful merge (by default they are removed,
            so a gallery is not stored twice).
        verify: check each part's sha256 before copying it.

    Returns:
        The merged file; its manifest lists every part's range and timing.

    Raises:
        IndexIntegrityError: no parts, a part fails its checksum or disagrees with the others,
            or the parts leave a gap or overlap; the message names the files and the rows.
    """
    folder = Path(out_dir)
    parts_dir = folder / PARTS_DIR
    manifest_paths = sorted(parts_dir.glob("part-*.json"))
    if not manifest_paths:
        raise IndexIntegrityError(f"{parts_dir}: no part manifests (part-*.json) to merge")
    parts = sorted(((_read_manifest(path), path) for path in manifest_paths), key=lambda pair: pair[0].start)
    first, first_path = parts[0]
    for manifest, path in parts[1:]:
        for field in ("dim", "dtype", "total", "model", "source"):
            if getattr(manifest, field) != getattr(first, field):
                raise IndexIntegrityError(
                    f"{path}: {field} is {getattr(manifest, field)!r} but {first_path} has {getattr(first, field)!r}; "
                    f"parts of one extraction must agree"
                )
    _check_coverage(parts, total=first.total)

    target = folder / FEATURES_FILE
    manifest_path = folder / MANIFEST_FILE
    temp_path = _temporary_path(target)
    rows_per_slice = max(1, _MERGE_CHUNK_BYTES // (first.dim * np.dtype(first.dtype).itemsize))
    try:
        merged = open_memmap(temp_path, mode="w+", dtype=np.dtype(first.dtype), shape=(first.total, first.dim))
        for manifest, path in parts:
            rows = _open_verified(path.with_name(manifest.file), manifest, manifest_path=path, verify=verify)
            for offset in range(0, manifest.count, rows_per_slice):
                upto = min(offset + rows_per_slice, manifest.count)
                merged[manifest.start + offset : manifest.start + upto] = rows[offset:upto]
            del rows
        merged.flush()
        del merged
        sha256 = file_sha256(temp_path)
        _publish(temp_path, target, manifest_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    result = FeatureManifest(
        file=target.name,
        count=first.total,
        dim=first.dim,
        dtype=first.dtype,
        start=0,
        stop=first.total,
        total=first.total,
        model=first.model,
        source=first.source,
        sha256=sha256,
        created_at=_now(),
        parts=[part for manifest, _ in parts for part in manifest.parts],
    )
    write_text_atomically(manifest_path, result.model_dump_json(indent=2) + "\n")
    logger.info("merged %d parts into %s: [%d, %d] %s", len(parts), target, first.total, first.dim, first.dtype)
    if not keep_parts:
        for manifest, path in parts:
            path.with_name(manifest.file).unlink()
            path.unlink()
        if not any(parts_dir.iterdir()):
            parts_dir.rmdir()
    return FeatureFile(path=target, manifest_path=manifest_path, manifest=result)


def remove_parts(out_dir: str | Path) -> int:
    """Delete the part files under `<out_dir>/parts/` (e.g. left by an earlier extraction); returns how many."""
    parts_dir = Path(out_dir) / PARTS_DIR
    removed = 0
    for path in sorted(parts_dir.glob("part-*")):
        path.unlink()
        removed += 1
    return removed


def _as_feature_rows(output: torch.Tensor | np.ndarray, *, rows: int, dtype: FeatureDtype) -> np.ndarray:
    """The embedding output as a float32 array `[rows, D]`, checked to fit `dtype`."""
    if isinstance(output, torch.Tensor):
        vectors = output.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        vectors = np.asarray(output, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise ValueError(f"embed must return [B, D] = [{rows}, D] for a batch of {rows} images, got {vectors.shape}")
    # A silent overflow to inf would corrupt every later distance computed with the row.
    if dtype == "float16" and vectors.size and float(np.max(np.abs(vectors))) > _FLOAT16_MAX:
        raise ValueError(
            f"embeddings reach {float(np.max(np.abs(vectors))):g}, beyond float16's range ({_FLOAT16_MAX:g}): "
            f"store them as float32"
        )
    return vectors


def _check_coverage(parts: list[tuple[FeatureManifest, Path]], *, total: int) -> None:
    """Raise unless the parts, sorted by start, cover `[0, total)` without gap or overlap."""
    covered = 0
    previous: Path | None = None
    for manifest, path in parts:
        if manifest.start > covered:
            after = f" after {previous.name}" if previous else ""
            raise IndexIntegrityError(
                f"{path.parent}: rows [{covered}, {manifest.start}) are in no part (gap{after}, before {path.name})"
            )
        if manifest.start < covered:
            raise IndexIntegrityError(
                f"{path.parent}: rows [{manifest.start}, {min(covered, manifest.stop)}) are in two parts "
                f"({previous.name if previous else '?'} and {path.name} overlap)"
            )
        covered = manifest.stop
        previous = path
    if covered != total:
        raise IndexIntegrityError(
            f"{parts[-1][1].parent}: rows [{covered}, {total}) of the {total}-item gallery are in no part "
            f"(missing after {parts[-1][1].name})"
        )


def _read_manifest(path: Path) -> FeatureManifest:
    try:
        return FeatureManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise IndexIntegrityError(f"{path}: cannot read the features manifest: {error}") from error
    except ValidationError as error:
        raise IndexIntegrityError(f"{path}: invalid features manifest: {error}") from error


def _open_verified(path: Path, manifest: FeatureManifest, *, manifest_path: Path, verify: bool) -> np.ndarray:
    if not path.is_file():
        raise IndexIntegrityError(f"{path}: missing (named by {manifest_path})")
    if verify:
        actual = file_sha256(path)
        if actual != manifest.sha256:
            raise IndexIntegrityError(
                f"{path}: sha256 mismatch, {manifest_path.name} expects {manifest.sha256} but the file has {actual}"
            )
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise IndexIntegrityError(f"{path}: not a readable .npy array: {error}") from error
    expected = (manifest.count, manifest.dim)
    if rows.shape != expected or rows.dtype != np.dtype(manifest.dtype):
        raise IndexIntegrityError(
            f"{path}: holds {rows.dtype} {list(rows.shape)}, "
            f"{manifest_path.name} says {manifest.dtype} {list(expected)}"
        )
    return rows


def _temporary_path(target: Path) -> Path:
    """A fresh hidden name beside `target`, so the rename that publishes it stays on one filesystem."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    return Path(name)


def _publish(temp_path: Path, target: Path, manifest_path: Path) -> None:
    """Move a finished array into place; the old manifest goes first so no reader pairs it with the new array."""
    manifest_path.unlink(missing_ok=True)
    os.replace(temp_path, target)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
