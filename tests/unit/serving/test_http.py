"""The HTTP API in-process: FastAPI's TestClient over a real `SearchService` with fake shards.

The fake shards hold contiguous id ranges of a small random gallery and answer by a plain
NumPy scan; the fake embedder reads a gallery id out of the uploaded image (its first pixel's
red value), so every answer has a brute-force reference computed in a Python loop here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.index.manifest import IndexManifest, ModelRef, ShardInfo
from retrieval.index.search_params import SearchParams
from retrieval.serving.errors import ShardUnavailableError
from retrieval.serving.http import build_http_api, json_body_limit, upload_body_limit
from retrieval.serving.http.gate import BodyLimits
from retrieval.serving.images import decode_image
from retrieval.serving.metrics import CONTENT_TYPE, ServingMetrics
from retrieval.serving.replies import ShardHits
from retrieval.serving.service import SearchService

DIM = 8
COUNT = 40
SHARD_SIZE = 20
VERSION = "v-test-1"
MODEL = ModelRef(name="digits-deep-metric", version="3", uri="models:/digits-deep-metric/3")
TOKEN_ENV = "RETRIEVAL_TEST_QUERY_TOKEN"
ORIGIN = "http://search.example.test"
TEXT_QUERY = "a seven"

VECTORS = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)
VECTORS /= np.linalg.norm(VECTORS, axis=1, keepdims=True)
ITEMS = [{"label": str(item_id % 10), "source": f"synthetic:{item_id}"} for item_id in range(COUNT)]


def png_of_id(item_id: int, size: int = 4) -> bytes:
    """A PNG whose first pixel's red value is ``item_id`` (read back by `FakeEmbedder`)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color=(item_id, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


THUMBNAILS = {item_id: png_of_id(item_id, size=6) for item_id in range(COUNT) if item_id != 7}


class FakeShard:
    """`ShardClient` over one contiguous id range, searched by a NumPy scan.

    ``remote``: whether it stands for a shard deployment (distributed layout, which the pool may
    find dead) or a shard held in the ingress (local layout).
    """

    def __init__(self, first: int, last: int, *, remote: bool = True) -> None:
        self.remote = remote
        self.shard = first // SHARD_SIZE
        self.ids = list(range(first, last + 1))
        self.params: list[SearchParams | None] = []
        self.versions = [VERSION]
        self.dead = False
        self.hang = False

    async def _ready(self) -> None:
        if self.dead:
            raise ShardUnavailableError("the test shard's replica is gone")
        if self.hang:
            await asyncio.Event().wait()

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        await self._ready()
        self.params.append(params)
        scores = np.asarray(queries, dtype=np.float32) @ VECTORS[self.ids].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return ShardHits(
            index_version=index_version,
            shard=self.shard,
            scores=np.take_along_axis(scores, order, axis=1),
            ids=np.asarray(self.ids)[order],
            items={item_id: {"id": item_id, **ITEMS[item_id]} for item_id in self.ids},
        )

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        await self._ready()
        return VECTORS[item_id] if item_id in self.ids else None

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        await self._ready()
        return {"id": item_id, **ITEMS[item_id]} if item_id in self.ids else None

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        await self._ready()
        return THUMBNAILS.get(item_id) if item_id in self.ids else None

    async def loaded_versions(self) -> list[str]:
        await self._ready()
        return list(self.versions)


class FakeEmbedder:
    """`EmbedderClient`: an image gives the vector of the id in its first pixel; one known text a fixed vector."""

    remote = True

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        pixel = decode_image(image_bytes).getpixel((0, 0))
        assert isinstance(pixel, tuple)
        return VECTORS[pixel[0]]

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        if text != TEXT_QUERY:
            raise BadRequestError(f"the test model knows only the text {TEXT_QUERY!r}")
        return VECTORS[17]

    async def loaded_versions(self) -> list[str]:
        return [VERSION]


def manifest(*, thumbnails: bool = True, gallery: dict[str, Any] | None = None) -> IndexManifest:
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
        model=MODEL,
        dim=DIM,
        metric="ip",
        factory="IVF4,Flat",
        num_items=COUNT,
        shards=shards,
        gallery=gallery if gallery is not None else {"dataset": "synthetic"},
        thumbnails=thumbnails,
    )


class Served:
    def __init__(self, client: TestClient, shards: list[FakeShard], spec: ServingSpec) -> None:
        self.client = client
        self.shards = shards
        self.spec = spec


