"""Prometheus metrics of the search application, served by ``GET /metrics``.

Each ingress replica (and each in-process app) keeps its own registry, so two apps in one
process (tests) never share counters. With several ingress replicas a scrape reaches one of
them: scrape each replica (Serve's own metrics port), or sum over ``replica`` in queries.

Metrics:

    retrieval_requests_total{endpoint, status}              counter
    retrieval_request_seconds{endpoint}                     histogram
    retrieval_shard_requests_total{shard, outcome}          counter (ok | timeout | unavailable | error)
    retrieval_shard_seconds{shard}                          histogram (one shard call, batched or not)
    retrieval_batch_size{stage}                             histogram (queries per batched call: router)
    retrieval_partial_results_total                         counter (replies missing a shard)
    retrieval_index_info{index_version, model}              gauge, 1 for the version answering now (model: name/version)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Search latencies on one machine run from ~0.1 ms (in-process Faiss) to seconds (a cold shard).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    """The application's counters and histograms in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "retrieval_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self._request_seconds = Histogram(
            "retrieval_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._shard_requests = Counter(
            "retrieval_shard_requests", "shard calls by outcome", ["shard", "outcome"], registry=self.registry
        )
        self._shard_seconds = Histogram(
            "retrieval_shard_seconds", "shard call latency", ["shard"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self._batch_size = Histogram(
            "retrieval_batch_size",
            "queries per batched call",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self._partial = Counter(
            "retrieval_partial_results", "replies answered without every shard", registry=self.registry
        )
        self._index_info = Gauge(
            "retrieval_index_info", "the index version answering now (1)", ["index_version", "model"],
            registry=self.registry,
        )  # fmt: skip
        self._version: tuple[str, str] | None = None

    def observe_request(self, *, endpoint: str, status: int, seconds: float) -> None:
        """Count one HTTP request by its route template (e.g. ``/items/{item_id}``) and status."""
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()
        self._request_seconds.labels(endpoint=endpoint).observe(seconds)

    def observe_shard(self, *, shard: int, outcome: str, seconds: float) -> None:
        """Count one shard call: ``outcome`` is ok, timeout, unavailable or error."""
        self._shard_requests.labels(shard=str(shard), outcome=outcome).inc()
        self._shard_seconds.labels(shard=str(shard)).observe(seconds)

    def observe_batch(self, *, stage: str, size: int) -> None:
        """Record how many queries one batched call carried (``stage``: router, shard, embedder)."""
        self._batch_size.labels(stage=stage).observe(size)

    def count_partial(self) -> None:
        """Count one reply answered without every shard."""
        self._partial.inc()

    def set_version(self, *, index_version: str, model: str) -> None:
        """Mark ``index_version`` (served with ``model``) as the one answering now."""
        if self._version == (index_version, model):
            return
        if self._version is not None:
            self._index_info.remove(*self._version)
        self._index_info.labels(index_version=index_version, model=model).set(1)
        self._version = (index_version, model)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
