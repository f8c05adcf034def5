"""The search HTTP API in-process: real shards and FastAPI over uvicorn, no Ray cluster.

The shard replicas are the `ShardDeployment` classes themselves, called directly; the
embedder is a stand-in that reads a gallery id out of the uploaded image, so image search
has a brute-force answer. `test_app.py` runs the same API inside Ray Serve.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import uvicorn
from PIL import Image

from retrieval.config import ServingSpec
from retrieval.index import ModelRef, build_shards, read_manifest
from retrieval.index.search_params import SearchParams
from retrieval.serving.deployments import ShardDeployment
from retrieval.serving.errors import NotAnImageError, VersionNotLoadedError
from retrieval.serving.http import build_http_api
from retrieval.serving.images import decode_image
from retrieval.serving.replies import ShardHits
from retrieval.serving.service import SearchService

DIM = 8
COUNT = 60
MAX_UPLOAD_BYTES = 20_000
MODEL = ModelRef(name="digits-deep-metric", version="2", uri="models:/digits-deep-metric/2")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_of_id(item_id: int) -> bytes:
    """A PNG whose first pixel's red value is the gallery id (read back by `IdEmbedder`)."""
    image = Image.new("RGB", (4, 4), color=(item_id, 0, 0))
    return png_bytes(image)


class InProcessShard:
    """`ShardClient` calling a `ShardDeployment` instance directly, optionally misbehaving as a remote replica may."""

    remote = True

    def __init__(self, replica: Any) -> None:
        self.replica = replica
        self.refusals_left = 0
        self.answer_as: str | None = None

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        if self.refusals_left > 0:
            self.refusals_left -= 1
            raise VersionNotLoadedError(f"test replica does not hold {index_version}")
        reply: ShardHits = self.replica.search(queries, k, index_version, params)
        if self.answer_as is not None:
            reply = dataclasses.replace(reply, index_version=self.answer_as)
        return reply

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        return self.replica.vector(item_id, index_version)

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        return self.replica.item(item_id, index_version)


class IdEmbedder:
    """Decodes the upload like the real embedder, then returns the vector of the id it encodes."""

    remote = True

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        image = decode_image(image_bytes)
        return self.vectors[image.getpixel((0, 0))[0]]


