"""Sharded, versioned Faiss indices: build, verify, load and merge (no Ray, no MLflow here)."""

from __future__ import annotations

from retrieval.index.manifest import IndexManifest, ModelRef, ShardInfo, read_manifest
from retrieval.index.merge import merge_topk
from retrieval.index.metadata import ItemStore, write_items_parquet
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import LoadedShard, build_shards, load_shard

__all__ = [
    "IndexManifest",
    "ItemStore",
    "LoadedShard",
    "ModelRef",
    "SearchParams",
    "ShardInfo",
    "build_shards",
    "load_shard",
    "merge_topk",
    "read_manifest",
    "write_items_parquet",
]
