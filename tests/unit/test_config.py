"""Job and serving specs: YAML in, typed spec out; every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from retrieval.config import (
    DeepMetricSpec,
    GateCondition,
    JobSpec,
    ServingSpec,
    load_job_spec,
)
from retrieval.errors import ConfigError, redact_credentials

REPO_ROOT = Path(__file__).parents[2]


ROOT = Path(__file__).resolve().parents[2]


def _minimal_job(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "unit_job", "method": {"name": "deep_metric"}, "train": {"epochs": 2}}
    data.update(sections)
    return data


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _load_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job_spec(path, overrides)
    return str(caught.value)


# --------------------------------------------------------------------------- loading


def test_valid_file_loads_with_its_values_and_the_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _minimal_job(
            method={"name": "deep_metric", "loss": "triplet", "triplet_margin": 0.2},
            model={"embedding_dim": 64},
        ),
    )
    spec = load_job_spec(path)
    assert isinstance(spec, JobSpec)
    assert isinstance(spec.method, DeepMetricSpec)
    assert (spec.name, spec.method.loss, spec.method.triplet_margin) == ("unit_job", "triplet", 0.2)
    assert (spec.train.epochs, spec.model.embedding_dim) == (2, 64)
    # Untouched sections take their documented defaults.
    assert (spec.model.backbone, spec.optimizer.name, spec.train.classes_per_batch) == ("resnet18", "adamw", 5)
    assert spec.registered_model_name == "unit_job"
    assert spec.index_root == "indices/unit_job"


def test_the_repository_job_spec_loads() -> None:
    spec = load_job_spec(REPO_ROOT / "jobs" / "digits_deep_metric.yaml")
    assert spec.name == "digits_deep_metric"
    assert spec.method.name == "deep_metric"
    assert spec.dataset.name == "digits"
    assert spec.registered_model_name == "digits-deep-metric"
    # The gate is on the catalogue protocol (held-out images of the training classes).
    assert [str(condition) for condition in spec.tracking.gate] == ["seen_classes/recall@1 >= 0.9"]
    assert spec.dataset.split.seen_test_fraction == 0.3


@pytest.mark.parametrize(
    ("sections", "key", "hint"),
    [
        ({"trian": {"epochs": 3}}, "trian", "train"),
        ({"train": {"epoch": 3}}, "train.epoch", "epochs"),
        ({"method": {"name": "deep_metric", "los": "triplet"}}, "method.los", "loss"),
    ],
)
def test_unknown_key_names_file_key_and_a_suggestion(
    tmp_path: Path, sections: dict[str, Any], key: str, hint: str
) -> None:
    path = _write(tmp_path, _minimal_job(**sections))
    message = _load_error(path)
    assert str(path) in message
    assert f"{key}: unknown key" in message
    assert f"did you mean '{hint}'?" in message


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job(train={"epochs": "many"}))
    message = _load_error(path)
    assert str(path) in message
    assert "train.epochs:" in message
    assert "'many'" in message


def test_missing_required_name_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, {"method": {"name": "deep_metric"}})
    assert "name: required key is missing" in _load_error(path)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: broken\ntrain: [1, 2\n")
    message = _load_error(path)
    assert message.startswith(f"{path}: not valid YAML")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "- name\n- method\n")
    message = _load_error(path)
    assert str(path) in message
    assert "top level must be a mapping" in message
    assert "list" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert _load_error(path) == f"{path}: no such file"


# --------------------------------------------------------------------------- --set overrides


def test_set_override_changes_the_value_with_yaml_typing(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job())
    spec = load_job_spec(path, ["train.epochs=3", "model.embedding_dim=16", "evaluation.recall_ks=[1, 5]"])
    assert spec.train.epochs == 3
    assert spec.model.embedding_dim == 16
    assert spec.evaluation.recall_ks == [1, 5]


def test_set_override_of_an_unknown_key_names_key_and_set(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job())
    message = _load_error(path, ("train.epoch=3",))
    assert str(path) in message
    assert "--set train.epoch=3" in message
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in message


def test_set_override_replacing_a_section_by_a_scalar_is_a_type_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job())
    message = _load_error(path, ("dataset=5",))
    assert "--set dataset=5" in message
    assert "dataset:" in message
    assert "(got 5)" in message


def test_set_override_through_a_value_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job())
    message = _load_error(path, ("train.epochs.x=1",))
    assert "--set 'train.epochs.x=1'" in message
    assert "'train.epochs' is a value, not a section" in message


def test_set_override_without_equals_sign_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job())
    assert "expected 'dotted.key=value'" in _load_error(path, ("train.epochs",))


def test_set_override_with_a_value_outside_a_choice_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job())
    message = _load_error(path, ("method.loss=triplett",))
    assert "method.loss:" in message
    assert "'triplett'" in message


# --------------------------------------------------------------------------- promotion gate


def test_gate_text_parses_into_a_condition() -> None:
    condition = GateCondition.model_validate("recall@1 >= 0.9")
    assert (condition.metric, condition.op, condition.value) == ("recall@1", ">=", 0.9)
    assert str(condition) == "recall@1 >= 0.9"


@pytest.mark.parametrize(
    ("text", "metrics", "expected"),
    [
        ("recall@1 >= 0.9", {"recall@1": 0.9}, True),
        ("recall@1 >= 0.9", {"recall@1": 0.89}, False),
        ("recall@1 > 0.9", {"recall@1": 0.9}, False),
        ("map_at_r <= 1e-1", {"map_at_r": 0.05}, True),
        ("loss < 2", {"loss": 3.0}, False),
        ("recall@1 == 1", {"recall@1": 1.0}, True),
    ],
)
def test_gate_condition_holds_as_its_operator_says(text: str, metrics: dict[str, float], expected: bool) -> None:
    assert GateCondition.model_validate(text).holds(metrics) is expected


def test_gate_fails_when_its_metric_was_not_measured() -> None:
    assert GateCondition.model_validate("recall@1 >= 0.0").holds({"recall@2": 1.0}) is False


def test_bad_gate_text_names_the_list_entry(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job(tracking={"gate": ["recall@1 >= 0.5", "recall@1 is high"]}))
    message = _load_error(path)
    assert "tracking.gate[1]:" in message
    assert "not of the form 'metric >= number'" in message


def test_gate_in_a_job_file_becomes_conditions(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job(tracking={"gate": ["recall@1 >= 0.5", "map_at_r > 0.2"]}))
    gate = load_job_spec(path).tracking.gate
    assert [(condition.metric, condition.op, condition.value) for condition in gate] == [
        ("recall@1", ">=", 0.5),
        ("map_at_r", ">", 0.2),
    ]


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    ("dataset", "key", "fragment"),
    [
        ({"name": "image_folder"}, "dataset:", "needs 'root'"),
        ({"name": "digits", "root": "/data/digits"}, "dataset:", "takes no 'root'"),
        (
            {"split": {"mode": "class_fraction", "train_classes": "0-4"}},
            "dataset.split:",
            "apply to mode 'class_ranges', not 'class_fraction'",
        ),
        ({"name": "cub200"}, "dataset:", "needs 'root'"),
        ({"name": "roxford5k"}, "dataset:", "needs 'root'"),
    ],
)
def test_dataset_rules_name_the_section(tmp_path: Path, dataset: dict[str, Any], key: str, fragment: str) -> None:
    path = _write(tmp_path, _minimal_job(dataset=dataset))
    message = _load_error(path)
    assert str(path) in message
    assert key in message
    assert fragment in message


def test_dataset_name_shorthand_is_the_usual_class_disjoint_protocol(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job(dataset="digits"))
    spec = load_job_spec(path)
    assert (spec.dataset.name, spec.dataset.split.mode) == ("digits", "class_ranges")
    assert spec.dataset.split.train_classes is None and spec.dataset.split.test_classes is None
    cub = load_job_spec(ROOT / "jobs" / "cub_finetune_triplet.yaml", ["dataset=digits", "model.weights=null"])
    assert cub.dataset.name == "digits" and cub.dataset.root is None and cub.model.weights is None


def test_image_folder_with_root_is_valid(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_job(dataset={"name": "image_folder", "root": str(tmp_path)}))
    assert load_job_spec(path).dataset.root == str(tmp_path)


# --------------------------------------------------------------------------- serving spec


def test_serving_spec_unknown_key_names_source_and_key() -> None:
    with pytest.raises(ConfigError) as caught:
        ServingSpec.from_mapping({"index": "indices/digits", "max_kk": 5}, source="serve/app.yaml")
    message = str(caught.value)
    assert message.startswith("serve/app.yaml: invalid spec")
    assert "max_kk: unknown key (did you mean 'max_k'?)" in message


def test_serving_spec_default_k_above_max_k_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"default_k \(20\) is larger than max_k \(5\)"):
        ServingSpec.from_mapping({"index": "indices/digits", "max_k": 5, "default_k": 20}, source="serve/app.yaml")


def test_serving_spec_valid_mapping_loads() -> None:
    spec = ServingSpec.from_mapping({"index": "indices/digits", "max_k": 50, "default_k": 50}, source="serve.yaml")
    assert (spec.index, spec.max_k, spec.default_k, spec.shard_replicas) == ("indices/digits", 50, 50, 1)


def test_did_you_mean_only_suggests_keys_of_the_same_section() -> None:
    """`lr` lives under `optimizer`: under `train` it is unknown, with no misleading hint."""
    with pytest.raises(ConfigError) as raised:
        JobSpec.from_mapping({"name": "x", "method": {"name": "deep_metric"}, "train": {"lr": 0.1}}, source="f.yaml")
    assert "train.lr: unknown key" in str(raised.value)
    assert "did you mean" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"tracking\.gate\[0\]\.vlue: unknown key \(did you mean 'value'\?\)"):
        JobSpec.from_mapping(
            {
                "name": "x",
                "method": {"name": "deep_metric"},
                "tracking": {"gate": [{"metric": "a", "op": ">=", "vlue": 1}]},
            },
            source="f.yaml",
        )


def test_dataset_shorthand_then_a_dataset_key_expands_the_shorthand(tmp_path: Path) -> None:
    spec = load_job_spec(
        ROOT / "jobs" / "cub_finetune_triplet.yaml",
        ["dataset=digits", "dataset.image_size=48", "dataset.split.mode=image_fraction", "model.weights=null"],
    )
    assert (spec.dataset.name, spec.dataset.image_size, spec.dataset.split.mode) == ("digits", 48, "image_fraction")


PASSWORD = "s3cr/t:pa55"


@pytest.mark.parametrize(
    "uri",
    [f"postgresql://bob:{PASSWORD}@db:5432/mlflow", f"https://bob:{PASSWORD}@mlflow.example.com", "http://token@h"],
)
def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(tmp_path: Path, uri: str) -> None:
    """Issue 16, item 10: specs are logged as parameters and saved in every package's job.yaml."""
    message = _load_error(_write(tmp_path, _minimal_job(tracking={"tracking_uri": uri})))
    assert "tracking.tracking_uri" in message and "must not contain a user or password" in message
    assert "MLFLOW_TRACKING_URI" in message
    assert PASSWORD not in message and "bob" not in message and "token" not in message
    with pytest.raises(ConfigError, match="must not contain a user or password") as caught:
        ServingSpec.from_mapping({"index": "indices/x", "tracking_uri": uri}, source="serve.yaml")
    assert PASSWORD not in str(caught.value)


