"""A metrics recorder for the serving tests: what the application recorded, by metric and tags."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import pytest

from retrieval.serving.metrics import MetricSpec, ServingMetrics

Tags = tuple[tuple[str, str], ...]


class RecordingSink:
    """A `MetricSink` that keeps every write: counters summed, histogram observations listed, gauges' last value."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, Tags], float] = defaultdict(float)
        self.observations: dict[tuple[str, Tags], list[float]] = defaultdict(list)
        self.gauges: dict[tuple[str, Tags], float] = {}

    @staticmethod
    def _key(spec: MetricSpec, tags: Mapping[str, str]) -> tuple[str, Tags]:
        return spec.name, tuple(sorted(tags.items()))

    def inc(self, spec: MetricSpec, tags: Mapping[str, str], value: float = 1.0) -> None:
        assert spec.kind == "counter" and value > 0, (spec, value)
        self.counters[self._key(spec, tags)] += value

    def observe(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        assert spec.kind == "histogram", spec
        self.observations[self._key(spec, tags)].append(value)

    def set(self, spec: MetricSpec, tags: Mapping[str, str], value: float) -> None:
        assert spec.kind == "gauge", spec
        self.gauges[self._key(spec, tags)] = value

    def exposition(self) -> None:
        return None

    def count(self, name: str, **tags: str) -> float:
        return self.counters.get((name, tuple(sorted(tags.items()))), 0.0)

    def observed(self, name: str, **tags: str) -> list[float]:
        return list(self.observations.get((name, tuple(sorted(tags.items()))), []))


@pytest.fixture
def recorder() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def recorded(recorder: RecordingSink) -> ServingMetrics:
    """`ServingMetrics` writing into the test's `recorder`."""
    return ServingMetrics(recorder)
