"""The manifest of a versioned, sharded index, and how to find the active version.

On disk an index ROOT holds one directory per index version plus a ``CURRENT`` text file
naming the active one::

    <root>/CURRENT                        "20250101T120000123456Z-3fa9c1"
    <root>/<version>/manifest.json        IndexManifest as JSON
    <root>/<version>/shard-000.faiss      one Faiss index per shard
    <root>/<version>/shard-000.items.parquet per-vector metadata (and thumbnails), by id

The manifest is the record that makes an index reproducible (ARCHITECTURE invariant 3):
it names the model version that embedded the gallery, the Faiss factory string, the
gallery it was built from, and the sha256 of every shard file.

Two kinds of index share this layout: float indices (metric ``"ip"`` or ``"l2"``, ``dim`` the
embedding size) and binary ones (metric ``"hamming"``: hash codes packed 8 bits a byte in Faiss
binary indices, ``dim`` and ``bits`` the code length in bits). ``modality`` says what the
gallery items are (images, or texts of a cross-modal dataset). ``search_defaults`` holds the
search settings of requests that give none (``{"nprobe": 16}`` for IVF, ``{"ef_search": 64}``
for HNSW) and ``thumbnails`` whether the items files carry PNG thumbnails. Manifests written
before these fields existed read as float image indices without defaults or thumbnails, and
their ``shard-000.items.jsonl`` files (one JSON object a line) still load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retrieval.errors import IndexIntegrityError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
FORMAT_VERSION = 1

# A version names a directory under the root: no separators, no leading dot (temp dirs).
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A shard file is a bare name inside its version directory (the same rule), and a checksum is
# 64 lowercase hex digits: both become local paths (`<version>/<file>`, `<cache>/blobs/<sha256>`),
# so a manifest someone else wrote must not be able to name anything outside them.
_FILE_NAME = _VERSION_NAME
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_FILE_NAMES = frozenset({"manifest.json", "CURRENT"})

IndexMetric = Literal["ip", "l2", "hamming"]
Modality = Literal["image", "text"]
# The settings a manifest may default (see `retrieval.index.search_params.SearchParams`).
SEARCH_DEFAULT_KEYS = ("nprobe", "ef_search")


class ModelRef(BaseModel):
    """The model version that embedded an index's gallery (and must embed its queries)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    uri: str
    run_id: str | None = None


class ShardInfo(BaseModel):
    """One shard: its files with checksums, and the contiguous id range it holds."""

    model_config = ConfigDict(extra="forbid")

    shard: int
    file: str
    sha256: str
    items_file: str
    items_sha256: str
    count: int
    id_min: int
    id_max: int

    @model_validator(mode="after")
    def _check_file_fields(self) -> ShardInfo:
        for field in ("file", "items_file"):
            name = getattr(self, field)
            if not _FILE_NAME.match(name) or name in _RESERVED_FILE_NAMES or name in (".", ".."):
                raise ValueError(
                    f"shard {self.shard}: {field} {name!r} is not a bare file name (letters, digits, '.', '_', '-'; "
                    "no path separators, no leading dot, not manifest.json or CURRENT)"
                )
        for field in ("sha256", "items_sha256"):
            if not _SHA256.match(getattr(self, field)):
                raise ValueError(f"shard {self.shard}: {field} {getattr(self, field)!r} is not 64 lowercase hex digits")
        return self


