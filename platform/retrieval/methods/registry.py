"""The method registry: a plain mapping from a method name to its class."""

from __future__ import annotations

from retrieval.config import JobSpec
from retrieval.methods.base import RetrievalMethod
from retrieval.methods.classification import Classification
from retrieval.methods.deep_metric import DeepMetric
from retrieval.methods.incremental import (
    DualDistillation,
    ElasticWeightConsolidation,
    FeatureEstimation,
    IncrementalFineTune,
    IncrementalJoint,
    IncrementalKdMmd,
    LearningWithoutForgetting,
)
from retrieval.methods.unsupervised import UnsupervisedMetric

METHODS: dict[str, type[RetrievalMethod]] = {
    DeepMetric.name: DeepMetric,
    Classification.name: Classification,
    UnsupervisedMetric.name: UnsupervisedMetric,
    **{
        method.name: method
        for method in (
            IncrementalFineTune,
            IncrementalJoint,
            LearningWithoutForgetting,
            ElasticWeightConsolidation,
            IncrementalKdMmd,
            FeatureEstimation,
            DualDistillation,
        )
    },
}


def build_method(spec: JobSpec) -> RetrievalMethod:
    """The method named by `spec.method.name`, bound to the spec."""
    try:
        method_class = METHODS[spec.method.name]
    except KeyError:
        raise ValueError(f"unknown method {spec.method.name!r}; registered: {sorted(METHODS)}") from None
    return method_class(spec)
