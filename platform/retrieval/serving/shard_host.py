"""The shards one replica holds, version by version: load (verified, within budget), search, look up, free.

Free of Ray, so it runs in three places unchanged: inside a `ShardDeployment` replica (one
shard, the distributed layout), inside every ingress replica (all shards, the local layout),
and in plain test processes.

A host holds one or more versions of the same shard numbers: one normally, two during a
rolling swap (ARCHITECTURE invariant 2). Every search names the version it wants and a host
asked for a version it does not hold raises `VersionNotLoadedError`; it never answers with
another version's results (invariant 1). Loading is all or nothing: the memory budget is
checked before anything is read (`retrieval.serving.memory.check_shard_memory`), every file's
checksum before it is used, and a failure leaves what is held untouched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.config import ServingSpec
from retrieval.index.manifest import IndexManifest, contained_path, read_manifest
from retrieval.index.object_store import local_index_path
from retrieval.index.shards import LoadedShard, load_shard
from retrieval.serving.errors import VersionNotLoadedError
from retrieval.serving.memory import check_shard_memory
from retrieval.serving.replies import ShardCall, ShardHits

logger = logging.getLogger(__name__)


def describe_shards(shards: Sequence[int]) -> str:
    """``"shard 2"``, ``"shards 0-3"`` or ``"shards 0, 2"``, for messages."""
    if len(shards) == 1:
        return f"shard {shards[0]}"
    if list(shards) == list(range(shards[0], shards[0] + len(shards))):
        return f"shards {shards[0]}-{shards[-1]}"
    return f"shards {', '.join(map(str, shards))}"


def shard_file_bytes(manifest: IndexManifest, version_dir: Path, shards: Sequence[int]) -> int:
    """The size on disk of some shards' index and items files (a lower bound of their memory)."""
    wanted = set(shards)
    sizes = 0
    for info in manifest.shards:
        if info.shard not in wanted:
            continue
        for name in (info.file, info.items_file):
            path = contained_path(version_dir, name)
            # A missing file is reported by the checksum check with its path; size it as 0 here.
            sizes += path.stat().st_size if path.is_file() else 0
    return sizes


