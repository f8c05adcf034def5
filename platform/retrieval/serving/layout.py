"""Which layout serves an index: shards in the ingress (local) or one deployment per shard (distributed).

The local layout is the fast one: a query crosses Ray once (proxy -> ingress) and the shards are
searched in the ingress's own process, where a distributed query pays a second Ray call per
shard (measured in ``benchmarks/serving_load.py``). It needs every ingress replica to hold the
whole index, twice during a rolling swap (the old and the new version side by side). So
``layout: auto`` picks local when two copies of the version's shard files fit an ingress
replica's memory budget (`ServingSpec.shard_memory_bytes`, or the memory available here,
container limits included), and distributed otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from retrieval.config import ServingSpec
from retrieval.index.manifest import IndexManifest
from retrieval.index.object_store import is_s3_uri, parse_s3_index_uri, s3_client
from retrieval.serving.memory import MemoryView, memory_view

logger = logging.getLogger(__name__)

Layout = Literal["local", "distributed"]
# A swap holds the old and the new version side by side.
SWAP_COPIES = 2


@dataclass(frozen=True)
class LayoutChoice:
    """The layout an application runs with, and why (logged, and shown by ``/readyz``)."""

    layout: Layout
    reason: str


def index_file_bytes(manifest: IndexManifest, manifest_location: str, *, endpoint_url: str | None = None) -> int:
    """The size of every shard's index and items files of one version, local or on S3.

    Args:
        manifest: the version's manifest.
        manifest_location: where it was read: a local ``.../manifest.json`` or an
            ``s3://.../<version>/manifest.json`` URI (sizes then come from the object store).
        endpoint_url: the S3-compatible endpoint, for ``s3://`` locations.
    """
    names = [name for info in manifest.shards for name in (info.file, info.items_file)]
    if is_s3_uri(manifest_location):
        location = parse_s3_index_uri(manifest_location)
        client = s3_client(endpoint_url=endpoint_url)
        version = location.version or manifest.index_version
        return sum(
            int(client.head_object(Bucket=location.bucket, Key=location.key(version, name))["ContentLength"])
            for name in names
        )
    folder = Path(manifest_location).parent
    return sum((folder / name).stat().st_size for name in names if (folder / name).is_file())


def choose_layout(spec: ServingSpec, *, index_bytes: int, view: MemoryView | None = None) -> LayoutChoice:
    """The layout for ``spec`` and an index of ``index_bytes`` of shard files.

    Args:
        spec: the serving spec; an explicit ``layout`` is kept as it is.
        index_bytes: the size of one version's shard files (`index_file_bytes`).
        view: the memory view to judge ``auto`` by when ``shard_memory_bytes`` is unset
            (default: this process's, cgroup-aware).
    """
    if spec.layout != "auto":
        return LayoutChoice(layout=spec.layout, reason=f"layout: {spec.layout} in the serving spec")
    needed = SWAP_COPIES * index_bytes
    if spec.shard_memory_bytes is not None:
        budget, source = spec.shard_memory_bytes, "shard_memory_bytes"
    else:
        view = view if view is not None else memory_view()
        budget, source = view.available_bytes, view.describe()
    fits = needed <= budget
    relation = "fit in" if fits else "exceed"
    reason = (
        f"two copies of the index ({needed} bytes: a swap holds the old and the new version) {relation} "
        f"an ingress replica's budget of {budget} bytes ({source})"
    )
    return LayoutChoice(layout="local" if fits else "distributed", reason=reason)
