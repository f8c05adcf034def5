"""The classification method: the head lives in the model, matches pml, trains, and survives a package round trip."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from retrieval.config import JobSpec
from retrieval.data.base import ArrayImageLoader, ImageDataset
from retrieval.data.transforms import eval_transform
from retrieval.errors import ConfigError, DatasetError
from retrieval.methods.classification import Classification, ClassifiedEmbeddingNetwork
from retrieval.methods.package import load_model_package, save_model_package
from retrieval.methods.registry import build_method

SpecFactory = Callable[..., JobSpec]

IMAGE_SIZE = 32
EMBEDDING_DIM = 16
# Dataset class ids of the training split: not 0..C-1, as after a class_fraction split.
CLASS_IDS = (3, 7, 8)
IMAGES_PER_CLASS = 4


def _dataset(labels: list[int] | None = None) -> ImageDataset:
    """`len(CLASS_IDS)` classes of near-copies of one random image each, 10 class names."""
    generator = np.random.default_rng(0)
    pixels = []
    for _ in CLASS_IDS:
        base = generator.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        for _ in range(IMAGES_PER_CLASS):
            noisy = base + generator.normal(0.0, 6.0, size=base.shape)
            pixels.append(np.clip(noisy, 0, 255).astype(np.uint8))
    class_labels = labels if labels is not None else [c for c in CLASS_IDS for _ in range(IMAGES_PER_CLASS)]
    return ImageDataset(
        loaders=[ArrayImageLoader(image) for image in pixels],
        labels=np.array(class_labels),
        class_names=[str(c) for c in range(10)],
        sources=[f"synthetic:{index}" for index in range(len(pixels))],
        transform=eval_transform(image_size=IMAGE_SIZE),
    )


def _batch(dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[index] for index in range(len(dataset))]
    return torch.stack([image for image, _, _ in items]), torch.tensor([label for _, label, _ in items])


def _method(make_job_spec: SpecFactory, **settings: Any) -> Classification:
    spec = make_job_spec(
        method={"name": "classification", **settings},
        dataset={"name": "digits", "image_size": IMAGE_SIZE},
        model={"backbone": "resnet18", "embedding_dim": EMBEDDING_DIM},
    )
    method = build_method(spec)
    assert isinstance(method, Classification)
    return method


def _prepared_model(method: Classification, dataset: ImageDataset) -> ClassifiedEmbeddingNetwork:
    torch.manual_seed(0)
    model = method.build_model()
    assert isinstance(model, ClassifiedEmbeddingNetwork)
    assert method.prepare_training(model=model, dataset=dataset, device=torch.device("cpu")) is None
    return model


def test_spec_defaults_and_the_two_zero_weights_error(make_job_spec: SpecFactory) -> None:
    settings = make_job_spec(method={"name": "classification"}).method
    assert settings.model_dump() == {
        "name": "classification",
        "head": "normalized_softmax",
        "temperature": 0.05,
        "arcface_margin": 28.6,
        "arcface_scale": 64.0,
        "classification_weight": 1.0,
        "metric_weight": 0.0,
        "metric_loss": "multi_similarity",
    }
    with pytest.raises(ConfigError, match="classification_weight and metric_weight are both 0"):
        make_job_spec(method={"name": "classification", "classification_weight": 0})


def test_prepare_training_sizes_the_head_to_the_training_classes_inside_the_model(make_job_spec: SpecFactory) -> None:
    method = _method(make_job_spec, head="arcface")
    model = _prepared_model(method, _dataset())
    assert model.class_ids.tolist() == list(CLASS_IDS)
    names = dict(model.named_parameters())
    # The ArcFace weights are the model's (so DDP syncs them and the optimiser trains them).
    assert names["classifier.criterion.W"].shape == (EMBEDDING_DIM, len(CLASS_IDS))
    assert set(model.state_dict()) >= {"class_ids", "classifier.criterion.W"}


@pytest.mark.parametrize(
    ("head", "reference"),
    [
        ("arcface", lambda: pml_losses.ArcFaceLoss(len(CLASS_IDS), EMBEDDING_DIM, margin=20.0, scale=16.0)),
        (
            "normalized_softmax",
            lambda: pml_losses.NormalizedSoftmaxLoss(len(CLASS_IDS), EMBEDDING_DIM, temperature=0.1),
        ),
    ],
)
def test_the_head_matches_pml_called_directly_with_the_same_weights(
    make_job_spec: SpecFactory, head: str, reference: Callable[[], torch.nn.Module]
) -> None:
    method = _method(make_job_spec, head=head, arcface_margin=20.0, arcface_scale=16.0, temperature=0.1)
    dataset = _dataset()
    model = _prepared_model(method, dataset).eval()
    images, labels = _batch(dataset)
    direct = reference()
    with torch.no_grad():
        direct.get_parameter("W").copy_(model.get_parameter("classifier.criterion.W"))
        terms = method.training_step(model=model, loss=method.build_loss(), images=images, labels=labels)
        # Dataset classes 3, 7, 8 are the head's rows 0, 1, 2.
        rows = torch.tensor([CLASS_IDS.index(label) for label in labels.tolist()])
        expected = direct(model.embedder(images), rows)
    assert set(terms) == {"classification", "loss"}
    torch.testing.assert_close(terms["classification"], expected)
    torch.testing.assert_close(terms["loss"], expected)


def test_metric_weight_adds_a_named_metric_term(make_job_spec: SpecFactory) -> None:
    method = _method(make_job_spec, head="softmax", classification_weight=0.5, metric_weight=2.0, metric_loss="triplet")
    dataset = _dataset()
    model = _prepared_model(method, dataset)
    images, labels = _batch(dataset)
    loss = method.build_loss()
    terms = method.training_step(model=model, loss=loss, images=images, labels=labels)
    assert set(terms) == {"classification", "metric", "loss"}
    assert all(torch.isfinite(value) for value in terms.values())
    torch.testing.assert_close(terms["loss"], 0.5 * terms["classification"] + 2.0 * terms["metric"])


@pytest.mark.parametrize("head", ["softmax", "normalized_softmax", "arcface"])
def test_the_loss_decreases_on_a_separable_problem(make_job_spec: SpecFactory, head: str) -> None:
    method = _method(make_job_spec, head=head, arcface_scale=16.0)
    dataset = _dataset()
    model = _prepared_model(method, dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = _batch(dataset)
    loss = method.build_loss()
    indices = torch.arange(len(dataset))
    totals = []
    for _ in range(4):
        terms = method.indexed_training_step(model=model, loss=loss, images=images, labels=labels, indices=indices)
        assert all(torch.isfinite(value) for value in terms.values())
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        totals.append(terms["loss"].item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_a_label_outside_the_heads_classes_is_named(make_job_spec: SpecFactory) -> None:
    method = _method(make_job_spec)
    model = _prepared_model(method, _dataset())
    images, labels = _batch(_dataset())
    labels[0] = 5
    with pytest.raises(DatasetError, match=r"labels \[5\] are not among the 3 classes"):
        method.training_step(model=model, loss=method.build_loss(), images=images, labels=labels)
    with pytest.raises(ValueError, match="already has 3 classes; cannot resize it to 2"):
        model.size_head(np.array([1, 2]))


def test_without_prepare_training_the_head_is_sized_from_the_first_batch(
    make_job_spec: SpecFactory, caplog: pytest.LogCaptureFixture
) -> None:
    method = _method(make_job_spec)
    torch.manual_seed(0)
    model = method.build_model()
    assert isinstance(model, ClassifiedEmbeddingNetwork) and not model.is_sized
    images, labels = _batch(_dataset())
    with caplog.at_level(logging.WARNING, logger="retrieval.methods.classification"):
        terms = method.training_step(model=model, loss=method.build_loss(), images=images[:8], labels=labels[:8])
    assert torch.isfinite(terms["loss"])
    assert model.class_ids.tolist() == [3, 7]
    assert "call prepare_training before building" in caplog.text


def test_the_package_round_trip_rebuilds_the_head_and_embeds_identically(
    make_job_spec: SpecFactory, tmp_path: Path
) -> None:
    method = _method(make_job_spec, head="arcface")
    dataset = _dataset()
    model = _prepared_model(method, dataset)
    images, labels = _batch(dataset)
    # One step moves every weight (and the BatchNorm statistics) away from its initialisation.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    method.training_step(model=model, loss=method.build_loss(), images=images, labels=labels)["loss"].backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = method.embed(model, images)
    assert torch.isfinite(expected).all()

    folder = save_model_package(tmp_path / "package", spec=method.spec, state_dict=model.state_dict())
    torch.manual_seed(1)
    package = load_model_package(folder)
    assert isinstance(package.method, Classification)
    assert package.spec.method == method.spec.method
    assert package.dim == EMBEDDING_DIM
    loaded = package.model
    assert isinstance(loaded, ClassifiedEmbeddingNetwork)
    assert loaded.class_ids.tolist() == list(CLASS_IDS)
    torch.testing.assert_close(
        loaded.get_parameter("classifier.criterion.W"), model.get_parameter("classifier.criterion.W")
    )
    np.testing.assert_allclose(package.embed_tensor(images), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(package.embed_tensor(images), axis=1), 1.0, rtol=1e-5)
