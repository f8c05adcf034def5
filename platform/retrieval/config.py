"""Typed specs of a training job and a serving app, loaded from YAML.

A spec is validated once, at the edge (CLI, Ray job entrypoint, Serve application
builder), and then passed down as these typed objects. Unknown keys and wrong types
are errors that name the key and the file they came from.

Example:
    >>> spec = JobSpec.model_validate({"name": "demo", "method": {"name": "deep_metric"}})
    >>> spec.train.epochs
    10
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from retrieval.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    """Base of every spec: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class SplitSpec(StrictModel):
    """How a dataset is split into a training part and a held-out retrieval part.

    `class_ranges` and `class_fraction` are class-disjoint (the deep metric learning
    protocol: retrieval is tested on classes never seen in training); `image_fraction`
    splits the images of every class.
    """

    mode: Literal["class_ranges", "class_fraction", "image_fraction"] = "class_fraction"
    train_classes: str | list[int] | None = None
    test_classes: str | list[int] | None = None
    train_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _ranges_need_classes(self) -> SplitSpec:
        if self.mode == "class_ranges" and (self.train_classes is None or self.test_classes is None):
            raise ValueError("mode 'class_ranges' needs both 'train_classes' and 'test_classes' (e.g. '0-4')")
        return self


class DatasetSpec(StrictModel):
    """Which images to train and evaluate on.

    `digits` is bundled (scikit-learn's real 8x8 handwritten digits); `image_folder`
    reads a user's own `root/<class>/<image>` tree.
    """

    name: Literal["digits", "image_folder"] = "digits"
    root: str | None = None
    image_size: int = Field(32, ge=8, le=2048)
    augment: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    split: SplitSpec = Field(default_factory=SplitSpec)

    @model_validator(mode="after")
    def _root_matches_name(self) -> DatasetSpec:
        if self.name == "image_folder" and not self.root:
            raise ValueError("dataset 'image_folder' needs 'root' (a folder laid out as root/<class>/<image>)")
        if self.name == "digits" and self.root:
            raise ValueError("dataset 'digits' is bundled and takes no 'root'")
        return self


# --------------------------------------------------------------------------- model and method


class ModelSpec(StrictModel):
    """Backbone, pooling and embedding head."""

    backbone: str = "resnet18"
    weights: str | None = Field(
        None, description="torchvision weights name (e.g. 'DEFAULT', 'IMAGENET1K_V1'); None = random init"
    )
    pooling: Literal["gem", "avg", "max"] = "gem"
    gem_p: float = Field(3.0, gt=0.0)
    embedding_dim: int = Field(128, ge=2, le=8192)


class DeepMetricSpec(StrictModel):
    """Thesis ch. 2, verification-based fine-tuning with pytorch-metric-learning losses."""

    name: Literal["deep_metric"] = "deep_metric"
    loss: Literal["triplet", "multi_similarity", "contrastive"] = "multi_similarity"
    miner: Literal["default", "none"] = "default"
    triplet_margin: float = Field(0.1, ge=0.0)
    triplet_mining: Literal["hard", "semihard", "all"] = "hard"
    ms_alpha: float = Field(2.0, gt=0.0)
    ms_beta: float = Field(50.0, gt=0.0)
    ms_base: float = 0.5
    ms_miner_epsilon: float = Field(0.1, ge=0.0)
    contrastive_pos_margin: float = 1.0
    contrastive_neg_margin: float = 0.0
    metric_weight: float = Field(1.0, ge=0.0)


MethodSpec = Annotated[DeepMetricSpec, Field(discriminator="name")]


# --------------------------------------------------------------------------- training


