"""serve/digits.yaml is a valid Ray Serve 2.60 config whose args are a valid ServingSpec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from retrieval.config import ServingSpec
from retrieval.errors import ConfigError, IndexIntegrityError
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