@dataclass
class Served:
    url: str
    vectors: np.ndarray
    items: list[dict[str, str]]
    shards: list[InProcessShard]
    index_version: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((COUNT, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [{"label": str(item_id % 10), "source": f"synthetic:{item_id}"} for item_id in range(COUNT)]
    root = tmp_path_factory.mktemp("index")
    build_shards(
        vectors=vectors,
        ids=np.arange(COUNT),
        items=items,
        out_root=root,
        num_shards=3,
        model=MODEL,
        gallery={"dataset": "synthetic"},
    )
    spec = ServingSpec(index=str(root), max_k=20, default_k=5, max_upload_bytes=MAX_UPLOAD_BYTES)
    manifest, _ = read_manifest(root)
    shards = [InProcessShard(ShardDeployment.func_or_class(spec=spec, shard=info.shard)) for info in manifest.shards]
    service = SearchService(manifest=manifest, spec=spec, shards=shards, embedder=IdEmbedder(vectors))

    server = uvicorn.Server(uvicorn.Config(build_http_api(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(
        url=f"http://127.0.0.1:{port}",
        vectors=vectors,
        items=items,
        shards=shards,
        index_version=manifest.index_version,
    )
    server.should_exit = True
    thread.join(timeout=10)


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    scores = [(float(np.dot(query.astype(np.float64), vector)), item_id) for item_id, vector in enumerate(vectors)]
    ranked = sorted((pair for pair in scores if pair[1] != exclude), key=lambda pair: -pair[0])
    return [item_id for _, item_id in ranked[:k]]


def check_search_reply(served: Served, reply: dict[str, Any], expected_ids: list[int], k: int) -> None:
    assert reply["model"] == {"name": MODEL.name, "version": MODEL.version, "uri": MODEL.uri}
    assert reply["index_version"] == served.index_version
    assert reply["k"] == k
    assert [result["id"] for result in reply["results"]] == expected_ids
    for result in reply["results"]:
        assert result["label"] == served.items[result["id"]]["label"]
        assert result["source"] == served.items[result["id"]]["source"]
    scores = [result["score"] for result in reply["results"]]
    assert scores == sorted(scores, reverse=True)


def assert_error(response: requests.Response, status: int, error_type: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    for fragment in fragments:
        assert fragment in body["error"]["message"]


def test_vector_search_equals_brute_force(served: Served) -> None:
    query = np.random.default_rng(1).standard_normal(DIM)
    response = requests.post(f"{served.url}/search/vector", json={"vector": query.tolist(), "k": 7}, timeout=10)
    assert response.status_code == 200, response.text
    reply = response.json()
    check_search_reply(served, reply, brute_force(served.vectors, query.astype(np.float32), 7), k=7)
    expected_scores = [
        float(np.dot(query.astype(np.float32), served.vectors[result["id"]])) for result in reply["results"]
    ]
    np.testing.assert_allclose([result["score"] for result in reply["results"]], expected_scores, rtol=1e-5)

    default = requests.post(f"{served.url}/search/vector", json={"vector": query.tolist()}, timeout=10).json()
    assert default["k"] == 5 and len(default["results"]) == 5


def test_id_search_excludes_the_item(served: Served) -> None:
    reply = requests.post(f"{served.url}/search/id", json={"id": 23, "k": 6}, timeout=10).json()
    check_search_reply(served, reply, brute_force(served.vectors, served.vectors[23], 6, exclude=23), k=6)


def test_image_search_and_item_and_version(served: Served) -> None:
    response = requests.post(
        f"{served.url}/search/image",
        files={"file": ("q.png", image_of_id(41), "image/png")},
        data={"k": "4"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    check_search_reply(served, response.json(), brute_force(served.vectors, served.vectors[41], 4), k=4)

    item = requests.get(f"{served.url}/items/12", timeout=10).json()
    assert item == {
        "model": {"name": MODEL.name, "version": MODEL.version, "uri": MODEL.uri},
        "index_version": served.index_version,
        "item": {"id": 12, **served.items[12]},
    }
    version = requests.get(f"{served.url}/version", timeout=10).json()
    assert version["index_version"] == served.index_version
    assert version["model"] == MODEL.model_dump()
    assert version["manifest"]["num_items"] == COUNT and len(version["manifest"]["shards"]) == 3
    assert requests.get(f"{served.url}/healthz", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "fragments"),
    [
        ("/search/vector", {"vector": [0.1] * (DIM - 1)}, 400, "bad_request", ("7 dimensions", f"expects {DIM}")),
        ("/search/vector", {"vector": [0.1] * DIM, "k": 0}, 400, "bad_request", ("k must be between 1 and 20, got 0",)),
        ("/search/vector", {"vector": [0.1] * DIM, "k": -3}, 400, "bad_request", ("got -3",)),
        ("/search/vector", {"vector": [0.1] * DIM, "k": 21}, 400, "bad_request", ("between 1 and 20, got 21",)),
        ("/search/vector", {"vector": [0.1] * (DIM - 1) + [1e39]}, 400, "bad_request", ("non-finite", "position 7")),
        ("/search/vector", {"k": 3}, 422, "validation_error", ("body.vector: Field required",)),
        ("/search/vector", {"vector": ["a"] * DIM}, 422, "validation_error", ("body.vector.0",)),
        ("/search/vector", {"vector": [0.1] * DIM, "kk": 3}, 422, "validation_error", ("body.kk",)),
        ("/search/vector", {"vector": [0.1] * DIM, "k": 2.5}, 422, "validation_error", ("body.k",)),
        ("/search/vector", [0.1] * DIM, 422, "validation_error", ("body",)),
        ("/search/id", {"k": 3}, 422, "validation_error", ("body.id: Field required",)),
        ("/search/id", {"id": 10_000}, 404, "not_found", ("no item with id 10000",)),
        ("/search/id", {"id": -1}, 404, "not_found", ("no item with id -1",)),
        ("/search/id", {"id": 3, "k": 0}, 400, "bad_request", ("got 0",)),
    ],
)
def test_bad_json_requests_get_a_4xx_json_error(
    served: Served, path: str, body: Any, status: int, error_type: str, fragments: tuple[str, ...]
) -> None:
    assert_error(requests.post(served.url + path, json=body, timeout=10), status, error_type, *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('{"vector": [0.1, ', ("malformed JSON body",)),
        ('{"vector": [NaN, 1, 1, 1, 1, 1, 1, 1]}', ("non-finite", "position 0")),
        ('{"vector": [1, 1, 1, 1, 1, 1, 1, Infinity]}', ("non-finite", "position 7")),
        ('{"vector": [1, 1, 1, 1, 1, 1, 1, 1e999]}', ("non-finite",)),
    ],
)
def test_malformed_and_non_finite_json(served: Served, text: str, fragments: tuple[str, ...]) -> None:
    response = requests.post(
        f"{served.url}/search/vector", data=text, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert_error(
        response, 422 if "malformed JSON body" in fragments else 400, response.json()["error"]["type"], *fragments
    )
    assert response.json()["error"]["type"] in {"validation_error", "bad_request"}


def test_bad_uploads_get_a_4xx_json_error(served: Served) -> None:
    url = f"{served.url}/search/image"
    assert_error(
        requests.post(url, files={"file": ("q.png", b"definitely not a picture", "image/png")}, timeout=10),
        400,
        "not_an_image",
        "not an image in an accepted format (PNG, JPEG",
    )
    truncated = image_of_id(3)[:-20]
    assert_error(requests.post(url, files={"file": ("q.png", truncated, "image/png")}, timeout=10), 400, "not_an_image")
    assert_error(
        requests.post(url, files={"file": ("q.png", b"", "image/png")}, timeout=10), 400, "not_an_image", "empty"
    )
    assert_error(requests.post(url, data={"k": "3"}, timeout=10), 422, "validation_error", "body.file")
    assert_error(
        requests.post(url, files={"file": ("q.png", image_of_id(3), "image/png")}, data={"k": "x"}, timeout=10),
        422,
        "validation_error",
        "body.k",
    )
    assert_error(
        requests.post(url, files={"file": ("q.png", image_of_id(3), "image/png")}, data={"k": "99"}, timeout=10),
        400,
        "bad_request",
        "got 99",
    )
    # Just over the limit: the file is refused after reading, whatever Content-Length says.
    noise = np.random.default_rng(2).integers(0, 256, size=(90, 90, 3), dtype=np.uint8)
    big = png_bytes(Image.fromarray(noise))
    assert MAX_UPLOAD_BYTES < len(big) < MAX_UPLOAD_BYTES + 64 * 1024
    assert_error(requests.post(url, files={"file": ("q.png", big, "image/png")}, timeout=10), 413, "payload_too_large")
    # Far over the limit: refused from the Content-Length header, before parsing the form.
    assert_error(
        requests.post(url, files={"file": ("q.bin", b"0" * 200_000, "image/png")}, timeout=10),
        413,
        "payload_too_large",
        "the limit is 20000",
    )


def test_unknown_routes_and_items_use_the_same_error_shape(served: Served) -> None:
    assert_error(requests.get(f"{served.url}/items/99999", timeout=10), 404, "not_found", "no item with id 99999")
    assert_error(requests.get(f"{served.url}/items/abc", timeout=10), 422, "validation_error", "path.item_id")
    assert_error(requests.get(f"{served.url}/nowhere", timeout=10), 404, "not_found", "/nowhere")
    assert_error(requests.get(f"{served.url}/search/vector", timeout=10), 405, "method_not_allowed")
    # After all the bad requests above, the service still answers.
    assert requests.post(f"{served.url}/search/id", json={"id": 0, "k": 1}, timeout=10).status_code == 200


def test_a_shard_without_the_version_is_retried_then_refused(served: Served) -> None:
    served.shards[1].refusals_left = 2
    reply = requests.post(f"{served.url}/search/id", json={"id": 5, "k": 3}, timeout=10).json()
    assert [result["id"] for result in reply["results"]] == brute_force(served.vectors, served.vectors[5], 3, exclude=5)
    assert served.shards[1].refusals_left == 0

    served.shards[1].refusals_left = 3
    response = requests.post(f"{served.url}/search/id", json={"id": 5, "k": 3}, timeout=10)
    assert_error(response, 503, "version_unavailable", served.index_version, "3 attempts")
    assert served.shards[1].refusals_left == 0


def test_a_reply_for_another_version_is_never_merged(served: Served) -> None:
    served.shards[2].answer_as = "some-other-version"
    try:
        response = requests.post(f"{served.url}/search/vector", json={"vector": [0.5] * DIM}, timeout=10)
    finally:
        served.shards[2].answer_as = None
    assert_error(response, 503, "version_unavailable")


def test_shard_replica_refuses_a_version_it_does_not_hold(served: Served) -> None:
    replica = served.shards[0].replica
    assert replica.loaded_versions() == [served.index_version]
    with pytest.raises(VersionNotLoadedError, match="does not hold index version v-other"):
        replica.search(served.vectors[:1], 3, "v-other")
    with pytest.raises(VersionNotLoadedError):
        replica.item(0, "v-other")
    assert replica.item(10_000, served.index_version) is None
    assert replica.vector(10_000, served.index_version) is None


def test_decode_image_accepts_any_mode_and_refuses_non_images(tmp_path: Path) -> None:
    for mode in ("L", "RGBA", "P", "I;16"):
        decoded = decode_image(png_bytes(Image.new(mode, (5, 3))))
        assert (decoded.mode, decoded.size) == ("RGB", (5, 3))
    jpeg = io.BytesIO()
    Image.new("RGB", (6, 6), color=(10, 20, 30)).save(jpeg, format="JPEG")
    assert decode_image(jpeg.getvalue()).size == (6, 6)
    for bad in (b"", b"GIF89a but not really", image_of_id(1)[:30]):
        with pytest.raises(NotAnImageError):
            decode_image(bad)
