"""The search application inside Ray Serve, queried over HTTP like a user would.

One application (2 shards over 200 random unit vectors, an untrained model package as the
embedder) is deployed for the whole module and deleted at its end.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from retrieval.index import ModelRef, build_shards, read_manifest
from retrieval.serving.images import decode_image

APP_NAME = "retrieval-serving-test"
ROUTE = "/serving-test"
COUNT = 200
FIRST_ID = 1000
MAX_K = 50
MAX_UPLOAD_BYTES = 100_000


@dataclass
class Deployed:
    layout: str
    app_name: str
    url: str
    vectors: np.ndarray
    ids: np.ndarray
    items: list[dict[str, str]]
    index_version: str
    model: ModelRef
    embedder: Any


def png_bytes(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=["local", "distributed"])
def deployed(
    request: pytest.FixtureRequest,
    ray_cluster: Any,
    serve_instance: str,
    model_package: Path,
    tmp_path_factory: pytest.TempPathFactory,
    http_ready: Any,
) -> Iterator[Deployed]:
    """The app in each layout: everything in the ingress (shards and the query model), or one deployment each."""
    from ray import serve

    from retrieval.serving.app import build_app
    from retrieval.tracking.registry import load_embedder

    embedder = load_embedder(str(model_package))
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((COUNT, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(FIRST_ID, FIRST_ID + COUNT, dtype=np.int64)
    items = [{"label": str(item_id % 10), "source": f"random:{item_id}"} for item_id in ids.tolist()]
    model = ModelRef(name="untrained", version="1", uri=str(model_package))
    root = tmp_path_factory.mktemp("served-index")
    build_shards(
        vectors=vectors,
        ids=ids,
        items=items,
        out_root=root,
        num_shards=2,
        model=model,
        gallery={"dataset": "random", "count": COUNT},
    )
    manifest, _ = read_manifest(root)

    app = build_app(
        {
            "index": str(root),
            "tracking_uri": None,
            "max_k": MAX_K,
            "default_k": 5,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "layout": request.param,
            "embedder_layout": request.param,
        }
    )
    app_name, route = f"{APP_NAME}-{request.param}", f"{ROUTE}-{request.param}"
    serve.run(app, name=app_name, route_prefix=route)
    url = f"http://127.0.0.1:{ray_cluster.serve_port}{route}"
    http_ready(f"{url}/healthz", deadline_s=30)
    try:
        yield Deployed(
            layout=request.param,
            app_name=app_name,
            url=url,
            vectors=vectors,
            ids=ids,
            items=items,
            index_version=manifest.index_version,
            model=model,
            embedder=embedder,
        )
    finally:
        serve.delete(app_name)


def brute_force(
    deployed: Deployed, query: np.ndarray, k: int, exclude: int | None = None
) -> tuple[list[int], list[float]]:
    """Top-k over ALL vectors (no shards), by a plain sort of float64 inner products."""
    scores = deployed.vectors.astype(np.float64) @ query.astype(np.float64)
    ranked = [
        (float(score), int(item_id))
        for score, item_id in sorted(zip(scores, deployed.ids, strict=True), key=lambda pair: -pair[0])
        if item_id != exclude
    ]
    return [item_id for _, item_id in ranked[:k]], [score for score, _ in ranked[:k]]


def check_reply(
    deployed: Deployed, reply: dict[str, Any], query: np.ndarray, k: int, exclude: int | None = None
) -> None:
    expected_ids, expected_scores = brute_force(deployed, query, k, exclude)
    assert reply["model"] == {"name": "untrained", "version": "1", "uri": deployed.model.uri}
    assert reply["index_version"] == deployed.index_version
    assert reply["k"] == k
    assert [result["id"] for result in reply["results"]] == expected_ids
    np.testing.assert_allclose([result["score"] for result in reply["results"]], expected_scores, rtol=1e-5, atol=1e-6)
    for result in reply["results"]:
        item = deployed.items[result["id"] - FIRST_ID]
        assert (result["label"], result["source"]) == (item["label"], item["source"])


def test_vector_search_equals_brute_force_over_all_shards(deployed: Deployed) -> None:
    query = np.random.default_rng(3).standard_normal(deployed.vectors.shape[1]).astype(np.float32)
    response = requests.post(f"{deployed.url}/search/vector", json={"vector": query.tolist(), "k": 10}, timeout=30)
    assert response.status_code == 200, response.text
    reply = response.json()
    check_reply(deployed, reply, query, 10)
    # The answer really merges both shards (ids 1000-1099 and 1100-1199).
    assert {result["id"] < FIRST_ID + COUNT // 2 for result in reply["results"]} == {True, False}


def test_id_search_excludes_the_item(deployed: Deployed) -> None:
    item_id = FIRST_ID + 137
    response = requests.post(f"{deployed.url}/search/id", json={"id": item_id, "k": 8}, timeout=30)
    assert response.status_code == 200, response.text
    check_reply(deployed, response.json(), deployed.vectors[137], 8, exclude=item_id)


def test_image_search_embeds_with_the_index_model(deployed: Deployed) -> None:
    image = png_bytes(seed=11)
    response = requests.post(
        f"{deployed.url}/search/image", files={"file": ("query.png", image, "image/png")}, data={"k": "6"}, timeout=60
    )
    assert response.status_code == 200, response.text
    # The same model package embeds the same decoded image here: the answer must match.
    query = deployed.embedder.embed_images([decode_image(image)])[0]
    check_reply(deployed, response.json(), query, 6)


def test_version_healthz_and_items(deployed: Deployed) -> None:
    assert requests.get(f"{deployed.url}/healthz", timeout=10).json() == {"status": "ok"}
    version = requests.get(f"{deployed.url}/version", timeout=10).json()
    assert version["index_version"] == deployed.index_version
    assert version["model"] == deployed.model.model_dump()
    assert version["manifest"]["num_items"] == COUNT
    assert [shard["count"] for shard in version["manifest"]["shards"]] == [100, 100]
    item = requests.get(f"{deployed.url}/items/{FIRST_ID + 5}", timeout=10).json()
    assert item["item"] == {"id": FIRST_ID + 5, **deployed.items[5]}
    assert item["index_version"] == deployed.index_version


def bad_requests(deployed: Deployed) -> list[tuple[str, dict[str, Any], int, str, str]]:
    """(description, requests.post/get kwargs, status, error type, message fragment)."""
    dim = deployed.vectors.shape[1]
    url = deployed.url
    return [
        (
            "short vector",
            {"url": f"{url}/search/vector", "json": {"vector": [0.1] * 3}},
            400,
            "bad_request",
            f"vector has 3 dimensions, the index expects {dim}",
        ),
        (
            "NaN",
            {
                "url": f"{url}/search/vector",
                "data": '{"vector": [NaN' + ", 1" * (dim - 1) + "]}",
                "headers": {"Content-Type": "application/json"},
            },
            400,
            "bad_request",
            "non-finite",
        ),
        (
            "k = 0",
            {"url": f"{url}/search/vector", "json": {"vector": [0.1] * dim, "k": 0}},
            400,
            "bad_request",
            f"k must be between 1 and {MAX_K}, got 0",
        ),
        (
            "k > max_k",
            {"url": f"{url}/search/id", "json": {"id": FIRST_ID, "k": MAX_K + 1}},
            400,
            "bad_request",
            f"got {MAX_K + 1}",
        ),
        (
            "malformed JSON",
            {"url": f"{url}/search/vector", "data": "{oops", "headers": {"Content-Type": "application/json"}},
            422,
            "validation_error",
            "malformed JSON body",
        ),
        (
            "missing field",
            {"url": f"{url}/search/id", "json": {"k": 3}},
            422,
            "validation_error",
            "body.id: Field required",
        ),
        (
            "not an image",
            {"url": f"{url}/search/image", "files": {"file": ("x.png", b"plain text", "image/png")}},
            400,
            "not_an_image",
            "not an image in an accepted format (PNG, JPEG",
        ),
        (
            "oversize upload",
            {"url": f"{url}/search/image", "files": {"file": ("x.png", b"0" * (MAX_UPLOAD_BYTES + 1), "image/png")}},
            413,
            "payload_too_large",
            str(MAX_UPLOAD_BYTES),
        ),
        (
            "unknown id",
            {"url": f"{url}/search/id", "json": {"id": FIRST_ID + COUNT}},
            404,
            "not_found",
            f"no item with id {FIRST_ID + COUNT}",
        ),
    ]


def test_every_bad_input_gets_a_4xx_json_error_and_the_app_keeps_answering(deployed: Deployed) -> None:
    for description, arguments, status, error_type, fragment in bad_requests(deployed):
        response = requests.post(timeout=30, **arguments)
        assert response.status_code == status, f"{description}: {response.status_code} {response.text}"
        body = response.json()
        assert set(body) == {"error"} and body["error"]["type"] == error_type, description
        assert fragment in body["error"]["message"], f"{description}: {body}"
    unknown_item = requests.get(f"{deployed.url}/items/{FIRST_ID - 1}", timeout=10)
    assert (unknown_item.status_code, unknown_item.json()["error"]["type"]) == (404, "not_found")

    # Nothing above took a replica down: every deployment is healthy and answers.
    from ray import serve

    deployments = serve.status().applications[deployed.app_name].deployments
    others = ["Embedder", "Shard0", "Shard1"] if deployed.layout == "distributed" else []
    assert sorted(deployments) == sorted(["SearchIngress", *others])
    assert {status.status for status in deployments.values()} == {"HEALTHY"}
    query = deployed.vectors[0]
    reply = requests.post(f"{deployed.url}/search/vector", json={"vector": query.tolist(), "k": 3}, timeout=30).json()
    check_reply(deployed, reply, query, 3)
    image = requests.post(f"{deployed.url}/search/image", files={"file": ("q.png", png_bytes(seed=5))}, timeout=60)
    assert image.status_code == 200


def test_metrics_are_exported_by_the_nodes_metrics_agent_with_serve_tags(
    deployed: Deployed, ray_cluster: Any, poll: Any
) -> None:
    """The app's metrics reach Ray's export (ray.serve.metrics), tagged by application, deployment and replica."""
    from prometheus_client.parser import text_string_to_metric_families

    pointer = requests.get(f"{deployed.url}/metrics", timeout=10)
    assert pointer.status_code == 404 and "ray_retrieval_*" in pointer.json()["error"]["message"]
    searches = 3
    for row in deployed.vectors[:searches]:
        assert requests.post(f"{deployed.url}/search/vector", json={"vector": row.tolist()}, timeout=30).ok
    mine = {"application": deployed.app_name, "deployment": "SearchIngress"}
    found: dict[str, list[tuple[dict[str, str], float]]] = {}

    def exported() -> bool:
        text = requests.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
        found.clear()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_retrieval_") and mine.items() <= sample.labels.items():
                    found.setdefault(sample.name, []).append((sample.labels, sample.value))
        return sum(
            value for labels, value in found.get("ray_retrieval_requests_total", [])
            if labels["endpoint"] == "/search/vector" and labels["status"] == "200"
        ) >= searches  # fmt: skip

    # Each worker reports to its node's agent every metrics_report_interval_ms (10 s by default).
    poll(exported, timeout=90, what="the app's request counter in the head node's metrics export")
    assert all(labels["replica"] for samples in found.values() for labels, _ in samples)
    assert any(
        labels["endpoint"] == "/metrics" and labels["status"] == "404"
        for labels, _ in found["ray_retrieval_requests_total"]
    )
    replies = [value for labels, value in found["ray_retrieval_search_replies_total"] if labels["answer"] == "complete"]
    assert sum(replies) >= searches
    assert [labels["index_version"] for labels, value in found["ray_retrieval_index_info"] if value == 1] == [
        deployed.index_version
    ]
    assert "ray_retrieval_request_seconds_bucket" in found
