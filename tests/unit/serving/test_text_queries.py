"""Text queries and binary (Hamming) indices in the search service, its HTTP API and the embedder.

Shards are the real `ShardDeployment` classes over indices built with `build_shards`, called
in-process; the embedder is a stand-in that maps each known text to a fixed ±1 code, so every
answer has a brute-force reference. The HTTP API is driven through its ASGI interface (httpx,
which FastAPI's TestClient needs, is not installed).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError, IndexIntegrityError
from retrieval.index.manifest import IndexManifest, ModelRef, read_manifest
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import build_shards
from retrieval.models.codes import pack_codes
from retrieval.serving.clients import LocalShardClient
from retrieval.serving.deployments import EmbedderDeployment
from retrieval.serving.errors import PayloadTooLargeError, VersionNotLoadedError
from retrieval.serving.http import build_http_api
from retrieval.serving.images import decode_image
from retrieval.serving.replies import ShardHits
from retrieval.serving.service import MAX_TEXT_CHARS, SearchService
from retrieval.serving.shard_host import ShardHost

BITS = 16
COUNT = 50
MODEL = ModelRef(name="pairs-hashing", version="2", uri="models:/pairs-hashing/2")
QUERY_TEXTS = ["a three next to a seven", "two ones", "a nine"]


def sign_codes(count: int, seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random((count, BITS)) < 0.5, -1.0, 1.0).astype(np.float32)


TEXT_CODES = dict(zip(QUERY_TEXTS, sign_codes(len(QUERY_TEXTS), seed=99), strict=True))


EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="text-query-shards")


class InProcessShard(LocalShardClient):
    """The local layout's shard client over a `ShardHost`, recording the queries it is given."""

    def __init__(self, host: ShardHost, shard: int) -> None:
        super().__init__(host, shard, EXECUTOR)
        self.queries: list[np.ndarray] = []

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        self.queries.append(queries)
        return await super().search(queries, k, index_version, params)


async def as_json(reply: Awaitable[Any]) -> dict[str, Any]:
    """A service reply as the JSON the API sends."""
    answered: dict[str, Any] = (await reply).to_json()
    return answered


class CodeEmbedder:
    """`EmbedderClient`: a known text gives its code; an image gives the code of the gallery id
    in its first pixel's red value; ``images_only`` refuses texts as an image-only model does."""

    remote = True

    def __init__(self, gallery: np.ndarray, *, images_only: bool = False) -> None:
        self.gallery = gallery
        self.images_only = images_only
        self.texts: list[tuple[str, str]] = []

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        return self.gallery[decode_image(image_bytes).getpixel((0, 0))[0]]

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        self.texts.append((text, index_version))
        if self.images_only:
            raise BadRequestError(
                f"model {MODEL.uri} (triplet) embeds images only; text queries need a cross-modal model"
            )
        return TEXT_CODES[text]


@dataclass
class Served:
    service: SearchService
    codes: np.ndarray
    shards: list[InProcessShard]
    embedder: CodeEmbedder
    manifest: IndexManifest


def serve_index(path: Path, codes: np.ndarray, *, images_only: bool = False) -> Served:
    spec = ServingSpec(index=str(path), max_k=30, default_k=5, max_upload_bytes=5_000)
    manifest, _ = read_manifest(path)
    host = ShardHost(spec=spec)
    host.prepare(str(path))
    shards = [InProcessShard(host, info.shard) for info in manifest.shards]
    embedder = CodeEmbedder(codes, images_only=images_only)
    service = SearchService(manifest=manifest, spec=spec, shards=shards, embedder=embedder)
    return Served(service=service, codes=codes, shards=shards, embedder=embedder, manifest=manifest)


@pytest.fixture
def binary(tmp_path: Path) -> Served:
    codes = sign_codes(COUNT, seed=1)
    path = build_shards(
        vectors=pack_codes(codes),
        ids=np.arange(COUNT),
        items=[{"source": f"pairs:{item_id}", "labels": [str(item_id % 10)]} for item_id in range(COUNT)],
        out_root=tmp_path / "binary",
        num_shards=3,
        metric="hamming",
        model=MODEL,
        gallery={"dataset": "digit_pairs"},
        modality="image",
    )
    return serve_index(path, codes)


def brute_force_hamming(codes: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None) -> list[list[int]]:
    """Top-k ``[distance, id]``: differing signs counted in a loop, ties by ascending id."""
    pairs = []
    for item_id, code in enumerate(codes.tolist()):
        if item_id != exclude:
            pairs.append([sum(1 for a, b in zip(code, query.tolist(), strict=True) if (a > 0) != (b > 0)), item_id])
    return sorted(pairs)[:k]


def hits(reply: dict[str, Any]) -> list[list[int]]:
    return [[result["distance"], result["id"]] for result in reply["results"]]


