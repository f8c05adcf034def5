"""Job settings: the training, scaling, storage, tracking, evaluation, index and incremental sections of a
job spec, and `JobSpec`, the whole job. The job runs in `retrieval.train` (Ray Train), is tracked by
`retrieval.tracking`, scored by `retrieval.evaluation` and indexed by `retrieval.index`.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from retrieval.config.base import _NAME_PATTERN, StrictModel, _without_credentials
from retrieval.config.datasets import KIND_WORDS, DatasetSpec, dataset_names
from retrieval.config.methods import FAMILY_TRAINS_ON, INCREMENTAL_METHODS, METHOD_FAMILY, MethodSpec
from retrieval.config.models import ModelSpec
from retrieval.config.validation import _validate


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
    batch_size: int | None = Field(
        None, ge=2, description="cross-modal jobs: pairs per step per worker (default classes x samples per batch)"
    )

    @property
    def pairs_per_batch(self) -> int:
        """Image-text pairs per step and worker of a cross-modal job."""
        return self.batch_size or self.classes_per_batch * self.samples_per_class


class ScalingSpec(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class StorageSpec(StrictModel):
    """Where Ray Train keeps checkpoints: a local folder, or `s3://bucket/prefix` on a multi-node cluster.

    Credentials never go in a spec: they come from the environment / the standard AWS chain
    on every node. `endpoint_url` (or the `AWS_ENDPOINT_URL` environment variable) points at
    an S3-compatible store such as MinIO.
    """

    path: str = "ray_results"
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    max_failures: int = Field(0, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.match(r"^https?://[^/@\s]+(:\d+)?/?$", value):
            raise ValueError(
                f"endpoint_url must be http(s)://host[:port] with no user or password (credentials come "
                f"from the environment), got {value.split('@')[-1]!r}"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _endpoint_needs_s3(self) -> StorageSpec:
        if self.endpoint_url is not None and not self.path.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// path, but path is {self.path!r}")
        return self


_GATE_PATTERN = re.compile(r"^\s*([A-Za-z0-9_@./]+)\s*(>=|<=|>|<|==)\s*([-+0-9.eE]+)\s*$")
_GATE_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class GateCondition(StrictModel):
    """One condition of a promotion gate, written `recall@1 >= 0.9` in YAML.

    `recall@1` is scored on the test split; `seen_classes/recall@1` on the held-out images of
    the training classes (`dataset.split.seen_test_fraction`).
    """

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
    """MLflow: where runs go, what the model is registered as, when it becomes champion.

    `artifact_location` (e.g. `s3://bucket/mlflow`) is where a *new* experiment keeps its
    artifacts when the tracking URI is a database; with a tracking server, the server's
    `--artifacts-destination` decides. A custom S3 endpoint comes from `MLFLOW_S3_ENDPOINT_URL`.
    """

    tracking_uri: str | None = Field(
        "sqlite:///mlflow.db",
        description=(
            "MLflow tracking URI, without a user or password; null: MLFLOW_TRACKING_URI from the environment "
            "(where a database URI with its password belongs; a tracking server's login goes in "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), else sqlite:///mlflow.db"
        ),
    )
    experiment: str = "retrieval"
    artifact_location: str | None = Field(None, description="artifact root of a new experiment, e.g. s3://b/mlflow")
    registered_model: str | None = Field(None, pattern=_NAME_PATTERN)
    gate: list[GateCondition] = Field(default_factory=list)
    system_metrics: bool = Field(
        False,
        description=(
            "log MLflow system metrics (CPU, memory, disk, network, GPU when pynvml finds one) to the training run "
            "from the first worker of every node, as system/... (system/node<N>/... on several nodes); needs psutil"
        ),
    )
    system_metrics_interval_s: float = Field(
        10.0,
        ge=1.0,
        description="seconds between system metrics samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins)",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri_without_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @field_validator("system_metrics")
    @classmethod
    def _system_metrics_need_psutil(cls, value: bool) -> bool:
        import importlib.util

        if value and importlib.util.find_spec("psutil") is None:
            raise ValueError("MLflow's system metrics need the psutil package: pip install psutil")
        return value

    def uri(self) -> str:
        """The tracking URI to use: the spec's, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

        One read from the environment is never written back into the spec, so it is never
        logged as a parameter or saved in a model package's ``job.yaml``.
        """
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


BaselineName = Literal["raw_pixels", "untrained"]
BASELINES: tuple[BaselineName, ...] = ("raw_pixels", "untrained")


PoolingName = Literal["mac", "spoc", "gem", "rmac", "crow"]


class EvaluationSpec(StrictModel):
    """How a model is scored, and the off-the-shelf variants `retrieval evaluate` tabulates.

    The protocol follows the dataset: leave-one-out Recall@K and mAP@R on the held-out
    split of a class dataset, or the benchmark's own mAP (revisited Easy/Medium/Hard,
    Holidays) or N-S score (UKBench) on a landmark dataset. Each variant is a pooling
    (or the trained model), then optionally PCA-whitening learnt on held-out images, then
    optionally query expansion.
    """

    recall_ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    baselines: list[BaselineName] = Field(default_factory=lambda: list(BASELINES))
    poolings: list[PoolingName] = Field(
        default_factory=list,
        description="off-the-shelf variants: the backbone (no head) with each pooling; empty = the model as built",
    )
    whitening: bool = Field(False, description="also score every variant after PCA-whitening learnt on held-out images")
    whitening_dim: int | None = Field(None, ge=1)
    whitening_dataset: DatasetSpec | None = Field(
        None,
        description="held-out images for PCA-whitening on a landmark benchmark (class datasets use their train split)",
    )
    query_expansion: list[Literal["average", "alpha"]] = Field(default_factory=list)
    qe_top_n: int = Field(2, ge=1)
    qe_alpha: float = Field(3.0, ge=0.0)
    late_fusion_backbones: list[str] = Field(
        default_factory=list, description="model-level fusion: add a variant joining the model with these backbones"
    )
    late_fusion_mode: Literal["concat", "sum"] = "concat"
    map_top_n: int = Field(500, ge=1, description="cross-modal hashing: mAP over the top N of the Hamming ranking")
    precision_ns: list[int] = Field(
        default_factory=lambda: [1, 10, 50, 100, 200, 500, 1000], description="cross-modal hashing: P@N curve"
    )

    @field_validator("recall_ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("recall_ks must be a non-empty list of positive integers")
        return sorted(set(ks))


class IndexSpec(StrictModel):
    """How `retrieval index` lays out the gallery index.

    `out` may be `s3://bucket/prefix`: the index is built locally, then published there (shards,
    manifest, CURRENT last). `endpoint_url` (or `AWS_ENDPOINT_URL`) points at an S3-compatible
    store; credentials come from the environment / the standard AWS chain, never from a spec.
    """

    out: str | None = Field(None, description="index root folder or s3://bucket/prefix; default indices/<job name>")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for an s3:// out")
    num_shards: int = Field(2, ge=1)
    factory: str = "Flat"
    metric: Literal["ip", "l2"] = "ip"
    gallery: Literal["test", "train", "all"] = "test"
    modality: Literal["image", "text"] = Field(
        "image",
        description="cross-modal models: index the retrieval set's images or its texts (captions); queries of "
        "either modality search it",
    )
    train_sample: int = Field(
        100_000, ge=1, description="at most this many vectors of a shard train an index that needs it (IVF, PQ)"
    )
    add_batch_size: int = Field(
        65_536, ge=1, description="vectors added to Faiss per call while streaming the gallery in"
    )
    nprobe: int | None = Field(None, ge=1, description="IVF indices: inverted lists visited per query by default")
    ef_search: int | None = Field(None, ge=1, description="HNSW indices: search breadth per query by default")
    thumbnail_px: int = Field(
        64,
        ge=0,
        description="image galleries: store a PNG thumbnail of this size per item for the search page (0: none)",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        # One rule for every endpoint in a spec: the storage section's.
        return StorageSpec._endpoint_without_credentials(value)

    @model_validator(mode="after")
    def _endpoint_needs_s3(self) -> IndexSpec:
        # With no `out`, `retrieval index --out s3://...` may still give the index an s3:// root.
        if self.endpoint_url is not None and self.out is not None and not self.out.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// out, but out is {self.out!r}")
        return self


class TaskSpec(StrictModel):
    """One task of an incremental sequence: some classes of the job's dataset, or a dataset of its own.

    `classes` picks class ids of the task's dataset (all of them when omitted); `dataset`
    (cross-domain lifelong sequences: birds, then dogs, then cars) replaces the job's
    dataset for this task. Class ids never collide across tasks: the model's classes are
    numbered in task order.
    """

    name: str | None = Field(None, pattern=_NAME_PATTERN)
    classes: str | list[int] | None = Field(None, description="class ids, e.g. '0-4' or [5, 6]")
    dataset: DatasetSpec | None = None
    epochs: int | None = Field(None, ge=1, description="default train.epochs")


class IncrementalSpec(StrictModel):
    """A sequence of tasks trained one after the other (thesis ch. 5-7).

    Every class's images are split once (`test_fraction` held out, seeded), so a task's test
    split is the same after every later task. After each task the runner scores every task
    seen so far, registers the model, and (with `index: true`) builds the gallery index of all
    classes seen so far; with `serve_url` it asks the running Serve app to swap to it.
    """

    tasks: list[TaskSpec] = Field(min_length=1)
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    seed: int = 0
    index: bool = Field(True, description="build the gallery index of the classes seen so far after each task")
    serve_url: str | None = Field(None, description="Serve app to swap after each task, e.g. http://127.0.0.1:8000")
    admin_token_env: str = Field("RETRIEVAL_ADMIN_TOKEN", description="env var holding the admin bearer token")

    @model_validator(mode="after")
    def _tasks_name_their_data(self) -> IncrementalSpec:
        names = [task.name for task in self.tasks if task.name is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for position, task in enumerate(self.tasks):
            if task.dataset is None or task.dataset.kind == "image":
                continue
            raise ValueError(
                f"tasks[{position}].dataset {task.dataset.name!r} is {KIND_WORDS[task.dataset.kind]} "
                f"(kind {task.dataset.kind!r}); a task "
                f"trains on an image dataset, one of {list(dataset_names('image'))}"
            )
        return self


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
    incremental: IncrementalSpec | None = None

    @model_validator(mode="after")
    def _resolve_auto_stem(self) -> JobSpec:
        # Resolved here, where the image sizes are known, so the saved spec names the stem built.
        if self.model.stem == "auto":
            sizes = [self.dataset.image_size]
            if self.incremental is not None:
                sizes += [task.dataset.image_size for task in self.incremental.tasks if task.dataset is not None]
            self.model.stem = self.model.resolved_stem(sizes)
        return self

    @model_validator(mode="after")
    def _incremental_methods_need_tasks(self) -> JobSpec:
        is_incremental = self.method.family == "incremental"
        if is_incremental and self.incremental is None:
            raise ValueError(
                f"method {self.method.name!r} is incremental and needs an 'incremental' section with tasks"
            )
        if not is_incremental and self.incremental is not None:
            raise ValueError(
                f"method {self.method.name!r} trains one task; an 'incremental' sequence needs one of "
                f"{list(INCREMENTAL_METHODS)}"
            )
        return self

    @model_validator(mode="after")
    def _method_family_fits_the_dataset_kind(self) -> JobSpec:
        family, kind = self.method.family, self.dataset.kind
        needed = FAMILY_TRAINS_ON[family]
        # A landmark benchmark is evaluated only: its jobs name an image method that is never trained.
        if kind == needed or (kind == "landmark" and needed == "image"):
            return self
        method, dataset = self.method.name, self.dataset.name
        others = [name for name, other in METHOD_FAMILY.items() if FAMILY_TRAINS_ON[other] == kind]
        raise ValueError(
            f"method {method!r} (family {family!r}) trains on datasets of kind {needed!r}, but dataset {dataset!r} "
            f"is of kind {kind!r}; use one of {list(dataset_names(needed))}"
            + (f", or train {dataset!r} with one of {others}" if others else "")
        )

    @model_validator(mode="after")
    def _landmark_whitening_needs_held_out_images(self) -> JobSpec:
        settings = self.evaluation
        if self.dataset.kind == "landmark" and settings.whitening and settings.whitening_dataset is None:
            raise ValueError(
                f"evaluation.whitening on the landmark benchmark {self.dataset.name!r} needs "
                "evaluation.whitening_dataset (held-out images, e.g. rparis6k when testing roxford5k)"
            )
        return self

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or self.name

    @property
    def index_root(self) -> str:
        return self.index.out or f"indices/{self.name}"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> JobSpec:
        return _validate(cls, data, source=source)
