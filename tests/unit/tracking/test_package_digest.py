"""A registered model package is checked against the registry at load (issue 16, item 11).

`package.json` records the weights' checksum beside them, so someone who can rewrite the
artifact store (or a serving node's cache) can replace both. The registry keeps a digest of
the whole package as a model version tag, in the tracking database, and every load checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from retrieval.config import JobSpec
from retrieval.errors import IntegrityError
from retrieval.methods import build_method, save_model_package
from retrieval.methods.package import package_digest
from retrieval.tracking.registry import PACKAGE_ARTIFACT, PACKAGE_DIGEST_TAG, load_embedder, register_model_package
from retrieval.tracking.runs import TrainingRun

SpecFactory = Callable[..., JobSpec]


def _rewrite_weights_consistently(package_dir: Path) -> None:
    """What an attacker with write access does: new weights and a matching package.json."""
    weights = package_dir / "model.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({name: torch.zeros_like(tensor) for name, tensor in state.items()}, weights)
    info = json.loads((package_dir / "package.json").read_text())
    info["model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (package_dir / "package.json").write_text(json.dumps(info))


def _register(
    root: Path, spec: JobSpec, *, seed: int, model_name: str = "digest-test", package_folder: str = "package"
) -> str:
    """A fresh registry under ``root`` with one version of ``model_name``; returns its tracking URI."""
    root.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(seed)
    weights = build_method(spec).build_model().state_dict()
    package = save_model_package(root / package_folder, spec=spec, state_dict=weights)
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=tracking,
        experiment="digest",
        artifact_location=str(root / "artifacts"),
        run_key="k",
        run_name="r",
        params={},
        tags={},
    )
    model = register_model_package(package, tracking_uri=tracking, run_id=run.run_id, registered_model=model_name)
    run.finish()
    tags = MlflowClient(tracking_uri=tracking).get_model_version(model_name, model.version).tags
    assert tags[PACKAGE_DIGEST_TAG] == package_digest(package)
    return tracking


@pytest.fixture
def registered(make_job_spec: SpecFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16})
    return _register(tmp_path, spec, seed=0), tmp_path


def _stored_packages(root: Path) -> list[Path]:
    return [path.parent for path in root.rglob("package.json") if path.parent.name == PACKAGE_ARTIFACT]


def test_a_package_rewritten_in_the_artifact_store_is_refused(registered: tuple[str, Path]) -> None:
    tracking, tmp_path = registered
    stored = _stored_packages(tmp_path / "artifacts")
    assert stored, "the registered package's artifacts"
    for package_dir in stored:
        _rewrite_weights_consistently(package_dir)
    with pytest.raises(
        IntegrityError, match=r"models:/digest-test/1: the package's files .* differ from the registered"
    ):
        load_embedder("models:/digest-test@candidate", tracking_uri=tracking)


def _weights(package: object) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in package.model.state_dict().items()}  # type: ignore[attr-defined]


def test_a_package_rewritten_in_the_local_cache_is_downloaded_again(
    registered: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    tracking, tmp_path = registered
    expected = _weights(load_embedder("models:/digest-test/1", tracking_uri=tracking))
    (cached,) = _stored_packages(tmp_path / "cache")
    _rewrite_weights_consistently(cached)
    with caplog.at_level(logging.WARNING, logger="retrieval"):
        reloaded = _weights(load_embedder("models:/digest-test/1", tracking_uri=tracking))
    assert "differs from the registered package; downloading it again" in caplog.text
    assert all(torch.equal(reloaded[name], expected[name]) for name in expected)
    # A file added beside the weights changes the digest too.
    (cached,) = _stored_packages(tmp_path / "cache")
    (cached / "extra.py").write_text("print('hi')\n")
    load_embedder("models:/digest-test/1", tracking_uri=tracking)
    (cached,) = _stored_packages(tmp_path / "cache")
    assert not (cached / "extra.py").exists()


def test_two_registries_with_the_same_model_name_and_version_do_not_share_a_cache_entry(
    make_job_spec: SpecFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache keyed by name and version alone served one registry's model for another's (found by the digest)."""
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16})
    first = _register(tmp_path / "a", spec, seed=1)
    second = _register(tmp_path / "b", spec, seed=2)
    one = _weights(load_embedder("models:/digest-test/1", tracking_uri=first))
    two = _weights(load_embedder("models:/digest-test/1", tracking_uri=second))
    assert any(not torch.equal(one[name], two[name]) for name in one)
    assert len(_stored_packages(tmp_path / "cache")) == 2


def test_a_package_registered_from_a_folder_of_any_name_loads(
    make_job_spec: SpecFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow stores an artifact under its folder's own name; the loader looked only in `artifacts/package`."""
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16})
    tracking = _register(tmp_path, spec, seed=3, package_folder="my-model-v2")
    package = load_embedder("models:/digest-test/1", tracking_uri=tracking)
    torch.manual_seed(3)
    expected = build_method(spec).build_model().state_dict()
    assert all(torch.equal(_weights(package)[name], expected[name]) for name in expected)


def test_the_registered_version_loads_as_an_mlflow_pyfunc_that_embeds(registered: tuple[str, Path]) -> None:
    """The pyfunc flavour: MLflow's own loader gives a model whose predict embeds like the package."""
    import mlflow
    import numpy as np

    tracking, _ = registered
    mlflow.set_tracking_uri(tracking)
    pyfunc = mlflow.pyfunc.load_model("models:/digest-test/1")
    package = load_embedder("models:/digest-test/1", tracking_uri=tracking)
    size = package.spec.dataset.image_size
    images = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    embedded = pyfunc.predict(images)
    assert embedded.shape == (2, 16)
    np.testing.assert_allclose(embedded, package.embed_tensor(torch.from_numpy(images)), rtol=1e-5, atol=1e-6)
