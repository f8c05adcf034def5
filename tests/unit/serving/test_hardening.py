"""What an attacker or a slow client can do to the search API (issue 16), in-process.

Each test names the item it covers: image bombs and formats (1), per-request Faiss settings (2),
500s that leak nothing (4), the body-read deadline (6). The API runs over the local layout's
own parts: a `ShardHost` searched through `LocalShardClient`, and an `EmbedderHost` (with a
stand-in model: loading a real one needs a model registry) through `LocalEmbedderClient`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.index import ModelRef, build_shards, read_manifest
from retrieval.index.search_params import SearchParams
from retrieval.serving import embedder_host
from retrieval.serving.clients import LocalEmbedderClient, LocalShardClient
from retrieval.serving.embedder_host import EmbedCall, EmbedderHost
from retrieval.serving.errors import NotAnImageError, PayloadTooLargeError
from retrieval.serving.http import build_http_api
from retrieval.serving.images import decode_image
from retrieval.serving.replies import ShardHits
from retrieval.serving.service import SearchService
from retrieval.serving.shard_host import ShardHost

DIM = 8
COUNT = 30


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A PNG of 9400 x 9400 one-bit pixels: about 11 KB on the wire, 265 MB once decoded as RGB."""
    data = png((9400, 9400), mode="1")
    assert len(data) < 20_000
    return data


