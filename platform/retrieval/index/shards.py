"""Build a versioned, sharded Faiss index on disk, and load one verified shard back.

Each shard holds a contiguous range of the (sorted) gallery ids, so a shard's manifest
entry says which ids it owns and a lookup by id goes to exactly one shard. Every shard
returns global ids, so per-shard results merge without translation (see `merge.merge_topk`).

Float shards hold float32 vectors (metric ``"ip"`` or ``"l2"``); binary shards (metric
``"hamming"``) hold hash codes packed 8 bits a byte (``uint8 [N, bits / 8]``, the layout of
`retrieval.models.codes.pack_codes`) in Faiss binary indices and are searched with
packed queries by Hamming distance. Both kinds share the items files, checksums and manifest.

Index types come from the Faiss factory string (``Flat``, ``IVF{n},Flat``, ``IVF{n},PQ{m}``,
``HNSW{M}``; binary ``BFlat``, ``BIVF{n}``, ``BHNSW{M}``). Training uses a seeded sample of each
shard; vectors are streamed in batches, so a memory-mapped gallery (``np.load(mmap_mode="r")``)
is never copied whole. Search settings (``nprobe``, ``efSearch``) travel with each call as Faiss
`SearchParameters` (see `retrieval.index.search_params`), with the manifest's defaults for the
settings a request leaves out. Item metadata lives in a Parquet file per shard
(`retrieval.index.metadata`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from retrieval.errors import BadRequestError, IndexIntegrityError
from retrieval.index.manifest import (
    IndexManifest,
    IndexMetric,
    Modality,
    ModelRef,
    ShardInfo,
    contained_path,
    set_current_version,
    version_name_is_valid,
    write_manifest,
)
from retrieval.index.metadata import ItemStore, write_items_parquet
from retrieval.index.search_params import IndexKnobs, SearchParams, faiss_search_parameters, index_knobs, ivf_of
from retrieval.models.codes import unpack_codes

logger = logging.getLogger(__name__)

_FAISS_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_HASH_CHUNK_BYTES = 1 << 20
# Faiss pads a short binary result row with an arbitrary distance; shown like an l2 row's padding.
_BINARY_PADDING = np.finfo(np.float32).max
# Rows converted (and finite-checked) at once while validating a gallery that may be memory-mapped.
_CHECK_CHUNK_ROWS = 65_536
# Read flags for memory-mapped shards: IO_FLAG_MMAP_IFC (faiss >= 1.10) maps flat codes, HNSW
# storage and inverted lists; IO_FLAG_MMAP maps only the inverted lists of IVF indices.
_MMAP_FLAGS = [flag for flag in (getattr(faiss, "IO_FLAG_MMAP_IFC", None), faiss.IO_FLAG_MMAP) if flag is not None]
_mmap_fallback_logged: set[str] = set()


def faiss_metric(metric: str) -> int:
    """Map ``"ip"`` / ``"l2"`` to the Faiss metric constant.

    Raises:
        ValueError: any other name.
    """
    if metric not in _FAISS_METRICS:
        raise ValueError(f"metric must be one of {sorted(_FAISS_METRICS)}, got {metric!r}")
    return _FAISS_METRICS[metric]


def binary_factory(factory: str) -> str:
    """The Faiss binary factory string for ``factory``: ``"Flat"`` means ``"BFlat"``, others pass as given.

    So a spec's default ``factory: Flat`` works for float and binary indices alike, while
    ``"BHNSW32"`` or ``"BIVF64"`` choose a binary HNSW graph or inverted file.
    """
    return "BFlat" if factory == "Flat" else factory


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks (shards can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_index_version() -> str:
    """A fresh version name: a UTC timestamp (sorts by creation time) and a random suffix.

    The suffix keeps two builds started in the same microsecond apart.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def _batch(vectors: np.ndarray, rows: np.ndarray, *, binary: bool) -> np.ndarray:
    """Rows ``rows`` of ``vectors`` as the contiguous array Faiss takes: ``[B, D]`` float32, or uint8 codes."""
    return np.ascontiguousarray(vectors[rows], dtype=np.uint8 if binary else np.float32)