class OptimizerSpec(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["constant", "cosine"] = "cosine"


class TrainSpec(StrictModel):
    epochs: int = Field(10, ge=1)
    classes_per_batch: int = Field(5, ge=2)
    samples_per_class: int = Field(8, ge=1)
    seed: int = 0
    loader_workers: int = Field(0, ge=0)
    embed_batch_size: int = Field(256, ge=1)


class ScalingSpec(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class StorageSpec(StrictModel):
    """Where Ray Train keeps checkpoints. `s3://...` on a multi-node cluster."""

    path: str = "ray_results"
    max_failures: int = Field(0, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)


_GATE_PATTERN = re.compile(r"^\s*([A-Za-z0-9_@.]+)\s*(>=|<=|>|<|==)\s*([-+0-9.eE]+)\s*$")
_GATE_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class GateCondition(StrictModel):
    """One condition of a promotion gate, written `recall@1 >= 0.9` in YAML."""

    metric: str
    op: Literal[">=", "<=", ">", "<", "=="]
    value: float

    @model_validator(mode="before")
    @classmethod
    def _parse_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _GATE_PATTERN.match(data)
            if not match:
                raise ValueError(f"gate condition {data!r} is not of the form 'metric >= number'")
            return {"metric": match.group(1), "op": match.group(2), "value": float(match.group(3))}
        return data

    def holds(self, metrics: Mapping[str, float]) -> bool:
        """Whether the condition holds; a metric that was not measured fails the gate."""
        if self.metric not in metrics:
            return False
        return bool(_GATE_OPERATORS[self.op](metrics[self.metric], self.value))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class TrackingSpec(StrictModel):
    """MLflow: where runs go, what the model is registered as, when it becomes champion."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "retrieval"
    registered_model: str | None = Field(None, pattern=_NAME_PATTERN)
    gate: list[GateCondition] = Field(default_factory=list)


BaselineName = Literal["raw_pixels", "untrained"]
BASELINES: tuple[BaselineName, ...] = ("raw_pixels", "untrained")


class EvaluationSpec(StrictModel):
    recall_ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    baselines: list[BaselineName] = Field(default_factory=lambda: list(BASELINES))

    @field_validator("recall_ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("recall_ks must be a non-empty list of positive integers")
        return sorted(set(ks))


class IndexSpec(StrictModel):
    """How `retrieval index` lays out the gallery index."""

    out: str | None = Field(None, description="index root folder; default indices/<job name>")
    num_shards: int = Field(2, ge=1)
    factory: str = "Flat"
    metric: Literal["ip", "l2"] = "ip"
    gallery: Literal["test", "train", "all"] = "test"


class JobSpec(StrictModel):
    """A training job: one method on one dataset, with everything needed to rerun it."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    method: MethodSpec
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or self.name

    @property
    def index_root(self) -> str:
        return self.index.out or f"indices/{self.name}"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> JobSpec:
        return _validate(cls, data, source=source)


# --------------------------------------------------------------------------- serving


class ServingSpec(StrictModel):
    """Arguments of the Ray Serve application (the `args:` of a Serve config file)."""

    index: str = Field(description="index root folder (with CURRENT) or a manifest.json")
    tracking_uri: str | None = None
    shard_replicas: int = Field(1, ge=1)
    embedder_replicas: int = Field(1, ge=1)
    shard_num_cpus: float = Field(0.5, ge=0.0)
    embedder_num_cpus: float = Field(0.5, ge=0.0)
    max_k: int = Field(100, ge=1)
    default_k: int = Field(10, ge=1)
    max_upload_bytes: int = Field(10_000_000, ge=1)

    @model_validator(mode="after")
    def _default_within_max(self) -> ServingSpec:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is larger than max_k ({self.max_k})")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> ServingSpec:
        return _validate(cls, data, source=source)


# --------------------------------------------------------------------------- loading


def load_job_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a job spec from YAML, apply `a.b=value` overrides, validate.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: naming the file (or the override) and the offending key.
    """
    data = read_yaml_mapping(path)
    for override in overrides:
        apply_override(data, override)
    source = str(path) + (f" (with --set {', '.join(overrides)})" if overrides else "")
    return JobSpec.from_mapping(data, source=source)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `dotted.key=value` in a raw spec mapping, creating intermediate mappings.

    >>> spec = {"train": {"epochs": 3}}
    >>> apply_override(spec, "train.epochs=5"); spec
    {'train': {'epochs': 5}}
    """
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected 'dotted.key=value'")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {override!r}: '{where}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override!r}: value is not valid YAML: {error}") from error


def _validate(model: type[StrictModel], data: Mapping[str, Any], *, source: str) -> Any:
    try:
        return model.model_validate(dict(data))
    except ValidationError as error:
        lines = [_describe_error(item, data, model) for item in error.errors()]
        raise ConfigError(f"{source}: invalid spec:\n  " + "\n  ".join(lines)) from None


def _describe_error(item: Mapping[str, Any], data: Any, root: type[BaseModel]) -> str:
    key = _key_path(item["loc"], data)
    if item["type"] == "extra_forbidden":
        name = str(item["loc"][-1])
        hint = difflib.get_close_matches(name, sorted(_section_fields(root, item["loc"][:-1])), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: unknown key{suggestion}"
    if item["type"] == "missing":
        return f"{key}: required key is missing"
    message = str(item["msg"]).removeprefix("Value error, ")
    value = item.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{key}: {message}{shown}"


def _key_path(loc: Sequence[Any], data: Any) -> str:
    """Dotted key for an error location, skipping pydantic's union tags and type names."""
    parts: list[str] = []
    node = data
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(node, list) and isinstance(part, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part}]"]
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif last or not isinstance(node, dict):
            parts.append(str(part))
        # else: a discriminator tag or a model-name segment pydantic inserts; not a user key
    return ".".join(parts) or "<top level>"


def _section_fields(root: type[BaseModel], loc: Sequence[Any]) -> set[str]:
    """The keys allowed in the section at `loc`, for "did you mean" hints within that section."""
    candidates = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        owners = [model for model in candidates if part in model.model_fields]
        if owners:
            candidates = [found for model in owners for found in _models_in(model.model_fields[part].annotation)]
        else:
            # A discriminator tag pydantic puts in the location: keep the union member it names.
            candidates = [
                model
                for model in candidates
                if model.model_fields.get("name") and model.model_fields["name"].default == part
            ]
    return {name for model in candidates for name in model.model_fields}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field annotation (through Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_in(argument)]
