"""`retrieval demo`: the whole platform on the bundled digits, end to end.

Train with Ray Train (the spec's workers) -> evaluate beside baselines -> MLflow run and
registered version -> 2-shard Faiss index of the held-out gallery -> Ray Serve on
127.0.0.1 -> sample queries over HTTP (by image upload, by vector, by gallery id).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.client import ApiError, RetrievalClient, SearchResult
from retrieval.config import JobSpec, load_job_spec
from retrieval.data.from_spec import datasets_from_spec
from retrieval.errors import redact_credentials
from retrieval.evaluation.runs import SEEN_CLASSES_PREFIX
from retrieval.index.manifest import read_manifest
from retrieval.methods.gallery import gallery_dataset
from retrieval.tracking.runs import resolve_tracking_uri

logger = logging.getLogger(__name__)

SAMPLE_QUERY_COUNT = 3
SAMPLE_K = 5
APP_NAME = "retrieval"


def run_demo(
    *,
    spec_path: str,
    overrides: Sequence[str],
    port: int,
    once: bool,
    address: str | None,
    summary_path: Path | None,
) -> dict[str, Any]:
    """Run the demo; returns (and optionally writes) its JSON summary."""
    import ray
    from ray import serve

    from retrieval.evaluation.suite import format_results_table
    from retrieval.serving.app import build_app
    from retrieval.tracking import load_embedder
    from retrieval.tracking.indexing import build_index_from_model
    from retrieval.train import run_training
    from retrieval.train.driver import check_job_inputs

    spec = load_job_spec(spec_path, overrides)
    check_job_inputs(spec)
    if not ray.is_initialized():
        ray.init(address=address)

    print(
        f"== 1/4 training {spec.name} with Ray Train ({spec.scaling.num_workers} workers, {spec.train.epochs} epochs)"
    )
    outcome = run_training(spec)
    print(format_results_table(outcome.metrics, outcome.baselines, ks=spec.evaluation.recall_ks))
    protocols = protocol_summary(outcome.metrics, outcome.baselines, spec=spec)
    for name, protocol in protocols.items():
        scores = ", ".join(
            f"{row} {values.get('recall@1', float('nan')):.3f}" for row, values in protocol["scores"].items()
        )
        mark = "headline" if protocol["headline"] else "also reported"
        print(f"{name} ({mark}): {protocol['description']}: Recall@1 {scores}")
    model_uri = outcome.model.uri
    print(f"registered {model_uri} (aliases: {', '.join(outcome.model.aliases)})")

    print(f"== 2/4 building a {spec.index.num_shards}-shard Faiss index of the held-out gallery")
    tracking_uri = resolve_tracking_uri(spec.tracking.uri())
    manifest_path = build_index_from_model(model_uri, tracking_uri=tracking_uri, out=spec.index_root)
    manifest, _ = read_manifest(manifest_path)
    print(
        f"index {manifest.index_version}: {manifest.num_items} items in {len(manifest.shards)} shards"
        f" -> {manifest_path}"
    )

    print(f"== 3/4 starting Ray Serve on http://127.0.0.1:{port}")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"index": str(Path(spec.index_root).resolve()), "tracking_uri": tracking_uri}),
        name=APP_NAME,
        route_prefix="/",
        # As serve/digits.yaml: no access-log line per request (it costs CPU on the request path).
        logging_config={"enable_access_log": False},
    )
    base_url = f"http://127.0.0.1:{port}"

    print("== 4/4 sample queries over HTTP")
    package = load_embedder(model_uri, tracking_uri=tracking_uri)
    queries = sample_queries(base_url, package=package, gallery=spec.index.gallery)
    for query in queries:
        labels = " ".join(str(hit["label"]) for hit in query["results"])
        mark = "ok" if query["ok"] else f"FAILED ({query.get('error')})"
        print(
            f"  {query['kind']:>6} query, digit {query['query_label']} ({query['query_source']}):"
            f" top-{SAMPLE_K} labels {labels}  [{mark}]"
        )

    summary = {
        "job": spec.name,
        "metrics": outcome.metrics,
        "baselines": outcome.baselines,
        "protocols": protocols,
        "gate": outcome.gate,
        "model": {
            "name": outcome.model.name,
            "version": outcome.model.version,
            "aliases": list(outcome.model.aliases),
            "uri": model_uri,
        },
        "promoted_to_champion": outcome.promoted,
        "mlflow": {
            "tracking_uri": redact_credentials(tracking_uri),
            "run_id": outcome.run_id,
            "experiment": spec.tracking.experiment,
        },
        "index": {
            "manifest": str(Path(manifest_path).resolve()),
            "index_version": manifest.index_version,
            "shards": len(manifest.shards),
            "items": manifest.num_items,
        },
        "url": base_url,
        "queries": queries,
    }
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {summary_path}")

    if once:
        serve.delete(APP_NAME)
        return summary
    print(
        f"\nserving {base_url} (POST /search/image, /search/vector, /search/id; GET /version, /readyz;"
        f" docs at {base_url}/docs)\nsearch page: {base_url}/\n"
        "metrics: ray_retrieval_* in the Ray node's metrics export (its --metrics-export-port), not GET /metrics"
    )
    print(f"MLflow UI: mlflow ui --backend-store-uri {redact_credentials(tracking_uri)}  (then http://127.0.0.1:5000)")
    print("Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        serve.shutdown()
    return summary


def protocol_summary(
    metrics: dict[str, float], baselines: dict[str, dict[str, float]], *, spec: JobSpec
) -> dict[str, dict[str, Any]]:
    """The scores of each evaluation protocol, the trained model beside the baselines.

    `seen_classes` (when the split holds out images of the training classes) is the catalogue
    search a demo user expects, and the headline; `unseen_classes` is the test split, classes
    the model never trained on (the metric-learning protocol).
    """
    rows = {"trained": metrics, **baselines}
    split = spec.dataset.split
    splits = datasets_from_spec(spec.dataset)
    protocols: dict[str, dict[str, Any]] = {}
    if any(key.startswith(SEEN_CLASSES_PREFIX) for key in metrics):
        protocols["seen_classes"] = {
            "description": (
                f"held-out images ({split.seen_test_fraction:.0%} of each) of the training classes "
                f"{_classes_text(split.train_classes)}, each a query against the rest"
            ),
            "headline": True,
            "images": 0 if splits.seen_test is None else len(splits.seen_test),
            "scores": {
                name: {
                    key.removeprefix(SEEN_CLASSES_PREFIX): value
                    for key, value in values.items()
                    if key.startswith(SEEN_CLASSES_PREFIX)
                }
                for name, values in rows.items()
            },
        }
    protocols["unseen_classes"] = {
        "description": (
            f"classes never trained on {_classes_text(split.test_classes)}, each image a query against the rest"
        ),
        "headline": not protocols,
        "images": len(splits.test),
        "scores": {
            name: {key: value for key, value in values.items() if "/" not in key} for name, values in rows.items()
        },
    }
    return protocols


def _classes_text(classes: str | list[int] | None) -> str:
    if classes is None:
        return "(per the split)"
    return classes if isinstance(classes, str) else ",".join(str(class_id) for class_id in classes)


def sample_queries(base_url: str, *, package: Any, gallery: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Query the live service three ways (through `retrieval.client`) for a few gallery items of different classes."""
    dataset = gallery_dataset(package, gallery)  # type: ignore[arg-type]
    first_of_class: dict[int, int] = {}
    for position, label in enumerate(dataset.labels):
        first_of_class.setdefault(int(label), position)
    chosen = sorted(first_of_class.values())[:SAMPLE_QUERY_COUNT]

    queries: list[dict[str, Any]] = []
    with RetrievalClient(base_url, timeout_s=timeout) as client:
        index_version = client.version().index_version
        for position in chosen:
            image = dataset.load_image(position)
            png = io.BytesIO()
            image.save(png, format="PNG")
            vector = np.asarray(package.embed_images([image])[0]).tolist()
            label_name = dataset.class_names[int(dataset.labels[position])]
            sent: dict[str, Callable[[], SearchResult]] = {
                "image": partial(client.search_image, png.getvalue(), k=SAMPLE_K),
                "vector": partial(client.search_vector, vector, k=SAMPLE_K),
                "id": partial(client.search_id, position, k=SAMPLE_K),
            }
            for kind, search in sent.items():
                queries.append(
                    _query_record(
                        kind,
                        search,
                        query_id=position,
                        label=label_name,
                        source=dataset.source(position),
                        index_version=index_version,
                    )
                )
    return queries


def _query_record(
    kind: str, search: Callable[[], SearchResult], *, query_id: int, label: str, source: str, index_version: str
) -> dict[str, Any]:
    """One sample query's outcome; `ok` means an answer from the index version the service announced."""
    record: dict[str, Any] = {"kind": kind, "query_id": query_id, "query_label": label, "query_source": source}
    try:
        result = search()
    except ApiError as error:
        return {
            **record,
            "status": error.status,
            "ok": False,
            "model_version": None,
            "index_version": None,
            "results": [],
            "precision_at_k": 0.0,
            "error": {"type": error.type, "message": error.reason},
        }
    results = [
        {"id": hit.id, "score": hit.score, "label": hit.fields.get("label"), "source": hit.fields.get("source")}
        for hit in result.hits
    ]
    return {
        **record,
        "status": 200,
        "ok": result.index_version == index_version,
        "model_version": result.model.version,
        "index_version": result.index_version,
        "results": results,
        "precision_at_k": float(np.mean([hit["label"] == label for hit in results])) if results else 0.0,
    }