def test_a_null_tracking_uri_comes_from_the_environment_and_is_never_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_uri = f"postgresql://bob:{PASSWORD}@db/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    spec = load_job_spec(_write(tmp_path, _minimal_job(tracking={"tracking_uri": None})))
    assert spec.tracking.uri() == secret_uri
    assert PASSWORD not in yaml.safe_dump(spec.model_dump(mode="json"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert spec.tracking.uri() == "sqlite:///mlflow.db"
    assert load_job_spec(_write(tmp_path, _minimal_job())).tracking.uri() == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"cannot reach postgresql://bob:{PASSWORD}@db:5432/mlflow now",
            "cannot reach postgresql://***@db:5432/mlflow now",
        ),
        ("https://u:p@host/x and http://v@h", "https://***@host/x and http://***@h"),
        ("models:/m@champion s3://bucket/a https://host/api?mail=a@b https://host:5000/x", None),
    ],
)
def test_credentials_are_redacted_from_messages_even_with_a_slash_in_the_password(
    text: str, expected: str | None
) -> None:
    assert redact_credentials(text) == (text if expected is None else expected)


def test_the_cli_redacts_credentials_from_errors_and_logs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from retrieval import cli
    from retrieval.errors import RetrievalError

    def fail(args: Any) -> int:
        logging.getLogger("retrieval.test").warning("connecting to %s", f"postgresql://bob:{PASSWORD}@db/m")
        raise RetrievalError(f"cannot open postgresql://bob:{PASSWORD}@db/m")

    class Parser:
        def parse_args(self, argv: Any) -> Any:
            import argparse

            return argparse.Namespace(handler=fail, verbose=False, log_format="text")

    monkeypatch.setattr(cli, "_parser", Parser)
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        for handler in before:
            root.removeHandler(handler)
        assert cli.main(["train", "job.yaml"]) == 2
        captured = capsys.readouterr()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)
    assert PASSWORD not in captured.err
    assert "error: cannot open postgresql://***@db/m" in captured.err
    assert "connecting to postgresql://***@db/m" in captured.err


def test_a_gate_can_name_a_seen_classes_metric() -> None:
    condition = GateCondition.model_validate("seen_classes/recall@1 >= 0.9")
    assert (condition.metric, condition.op, condition.value) == ("seen_classes/recall@1", ">=", 0.9)
    assert condition.holds({"recall@1": 0.5, "seen_classes/recall@1": 0.95})
    assert not condition.holds({"recall@1": 0.95})  # not measured: fails
