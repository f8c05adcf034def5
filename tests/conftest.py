"""Fixtures shared by every test: a small model package, and no Ray token auth."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# A fresh local Ray cluster turns on token authentication; tests talk to their own cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retrieval.config import JobSpec
from retrieval.methods import build_method, save_model_package


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


@pytest.fixture
def make_job_spec() -> object:
    """The `small_job_spec` factory, for tests that tweak a section."""
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
