"""Typed specs of a training job and a serving app, loaded from YAML.

A spec is validated once, at the edge (CLI, Ray job entrypoint, Serve application
builder), and then passed down as these typed objects. Unknown keys and wrong types
are errors that name the key and the file they came from.

Every name is importable from `retrieval.config`; each module holds one concern:

- `base`: `StrictModel` (the base of every spec), `IMAGENET_MEAN` / `IMAGENET_STD`, the name pattern;
- `datasets`: the dataset table `DATASETS` and the `dataset` section (loaders: `retrieval.data`);
- `models`: the `model` section (`retrieval.models`);
- `methods`: the `method` section, one spec class per method (`retrieval.methods`);
- `job`: the other sections of a job spec and `JobSpec` (run by `retrieval.train`);
- `serving`: `ServingSpec`, the Serve application's args (`retrieval.serving`);
- `sweeps`: `SweepSpec` and `load_sweep_spec` (run by `retrieval.tune`);
- `loading`: `load_job_spec` and the `--set` overrides;
- `validation`: validation errors that name the key and the file.

Example:
    >>> spec = JobSpec.model_validate({"name": "demo", "method": {"name": "deep_metric"}})
    >>> spec.train.epochs
    10
"""

from __future__ import annotations

from retrieval.config.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StrictModel,
)
from retrieval.config.datasets import (
    CROSS_MODAL_DATASETS,
    DATASET_KINDS,
    DATASETS,
    KIND_WORDS,
    LANDMARK_DATASETS,
    CrossModalSplitSpec,
    DatasetInfo,
    DatasetKind,
    DatasetName,
    DatasetSpec,
    SplitSpec,
    dataset_names,
    dataset_shorthand,
)
from retrieval.config.job import (
    BASELINES,
    BaselineName,
    EvaluationSpec,
    GateCondition,
    IncrementalSpec,
    IndexSpec,
    JobSpec,
    OptimizerSpec,
    PoolingName,
    ScalingSpec,
    StorageSpec,
    TaskSpec,
    TrackingSpec,
    TrainSpec,
)
from retrieval.config.loading import (
    apply_override,
    load_job_spec,
    parse_override,
    read_yaml_mapping,
    set_dotted,
)
from retrieval.config.methods import (
    CROSS_MODAL_METHODS,
    FAMILY_TRAINS_ON,
    INCREMENTAL_METHODS,
    METHOD_FAMILIES,
    METHOD_FAMILY,
    METHOD_NAMES,
    METHOD_SPECS,
    AdversarialCrossModalSpec,
    ClassificationSpec,
    CrossModalHashingSpec,
    DeepMetricSpec,
    DualDistillationSpec,
    EwcSpec,
    FeatureEstimationSpec,
    FineTuneSpec,
    IncrementalKdMmdSpec,
    IncrementalMethodSpec,
    JointSpec,
    LwfSpec,
    MethodFamily,
    MethodSpec,
    SynthesisSpec,
    TextEncoderSpec,
    UnsupervisedMetricSpec,
    method_name,
)
from retrieval.config.models import (
    SMALL_STEM_FAMILIES,
    SMALL_STEM_MAX_IMAGE_SIZE,
    ModelSpec,
    StemName,
    small_stem_supported,
)
from retrieval.config.serving import (
    ServingSpec,
)
from retrieval.config.sweeps import (
    DISTRIBUTIONS,
    Distribution,
    LoadedSweep,
    SchedulerSpec,
    SearchSpec,
    SweepSpec,
    TrialResourcesSpec,
    load_sweep_spec,
    sweep_metric_names,
)
from retrieval.config.validation import (
    validate_declared_keys,
)

__all__ = [
    "BASELINES",
    "CROSS_MODAL_DATASETS",
    "CROSS_MODAL_METHODS",
    "DATASETS",
    "DATASET_KINDS",
    "DISTRIBUTIONS",
    "FAMILY_TRAINS_ON",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCREMENTAL_METHODS",
    "KIND_WORDS",
    "LANDMARK_DATASETS",
    "METHOD_FAMILIES",
    "METHOD_FAMILY",
    "METHOD_NAMES",
    "METHOD_SPECS",
    "SMALL_STEM_FAMILIES",
    "SMALL_STEM_MAX_IMAGE_SIZE",
    "AdversarialCrossModalSpec",
    "BaselineName",
    "ClassificationSpec",
    "CrossModalHashingSpec",
    "CrossModalSplitSpec",
    "DatasetInfo",
    "DatasetKind",
    "DatasetName",
    "DatasetSpec",
    "DeepMetricSpec",
    "Distribution",
    "DualDistillationSpec",
    "EvaluationSpec",
    "EwcSpec",
    "FeatureEstimationSpec",
    "FineTuneSpec",
    "GateCondition",
    "IncrementalKdMmdSpec",
    "IncrementalMethodSpec",
    "IncrementalSpec",
    "IndexSpec",
    "JobSpec",
    "JointSpec",
    "LoadedSweep",
    "LwfSpec",
    "MethodFamily",
    "MethodSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PoolingName",
    "ScalingSpec",
    "SchedulerSpec",
    "SearchSpec",
    "ServingSpec",
    "SplitSpec",
    "StemName",
    "StorageSpec",
    "StrictModel",
    "SweepSpec",
    "SynthesisSpec",
    "TaskSpec",
    "TextEncoderSpec",
    "TrackingSpec",
    "TrainSpec",
    "TrialResourcesSpec",
    "UnsupervisedMetricSpec",
    "apply_override",
    "dataset_names",
    "dataset_shorthand",
    "load_job_spec",
    "load_sweep_spec",
    "method_name",
    "parse_override",
    "read_yaml_mapping",
    "set_dotted",
    "small_stem_supported",
    "sweep_metric_names",
    "validate_declared_keys",
]
