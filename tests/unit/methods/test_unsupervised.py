"""The unsupervised_metric method: pseudo-labels never depend on the dataset's labels, training works,
every rank gets rank 0's pseudo-pairs, and the model survives a package round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity

from retrieval.config import JobSpec, UnsupervisedMetricSpec
from retrieval.data.base import ArrayImageLoader, ImageDataset
from retrieval.data.transforms import eval_transform, train_transform
from retrieval.errors import ConfigError, DatasetError
from retrieval.losses.pseudo_pairs import mine_pseudo_pairs
from retrieval.methods.package import load_model_package, save_model_package
from retrieval.methods.registry import build_method
from retrieval.methods.unsupervised import UnsupervisedMetric, off_the_shelf_features
from retrieval.models.embedding import EmbeddingNetwork

SpecFactory = Callable[..., JobSpec]

IMAGE_SIZE = 32
EMBEDDING_DIM = 16
CLUSTERS = 3
IMAGES_PER_CLUSTER = 5
CPU = torch.device("cpu")


def _clusters() -> list[int]:
    """The cluster of each image, interleaved so no cluster is a contiguous index range."""
    return [index % CLUSTERS for index in range(CLUSTERS * IMAGES_PER_CLUSTER)]


def _dataset(labels: list[int] | None = None) -> ImageDataset:
    """Near-copies of `CLUSTERS` random images, with the augmenting training transform.

    `labels` replaces the true labels (the clusters); the images stay the same.
    """
    generator = np.random.default_rng(0)
    bases = generator.integers(0, 256, size=(CLUSTERS, IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = [
        np.clip(bases[cluster] + generator.normal(0.0, 6.0, size=bases[cluster].shape), 0, 255).astype(np.uint8)
        for cluster in _clusters()
    ]
    return ImageDataset(
        loaders=[ArrayImageLoader(image) for image in pixels],
        labels=np.array(labels if labels is not None else _clusters()),
        class_names=[str(c) for c in range(CLUSTERS)],
        sources=[f"synthetic:{index}" for index in range(len(pixels))],
        transform=train_transform(image_size=IMAGE_SIZE),
    )


def _spec(make_job_spec: SpecFactory, **settings: Any) -> JobSpec:
    return make_job_spec(
        method={"name": "unsupervised_metric", "knn_k": 2, "negative_rank": 6, **settings},
        dataset={"name": "digits", "image_size": IMAGE_SIZE},
        model={"backbone": "resnet18", "embedding_dim": EMBEDDING_DIM},
    )


def _method(spec: JobSpec) -> UnsupervisedMetric:
    method = build_method(spec)
    assert isinstance(method, UnsupervisedMetric)
    return method


def _initial_model(method: UnsupervisedMetric, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return method.build_model()


def test_spec_defaults_extend_deep_metric_and_check_the_ranks(make_job_spec: SpecFactory) -> None:
    settings = make_job_spec(method={"name": "unsupervised_metric"}).method
    assert isinstance(settings, UnsupervisedMetricSpec)
    deep_metric = make_job_spec(method={"name": "deep_metric"}).method
    assert (settings.knn_k, settings.negative_rank) == (5, 50)
    assert settings.model_dump() == {
        **deep_metric.model_dump(),
        "name": "unsupervised_metric",
        "knn_k": 5,
        "negative_rank": 50,
    }
    with pytest.raises(ConfigError, match=r"negative_rank \(3\) must be at least knn_k \(5\)"):
        make_job_spec(method={"name": "unsupervised_metric", "negative_rank": 3})


def test_pseudo_labels_do_not_depend_on_the_dataset_labels(make_job_spec: SpecFactory) -> None:
    spec = _spec(make_job_spec)
    model = _initial_model(_method(spec))
    results = []
    shuffled = np.random.default_rng(1).permutation(_clusters()).tolist()
    for labels in (None, shuffled, [0] * len(_clusters())):
        method = _method(spec)
        returned = method.prepare_training(model=model, dataset=_dataset(labels), device=CPU)
        assert method.pseudo_pairs is not None
        np.testing.assert_array_equal(returned, method.pseudo_pairs.labels)
        results.append(method.pseudo_pairs)
    for other in results[1:]:
        np.testing.assert_array_equal(other.labels, results[0].labels)
        np.testing.assert_array_equal(other.neighbours, results[0].neighbours)

    # Near-copies are mutual neighbours: no pseudo-class mixes two clusters.
    labels = results[0].labels
    assert labels.max() >= 1
    for pseudo_class in range(labels.max() + 1):
        assert len({_clusters()[index] for index in np.flatnonzero(labels == pseudo_class)}) == 1


def test_the_features_are_the_pooled_backbone_features_under_the_eval_transform(make_job_spec: SpecFactory) -> None:
    spec = _spec(make_job_spec)
    method = _method(spec)
    model = _initial_model(method)
    assert isinstance(model, EmbeddingNetwork)
    dataset = _dataset()
    method.prepare_training(model=model, dataset=dataset, device=CPU)
    assert model.training, "prepare_training must leave the model in the mode it found it in"
    images = torch.stack([eval_transform(image_size=IMAGE_SIZE)(dataset.load_image(i)) for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        features = off_the_shelf_features(model, images)
        torch.testing.assert_close(features, F.normalize(model.pool(model.trunk(images)), dim=-1))
    expected = mine_pseudo_pairs(features.numpy(), knn_k=2, negative_rank=6)
    assert method.pseudo_pairs is not None
    np.testing.assert_array_equal(method.pseudo_pairs.labels, expected.labels)
    np.testing.assert_array_equal(method.pseudo_pairs.neighbours, expected.neighbours)


def test_the_loss_decreases_on_indexed_batches_of_pseudo_classes(make_job_spec: SpecFactory) -> None:
    spec = _spec(make_job_spec, loss="contrastive", contrastive_pos_margin=0.99, contrastive_neg_margin=0.5)
    method = _method(spec)
    model = _initial_model(method)
    dataset = _dataset()
    pseudo_labels = method.prepare_training(model=model, dataset=dataset, device=CPU)
    loss = method.build_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    indices = torch.from_numpy(np.flatnonzero(pseudo_labels >= 0))
    images = torch.stack([dataset[int(index)][0] for index in indices])
    # The labels passed are wrong on purpose: with indices, the mined pseudo-classes are used.
    wrong = torch.zeros(len(indices), dtype=torch.int64)
    model.train()
    totals = []
    for _ in range(4):
        terms = method.indexed_training_step(model=model, loss=loss, images=images, labels=wrong, indices=indices)
        assert set(terms) == {"metric", "loss"} and all(torch.isfinite(value) for value in terms.values())
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        totals.append(terms["loss"].item())
    assert totals[0] > 0 and totals[-1] < totals[0], totals


def test_an_indexed_step_is_pml_on_same_pseudo_class_positives_and_far_negatives(make_job_spec: SpecFactory) -> None:
    spec = _spec(make_job_spec, loss="contrastive", miner="none", negative_rank=8)
    method = _method(spec)
    model = _initial_model(method)
    dataset = _dataset()
    pseudo_labels = method.prepare_training(model=model, dataset=dataset, device=CPU)
    assert method.pseudo_pairs is not None
    batch = [int(index) for index in np.flatnonzero(pseudo_labels >= 0)]
    images = torch.stack([dataset[index][0] for index in batch])
    model.eval()
    with torch.no_grad():
        terms = method.indexed_training_step(
            model=model,
            loss=method.build_loss(),
            images=images,
            labels=torch.zeros(len(batch)),
            indices=torch.tensor(batch),
        )
        embeddings = model(images)

    near = [set(row) for row in method.pseudo_pairs.neighbours.tolist()]
    positives, negatives = [], []
    for a, first in enumerate(batch):
        for b, second in enumerate(batch):
            if a == b:
                continue
            if pseudo_labels[first] == pseudo_labels[second]:
                positives.append((a, b))
            elif second not in near[first] and first not in near[second]:
                negatives.append((a, b))
    assert positives and negatives, "the batch must hold both kinds of pairs"
    as_tensors = [torch.tensor(column) for column in (*zip(*positives, strict=True), *zip(*negatives, strict=True))]
    direct = pml_losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.0, distance=CosineSimilarity())
    expected = direct(embeddings, torch.from_numpy(pseudo_labels[batch]), tuple(as_tensors))
    torch.testing.assert_close(terms["metric"], expected)


def test_indexed_steps_need_prepare_training_and_enough_images(make_job_spec: SpecFactory) -> None:
    method = _method(_spec(make_job_spec))
    model = _initial_model(method)
    images = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(RuntimeError, match="call prepare_training before training on indexed batches"):
        method.indexed_training_step(
            model=model, loss=method.build_loss(), images=images, labels=torch.zeros(2), indices=torch.arange(2)
        )
    too_few = _method(_spec(make_job_spec, knn_k=2, negative_rank=15))
    with pytest.raises(
        DatasetError, match="negative_rank=15 needs more training images than that, the training split has 15"
    ):
        too_few.prepare_training(model=model, dataset=_dataset(), device=CPU)


def test_the_package_round_trip_embeds_identically(make_job_spec: SpecFactory, tmp_path: Path) -> None:
    spec = _spec(make_job_spec)
    method = _method(spec)
    model = _initial_model(method)
    dataset = _dataset()
    pseudo_labels = method.prepare_training(model=model, dataset=dataset, device=CPU)
    indices = torch.from_numpy(np.flatnonzero(pseudo_labels >= 0))
    images = torch.stack([dataset[int(index)][0] for index in indices])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    terms = method.indexed_training_step(
        model=model, loss=method.build_loss(), images=images, labels=torch.zeros(len(images)), indices=indices
    )
    terms["loss"].backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = method.embed(model, images).numpy()
    assert np.isfinite(expected).all()

    package = load_model_package(save_model_package(tmp_path / "package", spec=spec, state_dict=model.state_dict()))
    assert isinstance(package.method, UnsupervisedMetric)
    assert package.spec == spec
    np.testing.assert_allclose(package.embed_tensor(images), expected, rtol=1e-5, atol=1e-6)


_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from retrieval.config import JobSpec, UnsupervisedMetricSpec
    from retrieval.methods.registry import build_method
    from test_unsupervised import _dataset

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method={init!r}, rank=rank, world_size=2)
    spec = JobSpec.model_validate(json.loads({spec!r}))
    method = build_method(spec)
    torch.manual_seed(rank)  # rank 1 holds another model: it must still end with rank 0's pseudo-pairs
    model = method.build_model()
    labels = None if rank == 0 else [0] * 15
    method.prepare_training(model=model, dataset=_dataset(labels), device=torch.device("cpu"))
    mined = method.pseudo_pairs
    np.savez({out!r} + f"/rank{{rank}}.npz", labels=mined.labels, neighbours=mined.neighbours)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_every_rank_gets_rank_zeros_pseudo_pairs(make_job_spec: SpecFactory, tmp_path: Path) -> None:
    spec = _spec(make_job_spec)
    script = tmp_path / "rank.py"
    script.write_text(
        _RANK_SCRIPT.format(
            tests=str(Path(__file__).parent),
            init=f"file://{tmp_path / 'rendezvous'}",
            spec=json.dumps(spec.model_dump(mode="json")),
            out=str(tmp_path),
        )
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(rank)], env=environment, stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    for process in ranks:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors.decode()

    method = _method(spec)
    method.prepare_training(model=_initial_model(method, seed=0), dataset=_dataset(), device=CPU)
    assert method.pseudo_pairs is not None
    for rank in range(2):
        stored = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(stored["labels"], method.pseudo_pairs.labels)
        np.testing.assert_array_equal(stored["neighbours"], method.pseudo_pairs.neighbours)

    alone = _method(spec)
    alone.prepare_training(model=_initial_model(alone, seed=1), dataset=_dataset(), device=CPU)
    assert alone.pseudo_pairs is not None
    assert not np.array_equal(alone.pseudo_pairs.neighbours, method.pseudo_pairs.neighbours), (
        "rank 1's own model mines the same pairs: the test cannot tell a broadcast happened"
    )
