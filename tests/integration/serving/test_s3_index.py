"""An index built to S3 with `retrieval index --out s3://...` and served from there by Ray Serve.

The S3 endpoint is the session's moto server. `retrieval index` finds it through
`AWS_ENDPOINT_URL` (the standard variable boto3 reads, as on a node whose environment points
at MinIO); the Serve app gets it as the spec's `endpoint_url`, because its replicas run in
the Ray cluster, whose environment has no such variable.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import requests
from PIL import Image

from retrieval.cli import main
from retrieval.index.manifest import read_manifest
from retrieval.index.object_store import fetch_index, parse_s3_index_uri
from retrieval.index.shards import load_shard

APP_NAME = "retrieval-s3-index-test"
ROUTE = "/s3-index-test"


def png_bytes(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_index_built_to_s3_is_served_from_s3(
    ray_cluster: Any,
    serve_instance: str,
    s3_endpoint: Any,
    model_package: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    http_ready: Any,
    mlflow_db: str,
) -> None:
    from ray import serve

    from retrieval.serving.app import build_app

    index_uri = f"s3://{s3_endpoint.bucket}/indices/s3-served"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint.url)
    tracking_uri = mlflow_db
    code = main(
        ["index", "--model", str(model_package), "--out", index_uri, "--shards", "2", "--tracking-uri", tracking_uri]
    )
    assert code == 0
    printed = capsys.readouterr().out
    location = parse_s3_index_uri(index_uri)
    current = boto3.client("s3", endpoint_url=s3_endpoint.url).get_object(
        Bucket=location.bucket, Key=location.key("CURRENT")
    )
    version = current["Body"].read().decode().strip()
    assert f"index manifest: {index_uri}/{version}/manifest.json" in printed
    monkeypatch.delenv("AWS_ENDPOINT_URL")

    # An independent reference: every gallery vector, read back from a separate fetch.
    reference_root = fetch_index(index_uri, cache_dir=tmp_path / "reference", endpoint_url=s3_endpoint.url)
    manifest, version_dir = read_manifest(reference_root)
    assert manifest.index_version == version
    vectors: dict[int, np.ndarray] = {}
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        vectors.update({item_id: shard.vector(item_id) for item_id in shard.items})
    assert len(vectors) == manifest.num_items > 0

    serve_cache = tmp_path / "serve-cache"
    app = build_app(
        {"index": index_uri, "endpoint_url": s3_endpoint.url, "cache_dir": str(serve_cache), "default_k": 5}
    )
    serve.run(app, name=APP_NAME, route_prefix=ROUTE)
    url = f"http://127.0.0.1:{ray_cluster.serve_port}{ROUTE}"
    try:
        http_ready(f"{url}/healthz", deadline_s=60)
        query = np.random.default_rng(11).standard_normal(manifest.dim).astype(np.float32)
        response = requests.post(f"{url}/search/vector", json={"vector": query.tolist(), "k": 8}, timeout=30)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["index_version"] == version
        ranked = sorted(vectors, key=lambda item_id: -float(vectors[item_id].astype(np.float64) @ query))
        assert [result["id"] for result in reply["results"]] == ranked[:8]

        image = requests.post(f"{url}/search/image", files={"file": ("q.png", png_bytes(3), "image/png")}, timeout=60)
        assert image.status_code == 200, image.text
        assert image.json()["index_version"] == version
        assert len(image.json()["results"]) == 5
    finally:
        serve.delete(APP_NAME)

    # The replicas downloaded every shard file once, into the cache the spec named, by checksum.
    blobs = {path.name for path in (serve_cache / "blobs").iterdir()}
    expected = {sha for info in manifest.shards for sha in (info.sha256, info.items_sha256)}
    assert blobs == expected
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in caplog.text
