"""Fuzz the search API from its own OpenAPI schema (schemathesis), in-process.

Every operation but the admin ones gets generated requests, valid and invalid; each reply
must be no 5xx, have a status the schema documents for that operation, the documented
content type, and a body that fits the documented schema. Two apps are fuzzed, both the real
HTTP API over a real `SearchService` and a fake embedder: one over fake shards (a NumPy scan),
one over real `ShardDeployment` replicas called in-process, holding an HNSW index with labels
and thumbnails built by `build_shards`, so generated index settings reach Faiss.
"""

from __future__ import annotations

import concurrent.futures
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from retrieval.config import ServingSpec
from retrieval.index.manifest import IndexManifest, ModelRef, ShardInfo, read_manifest
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import build_shards
from retrieval.serving.clients import LocalShardClient
from retrieval.serving.http import build_http_api
from retrieval.serving.images import decode_image
from retrieval.serving.replies import ShardHits
from retrieval.serving.service import SearchService
from retrieval.serving.shard_host import ShardHost

DIM = 4
COUNT = 30
SHARD_SIZE = 10
VERSION = "v-fuzz"
VECTORS = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)
THUMBNAIL = io.BytesIO()
Image.new("RGB", (3, 3), color=(9, 9, 9)).save(THUMBNAIL, format="PNG")


class FakeShard:
    """`ShardClient` over one contiguous id range, searched by a NumPy scan (a shard deployment's stand-in)."""

    remote = True

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.ids = np.arange(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE)

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        scores = np.asarray(queries, dtype=np.float32) @ VECTORS[self.ids].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        items = {item_id: {"id": item_id, "label": str(item_id % 3)} for item_id in self.ids.tolist()}
        return ShardHits(
            index_version=index_version,
            shard=self.shard,
            scores=np.take_along_axis(scores, order, axis=1),
            ids=self.ids[order],
            items=items,
        )

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        return VECTORS[item_id] if item_id in self.ids else None

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        return {"id": item_id, "label": str(item_id % 3)} if item_id in self.ids else None

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        return THUMBNAIL.getvalue() if item_id in self.ids else None

    async def loaded_versions(self) -> list[str]:
        return [VERSION]


class FakeEmbedder:
    """`EmbedderClient`: any decodable image or any text gets a vector derived from it."""

    remote = True

    def __init__(self, version: str) -> None:
        self.version = version

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        pixel = decode_image(image_bytes).getpixel((0, 0))
        assert isinstance(pixel, tuple)
        return VECTORS[pixel[0] % COUNT]

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        return VECTORS[len(text) % COUNT]

    async def loaded_versions(self) -> list[str]:
        return [self.version]


def manifest() -> IndexManifest:
    shards = [
        ShardInfo(
            shard=shard,
            file=f"shard-{shard:03d}.faiss",
            sha256="0" * 64,
            items_file=f"shard-{shard:03d}.items.parquet",
            items_sha256="0" * 64,
            count=SHARD_SIZE,
            id_min=shard * SHARD_SIZE,
            id_max=(shard + 1) * SHARD_SIZE - 1,
        )
        for shard in range(COUNT // SHARD_SIZE)
    ]
    return IndexManifest(
        index_version=VERSION,
        created_at="2026-01-01T00:00:00Z",
        model=ModelRef(name="fuzzed", version="1", uri="models:/fuzzed/1"),
        dim=DIM,
        metric="ip",
        factory="Flat",
        num_items=COUNT,
        shards=shards,
        gallery={"dataset": "synthetic", "modality": "image"},
        thumbnails=True,
    )


SPEC_FIELDS: dict[str, Any] = {"max_k": 20, "default_k": 5, "max_upload_bytes": 3_000, "max_query_vectors": 8}


def fake_shards_app() -> Any:
    spec = ServingSpec(index="unused", **SPEC_FIELDS)
    shards = [FakeShard(shard) for shard in range(COUNT // SHARD_SIZE)]
    service = SearchService(manifest=manifest(), spec=spec, shards=shards, embedder=FakeEmbedder(VERSION))
    return build_http_api(service)


EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fuzz-shards")


def real_shards_app(root: Path) -> Any:
    build_shards(
        vectors=VECTORS,
        ids=np.arange(COUNT),
        items=[{"label": str(item_id % 3), "source": f"synthetic:{item_id}"} for item_id in range(COUNT)],
        out_root=root,
        num_shards=COUNT // SHARD_SIZE,
        factory="HNSW8",
        model=ModelRef(name="fuzzed", version="1", uri="models:/fuzzed/1"),
        gallery={"dataset": "synthetic"},
        thumbnails=[THUMBNAIL.getvalue()] * COUNT,
    )
    spec = ServingSpec(index=str(root), **SPEC_FIELDS)
    served, _ = read_manifest(root)
    # The local layout: the shards held by the ingress's own ShardHost, searched on its threads.
    host = ShardHost(spec=spec)
    host.prepare(str(root))
    shards = [LocalShardClient(host, info.shard, EXECUTOR) for info in served.shards]
    service = SearchService(manifest=served, spec=spec, shards=shards, embedder=FakeEmbedder(served.index_version))
    return build_http_api(service)


# Loaded when the module is collected (schemathesis' lazy fixture loader predates pytest 9), so
# the index lives in a directory removed when the interpreter exits.
INDEX_DIR = tempfile.TemporaryDirectory(prefix="fuzz-index-")
FAKE_SHARDS = schemathesis.openapi.from_asgi("/openapi.json", fake_shards_app()).exclude(path_regex="^/admin/")
REAL_SHARDS = schemathesis.openapi.from_asgi("/openapi.json", real_shards_app(Path(INDEX_DIR.name))).exclude(
    path_regex="^/admin/"
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Bounded and reproducible: the same examples on every run.
FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@FAKE_SHARDS.parametrize()
@FUZZ_SETTINGS
def test_fake_shards_answer_every_generated_request_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


@REAL_SHARDS.parametrize()
@FUZZ_SETTINGS
def test_real_shards_answer_every_generated_request_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
