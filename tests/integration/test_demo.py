"""`retrieval demo --once`: the whole platform end to end, on the session's Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from retrieval.cli import main
from retrieval.config import load_job_spec

JOB = Path(__file__).resolve().parents[2] / "jobs" / "digits_deep_metric.yaml"


def test_demo_once_trains_registers_indexes_serves_and_answers(ray_train, tmp_path, monkeypatch, mlflow_db):
    # The demo writes mlflow.db (here an empty one already: `mlflow_db`), ray_results and indices
    # in the working directory.
    monkeypatch.chdir(tmp_path)
    summary_path = tmp_path / "summary.json"
    code = main(
        [
            "demo",
            "--once",
            "--spec",
            str(JOB),
            "--port",
            str(ray_train.serve_port),
            "--summary",
            str(summary_path),
            "--set",
            "train.epochs=1",
            "--set",
            "dataset.image_size=16",
            "--set",
            "tracking.gate=[]",
        ]
    )
    assert code == 0
    summary = json.loads(summary_path.read_text())

    scores = {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    both_protocols = scores | {f"seen_classes/{key}" for key in scores}
    assert set(summary["metrics"]) == both_protocols
    assert set(summary["baselines"]) == {"raw_pixels", "untrained"}
    for values in summary["baselines"].values():
        assert set(values) == both_protocols
    # Both protocols, the catalogue search (held-out images of the training classes) as the headline.
    protocols = summary["protocols"]
    assert list(protocols) == ["seen_classes", "unseen_classes"]
    assert [protocols[name]["headline"] for name in protocols] == [True, False]
    # 30% of the 901 images of digits 0-4 (per class, rounded) and all 896 images of digits 5-9.
    assert (protocols["seen_classes"]["images"], protocols["unseen_classes"]["images"]) == (270, 896)
    for name, prefix in (("seen_classes", "seen_classes/"), ("unseen_classes", "")):
        rows = protocols[name]["scores"]
        assert list(rows) == ["trained", "raw_pixels", "untrained"]
        assert rows["trained"] == {key: summary["metrics"][f"{prefix}{key}"] for key in scores}
        for baseline in ("raw_pixels", "untrained"):
            assert rows[baseline] == {key: summary["baselines"][baseline][f"{prefix}{key}"] for key in scores}
        assert all(0.0 <= value <= 1.0 for row in rows.values() for value in row.values())
    assert summary["gate"] == []  # emptied above; the committed spec gates on the catalogue protocol
    assert [str(condition) for condition in load_job_spec(str(JOB), []).tracking.gate] == [
        "seen_classes/recall@1 >= 0.9"
    ]
    assert summary["model"] == {
        "name": "digits-deep-metric",
        "version": "1",
        "aliases": ["candidate", "champion"],  # an empty gate promotes
        "uri": "models:/digits-deep-metric/1",
    }
    client = MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])
    assert str(client.get_model_version_by_alias("digits-deep-metric", "champion").version) == "1"

    manifest = json.loads(Path(summary["index"]["manifest"]).read_text())
    assert manifest["model"]["uri"] == "models:/digits-deep-metric/1"
    assert len(manifest["shards"]) == 2 and manifest["num_items"] == 896

    queries = summary["queries"]
    assert [query["kind"] for query in queries] == ["image", "vector", "id"] * 3
    for query in queries:
        assert query["ok"] and query["status"] == 200
        assert query["model_version"] == "1" and query["index_version"] == manifest["index_version"]
        assert len(query["results"]) == 5
    for query in queries:
        ids = [hit["id"] for hit in query["results"]]
        if query["kind"] == "id":
            assert query["query_id"] not in ids  # neighbours of an item exclude the item
        else:
            # An uploaded gallery image, or its vector, finds itself first.
            assert ids[0] == query["query_id"]
            assert query["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # --once takes the app down again (Serve's proxy stays and knows no route).
    assert requests.get(f"http://127.0.0.1:{ray_train.serve_port}/healthz", timeout=5).status_code == 404