def serve(
    *,
    thumbnails: bool = True,
    gallery: dict[str, Any] | None = None,
    remote: bool = True,
    metrics: ServingMetrics | None = None,
    **spec_fields: Any,
) -> Iterator[Served]:
    spec = ServingSpec(index="unused", max_k=20, default_k=5, max_upload_bytes=3_000, **spec_fields)
    shards = [
        FakeShard(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE - 1, remote=remote)
        for shard in range(COUNT // SHARD_SIZE)
    ]
    service = SearchService(
        manifest=manifest(thumbnails=thumbnails, gallery=gallery),
        spec=spec,
        shards=shards,
        embedder=FakeEmbedder(),
        metrics=metrics,
    )
    # One event loop for the whole client, as in a server (the router's batcher lives in it).
    with TestClient(build_http_api(service)) as client:
        yield Served(client, shards, spec)


@pytest.fixture(params=["distributed", "local"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """The API over remote shards (distributed layout) and over shards held in the ingress (local layout)."""
    yield from serve(remote=request.param == "distributed")


def brute_force(query: np.ndarray, k: int, exclude: int | None = None) -> list[tuple[int, float]]:
    """Top-k ``(id, score)`` by inner product, computed one item at a time."""
    scored = []
    for item_id in range(COUNT):
        if item_id != exclude:
            scored.append((item_id, sum(float(a) * float(b) for a, b in zip(query, VECTORS[item_id], strict=True))))
    return sorted(scored, key=lambda pair: -pair[1])[:k]


def check_hits(hits: list[dict[str, Any]], query: np.ndarray, k: int, *, exclude: int | None = None) -> None:
    expected = brute_force(query, k, exclude)
    assert [hit["id"] for hit in hits] == [item_id for item_id, _ in expected]
    np.testing.assert_allclose([hit["score"] for hit in hits], [score for _, score in expected], rtol=1e-5, atol=1e-6)
    for hit in hits:
        assert (hit["label"], hit["source"]) == (ITEMS[hit["id"]]["label"], ITEMS[hit["id"]]["source"])


def assert_error(response: Any, status: int, error_type: str, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == error_type, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    return body


# --------------------------------------------------------------------------- search routes


def test_vector_search_equals_brute_force_with_relative_thumbnail_links(served: Served) -> None:
    query = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    response = served.client.post("/search/vector", json={"vector": query.tolist(), "k": 7})
    assert response.status_code == 200, response.text
    reply = response.json()
    check_hits(reply["results"], query, 7)
    assert reply["model"] == {"name": MODEL.name, "version": MODEL.version, "uri": MODEL.uri}
    assert (reply["index_version"], reply["k"], reply["modality"]) == (VERSION, 7, "image")
    assert (reply["partial"], reply["missing_shards"], reply["params"]) == (False, [], {})
    assert [hit["thumbnail_url"] for hit in reply["results"]] == [
        f"items/{hit['id']}/thumbnail" for hit in reply["results"]
    ]


def test_every_query_kind_answers_like_brute_force(served: Served) -> None:
    client = served.client
    check_hits(client.post("/search/id", json={"id": 23, "k": 4}).json()["results"], VECTORS[23], 4, exclude=23)
    check_hits(client.post("/search", json={"id": 3}).json()["results"], VECTORS[3], 5, exclude=3)
    check_hits(client.post("/search/text", json={"text": TEXT_QUERY, "k": 3}).json()["results"], VECTORS[17], 3)
    check_hits(client.post("/search", json={"text": TEXT_QUERY}).json()["results"], VECTORS[17], 5)
    upload = client.post("/search/image", files={"file": ("q.png", png_of_id(31), "image/png")}, data={"k": "6"})
    check_hits(upload.json()["results"], VECTORS[31], 6)
    encoded = base64.b64encode(png_of_id(12)).decode()
    check_hits(client.post("/search", json={"image": encoded, "k": 2}).json()["results"], VECTORS[12], 2)


def test_index_params_reach_every_shard_and_the_reply(served: Served) -> None:
    query = VECTORS[5].tolist()
    reply = served.client.post("/search/vector", json={"vector": query, "k": 3, "params": {"nprobe": 2}}).json()
    assert reply["params"] == {"nprobe": 2}
    upload = served.client.post(
        "/search/image", files={"file": ("q.png", png_of_id(9), "image/png")}, data={"nprobe": "3"}
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["params"] == {"nprobe": 3}
    for shard in served.shards:
        assert shard.params == [SearchParams(nprobe=2), SearchParams(nprobe=3)]


@pytest.mark.parametrize(
    ("params", "status", "error_type", "fragment"),
    [
        ({"nlist": 3}, 400, "bad_request", "unknown search parameters ['nlist']"),
        ({"nprobe": 0}, 400, "bad_request", "nprobe must be a positive integer, got 0"),
        ({"nprobe": "many"}, 422, "validation_error", "body.params.nprobe"),
        ({"ef_search": 2**40}, 400, "bad_request", f"ef_search must be at most {2**31 - 1}, got {2**40}"),
        ({"efSearch": 2**31}, 400, "bad_request", f"ef_search must be at most {2**31 - 1}"),
    ],
)
def test_bad_index_params_are_refused(
    served: Served, params: dict[str, Any], status: int, error_type: str, fragment: str
) -> None:
    for path, body in (("/search/vector", {"vector": [0.1] * DIM}), ("/search", {"id": 1}), ("/search/id", {"id": 1})):
        response = served.client.post(path, json={**body, "params": params})
        assert_error(response, status, error_type, fragment)
    form = served.client.post(
        "/search/image", files={"file": ("q.png", png_of_id(1), "image/png")}, data={"ef_search": "-2"}
    )
    assert_error(form, 400, "bad_request", "ef_search must be a positive integer, got -2")


def test_a_batch_of_vectors_answers_each_in_order(served: Served) -> None:
    queries = np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32)
    response = served.client.post("/search/vectors", json={"vectors": queries.tolist(), "k": 4})
    assert response.status_code == 200, response.text
    reply = response.json()
    assert len(reply["results"]) == 3 and reply["k"] == 4 and reply["partial"] is False
    for hits, query in zip(reply["results"], queries, strict=True):
        check_hits(hits, query, 4)
        assert all(hit["thumbnail_url"] == f"items/{hit['id']}/thumbnail" for hit in hits)


def test_a_batch_over_the_limit_is_refused_whole(served: Served) -> None:
    limit = served.spec.max_query_vectors
    too_many = served.client.post("/search/vectors", json={"vectors": [[0.5] * DIM] * (limit + 1)})
    assert_error(too_many, 413, "payload_too_large", f"{limit + 1} query vectors", f"the limit is {limit}")
    assert_error(served.client.post("/search/vectors", json={"vectors": []}), 400, "bad_request", "empty")
    short = served.client.post("/search/vectors", json={"vectors": [[0.5] * DIM, [0.5] * 3]})
    assert_error(short, 400, "bad_request", "vectors[1]", "3 dimensions")
    assert all(shard.params == [] for shard in served.shards)


# --------------------------------------------------------------------------- limits


def test_an_oversize_body_is_refused_from_its_length_before_it_is_read(served: Served) -> None:
    limit = json_body_limit(served.spec)
    assert limit == 3_000 * 4 // 3 + 64 * 1024
    body = b'{"image": "' + b"A" * limit + b'"}'
    response = served.client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large", f"the request body is {len(body)} bytes", f"is {limit}")
    upload_limit = upload_body_limit(served.spec)
    big = served.client.post("/search/image", files={"file": ("q.png", b"0" * (upload_limit + 1), "image/png")})
    assert_error(big, 413, "payload_too_large", "the upload is ", "the limit is 3000 (plus 65536 bytes")
    # A file over max_upload_bytes whose request is still under the body limit is refused after reading.
    over = served.client.post("/search/image", files={"file": ("q.png", b"0" * 3_001, "image/png")})
    assert_error(over, 413, "payload_too_large", "over 3000 bytes")


def test_each_route_limits_its_body_to_what_it_can_carry(served: Served) -> None:
    """A vector route takes about one vector's worth of JSON, not the image routes' megabytes (issue 16, item 5)."""
    limits = BodyLimits(served.spec)
    vector_limit = limits.of("/search/vector", DIM)
    batch_limit = limits.of("/search/vectors", DIM)
    assert vector_limit < 8 * 1024 < batch_limit < json_body_limit(served.spec)
    assert batch_limit == served.spec.max_query_vectors * limits.vector_bytes(DIM) + 4 * 1024
    # The longest legitimate bodies pass: every float written at full length.
    widest = -1.2345678901234567e-308
    assert served.client.post("/search/vector", json={"vector": [widest] * DIM, "k": 3}).status_code == 200
    full_batch = {"vectors": [[widest] * DIM] * served.spec.max_query_vectors, "k": 3}
    assert served.client.post("/search/vectors", json=full_batch).status_code == 200
    # One vector's route refuses a body a little over its own limit, before reading it.
    padded = b'{"vector": [' + b"0.1, " * (vector_limit // 5) + b"0.1]}"
    response = served.client.post("/search/vector", content=padded, headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large", f"the limit for /search/vector is {vector_limit}")
    assert all(shard.params == [] or len(shard.params) == 2 for shard in served.shards)


def test_a_streamed_body_without_a_length_is_cut_at_the_limit(served: Served) -> None:
    limit = BodyLimits(served.spec).of("/search/vector", DIM)

    def chunks() -> Iterator[bytes]:
        yield b'{"vector": ['
        for _ in range(limit // 4_000 + 2):
            yield b"0.1, " * 800
        yield b"0.1]}"

    response = served.client.post("/search/vector", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {key.lower() for key in response.request.headers}
    assert_error(response, 413, "payload_too_large", f"over {limit} bytes")


# --------------------------------------------------------------------------- items, thumbnails, version


def test_item_and_thumbnail(served: Served) -> None:
    item = served.client.get("/items/12")
    assert item.json() == {
        "model": {"name": MODEL.name, "version": MODEL.version, "uri": MODEL.uri},
        "index_version": VERSION,
        "item": {"id": 12, **ITEMS[12]},
    }
    thumbnail = served.client.get("/items/12/thumbnail")
    assert thumbnail.status_code == 200
    assert thumbnail.headers["content-type"] == "image/png"
    assert thumbnail.content == THUMBNAILS[12]
    assert Image.open(io.BytesIO(thumbnail.content)).size == (6, 6)
    assert_error(served.client.get("/items/7/thumbnail"), 404, "not_found", "no thumbnail for id 7")
    assert_error(served.client.get("/items/400/thumbnail"), 404, "not_found", "400")
    assert_error(served.client.get("/items/x/thumbnail"), 422, "validation_error", "path.item_id")


def test_an_index_without_thumbnails_links_none_and_answers_404() -> None:
    for served in serve(thumbnails=False):
        reply = served.client.post("/search/id", json={"id": 2, "k": 3}).json()
        assert all("thumbnail_url" not in hit for hit in reply["results"])
        assert_error(served.client.get("/items/2/thumbnail"), 404, "not_found", "without thumbnails")


def test_version_says_whether_text_queries_can_be_answered() -> None:
    for served in serve():
        version = served.client.get("/version").json()
        assert (version["index_version"], version["model"]["uri"], version["text_queries"]) == (
            VERSION,
            MODEL.uri,
            False,
        )
        assert version["manifest"]["thumbnails"] is True
    for served in serve(gallery={"dataset": "digit_pairs", "modality": "image"}):
        assert served.client.get("/version").json()["text_queries"] is True


# --------------------------------------------------------------------------- health, readiness, deadlines


def test_readyz_is_200_when_every_shard_holds_the_version_else_503(served: Served) -> None:
    ready = served.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["index_version"] == VERSION
    served.shards[1].versions = ["v-other"]
    not_ready = served.client.get("/readyz")
    body = assert_error(not_ready, 503, "not_ready", "shards 1 not ready", VERSION)
    assert body["ready"] is False and [shard["ready"] for shard in body["shards"]] == [True, False]
    assert served.client.get("/healthz").json() == {"status": "ok"}


def test_a_dead_or_late_shard_gives_503_504_or_a_partial_answer() -> None:
    for served in serve(on_shard_timeout="error", shard_timeout_s=0.2):
        served.shards[1].dead = True
        assert_error(served.client.post("/search/id", json={"id": 3}), 503, "shard_unavailable", "retry later")
    for served in serve(on_shard_timeout="error", shard_timeout_s=0.2):
        served.shards[0].hang = True
        response = served.client.post("/search/vector", json={"vector": VECTORS[30].tolist()})
        assert_error(response, 504, "shard_timeout", "shard 0 did not answer within 0.2 s")
    for served in serve(on_shard_timeout="partial", shard_timeout_s=0.2):
        served.shards[0].hang = True
        reply = served.client.post("/search/vector", json={"vector": VECTORS[30].tolist(), "k": 3}).json()
        assert (reply["partial"], reply["missing_shards"]) == (True, [0])
        assert [hit["id"] for hit in reply["results"]] == [
            item_id for item_id, _ in sorted(((i, float(VECTORS[30] @ VECTORS[i])) for i in range(20, 40)),
                                             key=lambda pair: -pair[1])[:3]
        ]  # fmt: skip


# --------------------------------------------------------------------------- metrics


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_count_requests_by_route_template_and_status(served: Served) -> None:
    client = served.client
    for item_id in (1, 2, 3):
        assert client.get(f"/items/{item_id}").status_code == 200
    assert client.get("/items/999").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert client.post("/search/vector", json={"vector": [0.2] * DIM}).status_code == 200
    assert client.get("/search/vector").status_code == 405
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE
    counts = samples(response.text, "retrieval_requests_total")
    assert counts[(("endpoint", "/items/{item_id}"), ("status", "200"))] == 3
    assert counts[(("endpoint", "/items/{item_id}"), ("status", "404"))] == 1
    assert counts[(("endpoint", "unmatched"), ("status", "404"))] == 1
    assert counts[(("endpoint", "/search/vector"), ("status", "200"))] == 1
    assert counts[(("endpoint", "/search/vector"), ("status", "405"))] == 1
    latency = samples(response.text, "retrieval_request_seconds_count")
    assert latency[(("endpoint", "/items/{item_id}"),)] == 4
    info = samples(response.text, "retrieval_index_info")
    # The model's name and version, not its URI: an open route must not show a server path.
    assert info == {(("index_version", VERSION), ("model", f"{MODEL.name}/{MODEL.version}")): 1.0}
    again = samples(client.get("/metrics").text, "retrieval_requests_total")
    assert again[(("endpoint", "/metrics"), ("status", "200"))] == 1


def test_metrics_exported_by_ray_are_not_served_by_one_replica(recorder: Any, recorded: ServingMetrics) -> None:
    # Under Serve the sink has no text of its own (RayServeSink): every node's metrics agent exports it.
    for served in serve(metrics=recorded):
        response = served.client.get("/metrics")
        assert_error(response, 404, "not_found", "exported by the Ray metrics agent of every node")
        assert "ray_retrieval_*" in response.json()["error"]["message"]
        assert served.client.get("/items/1").status_code == 200
    # The requests are still recorded, into the sink the app was given.
    assert recorder.count("retrieval_requests", endpoint="/items/{item_id}", status="200") == 1
    assert recorder.count("retrieval_requests", endpoint="/metrics", status="404") == 1
    assert len(recorder.observed("retrieval_request_seconds", endpoint="/items/{item_id}")) == 1


# --------------------------------------------------------------------------- auth and CORS


def test_query_routes_need_the_token_when_one_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret-query-token-0123")
    for served in serve(query_token_env=TOKEN_ENV):
        client = served.client
        anonymous = client.post("/search/vector", json={"vector": [0.1] * DIM})
        assert_error(anonymous, 401, "unauthorized", "Authorization: Bearer")
        assert anonymous.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/items/1", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized", "the query token is not valid")
        # Refused before the body is parsed: an anonymous caller learns nothing about the schema.
        malformed = client.post("/search/vector", content=b"{oops", headers={"Content-Type": "application/json"})
        assert_error(malformed, 401, "unauthorized")
        for path in ("/version", "/items/1/thumbnail"):
            assert_error(client.get(path), 401, "unauthorized")
        granted = {"Authorization": "Bearer s3cret-query-token-0123"}
        assert client.post("/search/vector", json={"vector": [0.1] * DIM}, headers=granted).status_code == 200
        assert client.get("/items/1/thumbnail", headers=granted).status_code == 200
        assert client.get("/version", headers=granted).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/", "/ui/app.js", "/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path
        monkeypatch.delenv(TOKEN_ENV)
        assert_error(client.get("/items/1", headers=granted), 403, "forbidden", f"set {TOKEN_ENV}")


def test_without_a_query_token_the_routes_are_open(served: Served) -> None:
    assert served.client.get("/version").status_code == 200
    assert served.client.post("/search/id", json={"id": 1}).status_code == 200


def test_cors_preflight_allows_the_configured_origin_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret-query-token-0123")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    for served in serve(cors_origins=[ORIGIN], query_token_env=TOKEN_ENV):
        allowed = served.client.options("/search/vector", headers={"Origin": ORIGIN, **preflight})
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert {"GET", "POST"} <= set(re.split(r",\s*", allowed.headers["access-control-allow-methods"]))
        assert {"authorization", "content-type"} <= {
            header.lower() for header in re.split(r",\s*", allowed.headers["access-control-allow-headers"])
        }
        refused = served.client.options("/search/vector", headers={"Origin": "http://evil.test", **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        # The real request carries the header too, so the browser lets the page read the reply (even a 401).
        denied = served.client.post("/search/id", json={"id": 1}, headers={"Origin": ORIGIN})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    for served in serve():
        plain = served.client.options("/search/vector", headers={"Origin": ORIGIN, **preflight})
        assert "access-control-allow-origin" not in plain.headers


# --------------------------------------------------------------------------- the page and the schema


def test_the_page_and_its_files_are_served_from_the_package(served: Served) -> None:
    page = served.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="ui/app.js"' in page.text and 'href="ui/style.css"' in page.text
    package = resources.files("retrieval.serving").joinpath("page")
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = served.client.get(f"/ui/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert response.content == package.joinpath(name).read_bytes()
    assert_error(served.client.get("/ui/secrets.txt"), 404, "not_found", "no page file 'secrets.txt'")


def test_the_page_loads_nothing_from_elsewhere() -> None:
    package = resources.files("retrieval.serving").joinpath("page")
    for name in ("index.html", "app.js", "style.css"):
        text = package.joinpath(name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.IGNORECASE), name
        assert "@import" not in text and 'fetch("/' not in text and "fetch('/" not in text, name


def test_openapi_documents_bodies_statuses_and_security(monkeypatch: pytest.MonkeyPatch) -> None:
    for served in serve():
        schema = served.client.get("/openapi.json").json()
        paths = schema["paths"]
        assert set(paths) >= {
            "/search",
            "/search/vector",
            "/search/vectors",
            "/search/image",
            "/search/id",
            "/search/text",
            "/items/{item_id}",
            "/items/{item_id}/thumbnail",
            "/healthz",
            "/readyz",
            "/version",
            "/metrics",
        }
        assert "/" not in paths and "/ui/{name}" not in paths
        upload = paths["/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert upload["required"] == ["file"] and set(upload["properties"]) == {"file", "k", "nprobe", "ef_search"}
        vector = paths["/search/vector"]["post"]
        assert set(vector["responses"]) == {"200", "400", "413", "422", "503", "504"}
        assert vector["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SearchReply")
        assert vector["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorReply")
        assert "security" not in vector
        assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
        assert "image/png" in paths["/items/{item_id}/thumbnail"]["get"]["responses"]["200"]["content"]
    monkeypatch.setenv(TOKEN_ENV, "t")
    for served in serve(query_token_env=TOKEN_ENV):
        paths = served.client.get("/openapi.json").json()["paths"]
        assert paths["/search/vector"]["post"]["security"] == [{"bearer": []}]
        assert {"401", "403"} <= set(paths["/search/vector"]["post"]["responses"])
        assert "security" not in paths["/healthz"]["get"]


def test_errors_keep_one_json_shape(served: Served) -> None:
    client = served.client
    assert_error(client.post("/search/vector", json={"vector": [0.1] * 3}), 400, "bad_request", "3 dimensions")
    assert_error(client.post("/search", json={"id": 1, "text": "x"}), 422, "validation_error", "exactly one")
    assert_error(client.post("/search/text", json={"text": "unknown words"}), 400, "bad_request", "knows only")
    not_image = client.post("/search/image", files={"file": ("q.png", b"plain text", "image/png")})
    assert_error(not_image, 400, "not_an_image")
    assert_error(client.post("/search/image", data={"k": "3"}), 422, "validation_error", "body.file")
    assert_error(
        client.post("/search/image", files={"file": ("q.png", png_of_id(1), "image/png")}, data={"k": "9" * 40}),
        422,
        "validation_error",
        "body.k",
    )
    assert_error(client.post("/search/id", json={"id": 1000}), 404, "not_found", "no item with id 1000")
    assert_error(client.get("/nowhere"), 404, "not_found", "/nowhere")


def test_a_token_ending_in_a_newline_still_works_and_a_short_one_disables_the_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A secret mounted from a file ends in a newline; a short token is refused as configuration (issue 16)."""
    for served in serve(query_token_env=TOKEN_ENV):
        monkeypatch.setenv(TOKEN_ENV, "s3cret-query-token-0123\n")
        granted = {"Authorization": "Bearer s3cret-query-token-0123"}
        assert served.client.get("/version", headers=granted).status_code == 200
        monkeypatch.setenv(TOKEN_ENV, "short-token")
        short = served.client.get("/version", headers={"Authorization": "Bearer short-token"})
        assert_error(short, 403, "forbidden", f"the token in {TOKEN_ENV} is shorter than 16 characters")


def test_a_route_that_declares_no_access_is_protected_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route added to the app without an access level needs the query token (issue 15)."""
    monkeypatch.setenv(TOKEN_ENV, "s3cret-query-token-0123")
    spec = ServingSpec(index="unused", query_token_env=TOKEN_ENV)
    shards = [FakeShard(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE - 1) for shard in range(COUNT // SHARD_SIZE)]
    api = build_http_api(SearchService(manifest=manifest(), spec=spec, shards=shards, embedder=FakeEmbedder()))

    @api.get("/added-later")
    async def added_later() -> dict[str, str]:
        return {"secret": "yes"}

    with TestClient(api) as client:
        assert_error(client.get("/added-later"), 401, "unauthorized", "Authorization: Bearer")
        granted = client.get("/added-later", headers={"Authorization": "Bearer s3cret-query-token-0123"})
        assert granted.json() == {"secret": "yes"}


# --------------------------------------------------------------------------- the Python client (issue 18)


class RecordingAdmin:
    """The swap controller's routes' other side: records what it was asked and answers like the real one."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def swap(self, index: str) -> dict[str, Any]:
        self.calls.append(f"swap {index}")
        return {"from": VERSION, "to": index, "model": {}, "duration_s": 0.5, "replicas": {}}

    async def abort(self) -> dict[str, Any]:
        self.calls.append("abort")
        return {"active": VERSION, "prepared": None, "retiring": None, "replicas": {}}

    async def status(self) -> dict[str, Any]:
        self.calls.append("status")
        return {"active": VERSION, "prepared": None, "retiring": None, "replicas": {}}


@contextmanager
def running(*, admin: RecordingAdmin | None = None, **spec_fields: Any) -> Iterator[tuple[str, list[FakeShard]]]:
    """The API on a real HTTP server (uvicorn, 127.0.0.1, a free port) in a thread."""
    with running_api(admin=admin, **spec_fields) as (url, shards, _):
        yield url, shards


@contextmanager
def running_api(
    *, admin: RecordingAdmin | None = None, **spec_fields: Any
) -> Iterator[tuple[str, list[FakeShard], Any]]:
    """`running`, and the FastAPI application it serves."""
    import uvicorn

    spec = ServingSpec(index="unused", max_k=20, default_k=5, max_upload_bytes=3_000, **spec_fields)
    shards = [FakeShard(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE - 1) for shard in range(COUNT // SHARD_SIZE)]
    service = SearchService(manifest=manifest(), spec=spec, shards=shards, embedder=FakeEmbedder())
    api = build_http_api(service, admin=admin)
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", shards, api
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_client_answers_every_query_kind_like_brute_force() -> None:
    from retrieval.client import RetrievalClient

    with running() as (url, _), RetrievalClient(url) as client:
        result = client.search_vector(VECTORS[3].tolist(), k=4)
        assert [(hit.id, round(hit.score, 5)) for hit in result.hits] == [
            (item_id, round(score, 5)) for item_id, score in brute_force(VECTORS[3], 4)
        ]
        assert (result.index_version, result.model.name, result.partial) == (VERSION, MODEL.name, False)
        assert result.hits[0].fields["label"] == ITEMS[result.hits[0].id]["label"]
        assert [hit.id for hit in client.search_id(3, k=3).hits] == [i for i, _ in brute_force(VECTORS[3], 3, 3)]
        assert client.search_image(png_of_id(9), k=2).hits[0].id == 9
        assert [hit.id for hit in client.search_text(TEXT_QUERY, k=2).hits] == [
            i for i, _ in brute_force(VECTORS[17], 2)
        ]
        batch = client.search_vectors([VECTORS[1].tolist(), VECTORS[2].tolist()], k=2)
        assert [[hit.id for hit in hits] for hits in batch.hits] == [
            [i for i, _ in brute_force(VECTORS[1], 2)],
            [i for i, _ in brute_force(VECTORS[2], 2)],
        ]
        assert client.item(5).fields == {"id": 5, **ITEMS[5]}
        assert client.version().index_version == VERSION
        assert client.readiness().ready


def test_the_client_has_a_method_for_every_route_and_each_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: the client cannot drift from the API. Every public client method is called here (a new one
    fails the first assertion until it is), and every route of the application (but the page's) must be hit."""
    import httpx
    from fastapi.routing import APIRoute

    from retrieval.client import RetrievalClient

    sent: list[tuple[str, str]] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append((request.method, request.url.path))
            return super().handle_request(request)

    monkeypatch.setenv("TEST_CLIENT_ADMIN_TOKEN", "s3cret-admin-token-0123")
    admin = RecordingAdmin()
    with running_api(admin=admin, admin_token_env="TEST_CLIENT_ADMIN_TOKEN") as (url, _, api):
        client = RetrievalClient(url, admin_token="s3cret-admin-token-0123", transport=Recording())
        calls: dict[str, Any] = {
            "search_vector": lambda: client.search_vector(VECTORS[3].tolist(), k=4).hits[0].id == 3,
            "search_vectors": lambda: (
                [hits[0].id for hits in client.search_vectors(VECTORS[:2].tolist()).hits] == [0, 1]
            ),
            "search_id": lambda: 3 not in [hit.id for hit in client.search_id(3, k=4).hits],
            "search_text": lambda: client.search_text(TEXT_QUERY, k=1).hits[0].id == 17,
            "search_image": lambda: client.search_image(png_of_id(9), k=1).hits[0].id == 9,
            "search": lambda: (
                [
                    client.search(vector=VECTORS[5].tolist(), k=1).hits[0].id,
                    client.search(item_id=5, k=1).hits[0].id != 5,
                    client.search(text=TEXT_QUERY, k=1).hits[0].id,
                    client.search(image=png_of_id(12), k=1).hits[0].id,
                ]
                == [5, True, 17, 12]
            ),
            "item": lambda: client.item(5).fields == {"id": 5, **ITEMS[5]},
            "thumbnail": lambda: Image.open(io.BytesIO(client.thumbnail(5))).format == "PNG",
            "version": lambda: client.version().index_version == VERSION,
            "health": lambda: client.health() is True,
            "readiness": lambda: client.readiness().ready,
            "metrics": lambda: "search" in client.metrics(),
            "swap": lambda: client.swap("v-next")["to"] == "v-next",
            "abort_swap": lambda: client.abort_swap()["active"] == VERSION,
            "swap_status": lambda: client.swap_status()["active"] == VERSION,
        }
        public = {name for name in dir(RetrievalClient) if not name.startswith("_") and name != "close"}
        assert public == set(calls), f"call every client method here: {sorted(public ^ set(calls))}"
        with client:
            answers = {name: call() for name, call in calls.items()}
        assert [name for name, answer in answers.items() if answer is not True] == []
        assert admin.calls == ["swap v-next", "abort", "status"]
        routes = [route for route in api.routes if isinstance(route, APIRoute) and route.include_in_schema]
        unreached = [
            f"{method} {route.path}"
            for route in routes
            for method in route.methods
            if not any(verb == method and route.path_regex.match(path) for verb, path in sent)
        ]
        assert unreached == [], f"routes without a client method: {unreached}"


def test_the_async_client_has_the_sync_clients_methods() -> None:
    import inspect

    from retrieval.client import AsyncRetrievalClient, RetrievalClient

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(getattr(cls, name))
            for name in dir(cls)
            if not name.startswith("_") and callable(getattr(cls, name))
        }

    sync, asynchronous = public(RetrievalClient), public(AsyncRetrievalClient)
    assert sync.keys() == asynchronous.keys()
    for name, signature in sync.items():
        assert inspect.iscoroutinefunction(getattr(AsyncRetrievalClient, name)), name
        assert list(signature.parameters) == list(asynchronous[name].parameters), name


def test_admin_calls_need_the_admin_token_and_a_redirect_is_never_followed() -> None:
    import http.server

    from retrieval.client import ApiError, RetrievalClient, Unauthorized

    with running() as (url, _), RetrievalClient(url) as client, pytest.raises(Unauthorized, match="admin_token="):
        client.swap_status()

    seen: list[str | None] = []

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with (
            RetrievalClient(url, token="query-token-0123456") as client,
            pytest.raises(ApiError, match=r"HTTP 307 redirecting to http://127.0.0.1:9/steal; not following"),
        ):
            client.version()
    finally:
        server.shutdown()
    assert seen == ["Bearer query-token-0123456"]  # one request: the redirect was not followed


def test_search_takes_exactly_one_query() -> None:
    from retrieval.client import BadRequest, RetrievalClient

    with RetrievalClient("http://127.0.0.1:9") as client:
        with pytest.raises(BadRequest, match=r"exactly one of .* got \['vector', 'text'\]"):
            client.search(vector=[0.0], text="a seven")
        with pytest.raises(BadRequest, match="got none"):
            client.search()


def test_the_client_maps_each_error_to_its_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.client import BadRequest, NotFound, RetrievalClient, Unauthorized, Unavailable

    monkeypatch.setenv(TOKEN_ENV, "s3cret-query-token-0123")
    with running(query_token_env=TOKEN_ENV, on_shard_timeout="error") as (url, shards):
        with RetrievalClient(url) as anonymous, pytest.raises(Unauthorized) as refused:
            anonymous.search_id(1)
        assert (refused.value.status, refused.value.type) == (401, "unauthorized")
        with RetrievalClient(url, token="s3cret-query-token-0123\n", retries=1) as client:
            with pytest.raises(BadRequest, match=r"HTTP 400 bad_request: .*8") as bad:
                client.search_vector([0.1, 0.2])
            assert bad.value.type == "bad_request"
            with pytest.raises(NotFound):
                client.item(COUNT + 5)
            shards[1].dead = True
            with pytest.raises(Unavailable) as unavailable:
                client.search_id(3)
            assert unavailable.value.status == 503
            assert not client.readiness().ready
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with RetrievalClient(nowhere, retries=1) as gone, pytest.raises(Unavailable, match="no reply"):
        gone.search_id(1)


def test_the_async_client_answers_and_raises_the_same() -> None:
    from retrieval.client import AsyncRetrievalClient, BadRequest

    async def scenario(url: str) -> None:
        async with AsyncRetrievalClient(url) as client:
            results = await asyncio.gather(*(client.search_id(item_id, k=3) for item_id in range(6)))
            for item_id, result in enumerate(results):
                assert [hit.id for hit in result.hits] == [i for i, _ in brute_force(VECTORS[item_id], 3, item_id)]
            assert (await client.search_image(png_of_id(11), k=1)).hits[0].id == 11
            with pytest.raises(BadRequest):
                await client.search_vector([1.0], k=3)

    with running() as (url, _):
        asyncio.run(scenario(url))


def test_retrieval_search_prints_the_hits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from retrieval.cli import main

    image = tmp_path / "query.png"
    image.write_bytes(png_of_id(9))
    monkeypatch.setenv("MY_QUERY_TOKEN", "s3cret-query-token-0123")
    monkeypatch.setenv(TOKEN_ENV, "s3cret-query-token-0123")
    with running(query_token_env=TOKEN_ENV) as (url, _):
        assert main(["search", "--url", url, "--image", str(image), "-k", "2", "--token-env", "MY_QUERY_TOKEN"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"index {VERSION}, model {MODEL.name} version {MODEL.version}"
        assert out[1].startswith("  1. id 9 ") and f"label={ITEMS[9]['label']}" in out[1] and len(out) == 3
        argv = [
            "search",
            "--url",
            url,
            "--vector",
            json.dumps(VECTORS[4].tolist()),
            "--json",
            "--token-env",
            "MY_QUERY_TOKEN",
        ]
        assert main(argv) == 0
        reply = json.loads(capsys.readouterr().out)
        assert [hit["id"] for hit in reply["hits"]] == [i for i, _ in brute_force(VECTORS[4], 5)]
        assert main(["search", "--url", url, "--id", "3"]) == 2
        assert "HTTP 401 unauthorized" in capsys.readouterr().err
        assert main(["search", "--url", url, "--id", "3", "--param", "nprobe", "--token-env", "MY_QUERY_TOKEN"]) == 2
        assert "expected KEY=INTEGER" in capsys.readouterr().err
