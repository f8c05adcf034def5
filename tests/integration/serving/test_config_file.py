"""serve/digits.yaml is a valid Ray Serve 2.60 config, and a config file reaches Serve as Serve would apply it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from retrieval.config import ServingSpec
from retrieval.errors import ConfigError, IndexIntegrityError
from retrieval.index import ModelRef, build_shards
from retrieval.serving.app import build_app

CONFIG = Path(__file__).resolve().parents[3] / "serve" / "digits.yaml"


def test_digits_config_matches_the_serve_schema_and_the_serving_spec() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw)
    # The schema tolerates unknown keys, so a misspelt one would be silently ignored: check.
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    assert set(raw["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    assert set(raw["applications"][0]) <= set(ServeApplicationSchema.model_fields)
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    (application,) = config.applications
    assert application.import_path == "retrieval.serving.app:build_app"
    assert application.route_prefix == "/"
    spec = ServingSpec.from_mapping(application.args, source=str(CONFIG))
    assert spec.index == "indices/digits"
    assert spec.tracking_uri == "sqlite:///mlflow.db"


def test_build_app_refuses_bad_args_and_missing_indices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shard_replica"):
        build_app({"index": str(tmp_path), "shard_replica": 2})
    with pytest.raises(IndexIntegrityError, match="neither an index root"):
        build_app({"index": str(tmp_path)})


def test_a_config_file_reaches_serve_through_deploy_and_run(
    ray_cluster: Any, model_package: Path, tmp_path: Path, http_ready: Any, poll: Any
) -> None:
    """`retrieval serve deploy` (the dashboard's REST API) then the `serve run` path apply one file as Serve does.

    The ``deployments:`` override beats the args' ``ingress_replicas``, the application's
    ``runtime_env`` reaches its replicas (the admin token opens /admin/status, which answers 403
    without one), and the global ``logging_config`` leaves no access-log line per request.
    """
    from ray import serve

    from retrieval.cli import main
    from retrieval.serving.serve_config import read_serve_config, run_config
    from retrieval.tracking.registry import load_embedder

    dim = load_embedder(str(model_package)).dim
    vectors = np.random.default_rng(3).standard_normal((60, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    root = tmp_path / "index"
    build_shards(
        vectors=vectors,
        ids=np.arange(60, dtype=np.int64),
        items=[{"label": str(item % 10)} for item in range(60)],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="untrained", version="1", uri=str(model_package)),
        gallery={"dataset": "random", "count": 60},
    )
    name, token = "config-file-test", "config-file-test-admin-token"
    config: dict[str, Any] = {
        # The session's Serve (if another test started it) runs with these: anything else is refused.
        "http_options": {"host": "127.0.0.1", "port": ray_cluster.serve_port},
        "logging_config": {"enable_access_log": False, "log_level": "INFO"},
        "applications": [
            {
                "name": name,
                "route_prefix": f"/{name}",
                "import_path": "retrieval.serving.app:build_app",
                "args": {"index": str(root), "tracking_uri": None, "layout": "local", "embedder_layout": "local",
                         "ingress_replicas": 1, "shard_num_cpus": 0.25},
                "runtime_env": {"env_vars": {"RETRIEVAL_ADMIN_TOKEN": token}},
                "deployments": [{"name": "SearchIngress", "num_replicas": 2}],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    url = f"http://127.0.0.1:{ray_cluster.serve_port}/{name}"
    try:
        assert main(["serve", "deploy", str(path), "--address", ray_cluster.dashboard_url, "--wait"]) == 0
        application = serve.status().applications[name]
        assert application.status == "RUNNING"
        assert application.deployments["SearchIngress"].replica_states == {"RUNNING": 2}
        http_ready(f"{url}/healthz", deadline_s=30)
        status = requests.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert status.status_code == 200, status.text
        assert len(status.json()["replicas"]) == 2

        for _ in range(4):
            assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        details = requests.get(f"{ray_cluster.dashboard_url}/api/serve/applications/", timeout=10).json()
        replicas = details["applications"][name]["deployments"]["SearchIngress"]["replicas"]
        logs = ray_cluster.temp_dir / "session_latest" / "logs"
        texts = [(logs / replica["log_file_path"].lstrip("/")).read_text() for replica in replicas]
        # The replicas' own INFO lines are there; the access-log lines of the requests are not.
        assert all(any(line.startswith("INFO") for line in text.splitlines()) for text in texts)
        assert not [line for text in texts for line in text.splitlines() if "/healthz" in line]

        # The `serve run` path (Serve's controller client, in this process) applies a changed file.
        config["applications"][0]["deployments"] = [{"name": "SearchIngress", "num_replicas": 1}]
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run_config(read_serve_config(path), source=str(path), deadline=time.monotonic() + 300)
        poll(
            lambda: serve.status().applications[name].deployments["SearchIngress"].replica_states == {"RUNNING": 1},
            timeout=120,
            what="SearchIngress to scale down to the file's one replica",
        )
    finally:
        serve.delete(name)
