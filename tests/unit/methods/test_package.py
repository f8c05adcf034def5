"""Model packages: a saved model embeds exactly as before; damaged packages are refused by name."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from retrieval.config import JobSpec
from retrieval.data import eval_transform, load_digits_dataset
from retrieval.errors import ModelNotFoundError
from retrieval.methods import build_method, load_model_package, save_model_package
from retrieval.models import GeM
from retrieval.tracking.registry import load_embedder

SpecFactory = Callable[..., JobSpec]


def _digit_images(count: int = 6) -> list[Image.Image]:
    dataset = load_digits_dataset()
    return [dataset.load_image(index) for index in range(count)]


def _copy_package(model_package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_package, tmp_path / "copy"))


def test_round_trip_embeds_like_the_saved_model(make_job_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16})
    torch.manual_seed(1)
    model = build_method(spec).build_model()
    # Move the weights away from a fresh initialisation (GeM exponent, BatchNorm running
    # statistics), so a loader that rebuilt the model without its weights would differ.
    pooling = model.get_submodule("pool")
    assert isinstance(pooling, GeM)
    with torch.no_grad():
        pooling.p.fill_(2.5)
        model.train()
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    images = _digit_images()
    transform = eval_transform(image_size=spec.dataset.image_size, mean=spec.dataset.mean, std=spec.dataset.std)
    with torch.no_grad():
        expected = model(torch.stack([transform(image) for image in images])).numpy()

    folder = save_model_package(tmp_path / "package", spec=spec, state_dict=model.state_dict())
    assert sorted(path.name for path in folder.iterdir()) == ["job.yaml", "model.pt", "package.json"]
    info = json.loads((folder / "package.json").read_text())
    assert (info["method"], info["embedding_dim"]) == ("deep_metric", 16)
    assert JobSpec.from_mapping(yaml.safe_load((folder / "job.yaml").read_text()), source="job.yaml") == spec

    torch.manual_seed(2)
    package = load_model_package(folder)
    assert package.dim == 16
    assert package.spec == spec
    assert package.source == str(folder)
    embedded = package.embed_images(images, batch_size=4)
    assert embedded.shape == (len(images), 16)
    assert embedded.dtype == np.float32
    np.testing.assert_allclose(embedded, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), np.ones(len(images)), rtol=1e-5)


def test_flipped_byte_in_the_weights_fails_the_checksum(model_package: Path, tmp_path: Path) -> None:
    folder = _copy_package(model_package, tmp_path)
    weights = folder / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelNotFoundError, match="checksum") as caught:
        load_model_package(folder)
    assert str(weights) in str(caught.value)


@pytest.mark.parametrize("missing", ["job.yaml", "model.pt", "package.json"])
def test_missing_file_is_named(model_package: Path, tmp_path: Path, missing: str) -> None:
    folder = _copy_package(model_package, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(ModelNotFoundError, match=f"missing {missing}"):
        load_model_package(folder)


def test_weights_of_another_architecture_are_refused(
    model_package: Path, make_job_spec: SpecFactory, tmp_path: Path
) -> None:
    folder = _copy_package(model_package, tmp_path)
    other = build_method(make_job_spec(model={"backbone": "resnet18", "embedding_dim": 8})).build_model()
    save_model_package(folder, spec=load_model_package(model_package).spec, state_dict=other.state_dict())
    with pytest.raises(ModelNotFoundError, match="do not fit the spec's architecture"):
        load_model_package(folder)


def test_embedding_no_images_gives_an_empty_matrix(model_package: Path) -> None:
    package = load_model_package(model_package)
    embedded = package.embed_images([])
    assert embedded.shape == (0, package.dim)
    assert embedded.dtype == np.float32


def test_load_embedder_reads_a_local_package_folder(model_package: Path) -> None:
    images = _digit_images(3)
    package = load_embedder(str(model_package))
    assert package.dim == 32
    np.testing.assert_array_equal(package.embed_images(images), load_model_package(model_package).embed_images(images))


def test_load_embedder_with_an_unknown_path_errors(tmp_path: Path) -> None:
    absent = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError, match="neither a models:/ URI nor a model package folder") as caught:
        load_embedder(str(absent))
    assert str(absent) in str(caught.value)


def test_package_without_a_head_reports_the_backbone_channels(make_job_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": None, "pooling": "mac"})
    model = build_method(spec).build_model().eval()
    folder = save_model_package(tmp_path / "offtheshelf", spec=spec, state_dict=model.state_dict())
    package = load_model_package(folder)
    assert package.dim == 512  # resnet18's last stage, pooled, no projection
    vectors = package.embed_images(_digit_images(3))
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