def _check_finite(vectors: np.ndarray) -> None:
    """Refuse NaN / inf (also values that overflow float32), converting a chunk of rows at a time."""
    total = 0
    first: int | None = None
    for start in range(0, vectors.shape[0], _CHECK_CHUNK_ROWS):
        # A float64 value beyond float32's range becomes inf here, which is what this reports.
        with np.errstate(over="ignore"):
            chunk = np.asarray(vectors[start : start + _CHECK_CHUNK_ROWS], dtype=np.float32)
        bad_rows = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if bad_rows.size and first is None:
            first = start + int(bad_rows[0])
        total += bad_rows.size
    if first is not None:
        raise ValueError(f"vectors hold non-finite values (NaN or inf) in {total} rows, first at row {first}")


def _validate_inputs(
    *,
    vectors: Any,
    ids: Any,
    items: Sequence[Mapping[str, Any]],
    num_shards: int,
    index_version: str | None,
    train_sample: int,
    add_batch_size: int,
    metric: str,
    thumbnails: Sequence[bytes | None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    if metric != "hamming":
        faiss_metric(metric)
    # No copy of an ndarray: a np.memmap stays a view of its file, read a batch at a time below.
    vectors = np.asarray(vectors)
    ids = np.asarray(ids)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array [N, D], got shape {vectors.shape}")
    if metric == "hamming" and vectors.dtype != np.uint8:
        raise ValueError(
            f"a hamming index takes codes packed 8 bits a byte (uint8 [N, bits / 8], see pack_codes), "
            f"got dtype {vectors.dtype}"
        )
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise ValueError(f"vectors must hold numbers, got dtype {vectors.dtype}")
    count, dim = vectors.shape
    if count == 0 or dim == 0:
        raise ValueError(f"vectors must be non-empty, got shape {vectors.shape}")
    if ids.shape != (count,):
        raise ValueError(f"ids must have shape [N] = ({count},) to match vectors {vectors.shape}, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if len(items) != count:
        raise ValueError(f"items must hold one mapping per vector: {count} vectors but {len(items)} items")
    if thumbnails is not None and len(thumbnails) != count:
        raise ValueError(f"thumbnails must hold one entry per vector: {count} vectors but {len(thumbnails)}")
    if not 1 <= num_shards <= count:
        raise ValueError(f"num_shards must be between 1 and the number of vectors ({count}), got {num_shards}")
    if train_sample < 1:
        raise ValueError(f"train_sample must be >= 1, got {train_sample}")
    if add_batch_size < 1:
        raise ValueError(f"add_batch_size must be >= 1, got {add_batch_size}")
    if index_version is not None and not version_name_is_valid(index_version):
        raise ValueError(
            f"index_version {index_version!r} must start with a letter or digit and hold only "
            "letters, digits, '.', '_' and '-'"
        )
    if (ids < 0).any():
        # Faiss pads missing results with id -1: a negative gallery id would be ambiguous.
        raise ValueError(f"ids must be >= 0, got {int(ids.min())}")
    unique_ids, counts = np.unique(ids, return_counts=True)
    duplicated = unique_ids[counts > 1]
    if duplicated.size:
        raise ValueError(f"ids must be unique; {duplicated.size} repeat, e.g. {duplicated[:5].tolist()}")
    if metric != "hamming" and np.issubdtype(vectors.dtype, np.floating):
        _check_finite(vectors)
    return vectors, ids.astype(np.int64)


def _validated_search_defaults(
    index: Any, *, factory: str, search_defaults: Mapping[str, int] | None
) -> dict[str, int]:
    """The manifest's ``search_defaults``, checked against an (empty) index of ``factory``.

    Raises:
        ValueError: an unknown key, a value below 1, or a setting the index type does not have.
    """
    if not search_defaults:
        return {}
    try:
        params = SearchParams.from_mapping(search_defaults)
        faiss_search_parameters(index, params, factory=factory)
    except BadRequestError as error:
        raise ValueError(f"search_defaults {dict(search_defaults)} do not fit factory {factory!r}: {error}") from error
    return params.as_dict()


def _train(
    index: Any, vectors: np.ndarray, positions: np.ndarray, *, shard: int, factory: str, train_sample: int
) -> None:
    """Train ``index`` on a seeded sample of at most ``train_sample`` of the shard's rows ``positions``.

    Raises:
        ValueError: fewer training vectors than the index needs (an IVF's lists, a PQ's centroids).
    """
    rng = np.random.default_rng(shard)
    take = min(train_sample, len(positions))
    ivf = ivf_of(index)
    if ivf is not None and take < ivf.nlist:
        limit = f" (train_sample {train_sample})" if train_sample < len(positions) else ""
        raise ValueError(
            f"factory {factory!r} needs at least {ivf.nlist} training vectors (one per inverted list), but shard "
            f"{shard} trains on {take}{limit}: use fewer lists, fewer shards or more vectors"
        )
    rows = positions[np.sort(rng.choice(len(positions), size=take, replace=False))]
    binary = isinstance(index, faiss.IndexBinary)
    try:
        index.train(_batch(vectors, rows, binary=binary))
    except RuntimeError as error:
        raise ValueError(
            f"faiss cannot train factory {factory!r} on {take} vectors of shard {shard}: {error}"
        ) from error


def _new_shard_index(*, dim: int, factory: str, metric: str) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as error:
        raise ValueError(f"faiss cannot build factory {factory!r} for dim {dim}: {error}") from error
    if isinstance(index, faiss.IndexIDMap) and not isinstance(index, faiss.IndexIDMap2):
        raise ValueError(
            f"factory {factory!r} gives an IndexIDMap, which cannot reconstruct vectors by id; use 'IDMap2,...'"
        )
    if not isinstance(index, faiss.IndexIDMap2):
        index = faiss.IndexIDMap2(index)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        # An IVF index reconstructs a vector only through a direct map from its internal ids;
        # made while empty, the map is kept up to date by every add and saved with the index.
        ivf.make_direct_map()
    return index


def _new_binary_shard_index(*, bits: int, factory: str) -> faiss.IndexBinary:
    try:
        index = faiss.index_binary_factory(bits, binary_factory(factory))
    except RuntimeError as error:
        raise ValueError(
            f"faiss cannot build binary factory {binary_factory(factory)!r} for {bits} bits "
            f"(binary factories: 'Flat' / 'BFlat', 'BHNSW32', 'BIVF<lists>'): {error}"
        ) from error
    if isinstance(index, faiss.IndexBinaryIVF):
        # As for float IVF: reconstruction by id (id queries) needs the direct map, made while empty.
        index.make_direct_map()
    if not isinstance(index, faiss.IndexBinaryIDMap2):
        index = faiss.IndexBinaryIDMap2(index)
    return index


def _new_index(*, dim: int, factory: str, metric: str) -> Any:
    if metric == "hamming":
        return _new_binary_shard_index(bits=dim, factory=factory)
    return _new_shard_index(dim=dim, factory=factory, metric=metric)


def build_shards(
    *,
    vectors: Any,
    ids: Any,
    items: Sequence[Mapping[str, Any]],
    out_root: str | Path,
    num_shards: int,
    factory: str = "Flat",
    metric: IndexMetric = "ip",
    model: ModelRef,
    gallery: Mapping[str, Any],
    index_version: str | None = None,
    train_sample: int = 100_000,
    add_batch_size: int = 65_536,
    modality: Modality = "image",
    search_defaults: Mapping[str, int] | None = None,
    thumbnails: Sequence[bytes | None] | None = None,
) -> Path:
    """Write a new version of a sharded index under ``out_root`` and make it current.

    The version is built in a hidden staging directory and renamed into place, then
    ``<out_root>/CURRENT`` is switched to it last, so a reader following ``CURRENT`` never
    sees a half-written version and earlier versions stay intact.

    Args:
        vectors: gallery embeddings ``[N, D]``, any array-like of numbers, all finite, converted to
            float32 a batch at a time (a ``np.memmap`` / ``np.load(mmap_mode="r")`` array is read
            from disk batch by batch, never copied whole); for metric ``"hamming"`` packed hash
            codes ``uint8 [N, bits / 8]`` (see `pack_codes`).
        ids: gallery ids ``[N]``, unique non-negative integers.
        items: per-vector metadata (``N`` JSON-serialisable mappings, e.g.
            ``{"label": "7", "source": "digits:12"}``), stored per shard beside the index in a
            Parquet file (see `retrieval.index.metadata`).
        out_root: the index root directory (created if missing).
        num_shards: number of shards, between 1 and ``N``; shard ``s`` holds the ``s``-th
            contiguous range of the sorted ids.
        factory: Faiss factory string (``"Flat"``, ``"IVF{n},Flat"``, ``"IVF{n},PQ{m}"``,
            ``"HNSW{M}"``); for ``"hamming"`` a binary one (``"Flat"`` = ``"BFlat"``,
            ``"BHNSW32"``, ``"BIVF16"``).
        metric: ``"ip"`` (inner product, higher is better), ``"l2"`` (lower is better) or
            ``"hamming"`` (Hamming distance between packed codes, lower is better).
        model: the model version that produced ``vectors``.
        gallery: a free description of what was indexed (dataset, split, count).
        index_version: the version name; default a sortable UTC timestamp + random suffix.
        train_sample: at most this many vectors of a shard (a seeded sample) train an index that
            needs it (IVF, PQ).
        add_batch_size: vectors converted and added to Faiss per call (bounds peak memory).
        modality: what the gallery items are (``"image"``, or ``"text"`` for captions), recorded
            in the manifest for clients.
        search_defaults: the search settings a request that leaves them out gets,
            ``{"nprobe": n}`` (IVF) or ``{"ef_search": n}`` (HNSW); checked against ``factory``.
        thumbnails: one PNG (bytes, or None) per vector for the search page, stored in the items
            files; None stores none (``manifest.thumbnails`` says which).

    Returns:
        The path of the written ``manifest.json``.

    Raises:
        ValueError: inconsistent or invalid inputs, ``search_defaults`` that ``factory`` does
            not have, too few vectors to train ``factory``, or ``index_version`` already exists.
    """
    vectors, ids = _validate_inputs(
        vectors=vectors,
        ids=ids,
        items=items,
        num_shards=num_shards,
        index_version=index_version,
        train_sample=train_sample,
        add_batch_size=add_batch_size,
        metric=metric,
        thumbnails=thumbnails,
    )
    binary = metric == "hamming"
    count = vectors.shape[0]
    # A binary index's dimension is in bits, 8 per byte of a packed code.
    dim = vectors.shape[1] * 8 if binary else vectors.shape[1]
    defaults = _validated_search_defaults(
        _new_index(dim=dim, factory=factory, metric=metric), factory=factory, search_defaults=search_defaults
    )
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    version = index_version or new_index_version()
    version_dir = root / version
    if version_dir.exists():
        raise ValueError(f"index version directory {version_dir} already exists; choose another index_version")

    order = np.argsort(ids, kind="stable")
    staging = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=root))
    try:
        shard_infos: list[ShardInfo] = []
        for shard, positions in enumerate(np.array_split(order, num_shards)):
            shard_ids = ids[positions]
            index = _new_index(dim=dim, factory=factory, metric=metric)
            if not index.is_trained:
                _train(index, vectors, positions, shard=shard, factory=factory, train_sample=train_sample)
            # disable=None hides the bar when stderr is not a terminal (logs, CI).
            with tqdm(
                total=len(positions), desc=f"shard {shard + 1}/{num_shards}", unit="vec", file=sys.stderr, disable=None
            ) as progress:
                for start in range(0, len(positions), add_batch_size):
                    rows = positions[start : start + add_batch_size]
                    index.add_with_ids(_batch(vectors, rows, binary=binary), shard_ids[start : start + add_batch_size])
                    progress.update(len(rows))

            index_name = f"shard-{shard:03d}.faiss"
            items_name = f"shard-{shard:03d}.items.parquet"
            if binary:
                faiss.write_index_binary(index, str(staging / index_name))
            else:
                faiss.write_index(index, str(staging / index_name))
            del index
            position_list = positions.tolist()
            write_items_parquet(
                staging / items_name,
                shard_ids,
                [items[position] for position in position_list],
                None if thumbnails is None else [thumbnails[position] for position in position_list],
            )
            shard_infos.append(
                ShardInfo(
                    shard=shard,
                    file=index_name,
                    sha256=file_sha256(staging / index_name),
                    items_file=items_name,
                    items_sha256=file_sha256(staging / items_name),
                    count=len(positions),
                    id_min=int(shard_ids[0]),
                    id_max=int(shard_ids[-1]),
                )
            )
            logger.info(
                "index %s: shard %d/%d written (%d vectors, ids %d..%d, factory %s)",
                version,
                shard + 1,
                num_shards,
                len(positions),
                shard_ids[0],
                shard_ids[-1],
                factory,
            )

        manifest = IndexManifest(
            index_version=version,
            created_at=datetime.now(UTC).isoformat(),
            model=model,
            dim=dim,
            metric=metric,
            factory=factory,
            num_items=count,
            shards=shard_infos,
            gallery=dict(gallery),
            bits=dim if binary else None,
            modality=modality,
            search_defaults=defaults,
            thumbnails=thumbnails is not None,
        )
        write_manifest(manifest, staging)
        os.rename(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    set_current_version(root, version)
    logger.info("index %s: %d vectors in %d shards at %s", version, count, num_shards, version_dir)
    return version_dir / "manifest.json"


def _faiss_search(index: Any, queries: np.ndarray, k: int, params: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k, params=params)``, also in a process that imported `faiss.contrib.torch_utils`.

    That module (imported by pytorch-metric-learning's inference utilities) replaces every
    index class's ``search`` with a torch-aware one that takes no ``params``, and keeps
    Faiss's own as ``search_numpy``: call that one when it is there.
    """
    search = getattr(index, "search_numpy", None) or index.search
    distances, ids = search(queries, k, params=params)
    return distances, ids


@dataclass
class LoadedShard:
    """One verified shard in memory.

    Attributes:
        index: the Faiss index (a binary one for metric ``"hamming"``); it answers with global
            gallery ids. Shared by concurrent searches: nothing here ever changes its settings.
        items: per-id metadata (`ItemStore`: ``items.get(id)`` / ``items.get_many(ids)`` give
            dicts including their ``"id"``; ``id in items``; ``items.thumbnail(id)``).
        info: the shard's manifest entry.
        metric: the index's metric (from the manifest).
        factory: the index's Faiss factory string (from the manifest), named in errors.
        search_defaults: the manifest's search settings for requests that leave them out.
        mmap: whether the index was read memory-mapped.
    """

    index: Any
    items: ItemStore
    info: ShardInfo
    metric: IndexMetric = "ip"
    factory: str = "Flat"
    search_defaults: Mapping[str, int] = field(default_factory=dict)
    mmap: bool = False

    @property
    def is_binary(self) -> bool:
        """Whether the shard holds packed hash codes searched by Hamming distance."""
        return self.metric == "hamming"

    def faiss_params(self, params: SearchParams | None = None) -> Any | None:
        """The `faiss.SearchParameters` of one search: ``params`` over the manifest's defaults (None: defaults).

        Raises:
            BadRequestError: a setting this index type does not have, or out of range.
        """
        merged = (params or SearchParams()).with_defaults(self.search_defaults)
        return faiss_search_parameters(self.index, merged, factory=self.factory, knobs=self.knobs)

    @cached_property
    def knobs(self) -> IndexKnobs:
        """The per-search settings this index takes (``nprobe`` range, ``ef_search``), looked up once."""
        return index_knobs(self.index)

    def search(self, queries: np.ndarray, k: int, params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search the shard.

        Args:
            queries: ``[Q, D]`` float query vectors; for a binary shard packed codes
                ``uint8 [Q, bits / 8]`` (see `pack_codes`).
            k: neighbours per query, >= 1.
            params: this call's search settings (``nprobe`` for IVF, ``ef_search`` for HNSW);
                unset ones come from the manifest's ``search_defaults``. They go to Faiss with
                this call only, so concurrent calls with other settings are unaffected.

        Returns:
            Scores ``[Q, k]`` float32 (Hamming distances, whole numbers, for a binary shard) and
            ids ``[Q, k]`` int64; ids are ``-1`` past the shard's size (Faiss padding), with
            score ``float32 max`` in a binary shard.

        Raises:
            ValueError: ``k`` < 1 or queries of the wrong shape / dtype.
            BadRequestError: ``params`` the index type does not have (the message names it).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        faiss_params = self.faiss_params(params)
        if self.is_binary:
            code_bytes = self.index.d // 8
            queries = np.asarray(queries)
            if queries.dtype != np.uint8 or queries.ndim != 2 or queries.shape[1] != code_bytes:
                raise ValueError(
                    f"queries of a {self.index.d}-bit binary shard must be packed codes uint8 [Q, {code_bytes}], "
                    f"got {queries.dtype} {queries.shape}"
                )
            distances, ids = _faiss_search(self.index, np.ascontiguousarray(queries), k, faiss_params)
            scores = distances.astype(np.float32)
            scores[ids < 0] = _BINARY_PADDING
            return scores, ids.astype(np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must have shape [Q, {self.index.d}], got {queries.shape}")
        scores, ids = _faiss_search(self.index, queries, k, faiss_params)
        return scores, ids

    def vector(self, item_id: int) -> np.ndarray:
        """The stored vector ``[D]`` float32 of a gallery id; a binary shard's code unpacked to ±1 ``[bits]``.

        Raises:
            KeyError: the id is not in this shard.
        """
        if item_id not in self.items:
            raise KeyError(item_id)
        stored = self.index.reconstruct(int(item_id))
        if self.is_binary:
            return unpack_codes(stored, self.index.d)
        return np.asarray(stored, dtype=np.float32)


def _verified_path(version_dir: Path, name: str, expected_sha256: str) -> Path:
    path = contained_path(version_dir, name)
    if not path.is_file():
        raise IndexIntegrityError(f"{path}: shard file is missing")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise IndexIntegrityError(
            f"{path}: sha256 mismatch, manifest expects {expected_sha256} but the file has {actual}"
        )
    return path


def _read_index(path: Path, *, binary: bool, mmap: bool, factory: str) -> tuple[Any, bool]:
    """Read a Faiss index file, memory-mapped when asked and the type allows; returns it and whether it is mapped.

    Raises:
        RuntimeError: faiss cannot read the file at all.
    """
    read = faiss.read_index_binary if binary else faiss.read_index
    if mmap:
        errors = []
        for flag in _MMAP_FLAGS:
            try:
                return read(str(path), flag), True
            except RuntimeError as error:
                errors.append(str(error).strip().splitlines()[-1])
        kind = f"{'binary ' if binary else ''}{factory}"
        if kind not in _mmap_fallback_logged:
            _mmap_fallback_logged.add(kind)
            logger.warning("faiss cannot memory-map a %s index (%s); reading it into memory", kind, "; ".join(errors))
    return read(str(path)), False


def load_shard(
    *, manifest: IndexManifest, version_dir: Path, shard: int, verify: bool = True, mmap: bool = False
) -> LoadedShard:
    """Load one shard of an index version, refusing it if its files do not match the manifest.

    Args:
        manifest: the version's manifest (from `read_manifest`).
        version_dir: the directory holding the shard files.
        shard: the shard number.
        verify: check both files' sha256 against the manifest before reading them (in chunks).
        mmap: memory-map the index file (Faiss ``IO_FLAG_MMAP_IFC`` / ``IO_FLAG_MMAP``) instead
            of reading it into memory: pages come from the file on demand and are shared
            between processes. An index type faiss cannot map is read normally (logged once).

    Returns:
        The loaded shard.

    Raises:
        IndexIntegrityError: the shard is not in the manifest, a file is missing, a checksum
            differs (the message names the file, the expected and the actual sha256), a file
            cannot be read (corrupt or truncated), or the contents disagree with the manifest.
    """
    matching = [info for info in manifest.shards if info.shard == shard]
    if not matching:
        raise IndexIntegrityError(
            f"{version_dir}: manifest of index {manifest.index_version} has no shard {shard} "
            f"(it has {len(manifest.shards)})"
        )
    info = matching[0]
    version_dir = Path(version_dir)
    if verify:
        index_path = _verified_path(version_dir, info.file, info.sha256)
        items_path = _verified_path(version_dir, info.items_file, info.items_sha256)
    else:
        index_path = contained_path(version_dir, info.file)
        items_path = contained_path(version_dir, info.items_file)
    try:
        index, mapped = _read_index(index_path, binary=manifest.is_binary, mmap=mmap, factory=manifest.factory)
    except RuntimeError as error:
        raise IndexIntegrityError(f"{index_path}: faiss cannot read the shard: {error}") from error
    items = ItemStore.open(items_path)
    if index.ntotal != info.count or len(items) != info.count or index.d != manifest.dim:
        raise IndexIntegrityError(
            f"{index_path}: manifest expects {info.count} vectors of dim {manifest.dim}, the shard holds "
            f"{index.ntotal} vectors of dim {index.d} and {items_path.name} holds {len(items)} items"
        )
    logger.info(
        "index %s: loaded shard %d (%d vectors%s)",
        manifest.index_version,
        shard,
        info.count,
        ", memory-mapped" if mapped else "",
    )
    return LoadedShard(
        index=index,
        items=items,
        info=info,
        metric=manifest.metric,
        factory=manifest.factory,
        search_defaults=dict(manifest.search_defaults),
        mmap=mapped,
    )
