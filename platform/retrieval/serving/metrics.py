"""The search application's metrics: one table of definitions, one recording interface, two exports.

The service, the shard pool, the HTTP gate and the swap record through `ServingMetrics`, which
writes to a `MetricSink`:

- under Ray Serve, `retrieval.serving.ray_metrics.RayServeSink` (``ray.serve.metrics``): every
  node's metrics agent exports each replica's series, tagged with ``application``,
  ``deployment`` and ``replica`` beside Serve's own ``serve_*`` metrics, so one scrape of every
  node (the PodMonitor of ``k8s/components/monitoring``) sees every replica. Ray prefixes the
  names with ``ray_``: ``retrieval_requests`` is scraped as ``ray_retrieval_requests_total``;
- without Ray (the FastAPI app served in-process, e.g. by uvicorn or a test client),
  `PrometheusSink`, a prometheus-client registry of its own that ``GET /metrics`` renders.

Metrics (`METRICS`; counters are exported with ``_total``, histograms with ``_bucket``/``_sum``/``_count``)::

    retrieval_requests{endpoint, status}          counter    HTTP requests by route template and status
    retrieval_request_seconds{endpoint}           histogram  HTTP latency by route template
    retrieval_search_replies{answer}              counter    search replies: complete | partial (a shard missing)
    retrieval_shard_requests{shard, outcome}      counter    shard calls: ok | timeout | unavailable | error
    retrieval_shard_seconds{shard}                histogram  one shard call (batched or not)
    retrieval_batch_size{stage}                   histogram  queries per batched fan-out (stage: router)
    retrieval_swaps{outcome}                      counter    swaps run by this replica: completed | failed | refused
    retrieval_swap_seconds{outcome}               histogram  how long each swap took
    retrieval_index_info{index_version, model}    gauge      1 for the version this replica answers with, 0 for
                                                             versions it answered with before (model: name/version)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MetricKind = Literal["counter", "gauge", "histogram"]
ShardOutcome = Literal["ok", "timeout", "unavailable", "error"]
SwapOutcome = Literal["completed", "failed", "refused"]

# Search latencies on one machine run from ~0.1 ms (in-process Faiss) to seconds (a cold shard).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
# A swap loads a version on every replica: seconds to many minutes for a large index.
SWAP_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Ray's metrics agent exports application metrics under this namespace (ray_<name>).
RAY_EXPORT_PREFIX = "ray_"
# Tag keys Ray Serve adds itself and refuses in application metrics (ray.serve.metrics).
SERVE_RESERVED_TAGS = frozenset({"application", "deployment", "replica", "route"})
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (without export suffixes), kind, help text, tag keys and histogram buckets."""

    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # Ray drops a metric whose name is invalid with only a warning: refuse it here instead.
        if not _NAME.match(self.name) or self.name.endswith("_total"):
            raise ValueError(f"invalid metric name {self.name!r}: letters, digits and _, no _total suffix")
        reserved = SERVE_RESERVED_TAGS & set(self.tag_keys)
        if reserved:
            raise ValueError(f"metric {self.name}: tag keys {sorted(reserved)} are reserved by Ray Serve")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name}: buckets are required for a histogram and only for one")

    def exported_names(self, *, prefix: str = "") -> tuple[str, ...]:
        """The sample names a scrape shows, e.g. ``("ray_retrieval_requests_total",)`` with ``prefix="ray_"``."""
        base = prefix + self.name
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


REQUESTS = MetricSpec("retrieval_requests", "counter", "HTTP requests answered", ("endpoint", "status"))
REQUEST_SECONDS = MetricSpec(
    "retrieval_request_seconds", "histogram", "HTTP request latency", ("endpoint",), LATENCY_BUCKETS
)
SEARCH_REPLIES = MetricSpec(
    "retrieval_search_replies", "counter", "search replies, complete or partial (a shard missing)", ("answer",)
)
SHARD_REQUESTS = MetricSpec("retrieval_shard_requests", "counter", "shard calls by outcome", ("shard", "outcome"))
SHARD_SECONDS = MetricSpec("retrieval_shard_seconds", "histogram", "shard call latency", ("shard",), LATENCY_BUCKETS)
BATCH_SIZE = MetricSpec("retrieval_batch_size", "histogram", "queries per batched call", ("stage",), BATCH_BUCKETS)
SWAPS = MetricSpec("retrieval_swaps", "counter", "rolling swaps run by this replica, by outcome", ("outcome",))
SWAP_SECONDS = MetricSpec("retrieval_swap_seconds", "histogram", "rolling swap duration", ("outcome",), SWAP_BUCKETS)
INDEX_INFO = MetricSpec(
    "retrieval_index_info", "gauge", "1 for the index version answering now, 0 for earlier ones",
    ("index_version", "model"),
)  # fmt: skip

METRICS: tuple[MetricSpec, ...] = (
    REQUESTS,
    REQUEST_SECONDS,
    SEARCH_REPLIES,
    SHARD_REQUESTS,
    SHARD_SECONDS,
    BATCH_SIZE,
    SWAPS,
    SWAP_SECONDS,
    INDEX_INFO,
)


