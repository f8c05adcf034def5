"""ClassBalancedBatchSampler: P x K batches, equal per-replica counts, determinism, coverage."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from retrieval.data import ClassBalancedBatchSampler

# 10 classes x 8 images, shuffled: with P=2, K=4 an epoch is 10 batches using every image once.
EVEN_LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 8))
# Class c has c + 1 images: classes 0..2 have fewer than K=4 images.
UNEVEN_LABELS = np.random.default_rng(1).permutation(np.repeat(np.arange(12), np.arange(1, 13)))


def _batches(labels: np.ndarray, **kwargs: int) -> list[list[int]]:
    sampler = ClassBalancedBatchSampler(labels=labels, **kwargs)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    return batches


def _assert_p_by_k(batch: list[int], labels: np.ndarray, *, classes: int, per_class: int) -> None:
    counts = Counter(labels[batch].tolist())
    assert len(counts) == classes
    assert set(counts.values()) == {per_class}


@pytest.mark.parametrize("labels", [EVEN_LABELS, UNEVEN_LABELS])
def test_every_batch_has_p_classes_of_k_items(labels: np.ndarray) -> None:
    batches = _batches(labels, classes_per_batch=3, samples_per_class=4, seed=5)
    assert len(batches) == len(labels) // 12
    for batch in batches:
        _assert_p_by_k(batch, labels, classes=3, per_class=4)


def test_items_of_a_class_repeat_only_when_it_has_fewer_than_k() -> None:
    for epoch in range(3):
        sampler = ClassBalancedBatchSampler(labels=UNEVEN_LABELS, classes_per_batch=3, samples_per_class=4)
        sampler.set_epoch(epoch)
        for batch in sampler:
            for class_id in set(UNEVEN_LABELS[batch].tolist()):
                members = [index for index in batch if UNEVEN_LABELS[index] == class_id]
                class_size = class_id + 1
                # Every image of a small class is present; a class of >= K images repeats none.
                assert len(set(members)) == min(class_size, 4)


def test_one_epoch_uses_every_image_once_when_sizes_divide_evenly() -> None:
    batches = _batches(EVEN_LABELS, classes_per_batch=2, samples_per_class=4, seed=1)
    assert len(batches) == 10
    assert sorted(index for batch in batches for index in batch) == list(range(80))


def test_classes_appear_equally_often_and_all_are_covered() -> None:
    batches = _batches(UNEVEN_LABELS, classes_per_batch=4, samples_per_class=2, seed=2)
    appearances = Counter(label for batch in batches for label in set(UNEVEN_LABELS[batch].tolist()))
    assert set(appearances) == set(range(12))
    assert max(appearances.values()) - min(appearances.values()) <= 1


def test_replicas_split_the_global_batches_evenly_and_disjointly() -> None:
    replicas = [
        ClassBalancedBatchSampler(
            labels=EVEN_LABELS, classes_per_batch=2, samples_per_class=4, num_replicas=2, rank=rank, seed=3
        )
        for rank in range(2)
    ]
    for sampler in replicas:
        sampler.set_epoch(4)
    per_replica = [list(sampler) for sampler in replicas]
    assert len(replicas[0]) == len(replicas[1]) == len(per_replica[0]) == len(per_replica[1]) == 5
    global_batches = replicas[0].global_batches()
    assert global_batches == replicas[1].global_batches()
    assert per_replica[0] == global_batches[0::2] and per_replica[1] == global_batches[1::2]
    indices_0 = {index for batch in per_replica[0] for index in batch}
    indices_1 = {index for batch in per_replica[1] for index in batch}
    assert not indices_0 & indices_1
    assert indices_0 | indices_1 == set(range(80))
    for batch in per_replica[0] + per_replica[1]:
        _assert_p_by_k(batch, EVEN_LABELS, classes=2, per_class=4)


@pytest.mark.parametrize(("num_items", "num_replicas", "expected"), [(80, 3, 3), (80, 4, 2), (24, 4, 1)])
def test_batches_per_replica_are_equal_and_at_least_one(num_items: int, num_replicas: int, expected: int) -> None:
    labels = np.arange(num_items) % 10
    counts = [
        len(
            list(
                ClassBalancedBatchSampler(
                    labels=labels, classes_per_batch=2, samples_per_class=4, num_replicas=num_replicas, rank=rank
                )
            )
        )
        for rank in range(num_replicas)
    ]
    assert counts == [expected] * num_replicas


def test_same_seed_and_epoch_repeat_other_epochs_and_seeds_differ() -> None:
    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = ClassBalancedBatchSampler(labels=UNEVEN_LABELS, classes_per_batch=3, samples_per_class=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 1) != epoch_batches(0, 2)
    assert epoch_batches(0, 1) != epoch_batches(1, 1)


def test_dataloader_uses_the_batches() -> None:
    sampler = ClassBalancedBatchSampler(labels=EVEN_LABELS, classes_per_batch=2, samples_per_class=4)
    dataset = torch.utils.data.TensorDataset(torch.arange(80), torch.from_numpy(EVEN_LABELS))
    loaded = [batch[0].tolist() for batch in torch.utils.data.DataLoader(dataset, batch_sampler=sampler)]
    assert loaded == list(sampler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"classes_per_batch": 11, "samples_per_class": 2},
            "classes_per_batch=11 but the labels hold only 10 distinct",
        ),
        ({"classes_per_batch": 1, "samples_per_class": 1}, "1 \\* 1 = 1 item\\(s\\) has no pair"),
        ({"classes_per_batch": 2, "samples_per_class": 0}, "must be >= 1, got 2 and 0"),
        ({"classes_per_batch": 2, "samples_per_class": 2, "num_replicas": 2, "rank": 2}, "got rank=2, num_replicas=2"),
    ],
)
def test_bad_settings_raise_with_the_numbers(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(labels=EVEN_LABELS, **kwargs)
