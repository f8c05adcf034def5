"""The batch contract of every registered method with a `training_step` (timm-style): one test, every entry.

A new method in `retrieval.methods.METHODS` that defines `training_step` on image batches is
covered automatically with its default spec; add an entry to `METHOD_VARIANTS` to also cover
its loss options. (Every method, whatever its step, keeps the protocol of
`test_method_protocol.py`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from retrieval.config import INCREMENTAL_METHODS, JobSpec
from retrieval.methods import METHODS, build_method
from retrieval.methods.base import RetrievalMethod
from retrieval.methods.incremental import IncrementalMethod, TaskCarry

METHOD_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "deep_metric": [
        {"name": "deep_metric", "loss": "triplet"},
        {"name": "deep_metric", "loss": "multi_similarity"},
        {"name": "deep_metric", "loss": "contrastive"},
    ],
}

CASES = [
    pytest.param(method, id="-".join(str(value) for value in method.values()))
    for name in METHODS
    if METHODS[name].training_step is not RetrievalMethod.training_step
    for method in METHOD_VARIANTS.get(name, [{"name": name}])
]

CLASSES = 2
IMAGES_PER_CLASS = 4
IMAGE_SIZE = 32
EMBEDDING_DIM = 16

SpecFactory = Callable[..., JobSpec]


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes x 4 images `[8, 3, 32, 32]`, labels `[8]`.

    Class 1 holds near-copies of class 0's images, so whatever the untrained network does,
    every negative is about as close as the closest image: each miner (hard triplets,
    multi-similarity, pair margin) finds something to train on.
    """
    generator = torch.Generator().manual_seed(0)
    originals = torch.randn(IMAGES_PER_CLASS, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    near_copies = originals + 0.01 * torch.randn(originals.shape, generator=generator)
    images = torch.cat([originals, near_copies])
    labels = torch.arange(CLASSES).repeat_interleave(IMAGES_PER_CLASS)
    return images, labels


def _spec(make_job_spec: SpecFactory, method: dict[str, Any]) -> JobSpec:
    # An incremental method trains a sequence; the contract batch is its first task.
    sequence = {"incremental": {"tasks": [{"classes": "0-1"}]}} if method["name"] in INCREMENTAL_METHODS else {}
    return make_job_spec(
        method=method,
        dataset={"name": "digits", "image_size": IMAGE_SIZE},
        model={"backbone": "resnet18", "embedding_dim": EMBEDDING_DIM},
        **sequence,
    )


def test_every_registered_method_is_named_by_its_key() -> None:
    assert METHODS, "the method registry is empty"
    for name, method_class in METHODS.items():
        assert method_class.name == name


@pytest.mark.parametrize("method", CASES)
def test_method_contract(make_job_spec: SpecFactory, method: dict[str, Any]) -> None:
    spec = _spec(make_job_spec, method)
    retrieval_method = build_method(spec)
    assert retrieval_method.name == method["name"]
    torch.manual_seed(0)
    model = retrieval_method.build_model()
    if isinstance(retrieval_method, IncrementalMethod):
        carry = TaskCarry(task=0, classes=tuple(range(CLASSES)))
        retrieval_method.begin_task(model=model, carry=carry, phase="student", device=torch.device("cpu"))
    loss = retrieval_method.build_loss()
    images, labels = _tiny_batch()

    model.train()
    terms = retrieval_method.training_step(model=model, loss=loss, images=images, labels=labels)
    total = terms["loss"]
    assert total.ndim == 0
    assert torch.isfinite(total)
    assert total.item() > 0, f"nothing to train on in the contract batch: {terms}"
    total.backward()
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable
    missing = [name for name, parameter in trainable if parameter.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(parameter.grad).all() for _, parameter in trainable if parameter.grad is not None)

    model.eval()
    with torch.no_grad():
        embeddings = retrieval_method.embed(model, images)
    assert embeddings.shape == (len(images), EMBEDDING_DIM)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(images)))


def test_deep_metric_total_is_the_weighted_metric_term(make_job_spec: SpecFactory) -> None:
    spec = _spec(make_job_spec, {"name": "deep_metric", "loss": "multi_similarity", "metric_weight": 0.25})
    retrieval_method = build_method(spec)
    torch.manual_seed(0)
    model = retrieval_method.build_model()
    images, labels = _tiny_batch()
    terms = retrieval_method.training_step(
        model=model, loss=retrieval_method.build_loss(), images=images, labels=labels
    )
    assert set(terms) == {"metric", "loss"}
    torch.testing.assert_close(terms["loss"], 0.25 * terms["metric"])


def test_build_method_with_an_unregistered_name_errors(
    make_job_spec: SpecFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_job_spec()
    monkeypatch.delitem(METHODS, spec.method.name)
    with pytest.raises(ValueError, match=f"unknown method '{spec.method.name}'; registered: "):
        build_method(spec)