class IndexManifest(BaseModel):
    """Everything needed to load, verify and reproduce one version of a sharded index."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    index_version: str
    created_at: str
    model: ModelRef
    dim: int
    metric: IndexMetric
    factory: str
    num_items: int
    shards: list[ShardInfo]
    gallery: dict[str, Any]
    bits: int | None = None
    modality: Modality = "image"
    search_defaults: dict[str, int] = Field(default_factory=dict)
    thumbnails: bool = False

    @property
    def is_binary(self) -> bool:
        """A Faiss binary index of packed hash codes, searched by Hamming distance."""
        return self.metric == "hamming"

    @model_validator(mode="after")
    def _check_consistency(self) -> IndexManifest:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if not _VERSION_NAME.match(self.index_version):
            raise ValueError(f"index_version {self.index_version!r} is not a valid directory name")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.metric == "hamming":
            if self.bits != self.dim or self.dim % 8:
                raise ValueError(
                    f"a hamming index needs bits equal to dim and a multiple of 8, got bits {self.bits}, dim {self.dim}"
                )
        elif self.bits is not None:
            raise ValueError(f"bits applies to a hamming index only, but metric is {self.metric!r}")
        unknown = sorted(set(self.search_defaults) - set(SEARCH_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"search_defaults keys must be among {list(SEARCH_DEFAULT_KEYS)}, got {unknown}")
        below = {key: value for key, value in self.search_defaults.items() if value < 1}
        if below:
            raise ValueError(f"search_defaults values must be >= 1, got {below}")
        names = [name for info in self.shards for name in (info.file, info.items_file)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"every shard file needs its own name, but {repeated} appear more than once")
        numbers = [info.shard for info in self.shards]
        if numbers != list(range(len(self.shards))):
            raise ValueError(f"shards must be numbered 0..{len(self.shards) - 1} in order, got {numbers}")
        total = sum(info.count for info in self.shards)
        if total != self.num_items:
            raise ValueError(f"num_items is {self.num_items} but the shard counts sum to {total}")
        return self


def contained_path(directory: Path, name: str) -> Path:
    """``directory / name``, refused unless it resolves inside ``directory`` (defence in depth).

    The manifest's validators already allow only bare names; this checks the resolved path too,
    so a symlink planted in the folder cannot redirect a write or a delete outside it either.

    Raises:
        IndexIntegrityError: ``name`` is not a bare name or its path leaves ``directory``.
    """
    if not _FILE_NAME.match(name):
        raise IndexIntegrityError(f"{name!r}: not a bare file name inside {directory}")
    path = directory / name
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise IndexIntegrityError(f"{path}: resolves to {path.resolve()}, outside {root}")
    return path


def version_name_is_valid(name: str) -> bool:
    """Whether ``name`` can name a version directory under an index root."""
    return bool(_VERSION_NAME.match(name))


def read_manifest(path: str | Path) -> tuple[IndexManifest, Path]:
    """Read and validate the manifest of an index.

    Args:
        path: a ``manifest.json`` file, a version directory holding one, or an index root
            directory whose ``CURRENT`` file names the active version.

    Returns:
        The manifest and the version directory holding its shard files.

    Raises:
        IndexIntegrityError: the path, ``CURRENT``, the version directory or the manifest is
            missing or malformed; the message names the path and the problem.
    """
    path = Path(path)
    if path.is_dir():
        current = path / CURRENT_FILE
        if current.is_file():
            version = current.read_text(encoding="utf-8").strip()
            if not version_name_is_valid(version):
                raise IndexIntegrityError(f"{current}: does not name a version directory (read {version!r})")
            manifest_path = path / version / MANIFEST_FILE
            if not manifest_path.is_file():
                raise IndexIntegrityError(f"{current}: names version {version!r} but {manifest_path} does not exist")
        elif (path / MANIFEST_FILE).is_file():
            manifest_path = path / MANIFEST_FILE
            version = None
        else:
            raise IndexIntegrityError(
                f"{path}: is neither an index root (no {CURRENT_FILE} file) nor a version directory "
                f"(no {MANIFEST_FILE})"
            )
    elif path.is_file():
        manifest_path = path
        version = None
    else:
        raise IndexIntegrityError(f"{path}: index manifest or root does not exist")

    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexIntegrityError(f"{manifest_path}: cannot read the manifest as JSON: {error}") from error
    try:
        manifest = IndexManifest.model_validate(raw)
    except ValidationError as error:
        raise IndexIntegrityError(f"{manifest_path}: invalid manifest: {error}") from error
    if version is not None and manifest.index_version != version:
        raise IndexIntegrityError(
            f"{manifest_path}: {CURRENT_FILE} names version {version!r} but the manifest says "
            f"{manifest.index_version!r}"
        )
    return manifest, manifest_path.parent


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees either the old file or the whole new one.

    Args:
        path: the destination; its directory must exist.
        text: the full content.
    """
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
            temp_file.write(text)
            temp_file.flush()
            # fsync before the rename: otherwise a crash can leave the new name pointing at
            # an empty file on some filesystems.
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_manifest(manifest: IndexManifest, version_dir: Path) -> Path:
    """Write ``manifest.json`` into ``version_dir`` atomically.

    Args:
        manifest: the manifest to write.
        version_dir: the directory holding the version's shard files.

    Returns:
        The path of the written manifest.
    """
    path = version_dir / MANIFEST_FILE
    write_text_atomically(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def set_current_version(root: Path, index_version: str) -> None:
    """Point ``<root>/CURRENT`` at ``index_version`` atomically.

    Args:
        root: the index root.
        index_version: a version whose directory and manifest already exist under ``root``.
    """
    write_text_atomically(root / CURRENT_FILE, index_version + "\n")
    logger.info("index root %s: CURRENT -> %s", root, index_version)