def test_text_query_on_a_binary_index_equals_brute_force_hamming(binary: Served) -> None:
    reply = asyncio.run(as_json(binary.service.search_text("a three next to a seven", 12)))
    assert hits(reply) == brute_force_hamming(binary.codes, TEXT_CODES["a three next to a seven"], 12)
    assert reply["model"] == {"name": MODEL.name, "version": MODEL.version, "uri": MODEL.uri}
    assert (reply["index_version"], reply["modality"], reply["k"]) == (binary.manifest.index_version, "image", 12)
    for result in reply["results"]:
        assert result["score"] == 1.0 - 2.0 * result["distance"] / BITS
        assert result["source"] == f"pairs:{result['id']}" and result["labels"] == [str(result["id"] % 10)]
    # The embedder was asked with the pinned version, and the shards got packed codes.
    assert binary.embedder.texts == [("a three next to a seven", binary.manifest.index_version)]
    assert all(
        queries.dtype == np.uint8 and queries.shape == (1, BITS // 8)
        for shard in binary.shards
        for queries in shard.queries
    )


def test_vector_queries_on_a_binary_index_take_signs(binary: Served) -> None:
    real = np.random.default_rng(5).standard_normal(BITS)
    reply = asyncio.run(as_json(binary.service.search_vector(real.tolist(), 9)))
    assert hits(reply) == brute_force_hamming(binary.codes, real, 9)
    with pytest.raises(BadRequestError, match=r"vector has 15 values, the binary index expects 16 \(one per code bit"):
        asyncio.run(as_json(binary.service.search_vector(real[:15].tolist(), 5)))


def test_id_and_image_queries_on_a_binary_index(binary: Served) -> None:
    reply = asyncio.run(as_json(binary.service.search_id(17, 6)))
    assert hits(reply) == brute_force_hamming(binary.codes, binary.codes[17], 6, exclude=17)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (23, 0, 0)).save(buffer, format="PNG")
    reply = asyncio.run(as_json(binary.service.search_image(buffer.getvalue(), 4)))
    assert hits(reply)[0] == [0, 23]
    assert hits(reply) == brute_force_hamming(binary.codes, binary.codes[23], 4)


