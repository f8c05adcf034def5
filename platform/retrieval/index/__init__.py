"""Sharded, versioned Faiss indices: build, verify, load and merge (no Ray, no MLflow here)."""

from __future__ import annotations

from retrieval.index.manifest import IndexManifest, ModelRef, ShardInfo, read_manifest
from retrieval.index.merge import merge_topk
from retrieval.index.shards import LoadedShard, build_shards, load_shard

__all__ = [
    "IndexManifest",
    "LoadedShard",
    "ModelRef",
    "ShardInfo",
    "build_shards",
    "load_shard",
    "merge_topk",
    "read_manifest",
]
