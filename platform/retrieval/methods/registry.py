"""The method registry: a plain mapping from a method name to its class."""

from __future__ import annotations

from retrieval.config import JobSpec
from retrieval.methods.base import RetrievalMethod
from retrieval.methods.deep_metric import DeepMetric

METHODS: dict[str, type[RetrievalMethod]] = {
    DeepMetric.name: DeepMetric,
}


def build_method(spec: JobSpec) -> RetrievalMethod:
    """The method named by `spec.method.name`, bound to the spec."""
    try:
        method_class = METHODS[spec.method.name]
    except KeyError:
        raise ValueError(f"unknown method {spec.method.name!r}; registered: {sorted(METHODS)}") from None
    return method_class(spec)