def test_float_index_replies_keep_their_shape_and_say_the_modality(tmp_path: Path) -> None:
    vectors = np.random.default_rng(2).standard_normal((COUNT, BITS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = build_shards(
        vectors=vectors,
        ids=np.arange(COUNT),
        items=[{"caption": f"caption {item_id}", "owner": item_id // 5} for item_id in range(COUNT)],
        out_root=tmp_path / "float",
        num_shards=2,
        model=MODEL,
        gallery={},
        modality="text",
    )
    served = serve_index(path, vectors)
    reply = asyncio.run(as_json(served.service.search_text("two ones", 5)))
    scores = vectors.astype(np.float64) @ TEXT_CODES["two ones"].astype(np.float64)
    assert [result["id"] for result in reply["results"]] == np.argsort(-scores, kind="stable")[:5].tolist()
    assert reply["modality"] == "text"
    assert all(set(result) == {"id", "score", "caption", "owner"} for result in reply["results"])


def test_text_query_checks(binary: Served, tmp_path: Path) -> None:
    for blank in ("", "   \n\t"):
        with pytest.raises(BadRequestError, match="text is empty"):
            asyncio.run(as_json(binary.service.search_text(blank, 5)))
    with pytest.raises(PayloadTooLargeError, match=f"text has {MAX_TEXT_CHARS + 1} characters, the limit is"):
        asyncio.run(as_json(binary.service.search_text("a" * (MAX_TEXT_CHARS + 1), 5)))
    with pytest.raises(BadRequestError, match="k must be between 1 and 30"):
        asyncio.run(as_json(binary.service.search_text("a nine", 31)))
    assert binary.embedder.texts == []


# --------------------------------------------------------------------------- HTTP


def asgi_call(app: Any, method: str, path: str, *, body: dict[str, Any]) -> tuple[int, Any]:
    """One JSON request through an ASGI app: (status, JSON body)."""
    messages: list[dict[str, Any]] = []
    payload = json.dumps(body).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(message["status"] for message in messages if message["type"] == "http.response.start")
    content = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    return status, json.loads(content)


def test_http_text_search_on_both_routes(binary: Served) -> None:
    app = build_http_api(binary.service)
    expected = brute_force_hamming(binary.codes, TEXT_CODES["two ones"], 7)
    for path in ("/search", "/search/text"):
        status, reply = asgi_call(app, "POST", path, body={"text": "two ones", "k": 7})
        assert status == 200, reply
        assert hits(reply) == expected and reply["modality"] == "image"
    status, reply = asgi_call(app, "POST", "/search", body={"text": "a nine"})
    assert status == 200 and len(reply["results"]) == 5


def test_http_search_takes_every_query_kind(binary: Served) -> None:
    app = build_http_api(binary.service)
    status, by_vector = asgi_call(app, "POST", "/search", body={"vector": binary.codes[3].tolist(), "k": 4})
    assert status == 200 and hits(by_vector) == brute_force_hamming(binary.codes, binary.codes[3], 4)
    status, by_id = asgi_call(app, "POST", "/search", body={"id": 3, "k": 4})
    assert status == 200 and hits(by_id) == brute_force_hamming(binary.codes, binary.codes[3], 4, exclude=3)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (3, 0, 0)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    status, by_image = asgi_call(app, "POST", "/search", body={"image": image, "k": 4})
    assert status == 200 and hits(by_image) == hits(by_vector)


@pytest.mark.parametrize(
    ("body", "status", "error_type", "fragment"),
    [
        ({"text": ""}, 400, "bad_request", "text is empty"),
        ({"text": "  "}, 400, "bad_request", "text is empty"),
        ({"text": "x" * (MAX_TEXT_CHARS + 1)}, 413, "payload_too_large", f"the limit is {MAX_TEXT_CHARS}"),
        ({"text": "two ones", "vector": [1.0] * BITS}, 422, "validation_error", "got vector, text"),
        ({"k": 3}, 422, "validation_error", "give exactly one of vector, id, text, image; got none"),
        ({"text": 5}, 422, "validation_error", "body.text: Input should be a valid string"),
        ({"text": "a nine", "caption": "x"}, 422, "validation_error", "body.caption: Extra inputs are not permitted"),
        ({"image": "not base64!"}, 400, "bad_request", "image is not valid base64"),
        ({"image": "A" * 8_000}, 413, "payload_too_large", "the limit is 5000"),
        ({"vector": [1.0] * (BITS + 1)}, 400, "bad_request", "vector has 17 values, the binary index expects 16"),
    ],
)
def test_http_search_refuses_bad_queries(
    binary: Served, body: dict[str, Any], status: int, error_type: str, fragment: str
) -> None:
    reply_status, reply = asgi_call(build_http_api(binary.service), "POST", "/search", body=body)
    assert reply_status == status, reply
    assert set(reply) == {"error"} and reply["error"]["type"] == error_type
    assert fragment in reply["error"]["message"]
    assert binary.embedder.texts == []


def test_http_text_query_to_an_image_only_model_is_a_400_naming_the_problem(binary: Served, tmp_path: Path) -> None:
    binary.embedder.images_only = True
    status, reply = asgi_call(build_http_api(binary.service), "POST", "/search/text", body={"text": "two ones"})
    assert status == 400
    assert reply["error"]["type"] == "bad_request"
    assert "embeds images only" in reply["error"]["message"]


# --------------------------------------------------------------------------- the embedder deployment


class FakePackage:
    """The `ModelPackage` contract: ``code_bits``, ``dim``, ``embed_images``, ``embed_texts``."""

    def __init__(self, *, code_bits: int | None, dim: int = BITS) -> None:
        self.code_bits = code_bits
        self.dim = dim

    def embed_images(self, images: list[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        return np.ones((len(images), self.dim), np.float32)

    def embed_texts(self, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
        if self.code_bits is None and self.dim != BITS:
            raise BadRequestError("model fake embeds images only")
        return np.stack([TEXT_CODES[text] for text in texts])


def test_embedder_embeds_texts_with_the_pinned_version(
    binary: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = {
        "models:/pairs-hashing/2": FakePackage(code_bits=BITS),
        "models:/image-only/1": FakePackage(code_bits=None, dim=8),
    }
    monkeypatch.setattr("retrieval.tracking.registry.load_embedder", lambda uri, tracking_uri=None: packages[uri])
    path = Path(binary.service.spec.index)
    replica = EmbedderDeployment.func_or_class(spec=ServingSpec(index=str(path)))
    version = binary.manifest.index_version
    assert replica.embed_text("a nine", version).tolist() == TEXT_CODES["a nine"].tolist()
    with pytest.raises(VersionNotLoadedError, match="not v-unknown"):
        replica.embed_text("a nine", "v-unknown")

    # A binary index whose model gives real-valued embeddings is refused on load.
    image_only = ModelRef(name="image-only", version="1", uri="models:/image-only/1")
    wrong = build_shards(
        vectors=pack_codes(sign_codes(8, seed=0)), ids=np.arange(8), items=[{}] * 8, out_root=tmp_path / "wrong",
        num_shards=1, metric="hamming", model=image_only, gallery={},
    )  # fmt: skip
    with pytest.raises(IndexIntegrityError, match="holds 16-bit hash codes but model models:/image-only/1 gives real"):
        replica.prepare(str(wrong))

    # An image-only model answers a text query with the package's BadRequestError.
    floats = build_shards(
        vectors=np.eye(8, dtype=np.float32), ids=np.arange(8), items=[{}] * 8, out_root=tmp_path / "floats",
        num_shards=1, model=image_only, gallery={},
    )  # fmt: skip
    floats_version = replica.prepare(str(floats))
    with pytest.raises(BadRequestError, match="embeds images only"):
        replica.embed_text("a nine", floats_version)
