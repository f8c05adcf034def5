"""What every test shares: the tiers' order, the markers derived from fixtures, a small model package.

Tiers: every test under tests/unit runs before any under tests/integration (a broken unit test
shows within minutes, and `pytest -x` stops there). Markers: what a test needs is read off the
fixtures it uses, never applied by hand: `FIXTURE_MARKS` below maps the fixtures that start
clusters, servers, Serve apps or Ray Train/Tune runs to the markers they bring, through the
test's whole fixture closure (a fixture built on `ray_train` marks its tests `train_run` too).
Only `slow` is still set by hand, on unit tests that compute for long without any such fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

# A fresh local Ray cluster turns on token authentication; tests talk to their own cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retrieval.config import JobSpec
from retrieval.methods import build_method, save_model_package

# The one place that says which fixtures mark a test (tests/integration/conftest.py defines them;
# tests/unit/test_test_tiers.py checks both that they exist and that a test using one is marked).
FIXTURE_MARKS: Mapping[str, frozenset[str]] = {
    # The session's local Ray cluster.
    "ray_cluster": frozenset({"integration"}),
    # The session cluster for a test or fixture that starts Ray Train or Tune runs (~25 s each).
    "ray_train": frozenset({"integration", "slow", "train_run"}),
    # Ray Serve running on the session cluster (apps take seconds to deploy).
    "serve_instance": frozenset({"integration", "slow"}),
    # The S3 API (moto server) that Ray workers and MLflow reach over HTTP.
    "s3_endpoint": frozenset({"integration"}),
    # An `mlflow server` process with its artifacts in S3.
    "mlflow_server": frozenset({"integration", "slow"}),
    # The two-node cluster whose worker node the fault tests kill.
    "two_node_cluster": frozenset({"integration", "slow", "faults"}),
    # The two-node cluster for a test that starts a Ray Train run on it.
    "two_nodes_training": frozenset({"integration", "slow", "faults", "train_run"}),
    # Debian's chromium driven through selenium.
    "browser": frozenset({"slow"}),
}

# The tiers, in the order they run: the first folder under tests/ names a test's tier.
TIERS = ("unit", "integration")
TESTS = Path(__file__).resolve().parent


def tier_of(item: pytest.Item) -> int:
    """The index of the test's tier in `TIERS`; anything else after them."""
    try:
        folder = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return len(TIERS)
    return TIERS.index(folder) if folder in TIERS else len(TIERS)


def marks_from_fixtures(fixturenames: Iterable[str]) -> set[str]:
    """The markers that the fixtures in a test's closure bring (see `FIXTURE_MARKS`)."""
    return {mark for name in fixturenames for mark in FIXTURE_MARKS.get(name, ())}


def pytest_itemcollected(item: pytest.Item) -> None:
    # Before `-m` selects (pytest's modifyitems hooks): the derived markers take part in it.
    present = {mark.name for mark in item.iter_markers()}
    for name in sorted(marks_from_fixtures(getattr(item, "fixturenames", ()))):
        if name not in present:
            item.add_marker(name)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # After pytest's own reordering (which groups the tests of a module- or session-scoped
    # parameter): a stable sort keeps that order within each tier.
    items.sort(key=tier_of)


def small_job_spec(**sections: object) -> JobSpec:
    """A deep_metric job on digits, small enough to train in seconds on a CPU."""
    data: dict[str, object] = {
        "name": "test_job",
        "method": {"name": "deep_metric", "loss": "multi_similarity"},
        "dataset": {
            "name": "digits",
            "image_size": 32,
            "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
        },
        "model": {"backbone": "resnet18", "embedding_dim": 32},
        "train": {"epochs": 2, "classes_per_batch": 5, "samples_per_class": 8},
        "scaling": {"num_workers": 2},
    }
    data.update(sections)
    return JobSpec.from_mapping(data, source="small_job_spec")


@pytest.fixture(scope="session")
def model_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-package folder holding an untrained resnet18 (embedding_dim 32, 32x32 inputs)."""
    spec = small_job_spec()
    torch.manual_seed(0)
    model = build_method(spec).build_model()
    return save_model_package(tmp_path_factory.mktemp("package") / "model", spec=spec, state_dict=model.state_dict())


@pytest.fixture(scope="session")
def make_job_spec() -> object:
    """The `small_job_spec` factory, for tests (and module-scoped run fixtures) that tweak a section."""
    return small_job_spec


@pytest.fixture(autouse=True)
def _cli_logging_stays_in_its_test() -> Iterator[None]:
    """A test that runs `retrieval.cli.main` installs the CLI's log handler; later tests must not inherit it."""
    import logging

    yield
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if handler.get_name() == "retrieval-cli"]:
        root.removeHandler(handler)
        handler.close()
    logging.getLogger("retrieval").setLevel(logging.NOTSET)
