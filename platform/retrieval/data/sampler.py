"""P x K batches (P classes, K images each) for metric-learning losses, DDP-aware.

Pair and triplet losses need several positives per class in every batch, which a
plain shuffle does not give. Every replica builds the same global list of batches
from `(seed, epoch)` and takes every `num_replicas`-th batch, so replicas never share
a batch and all take the same number of steps (DDP's all-reduce needs equal counts).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class _ShuffledCycle:
    """Yields items of a fixed pool in reshuffled rounds, `count` distinct at a time.

    Consuming whole shuffled rounds before reusing an item spreads draws evenly: over
    an epoch every class (or every image of a class) is used as often as any other, +-1.
    """

    def __init__(self, pool: np.ndarray) -> None:
        self._pool = pool
        self._pending: list[int] = []

    def take(self, count: int, rng: np.random.Generator) -> list[int]:
        chosen: list[int] = []
        chosen_set: set[int] = set()
        while len(chosen) < count:
            position = next((position for position, item in enumerate(self._pending) if item not in chosen_set), None)
            if position is None:
                # Everything still pending is already in this draw: start the next round
                # (it holds all pool items, at least `count` of them distinct from `chosen`).
                self._pending.extend(rng.permutation(self._pool).tolist())
                continue
            item = self._pending.pop(position)
            chosen.append(item)
            chosen_set.add(item)
        return chosen


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of `classes_per_batch` (P) distinct classes x `samples_per_class` (K) indices.

    Each epoch, a generator seeded by `(seed, epoch)` builds `len(self) * num_replicas`
    global batches: classes are drawn in reshuffled rounds so every class appears
    equally often (+-1), and each class's images in reshuffled rounds so an image is
    reused only after all of its class's images were used. The K images of one class
    in one batch are distinct, except for classes with fewer than K images, which give
    all their images plus random repeats. Replica `rank` takes global batches
    `rank::num_replicas`.

    Batches per replica: `max(1, (N // (P * K)) // num_replicas)`, N = `len(labels)`.

    Args:
        labels: Class id of each dataset item `[N]`.
        classes_per_batch: P, distinct classes per batch.
        samples_per_class: K, items per class in a batch.
        num_replicas: Number of data-parallel processes (DDP world size).
        rank: This process's rank in `[0, num_replicas)`.
        seed: Base seed; batches depend only on `(seed, epoch)`, never on rank.

    Raises:
        ValueError: Fewer than P classes, P * K < 2, or a bad replica setting; the
            message gives the numbers.
    """

    def __init__(
        self,
        *,
        labels: np.ndarray | Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        label_array = np.asarray(labels, dtype=np.int64)
        if label_array.ndim != 1:
            raise ValueError(f"labels must be one-dimensional [N], got shape {label_array.shape}")
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(
                f"classes_per_batch and samples_per_class must be >= 1, got {classes_per_batch} and {samples_per_class}"
            )
        if classes_per_batch * samples_per_class < 2:
            raise ValueError(
                f"a batch of classes_per_batch * samples_per_class = {classes_per_batch} * "
                f"{samples_per_class} = {classes_per_batch * samples_per_class} item(s) has no pair; need >= 2"
            )
        classes = np.unique(label_array)
        if len(classes) < classes_per_batch:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but the labels hold only {len(classes)} "
                f"distinct class(es) in {len(label_array)} items"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}"
            )
        self._classes = classes
        self._members = {int(class_id): np.flatnonzero(label_array == class_id) for class_id in classes}
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self._batches_per_replica = max(
            1, (len(label_array) // (classes_per_batch * samples_per_class)) // num_replicas
        )

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose batches the next iteration yields (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._batches_per_replica

    def global_batches(self) -> list[list[int]]:
        """All replicas' batches of the current epoch, `[len(self) * num_replicas][P * K]`."""
        rng = np.random.default_rng([self.seed, self.epoch])
        class_cycle = _ShuffledCycle(self._classes)
        member_cycles = {class_id: _ShuffledCycle(members) for class_id, members in self._members.items()}
        batches: list[list[int]] = []
        for _ in range(self._batches_per_replica * self.num_replicas):
            batch: list[int] = []
            for class_id in class_cycle.take(self.classes_per_batch, rng):
                members = self._members[class_id]
                if len(members) >= self.samples_per_class:
                    batch.extend(member_cycles[class_id].take(self.samples_per_class, rng))
                else:
                    repeats = rng.choice(members, size=self.samples_per_class - len(members), replace=True)
                    batch.extend([*rng.permutation(members).tolist(), *repeats.tolist()])
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank :: self.num_replicas]
