"""The metrics' definitions, the recording interface and both exports (prometheus-client and ``ray.serve.metrics``).

No Ray cluster: ``ray.serve.metrics`` objects are made and written to in this process (Ray
validates their names and tags there; only the export needs a node's metrics agent, which
tests/integration/serving/test_app.py reads).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from retrieval.serving import metrics as metrics_module
from retrieval.serving.metrics import (
    INDEX_INFO,
    METRICS,
    RAY_EXPORT_PREFIX,
    MetricSpec,
    PrometheusSink,
    ServingMetrics,
)
from retrieval.serving.ray_metrics import RayServeSink


def record_one_of_each(metrics: ServingMetrics) -> None:
    metrics.observe_request(endpoint="/search/vector", status=200, seconds=0.003)
    metrics.observe_shard(shard=1, outcome="timeout", seconds=5.0)
    metrics.observe_batch(stage="router", size=8)
    metrics.count_reply(partial=True)
    metrics.observe_swap(outcome="completed", seconds=42.0)
    metrics.set_version(index_version="v0002", model="digits/3")


def test_every_metric_is_defined_once_with_a_valid_name_and_the_module_docstring_lists_it() -> None:
    names = [spec.name for spec in METRICS]
    assert len(set(names)) == len(names)
    assert {name for name in vars(metrics_module).values() if isinstance(name, MetricSpec)} == set(METRICS)
    for spec in METRICS:
        assert spec.name.startswith("retrieval_")
        assert f"{spec.name}{{" in (metrics_module.__doc__ or "").replace(" ", "").replace("\n", ""), spec.name


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "retrieval-requests", "kind": "counter"}, "invalid metric name"),
        ({"name": "retrieval_requests_total", "kind": "counter"}, "no _total suffix"),
        ({"name": "retrieval_x", "kind": "counter", "tag_keys": ("replica",)}, "reserved by Ray Serve"),
        ({"name": "retrieval_x", "kind": "histogram"}, "buckets are required"),
        ({"name": "retrieval_x", "kind": "gauge", "buckets": (1.0,)}, "buckets are required"),
    ],
)
def test_a_bad_definition_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricSpec(description="d", **fields)


def test_events_are_recorded_with_their_tags(recorder: Any, recorded: ServingMetrics) -> None:
    record_one_of_each(recorded)
    recorded.observe_request(endpoint="/search/vector", status=504, seconds=5.1)
    assert recorder.count("retrieval_requests", endpoint="/search/vector", status="200") == 1
    assert recorder.count("retrieval_requests", endpoint="/search/vector", status="504") == 1
    assert recorder.observed("retrieval_request_seconds", endpoint="/search/vector") == [0.003, 5.1]
    assert recorder.count("retrieval_shard_requests", shard="1", outcome="timeout") == 1
    assert recorder.observed("retrieval_shard_seconds", shard="1") == [5.0]
    assert recorder.observed("retrieval_batch_size", stage="router") == [8]
    assert recorder.count("retrieval_search_replies", answer="partial") == 1
    assert recorder.count("retrieval_swaps", outcome="completed") == 1
    assert recorder.observed("retrieval_swap_seconds", outcome="completed") == [42.0]


def test_the_version_gauge_is_one_for_the_active_version_and_zero_for_the_one_before(
    recorder: Any, recorded: ServingMetrics
) -> None:
    recorded.set_version(index_version="v1", model="m/1")
    recorded.set_version(index_version="v1", model="m/1")
    recorded.set_version(index_version="v2", model="m/2")
    assert recorder.gauges == {
        ("retrieval_index_info", (("index_version", "v1"), ("model", "m/1"))): 0,
        ("retrieval_index_info", (("index_version", "v2"), ("model", "m/2"))): 1,
    }


def test_undeclared_or_missing_tags_are_refused_before_any_sink_sees_them(
    recorder: Any, recorded: ServingMetrics
) -> None:
    with pytest.raises(ValueError, match=r"retrieval_swaps takes tags \['outcome'\], got \['outcome', 'shard'\]"):
        recorded._inc(metrics_module.SWAPS, outcome="completed", shard="0")
    with pytest.raises(ValueError, match=r"retrieval_index_info takes tags \['index_version', 'model'\], got \[\]"):
        recorded.sink.set(INDEX_INFO, recorded._tags(INDEX_INFO, {}), 1)
    assert not recorder.counters and not recorder.gauges


def test_the_prometheus_export_shows_every_metric_under_the_names_the_specs_give() -> None:
    metrics = ServingMetrics(PrometheusSink())
    record_one_of_each(metrics)
    text = metrics.exposition()
    assert text is not None
    scraped = {sample.name for family in text_string_to_metric_families(text.decode()) for sample in family.samples}
    expected = {name for spec in METRICS for name in spec.exported_names()}
    assert expected <= scraped, expected - scraped
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }
    assert samples[("retrieval_search_replies_total", (("answer", "partial"),))] == 1
    assert samples[("retrieval_swap_seconds_bucket", (("le", "60.0"), ("outcome", "completed")))] == 1
    assert samples[("retrieval_swap_seconds_bucket", (("le", "30.0"), ("outcome", "completed")))] == 0


def test_two_prometheus_sinks_in_one_process_count_apart() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.count_reply(partial=False)
    assert b'retrieval_search_replies_total{answer="complete"} 1.0' in (first.exposition() or b"")
    assert b"retrieval_search_replies_total{" not in (second.exposition() or b"")


def test_the_ray_sink_makes_one_serve_metric_per_spec_with_its_tags_and_buckets() -> None:
    sink = RayServeSink()
    assert sink.exposition() is None
    objects = sink.metrics
    assert set(objects) == {spec.name for spec in METRICS}
    for spec in METRICS:
        info = objects[spec.name].info
        assert (info["name"], info["description"], info["tag_keys"]) == (spec.name, spec.description, spec.tag_keys)
        assert type(objects[spec.name]).__name__ == spec.kind.capitalize()
        if spec.kind == "histogram":
            assert info["boundaries"] == list(spec.buckets)
    # Recording validates every tag against the keys Ray was given (a missing one raises in Ray).
    record_one_of_each(ServingMetrics(sink))
    with pytest.raises(ValueError, match="Missing value for tag key"):
        objects["retrieval_swaps"].inc(1.0, tags={})


def test_inside_a_replica_serve_adds_its_tags_and_ours_do_not_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve import context

    replica = SimpleNamespace(deployment="SearchIngress", replica_tag="abc123", app_name="retrieval")
    monkeypatch.setattr(context, "_get_internal_replica_context", lambda: replica)
    sink = RayServeSink()
    for spec in METRICS:
        info = sink.metrics[spec.name].info
        assert info["tag_keys"] == ("deployment", "replica", "application", *spec.tag_keys)
        assert info["default_tags"] == {"deployment": "SearchIngress", "replica": "abc123", "application": "retrieval"}
    record_one_of_each(ServingMetrics(sink))


def test_exported_names_carry_rays_prefix_and_prometheus_suffixes() -> None:
    assert metrics_module.REQUESTS.exported_names(prefix=RAY_EXPORT_PREFIX) == ("ray_retrieval_requests_total",)
    assert metrics_module.SHARD_SECONDS.exported_names(prefix=RAY_EXPORT_PREFIX) == (
        "ray_retrieval_shard_seconds_bucket",
        "ray_retrieval_shard_seconds_sum",
        "ray_retrieval_shard_seconds_count",
    )
    assert INDEX_INFO.exported_names(prefix=RAY_EXPORT_PREFIX) == ("ray_retrieval_index_info",)
