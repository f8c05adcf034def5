"""The method registry: one mapping from every method's name to its class, whatever its family.

Its names are the config's: a method spec the config accepts without a class here, or a class
here without a spec, fails at import, not inside a Ray worker.
"""

from __future__ import annotations

from retrieval.config import JobSpec
from retrieval.methods.base import RetrievalMethod
from retrieval.methods.classification import Classification
from retrieval.methods.cross_modal import AdversarialCrossModal, CrossModalHashing
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
            CrossModalHashing,
            AdversarialCrossModal,
        )
    },
}


def _check_names() -> None:
    """Every method name the job spec accepts has exactly one class here, and no class is unreachable."""
    from retrieval.config import METHOD_NAMES

    accepted = set(METHOD_NAMES)
    if accepted != set(METHODS):
        raise RuntimeError(
            f"the method registry and the job spec disagree: specs without a class {sorted(accepted - set(METHODS))}, "
            f"classes without a spec {sorted(set(METHODS) - accepted)}"
        )


_check_names()


def build_method(spec: JobSpec) -> RetrievalMethod:
    """The method named by `spec.method.name`, bound to the spec."""
    try:
        method_class = METHODS[spec.method.name]
    except KeyError:
        raise ValueError(f"unknown method {spec.method.name!r}; registered: {sorted(METHODS)}") from None
    return method_class(spec)
