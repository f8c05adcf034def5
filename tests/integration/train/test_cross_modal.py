"""Cross-modal jobs end to end on the session cluster: Ray Train with 2 workers, MLflow, indices, HTTP.

Ch. 3 (hashing, BoW tags): a worker is killed mid-run and the group resumes with both players'
optimisers restored; the model is registered with its plots, indexed as binary shards, served,
and text queries over HTTP return images whose digits match far above chance.
Ch. 4 (real-valued, GRU captions): trained, registered, its captions indexed as float shards;
an image uploaded over HTTP returns captions naming its digits far above chance.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from retrieval.config import load_job_spec
from retrieval.data.cross_modal import cross_modal_datasets_from_spec
from retrieval.index.gallery import build_gallery_index
from retrieval.index.manifest import ModelRef, read_manifest
from retrieval.serialization import load_state
from retrieval.tracking.registry import load_embedder
from retrieval.train import run_training
from retrieval.train.worker import CHECKPOINT_STATE

ROOT = Path(__file__).resolve().parents[3]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SMALL_PAIRS = [
    "dataset.image_size=32",
    "dataset.cross_modal.size=700",
    "dataset.cross_modal.query_size=100",
    "dataset.cross_modal.train_size=480",
    "scaling.num_workers=2",
]


def _job(name: str, tmp_path: Path, overrides: list[str]) -> Any:
    return load_job_spec(
        ROOT / "jobs" / name,
        [
            *SMALL_PAIRS,
            f"storage.path={tmp_path / 'ray_results'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ],
    )


@contextmanager
def _served(
    ray_cluster: Any, index_root: Path, *, name: str, route: str, http_ready: Any, tracking_uri: str
) -> Iterator[str]:
    """A Serve app over `index_root` at `route`, deleted on exit (the cluster is shared by the session)."""
    from ray import serve

    from retrieval.serving.app import build_app

    app = build_app({"index": str(index_root), "tracking_uri": tracking_uri, "max_k": 50, "default_k": 10})
    serve.run(app, name=name, route_prefix=route)
    try:
        url = f"http://127.0.0.1:{ray_cluster.serve_port}{route}"
        http_ready(f"{url}/healthz", 180)
        yield url
    finally:
        serve.delete(name)


def _label_sets(labels: np.ndarray) -> list[set[int]]:
    return [set(np.flatnonzero(row).tolist()) for row in labels]


def test_hashing_job_resumes_registers_and_answers_text_queries(ray_train, serve_instance, tmp_path, http_ready):
    spec = _job(
        "digit_pairs_hashing.yaml",
        tmp_path,
        ["method.bits=32", "train.epochs=4", "train.batch_size=8", "optimizer.lr=0.001", "tracking.gate=[]"],
    )
    marker = tmp_path / "killed.txt"
    outcome = run_training(spec, fault={"epoch": 1, "rank": 1, "marker": str(marker)})
    assert marker.read_text().startswith("killed rank 1 at epoch 1")

    client = MlflowClient(tracking_uri=spec.tracking.tracking_uri)
    # Epoch 0 ran once; the restarted group loaded its checkpoint (both players, both optimisers).
    resumed = [int(point.value) for point in client.get_metric_history(outcome.run_id, "resumed_from_epoch")]
    assert resumed == [0, 1, 1, 1]
    state = load_state(Path(outcome.checkpoint_path) / CHECKPOINT_STATE)
    steps_per_epoch = 480 // 2 // 8
    for optimiser in ("optimizer", "discriminator_optimizer"):
        # Adam's step count runs on through the restart: it was restored, not started afresh.
        assert {int(value["step"]) for value in state[optimiser]["state"].values()} == {4 * steps_per_epoch}

    # Every loss term and both classifiers' accuracy, once per epoch.
    for term in ("code_pair", "feature_pair", "quantization", "entropy", "disc/feature_accuracy", "disc/code_accuracy"):
        assert sorted(point.step for point in client.get_metric_history(outcome.run_id, f"train/{term}")) == [
            0,
            1,
            2,
            3,
        ]
    # And the trained classifiers' balanced accuracy on the held-out query + retrieval items, once per epoch.
    for key in ("disc/feature_accuracy", "disc/code_accuracy"):
        history = client.get_metric_history(outcome.run_id, key)
        assert sorted(point.step for point in history) == [0, 1, 2, 3]
        assert all(0.0 <= point.value <= 1.0 for point in history)
    assert {"map@all", "i2t/map@all", "t2i/map@all", "i2t/map@100", "t2i/p@10"} <= set(outcome.metrics)
    artifacts = {
        item.path for folder in ("evaluation", "training") for item in client.list_artifacts(outcome.run_id, folder)
    }
    assert {
        "evaluation/pr_curves.png",
        "evaluation/precision_at_n.png",
        "evaluation/curves.json",
        "training/discriminator_accuracy.png",
    } <= artifacts
    assert outcome.model.version == "1"

    # The registered model: its tag vocabulary travelled with it; its index is binary.
    package = load_embedder(outcome.model.uri, tracking_uri=spec.tracking.tracking_uri)
    assert package.code_bits == 32
    manifest_path = build_gallery_index(
        package,
        model=ModelRef(name=outcome.model.name, version=outcome.model.version, uri=outcome.model.uri),
        out_root=tmp_path / "index",
        gallery="test",
        num_shards=2,
        factory="Flat",
        metric="ip",
        modality="image",
    )
    manifest, _ = read_manifest(manifest_path)
    assert manifest.metric == "hamming"

    with _served(
        ray_train,
        tmp_path / "index",
        name="pairs-hashing",
        route="/pairs-hashing",
        http_ready=http_ready,
        tracking_uri=spec.tracking.tracking_uri,
    ) as url:
        _text_queries_find_their_digits(url, spec)


def _text_queries_find_their_digits(url: str, spec: Any) -> None:
    retrieval = cross_modal_datasets_from_spec(spec.dataset).retrieval
    labels = _label_sets(retrieval.labels)
    precision, base_rate = [], []
    for digit, word in enumerate(DIGIT_WORDS):
        response = requests.post(f"{url}/search", json={"text": f"a handwritten {word}", "k": 10}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["modality"] == "image" and len(body["results"]) == 10
        assert all(hit["score"] == pytest.approx(1 - 2 * hit["distance"] / 32) for hit in body["results"])
        precision.append(np.mean([digit in labels[hit["id"]] for hit in body["results"]]))
        base_rate.append(np.mean([digit in item for item in labels]))
    # Chance: a random image holds a given digit about a quarter of the time.
    assert np.mean(precision) > 1.5 * np.mean(base_rate), (precision, base_rate)

    response = requests.post(f"{url}/search", json={"text": "   ", "k": 5}, timeout=30)
    assert response.status_code == 400 and "text" in response.json()["error"]["message"]


def test_adversarial_job_registers_and_answers_image_queries_with_captions(
    ray_train, serve_instance, tmp_path, http_ready
):
    spec = _job(
        "digit_pairs_adversarial.yaml",
        tmp_path,
        ["train.epochs=3", "train.batch_size=8", "optimizer.lr=0.001", "tracking.gate=[]", "method.embedding_dim=64"],
    )
    outcome = run_training(spec)
    client = MlflowClient(tracking_uri=spec.tracking.tracking_uri)
    for term in ("ranking", "projection", "entropy", "disc/feature_accuracy"):
        assert sorted(point.step for point in client.get_metric_history(outcome.run_id, f"train/{term}")) == [0, 1, 2]
    assert {"i2t/recall@1", "t2i/recall@10", "rsum"} <= set(outcome.metrics)
    assert outcome.metrics["rsum"] == pytest.approx(sum(v for k, v in outcome.metrics.items() if "recall@" in k))

    package = load_embedder(outcome.model.uri, tracking_uri=spec.tracking.tracking_uri)
    assert package.code_bits is None and package.dim == 64
    build_gallery_index(
        package,
        model=ModelRef(name=outcome.model.name, version=outcome.model.version, uri=outcome.model.uri),
        out_root=tmp_path / "index",
        gallery="test",
        num_shards=2,
        factory="Flat",
        metric="ip",
        modality="text",
    )
    with _served(
        ray_train,
        tmp_path / "index",
        name="pairs-captions",
        route="/pairs-captions",
        http_ready=http_ready,
        tracking_uri=spec.tracking.tracking_uri,
    ) as url:
        _image_queries_find_captions_of_their_digits(url, spec)


def _image_queries_find_captions_of_their_digits(url: str, spec: Any) -> None:
    retrieval = cross_modal_datasets_from_spec(spec.dataset).retrieval
    names = {word: digit for digit, word in enumerate(DIGIT_WORDS)} | {str(digit): digit for digit in range(10)}
    hit_rates, base_rates = [], []
    for index in range(0, 60, 6):
        buffer = io.BytesIO()
        retrieval.load_image(index).save(buffer, format="PNG")
        response = requests.post(
            f"{url}/search/image",
            files={"file": ("query.png", buffer.getvalue(), "image/png")},
            data={"k": "5"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        digits = set(np.flatnonzero(retrieval.labels[index]).tolist())
        captions = [hit["caption"] for hit in response.json()["results"]]
        named = [{names[word] for word in caption.replace(",", " ").split() if word in names} for caption in captions]
        hit_rates.append(np.mean([bool(found & digits) for found in named]))
        all_captions = retrieval.texts()[0]
        base_rates.append(
            np.mean(
                [
                    bool({names[w] for w in caption.replace(",", " ").split() if w in names} & digits)
                    for caption in all_captions[:500]
                ]
            )
        )
    assert np.mean(hit_rates) > np.mean(base_rates), (hit_rates, base_rates)
