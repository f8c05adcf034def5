"""Names from one place: the dataset table (`DATASETS`) and the method spec classes (`METHOD_SPECS`)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from retrieval import config
from retrieval.config import (
    CROSS_MODAL_DATASETS,
    CROSS_MODAL_METHODS,
    DATASETS,
    INCREMENTAL_METHODS,
    LANDMARK_DATASETS,
    METHOD_FAMILY,
    METHOD_NAMES,
    METHOD_SPECS,
    DatasetInfo,
    DatasetSpec,
    JobSpec,
    ServingSpec,
    dataset_names,
    load_job_spec,
    load_sweep_spec,
    method_name,
)
from retrieval.config import methods as method_specs
from retrieval.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _job(**sections: Any) -> dict[str, Any]:
    return {"name": "names_unit", "method": {"name": "deep_metric"}, **sections}


# --------------------------------------------------------------------------- datasets


def test_the_name_lists_are_views_of_the_table() -> None:
    assert LANDMARK_DATASETS == dataset_names("landmark") == ("roxford5k", "rparis6k", "holidays", "ukbench")
    assert dataset_names("image_text") == CROSS_MODAL_DATASETS
    assert CROSS_MODAL_DATASETS == ("digit_pairs", "mirflickr25k", "nus_wide", "flickr30k", "coco")
    assert dataset_names("image") == ("digits", "image_folder", "cub200", "stanford_dogs", "stanford_cars")
    assert dataset_names() == tuple(DATASETS)


def test_every_table_name_is_a_valid_dataset_with_its_kind_and_root_rule() -> None:
    for name, info in DATASETS.items():
        root = None if info.bundled else "/data/somewhere"
        spec = DatasetSpec(name=name, root=root)
        assert (spec.kind, spec.info) == (info.kind, info)
        if info.bundled:
            with pytest.raises(ValidationError, match=f"dataset '{name}' is bundled and takes no 'root'"):
                DatasetSpec(name=name, root="/data/somewhere")
        else:
            with pytest.raises(ValidationError, match=f"dataset '{name}' needs 'root'"):
                DatasetSpec(name=name)


def test_the_json_schema_and_the_reference_list_the_table_names() -> None:
    schema = JobSpec.model_json_schema()["$defs"]["DatasetSpec"]["properties"]["name"]
    assert schema["enum"] == list(DATASETS)
    annotation = DatasetSpec.model_fields["name"].annotation
    assert typing.get_origin(annotation) is typing.Literal and typing.get_args(annotation) == tuple(DATASETS)
    doc = DatasetSpec.__doc__ or ""
    for name, info in DATASETS.items():
        assert f"| `{name}` | `{info.kind}` |" in doc and info.description in doc


def test_an_unknown_dataset_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as raised:
        DatasetSpec(name="mnist")
    message = str(raised.value)
    assert "unknown dataset 'mnist'" in message
    assert all(repr(name) in message for name in DATASETS)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(dataset={"name": "cub2000", "root": "/data"})))
    with pytest.raises(ConfigError) as raised_config:
        load_job_spec(path)
    assert "dataset.name: unknown dataset 'cub2000' (did you mean 'cub200'?); expected one of ['digits'" in str(
        raised_config.value
    )
    with pytest.raises(ConfigError, match=r"dataset\.name: unknown dataset 'mnist'"):
        load_job_spec(ROOT / "jobs" / "digits_deep_metric.yaml", ["dataset=mnist"])


def test_a_table_row_is_checked_when_written() -> None:
    with pytest.raises(ValueError, match="dataset kind 'video' is not one of"):
        DatasetInfo(kind="video", loader="m:f", description="", root=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"is not a 'package\.module:function' path"):
        DatasetInfo(kind="image", loader="retrieval.data.digits.load_digits_dataset", description="", root=None)
    with pytest.raises(ValueError, match=r"a landmark benchmark \(kind 'landmark'\) needs a protocol"):
        DatasetInfo(kind="landmark", loader="m:f", description="", root="in its layout")
    with pytest.raises(ValueError, match=r"an image dataset \(kind 'image'\) takes no protocol"):
        DatasetInfo(kind="image", loader="m:f", description="", root=None, protocol="holidays")


def test_a_row_added_to_the_table_is_a_dataset_everywhere_in_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "fake_pairs" not in DATASETS
    with pytest.raises(ValidationError, match="unknown dataset 'fake_pairs'"):
        DatasetSpec(name="fake_pairs")
    monkeypatch.setitem(
        DATASETS,
        "fake_pairs",
        DatasetInfo(kind="image_text", loader="fake.module:load", description="a test row", root="holding pairs"),
    )
    with pytest.raises(ValidationError, match=r"dataset 'fake_pairs' needs 'root' \(a folder holding pairs\)"):
        DatasetSpec(name="fake_pairs")
    spec = DatasetSpec(name="fake_pairs", root="/data/pairs")
    assert spec.kind == "image_text"
    assert "fake_pairs" in dataset_names("image_text")
    # The method/dataset pairing reads the kind from the table too.
    job = JobSpec.model_validate(_job(method={"name": "cross_modal_hashing"}, dataset=spec.model_dump()))
    assert job.method.family == "image_text"
    with pytest.raises(ValidationError, match="dataset 'fake_pairs' is of kind 'image_text'"):
        JobSpec.model_validate(_job(dataset=spec.model_dump()))


# --------------------------------------------------------------------------- kinds and families


def test_the_method_name_lists_come_from_the_spec_classes() -> None:
    assert typing.get_args(typing.get_args(config.MethodSpec)[0]) == METHOD_SPECS
    assert tuple(method_name(spec_class) for spec_class in METHOD_SPECS) == METHOD_NAMES
    assert METHOD_NAMES == (
        "deep_metric",
        "classification",
        "unsupervised_metric",
        "incremental_finetune",
        "incremental_joint",
        "lwf",
        "ewc",
        "incremental_kd_mmd",
        "feature_estimation",
        "dual_distillation",
        "cross_modal_hashing",
        "adversarial_cross_modal",
    )
    assert CROSS_MODAL_METHODS == ("cross_modal_hashing", "adversarial_cross_modal")
    assert INCREMENTAL_METHODS == (
        "incremental_finetune",
        "incremental_joint",
        "lwf",
        "ewc",
        "incremental_kd_mmd",
        "feature_estimation",
        "dual_distillation",
    )
    for spec_class in METHOD_SPECS:
        assert METHOD_FAMILY[method_name(spec_class)] == spec_class.family
        parsed = JobSpec.model_validate(
            _job(
                method={"name": method_name(spec_class)},
                dataset="digit_pairs" if spec_class.family == "image_text" else "digits",
                **({"incremental": {"tasks": [{"classes": "0-4"}]}} if spec_class.family == "incremental" else {}),
            )
        )
        assert type(parsed.method) is spec_class


def test_a_method_spec_class_without_a_family_or_a_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoFamily(config.StrictModel):
        name: typing.Literal["no_family"] = "no_family"

    # `_method_families` reads METHOD_SPECS of the module that defines both.
    monkeypatch.setattr(method_specs, "METHOD_SPECS", (*METHOD_SPECS, NoFamily))
    with pytest.raises(TypeError, match="NoFamily needs `family: ClassVar"):
        method_specs._method_families()
    monkeypatch.setattr(method_specs, "METHOD_SPECS", (*METHOD_SPECS, config.DeepMetricSpec))
    with pytest.raises(TypeError, match="two method spec classes are named 'deep_metric'"):
        method_specs._method_families()
    with pytest.raises(TypeError, match="needs a field `name: Literal"):
        method_name(config.ModelSpec)


@pytest.mark.parametrize(
    ("method", "dataset", "fragments"),
    [
        (
            {"name": "cross_modal_hashing"},
            "digits",
            [
                "method 'cross_modal_hashing' (family 'image_text') trains on datasets of kind 'image_text'",
                "dataset 'digits' is of kind 'image'",
                "use one of ['digit_pairs'",
                "or train 'digits' with one of ['deep_metric'",
            ],
        ),
        (
            {"name": "adversarial_cross_modal"},
            {"name": "holidays", "root": "/data/holidays"},
            ["method 'adversarial_cross_modal' (family 'image_text')", "dataset 'holidays' is of kind 'landmark'"],
        ),
        (
            {"name": "deep_metric"},
            "digit_pairs",
            [
                "method 'deep_metric' (family 'image') trains on datasets of kind 'image'",
                "dataset 'digit_pairs' is of kind 'image_text'",
                "or train 'digit_pairs' with one of ['cross_modal_hashing', 'adversarial_cross_modal']",
            ],
        ),
    ],
)
def test_a_method_family_must_fit_the_dataset_kind(method: dict[str, Any], dataset: Any, fragments: list[str]) -> None:
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate(_job(method=method, dataset=dataset))
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_landmark_benchmark_is_evaluated_with_an_image_method_but_never_a_task() -> None:
    job = JobSpec.model_validate(_job(dataset={"name": "roxford5k", "root": "/data/roxford5k"}))
    assert job.dataset.kind == "landmark" and job.method.family == "image"
    for dataset, kind in (({"name": "ukbench", "root": "/data/ukbench"}, "landmark"), ("digit_pairs", "image_text")):
        with pytest.raises(ValidationError, match=rf"tasks\[1\]\.dataset '\w+' is an? [\w-]+ \w+ \(kind '{kind}'\)"):
            JobSpec.model_validate(
                _job(
                    method={"name": "lwf"},
                    incremental={"tasks": [{"classes": "0-4"}, {"dataset": dataset}]},
                )
            )


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize(
    "path",
    [path for path in sorted((ROOT / "jobs").glob("*.yaml")) if path.name != "runtime_env.yaml"],
    ids=lambda path: path.name,
)
def test_every_shipped_job_spec_loads(path: Path) -> None:
    spec = load_job_spec(path)
    assert spec.dataset.name in DATASETS and spec.method.name in METHOD_NAMES


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_sweep_loads(path: Path) -> None:
    assert load_sweep_spec(path).base_job.method.name in METHOD_NAMES


@pytest.mark.parametrize("path", sorted((ROOT / "serve").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_serve_config_has_valid_args(path: Path) -> None:
    for application in yaml.safe_load(path.read_text())["applications"]:
        ServingSpec.from_mapping(application["args"], source=str(path))