class MetricSink(Protocol):
    """Where `ServingMetrics` writes: one call per sample, tags already checked against the spec."""

    def inc(self, spec: MetricSpec, tags: Mapping[str, str], value: float = 1.0) -> None:
        """Add ``value`` (> 0) to a counter."""
        ...

    def observe(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        """Record one observation in a histogram."""
        ...

    def set(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        """Set a gauge."""
        ...

    def exposition(self) -> bytes | None:
        """The metrics in Prometheus' text format, or None when something else exports them."""
        ...


class ServingMetrics:
    """What the application records, by event, into one `MetricSink` (default: a `PrometheusSink`).

    Every write is checked against its `MetricSpec`: a tag key the spec does not declare, or one
    it declares missing, is a ``ValueError`` in every sink (Ray's would only fail at run time).
    """

    def __init__(self, sink: MetricSink | None = None) -> None:
        self.sink: MetricSink = sink if sink is not None else PrometheusSink()
        self._version: tuple[str, str] | None = None

    @staticmethod
    def _tags(spec: MetricSpec, tags: Mapping[str, str]) -> Mapping[str, str]:
        if tuple(sorted(tags)) != tuple(sorted(spec.tag_keys)):
            raise ValueError(f"metric {spec.name} takes tags {sorted(spec.tag_keys)}, got {sorted(tags)}")
        return tags

    def _inc(self, spec: MetricSpec, **tags: str) -> None:
        self.sink.inc(spec, self._tags(spec, tags))

    def _observe(self, spec: MetricSpec, value: float, **tags: str) -> None:
        self.sink.observe(spec, self._tags(spec, tags), value)

    def observe_request(self, *, endpoint: str, status: int, seconds: float) -> None:
        """Count one HTTP request by its route template (e.g. ``/items/{item_id}``) and status."""
        self._inc(REQUESTS, endpoint=endpoint, status=str(status))
        self._observe(REQUEST_SECONDS, seconds, endpoint=endpoint)

    def observe_shard(self, *, shard: int, outcome: ShardOutcome, seconds: float) -> None:
        """Count one shard call: ``outcome`` is ok, timeout, unavailable or error."""
        self._inc(SHARD_REQUESTS, shard=str(shard), outcome=outcome)
        self._observe(SHARD_SECONDS, seconds, shard=str(shard))

    def observe_batch(self, *, stage: str, size: int) -> None:
        """Record how many queries one batched call carried (``stage``: router)."""
        self._observe(BATCH_SIZE, size, stage=stage)

    def count_reply(self, *, partial: bool) -> None:
        """Count one search reply, answered by every shard or (``partial``) without some."""
        self._inc(SEARCH_REPLIES, answer="partial" if partial else "complete")

    def observe_swap(self, *, outcome: SwapOutcome, seconds: float) -> None:
        """Count one rolling swap this replica ran: completed, failed (aborted, rolled back) or refused."""
        self._inc(SWAPS, outcome=outcome)
        self._observe(SWAP_SECONDS, seconds, outcome=outcome)

    def set_version(self, *, index_version: str, model: str) -> None:
        """Mark ``index_version`` (served with ``model``) as the one answering now, the previous one as 0."""
        if self._version == (index_version, model):
            return
        if self._version is not None:
            previous_version, previous_model = self._version
            self.sink.set(INDEX_INFO, self._tags(INDEX_INFO, {"index_version": previous_version,
                                                               "model": previous_model}), 0)  # fmt: skip
        self.sink.set(INDEX_INFO, self._tags(INDEX_INFO, {"index_version": index_version, "model": model}), 1)
        self._version = (index_version, model)

    def exposition(self) -> bytes | None:
        """The sink's Prometheus text, or None when the metrics are exported elsewhere (Ray)."""
        return self.sink.exposition()


class PrometheusSink:
    """A prometheus-client registry of its own (so two apps in one process never share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        for spec in METRICS:
            labels = list(spec.tag_keys)
            if spec.kind == "counter":
                self._metrics[spec.name] = Counter(spec.name, spec.description, labels, registry=self.registry)
            elif spec.kind == "gauge":
                self._metrics[spec.name] = Gauge(spec.name, spec.description, labels, registry=self.registry)
            else:
                self._metrics[spec.name] = Histogram(
                    spec.name, spec.description, labels, buckets=spec.buckets, registry=self.registry
                )

    def _child(self, spec: MetricSpec, tags: Mapping[str, str]) -> Counter | Gauge | Histogram:
        metric = self._metrics[spec.name]
        return metric.labels(**tags) if spec.tag_keys else metric

    def inc(self, spec: MetricSpec, tags: Mapping[str, str], value: float = 1.0) -> None:
        self._child(spec, tags).inc(value)  # type: ignore[union-attr]

    def observe(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        self._child(spec, tags).observe(value)  # type: ignore[union-attr]

    def set(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        self._child(spec, tags).set(value)  # type: ignore[union-attr]

    def exposition(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
