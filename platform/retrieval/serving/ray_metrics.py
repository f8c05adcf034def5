"""`RayServeSink`: the application's metrics through ``ray.serve.metrics``, exported by Ray.

Built inside a Serve replica, each metric carries Serve's ``application``, ``deployment`` and
``replica`` tags beside its own (``ray.serve.metrics`` adds them), and the node's metrics agent
exports it next to Serve's ``serve_*`` metrics, as ``ray_<name>`` (``ray_retrieval_requests_total``).
So there is nothing to render here: ``GET /metrics`` points at the agent instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import metrics as serve_metrics

from retrieval.serving.metrics import METRICS, MetricSpec


class RayServeSink:
    """One ``ray.serve.metrics`` object per `MetricSpec` of `METRICS`, made in the replica that records."""

    def __init__(self) -> None:
        self._counters: dict[str, serve_metrics.Counter] = {}
        self._gauges: dict[str, serve_metrics.Gauge] = {}
        self._histograms: dict[str, serve_metrics.Histogram] = {}
        for spec in METRICS:
            # Ray annotates tag_keys as `Tuple[str]` (one key) but takes any tuple of strings.
            tag_keys: Any = spec.tag_keys
            if spec.kind == "counter":
                self._counters[spec.name] = serve_metrics.Counter(
                    spec.name, description=spec.description, tag_keys=tag_keys
                )
            elif spec.kind == "gauge":
                self._gauges[spec.name] = serve_metrics.Gauge(
                    spec.name, description=spec.description, tag_keys=tag_keys
                )
            else:
                self._histograms[spec.name] = serve_metrics.Histogram(
                    spec.name, description=spec.description, boundaries=list(spec.buckets), tag_keys=tag_keys
                )

    @property
    def metrics(self) -> dict[str, serve_metrics.Counter | serve_metrics.Gauge | serve_metrics.Histogram]:
        """The Ray metric objects by name."""
        return {**self._counters, **self._gauges, **self._histograms}

    def inc(self, spec: MetricSpec, tags: Mapping[str, str], value: float = 1.0) -> None:
        self._counters[spec.name].inc(value, tags=dict(tags))

    def observe(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        self._histograms[spec.name].observe(value, tags=dict(tags))

    def set(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        self._gauges[spec.name].set(value, tags=dict(tags))

    def exposition(self) -> None:
        """None: Ray's metrics agent exports these (each node's ``--metrics-export-port``)."""
        return None