class ShardHost:
    """Some shards of the index, in every version this replica must hold.

    Args:
        spec: the serving spec (cache, S3 endpoint, memory budget, memory-mapping).
        shards: the shard numbers held (None: every shard of the manifest, as the local layout does).
    """

    def __init__(self, *, spec: ServingSpec, shards: Sequence[int] | None = None) -> None:
        self._spec = spec
        self._wanted = None if shards is None else tuple(shards)
        self._versions: dict[str, dict[int, LoadedShard]] = {}
        self._bytes: dict[str, int] = {}
        self._manifests: dict[str, IndexManifest] = {}
        # Loads run on a helper thread while searches run on others.
        self._lock = threading.Lock()

    def _local(self, manifest_ref: str, shards: Sequence[int] | None) -> Path:
        return local_index_path(
            manifest_ref, endpoint_url=self._spec.endpoint_url, cache_dir=self._spec.cache_dir, shards=shards
        )

    def shards_of(self, manifest: IndexManifest) -> tuple[int, ...]:
        """The shard numbers this host holds of ``manifest``."""
        every = tuple(info.shard for info in manifest.shards)
        return every if self._wanted is None else self._wanted

    def prepare(self, manifest_ref: str) -> str:
        """Load the version ``manifest_ref`` names beside the ones held.

        The memory budget is checked before anything is read into memory, then the files'
        checksums; on any error nothing held changes.

        Args:
            manifest_ref: a local ``manifest.json`` path or ``s3://.../manifest.json`` URI.

        Returns:
            The loaded index version.

        Raises:
            MemoryBudgetError: the shards would not fit beside the ones held.
            IndexIntegrityError: a missing or corrupt file, a checksum mismatch, no such shard.
        """
        manifest, version_dir = read_manifest(self._local(manifest_ref, self._wanted))
        version = manifest.index_version
        if version in self._versions:
            return version
        shards = self.shards_of(manifest)
        new_bytes = shard_file_bytes(manifest, version_dir, shards)
        check_shard_memory(
            shards=describe_shards(shards),
            index_version=version,
            new_bytes=new_bytes,
            held_bytes=sum(self._bytes.values()),
            budget_bytes=self._spec.shard_memory_bytes,
        )
        loaded = {
            shard: load_shard(manifest=manifest, version_dir=version_dir, shard=shard, mmap=self._spec.mmap_shards)
            for shard in shards
        }
        with self._lock:
            self._bytes[version] = new_bytes
            self._manifests[version] = manifest
            self._versions[version] = loaded
        return version

    def drop(self, version: str) -> None:
        """Free ``version`` (nothing if it is not held)."""
        with self._lock:
            self._versions.pop(version, None)
            self._bytes.pop(version, None)
            self._manifests.pop(version, None)

    def versions(self) -> list[str]:
        """The index versions held, sorted."""
        return sorted(self._versions)

    def manifest(self, version: str) -> IndexManifest:
        """The manifest of a version held.

        Raises:
            VersionNotLoadedError: the version is not held.
        """
        manifest = self._manifests.get(version)
        if manifest is None:
            raise VersionNotLoadedError(f"{self._what()} do not hold index version {version} ({self._holds()})")
        return manifest

    def held_bytes(self) -> int:
        """The file sizes of every version held."""
        return sum(self._bytes.values())

    def _what(self) -> str:
        return "the local shards" if self._wanted is None else describe_shards(self._wanted)

    def _holds(self) -> str:
        return f"it holds {self.versions()}"

    def loaded(self, shard: int, version: str) -> LoadedShard:
        """One shard of one version held.

        Raises:
            VersionNotLoadedError: the version (or that shard of it) is not held here.
        """
        held = self._versions.get(version)
        loaded = None if held is None else held.get(shard)
        if loaded is None:
            raise VersionNotLoadedError(f"shard {shard} does not hold index version {version} ({self._holds()})")
        return loaded

    def search_calls(self, shard: int, calls: Sequence[ShardCall]) -> list[ShardHits | Exception]:
        """Answer several calls to one shard, one Faiss search per group of equal (version, params).

        Each group is searched with its largest k and cut back per call.

        Returns:
            One `ShardHits` per call, in order; a group's error (a version not held, a setting
            the index does not have) in place of each of its replies.
        """
        groups: dict[tuple[str, tuple[int | None, int | None]], list[int]] = {}
        for position, call in enumerate(calls):
            groups.setdefault((call.index_version, call.params.key()), []).append(position)
        results: list[ShardHits | Exception] = [RuntimeError("unanswered")] * len(calls)
        for (version, _), positions in groups.items():
            members = [calls[position] for position in positions]
            try:
                loaded = self.loaded(shard, version)
                stacked = members[0].queries if len(members) == 1 else np.concatenate([c.queries for c in members])
                fetch = max(call.k for call in members)
                scores, ids = loaded.search(stacked, fetch, members[0].params)
            except Exception as error:
                for position in positions:
                    results[position] = error
                continue
            row = 0
            for position, call in zip(positions, members, strict=True):
                rows = slice(row, row + len(call.queries))
                row += len(call.queries)
                results[position] = self._hits(loaded, shard, version, scores[rows, : call.k], ids[rows, : call.k])
        return results

    def search(self, shard: int, call: ShardCall) -> ShardHits:
        """One call's `ShardHits` (see `search_calls`).

        Raises:
            VersionNotLoadedError: the version is not held.
            BadRequestError: a setting the index does not have.
        """
        result = self.search_calls(shard, [call])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @staticmethod
    def _hits(loaded: LoadedShard, shard: int, version: str, scores: np.ndarray, ids: np.ndarray) -> ShardHits:
        # The metadata travels with the scores, so the caller needs no second round trip.
        return ShardHits(
            index_version=version,
            shard=shard,
            scores=np.ascontiguousarray(scores),
            ids=np.ascontiguousarray(ids),
            items=loaded.items.get_many(ids.ravel()),
        )

    def vector(self, shard: int, item_id: int, version: str) -> np.ndarray | None:
        """The stored vector ``[D]`` of an id, or None when the shard does not hold it."""
        loaded = self.loaded(shard, version)
        return loaded.vector(item_id) if item_id in loaded.items else None

    def item(self, shard: int, item_id: int, version: str) -> dict[str, Any] | None:
        """The stored metadata of an id, or None when the shard does not hold it."""
        return self.loaded(shard, version).items.get(item_id)

    def thumbnail(self, shard: int, item_id: int, version: str) -> bytes | None:
        """The stored thumbnail (image file bytes) of an id, or None when there is none."""
        return self.loaded(shard, version).items.thumbnail(item_id)