class TinyModel:
    """A model with the real package's image path: `preprocess` to a tensor, `embed_tensor` on a stack."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def preprocess(self) -> Any:
        def transform(image: Image.Image) -> torch.Tensor:
            self.events.append("transform")
            return torch.full((DIM,), float(image.getpixel((0, 0))[0]))

        return transform

    def embed_tensor(self, images: torch.Tensor) -> np.ndarray:
        self.events.append(f"embed {len(images)}")
        vectors = images.numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise BadRequestError("images only")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vectors = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)
    root = tmp_path_factory.mktemp("hardening")
    return build_shards(
        vectors=vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
        ids=np.arange(COUNT),
        items=[{"label": str(item_id % 3)} for item_id in range(COUNT)],
        out_root=root,
        num_shards=2,
        factory="HNSW8",
        model=ModelRef(name="tiny", version="1", uri="models:/tiny/1"),
        gallery={"dataset": "synthetic"},
    )


def local_api(index: Path, events: list[str], **spec_fields: Any) -> tuple[TestClient, SearchService]:
    spec = ServingSpec(index=str(index), max_upload_bytes=200_000, **spec_fields)
    manifest, _ = read_manifest(index)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    shards = ShardHost(spec=spec)
    shards.prepare(str(index))
    embedder = EmbedderHost(spec=spec)
    embedder._models[manifest.index_version] = ("models:/tiny/1", TinyModel(events))
    service = SearchService(
        manifest=manifest,
        spec=spec,
        shards=[LocalShardClient(shards, info.shard, executor) for info in manifest.shards],
        embedder=LocalEmbedderClient(embedder, executor, max_batch_size=8, batch_wait_timeout_s=0.01),
    )
    return TestClient(build_http_api(service)), service


@pytest.fixture
def api(index: Path) -> Iterator[tuple[TestClient, list[str]]]:
    events: list[str] = []
    client, _ = local_api(index, events)
    with client:
        yield client, events


# --------------------------------------------------------------------------- 1. images


def test_a_decompression_bomb_is_refused_from_its_header(bomb: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    original = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append("!") or original(self, *a, **k))
    with pytest.raises(PayloadTooLargeError, match=r"9400 x 9400 = 88,360,000 pixels, the limit is 25,000,000"):
        decode_image(bomb)
    assert decoded == []  # refused before a pixel was decoded
    with pytest.raises(PayloadTooLargeError, match="the limit is 1,000"):
        decode_image(png((40, 40)), max_pixels=1_000)
    assert decode_image(png((40, 40)), max_pixels=1_600).size == (40, 40)


def test_a_bomb_upload_is_a_413_naming_its_size(api: tuple[TestClient, list[str]], bomb: bytes) -> None:
    client, events = api
    response = client.post("/search/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "payload_too_large" and "9400 x 9400" in error["message"]
    assert events == []  # nothing reached the model
    fine = client.post("/search/image", files={"file": ("q.png", png((16, 16)), "image/png")})
    assert fine.status_code == 200, fine.text


def test_only_the_accepted_formats_are_tried(api: tuple[TestClient, list[str]]) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(NotAnImageError, match=r"not an image in an accepted format \(PNG, JPEG, WEBP, GIF, BMP\)"):
        decode_image(eps)
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(NotAnImageError, match="accepted format"):
        decode_image(tiff.getvalue())
    assert decode_image(tiff.getvalue(), formats=["TIFF"]).size == (8, 8)
    client, _ = api
    response = client.post("/search/image", files={"file": ("q.eps", eps, "application/postscript")})
    assert response.status_code == 400 and response.json()["error"]["type"] == "not_an_image"
    with pytest.raises(ValueError, match="unknown image formats"):
        ServingSpec(index="unused", image_formats=["PNG", "NOPE"])


def test_images_of_a_batch_are_decoded_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    host = EmbedderHost(spec=ServingSpec(index="unused"))
    host._models["v1"] = ("models:/tiny/1", TinyModel(events))
    real_decode = embedder_host.decode_image

    def logged(data: bytes, **kwargs: Any) -> Image.Image:
        events.append("decode")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(embedder_host, "decode_image", logged)
    images = [png((4 + size, 4)) for size in range(3)]
    results = host.embed_calls([EmbedCall(kind="image", data=data, index_version="v1") for data in images])
    # Each decoded image becomes its (small) input tensor before the next is decoded; one model call.
    assert events == ["decode", "transform"] * 3 + ["embed 3"]
    assert all(isinstance(result, np.ndarray) and result.shape == (DIM,) for result in results)


# --------------------------------------------------------------------------- 2. search settings


def test_search_settings_above_the_service_limits_are_refused(api: tuple[TestClient, list[str]]) -> None:
    client, _ = api
    query = {"vector": [0.1] * DIM, "k": 3}
    limited = client.post("/search/vector", json={**query, "params": {"ef_search": 1025}})
    assert limited.status_code == 400
    expected = "ef_search must be at most 1024 on this service (max_ef_search), got 1025"
    assert limited.json()["error"]["message"] == expected
    assert client.post("/search/vector", json={**query, "params": {"ef_search": 1024}}).status_code == 200
    huge = client.post("/search/vector", json={**query, "params": {"ef_search": 10**8}})
    assert huge.status_code == 400 and "at most 1024" in huge.json()["error"]["message"]


def test_the_limits_are_the_spec_s_own(index: Path) -> None:
    client, service = local_api(index, [], max_ef_search=64, max_nprobe=8)
    with client:
        response = client.post("/search/vector", json={"vector": [0.1] * DIM, "params": {"ef_search": 65}})
        assert "ef_search must be at most 64" in response.json()["error"]["message"]
    with pytest.raises(BadRequestError, match="nprobe must be at most 8"):
        service.search_params(service.active, SearchParams(nprobe=9))


# --------------------------------------------------------------------------- 4. no internals in errors


class LeakyShard:
    """A shard whose search fails with a message full of internals, as a remote traceback would be."""

    remote = True

    async def search(self, queries: np.ndarray, k: int, index_version: str, params: Any = None) -> ShardHits:
        raise RuntimeError("Traceback ... File /srv/retrieval/secret.py, raylet at 10.1.2.3:6379, pid=4242")

    async def loaded_versions(self) -> list[str]:
        raise RuntimeError("raylet at 10.1.2.3:6379 says: /srv/retrieval/index is gone")


def test_a_500_names_an_error_id_and_the_log_holds_the_detail(index: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest, _ = read_manifest(index)
    spec = ServingSpec(index=str(index))
    service = SearchService(
        manifest=manifest, spec=spec, shards=[LeakyShard(), LeakyShard()], embedder=LocalEmbedderClient(
            EmbedderHost(spec=spec), concurrent.futures.ThreadPoolExecutor(1), max_batch_size=1,
            batch_wait_timeout_s=0.0,
        ),
    )  # fmt: skip
    app = build_http_api(service)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.WARNING):
        response = client.post("/search/vector", json={"vector": [0.1] * DIM})
        ready = client.get("/readyz")
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    match = re.fullmatch(r"internal error ([0-9a-f]{12}); the server's log has the details under this id", message)
    assert match is not None, message
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert match.group(1) in logged and "10.1.2.3" in logged
    # The open readiness probe says what kind of failure, never the text.
    assert ready.status_code == 503
    assert "10.1.2.3" not in ready.text and "/srv/" not in ready.text
    assert ready.json()["shards"][0]["error"].startswith("error ")


# --------------------------------------------------------------------------- 6. slow bodies


def test_a_body_that_trickles_in_is_cut_after_the_read_deadline(index: Path) -> None:
    client, _ = local_api(index, [], body_read_timeout_s=0.2)
    app = client.app
    messages: list[dict[str, Any]] = []
    chunks = [b'{"vector": [', b"0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, ", b"0.1]}"]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        if len(chunks) == 1:
            await asyncio.sleep(1.0)  # the client stalls half-way
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/search/vector",
        "raw_path": b"/search/vector",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(message for message in messages if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    assert start["status"] == 408, body
    assert b"did not arrive within 0.2 s" in body and b'"request_timeout"' in body


def test_both_serve_configs_bound_requests_and_bodies_in_time() -> None:
    """Serve's proxy answers 408 past request_timeout_s; the ingress cuts slow bodies (issue 16, item 6)."""
    import yaml

    repo = Path(__file__).resolve().parents[3]
    local = yaml.safe_load((repo / "serve" / "digits.yaml").read_text())
    service = yaml.safe_load((repo / "k8s" / "base" / "rayservice.yaml").read_text())
    cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (local, cluster):
        assert 0 < config["http_options"]["request_timeout_s"] <= 60
        assert 0 < config["http_options"]["keep_alive_timeout_s"] <= 30
        for application in config["applications"]:
            spec = ServingSpec.from_mapping({**application["args"], "index": "unused"}, source="test")
            assert 0 < spec.body_read_timeout_s < config["http_options"]["request_timeout_s"]
            # The global block covers the proxies and every application without its own.
            assert application.get("logging_config", config["logging_config"]) == {
                "enable_access_log": False,
                "log_level": "INFO",
            }
