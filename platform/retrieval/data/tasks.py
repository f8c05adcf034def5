"""Task sequences of incremental and lifelong retrieval (thesis ch. 5-7).

A sequence is a list of tasks; each task is some classes of one dataset ("at once":
classes 0-99 then 100-199; "sequential": 100, then 25 x 4) or a dataset of its own
(cross-domain: birds, then dogs, then cars). Every class's images are split once into a
training and a test part, with one seed, so the test split of a task is the same whichever
task is being trained and however many tasks follow.

Classes are renumbered in task order: the classes of task 0 are 0..n0-1, those of task 1
follow, and so on, so the classifier of a model grows by appending rows and two domains
never share a class id. A task's training data holds its own images only; nothing here
reads an image of another task (the joint-training upper bound asks for the union itself).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.config import DatasetSpec, IncrementalSpec, TaskSpec
from retrieval.data.base import ImageDataset
from retrieval.data.registry import DatasetSplits, build_datasets
from retrieval.data.splits import parse_class_range
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """One task's images, labelled with the sequence's class numbering.

    Attributes:
        index: the task's position in the sequence.
        name: the task's name (its spec's, or "task<index>").
        train: training images of the task's classes (training transform).
        test: held-out images of the task's classes (eval transform).
        classes: the sequence's class ids of this task, ascending and contiguous.
    """

    index: int
    name: str
    train: ImageDataset
    test: ImageDataset
    classes: tuple[int, ...]


def task_name(task: TaskSpec, index: int) -> str:
    """A task's display name: its own, or `task<index>`."""
    return task.name or f"task{index}"


def _relabelled(dataset: ImageDataset, *, mapping: dict[int, int], class_names: Sequence[str]) -> ImageDataset:
    """The same items with labels mapped to the sequence's class numbering."""
    labels = np.asarray([mapping[int(label)] for label in dataset.labels], dtype=np.int64)
    return ImageDataset(
        loaders=[functools.partial(dataset.load_image, position) for position in range(len(dataset))],
        labels=labels,
        class_names=class_names,
        sources=[dataset.source(position) for position in range(len(dataset))],
        transform=dataset.transform,
    )


def _task_classes(task: TaskSpec, *, num_classes: int, position: int) -> list[int]:
    if task.classes is None:
        return list(range(num_classes))
    chosen = parse_class_range(task.classes) if isinstance(task.classes, str) else sorted(set(task.classes))
    unknown = [class_id for class_id in chosen if not 0 <= class_id < num_classes]
    if unknown:
        raise DatasetError(
            f"incremental.tasks[{position}].classes names class id(s) {unknown}, but its dataset has "
            f"class ids 0..{num_classes - 1}"
        )
    return chosen


def build_task_sequence(*, dataset: DatasetSpec, incremental: IncrementalSpec) -> list[TaskData]:
    """Every task of a sequence, each with its own train and test images.

    Args:
        dataset: the job's dataset (a task with its own `dataset` uses that instead).
        incremental: the sequence.

    Returns:
        One `TaskData` per task, in order.

    Raises:
        DatasetError: a task names an unknown class id, two tasks of one dataset share a class,
            or a task has no training or no test image.
    """
    cross_domain = any(task.dataset is not None for task in incremental.tasks)
    split_cache: dict[str, DatasetSplits] = {}
    claimed: dict[str, dict[int, int]] = {}
    picked: list[tuple[ImageDataset, ImageDataset, dict[int, int]]] = []
    class_names: list[str] = []
    for position, task in enumerate(incremental.tasks):
        source = task.dataset or dataset
        key = source.model_dump_json()
        if key not in split_cache:
            split_cache[key] = build_datasets(
                name=source.name,  # type: ignore[arg-type]
                root=source.root,
                image_size=source.image_size,
                mean=source.mean,
                std=source.std,
                augment=source.augment,
                split_mode="image_fraction",
                train_classes=None,
                test_classes=None,
                train_fraction=1.0 - incremental.test_fraction,
                seed=incremental.seed,
            )
        splits = split_cache[key]
        chosen = _task_classes(task, num_classes=splits.train.num_classes, position=position)
        owners = claimed.setdefault(f"{source.name}:{source.root}", {})
        shared = sorted(set(chosen) & set(owners))
        if shared:
            raise DatasetError(
                f"incremental.tasks[{position}] repeats class id(s) {shared} of {source.name!r}, "
                f"already learnt in task {owners[shared[0]]}"
            )
        owners.update({class_id: position for class_id in chosen})
        mapping = {class_id: len(class_names) + offset for offset, class_id in enumerate(chosen)}
        prefix = f"{source.name}/" if cross_domain else ""
        class_names.extend(f"{prefix}{splits.train.class_names[class_id]}" for class_id in chosen)
        sides = []
        for side, split in (("train", splits.train), ("test", splits.test)):
            kept = np.flatnonzero(np.isin(split.labels, chosen))
            if kept.size == 0:
                raise DatasetError(f"incremental.tasks[{position}] has no {side} image for classes {chosen}")
            sides.append(split.subset(kept))
        picked.append((sides[0], sides[1], mapping))

    # Relabelled once every class name is known, so all tasks share one class list.
    tasks: list[TaskData] = []
    for position, (train, test, mapping) in enumerate(picked):
        built = TaskData(
            index=position,
            name=task_name(incremental.tasks[position], position),
            train=_relabelled(train, mapping=mapping, class_names=class_names),
            test=_relabelled(test, mapping=mapping, class_names=class_names),
            classes=tuple(sorted(mapping.values())),
        )
        logger.info(
            "task %d (%s): %d classes, %d train / %d test images",
            position,
            built.name,
            len(built.classes),
            len(built.train),
            len(built.test),
        )
        tasks.append(built)
    return tasks
