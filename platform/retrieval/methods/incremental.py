"""Incremental and lifelong retrieval (thesis ch. 5, 6, 7) and the baselines they are compared with.

A sequence of tasks is trained one task at a time. Before a task, the runner gives the method
a `TaskCarry`: what the method chose to keep from earlier tasks, never their images. Each
method keeps only what it needs:

- `incremental_finetune` (lower bound): nothing; fine-tunes the previous model on new data.
- `incremental_joint` (upper bound): nothing; trains on the images of every task so far.
- `lwf`: the previous model, for KD on the old classes' probabilities.
- `ewc`: each finished task's diagonal empirical Fisher (per-sample gradients) and weights (a
  penalty per old task).
- `incremental_kd_mmd` (ch. 5): the previous model, for KD and multi-kernel MMD.
- `feature_estimation` (ch. 6): the penultimate model, plus per finished task a backward affine
  map (3 x D floats) to estimate the older models' features.
- `dual_distillation` (ch. 7): the previous model (old teacher), a specialist fine-tuned on the
  new task (new teacher, trained first as its own phase), each class's mean embedding, and
  replay images synthesised from the old teacher's BatchNorm statistics (aimed at the class
  means, or at the head when cross-entropy trained it).

Every method trains on a task's new images with a metric loss plus cross-entropy of the
cosine classifier over the task's classes (joint: over all classes so far), and adds its own
distillation terms. All terms are returned by name so each is logged.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import (
    DualDistillationSpec,
    EwcSpec,
    FeatureEstimationSpec,
    IncrementalKdMmdSpec,
    IncrementalMethodSpec,
    JobSpec,
    LwfSpec,
)
from retrieval.data.base import ImageDataset, concatenate_datasets
from retrieval.errors import ConfigError
from retrieval.evaluation.runs import embed_dataset, score_embeddings
from retrieval.losses.distillation import (
    correlation_distillation,
    empirical_fisher,
    ewc_penalty,
    knowledge_distillation,
    multi_kernel_mmd,
)
from retrieval.losses.feature_estimation import (
    BackwardMap,
    descending_weights,
    estimate_older_features,
    fit_backward_map,
)
from retrieval.losses.metric import MetricLoss
from retrieval.methods.base import Gallery, Phase, RetrievalMethod, TaskAssignment, TrainingData
from retrieval.models.incremental import IncrementalNetwork
from retrieval.models.inversion import class_mean_logits, synthesize_images

if TYPE_CHECKING:
    from retrieval.data.tasks import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskCarry:
    """What a method keeps from the tasks before `task` (plain tensors and arrays, no images of old tasks).

    Attributes:
        task: index of the task about to be trained.
        classes: that task's class ids (the sequence's numbering, contiguous).
        previous_state: the model's state after task `task - 1` (None for the first task).
        fisher: per finished task, EWC's diagonal Fisher and the weights it is anchored at.
        drift: ch. 6, per finished task k >= 1, the backward map from model k's features to model k-1's.
        specialist_state: ch. 7, the new teacher fine-tuned on this task (None until its phase ran).
        replay_images: ch. 7, images `[R, 3, S, S]` synthesised from the old teachers.
        replay_labels: `[R]` the classes they were synthesised for.
        class_means: ch. 7, `[C, D]` the mean embedding of each class learnt so far (row c: class
            c), by the model after that class's task: what synthesis aims at without a trained head.
    """

    task: int
    classes: tuple[int, ...]
    previous_state: dict[str, torch.Tensor] | None = None
    fisher: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(default_factory=list)
    drift: dict[int, BackwardMap] = field(default_factory=dict)
    specialist_state: dict[str, torch.Tensor] | None = None
    replay_images: torch.Tensor | None = None
    replay_labels: torch.Tensor | None = None
    class_means: torch.Tensor | None = None

    @property
    def old_classes(self) -> int:
        """Classes learnt before this task (ids 0..old_classes-1)."""
        return self.classes[0]

    @property
    def seen_classes(self) -> int:
        """Classes learnt once this task is learnt."""
        return self.classes[-1] + 1


def network(model: nn.Module) -> IncrementalNetwork:
    """The `IncrementalNetwork` inside `model` (which may be DDP-wrapped)."""
    bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(bare, IncrementalNetwork):
        raise TypeError(f"expected an IncrementalNetwork, got {type(bare).__name__}")
    return bare


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's weights, to carry to the next task."""
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class IncrementalMethod(RetrievalMethod):
    """Shared by every incremental method: the network, the loss on new data, the task hooks.

    The runner calls, per task: `begin_task` on every worker (after `build_model`, before DDP),
    then the usual training steps, then `finish_task` once on the trained bare model to extend
    the carry for the next task.
    """

    carry_type = TaskCarry
    #: Whether a task trains on the images of earlier tasks too (only the joint upper bound).
    reads_old_tasks = False
    #: Whether the losses read a frozen copy of the previous model (not fine-tuning, joint or EWC).
    distils_from_previous_model = True

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        if not isinstance(spec.method, IncrementalMethodSpec):
            raise TypeError(f"{type(self).__name__} needs an incremental method spec, got {spec.method.name!r}")
        if spec.model.embedding_dim is None:
            raise ValueError("incremental methods need model.embedding_dim (the classifier sits on the embedding)")
        self.settings: IncrementalMethodSpec = spec.method
        self.carry: TaskCarry | None = None
        self.phase: Phase = "student"
        self.teacher: nn.Module | None = None

    # ------------------------------------------------------------------ model and loss

    def build_model(self) -> nn.Module:
        return IncrementalNetwork(
            model=self.spec.model, num_classes=1, temperature=self.settings.classifier_temperature
        )

    def build_loss(self) -> nn.Module:
        return MetricLoss(
            loss=self.settings.metric_loss, triplet_margin=self.settings.triplet_margin, triplet_mining="hard"
        )

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = network(model).embedding(images)
        return embeddings

    def phases(self, task: int) -> list[Phase]:
        """The training runs of a task, in order (ch. 7 trains its specialist first)."""
        return ["student"]

    def phase_epochs(self, phase: Phase, *, task_epochs: int) -> int:
        """Epochs of one phase of a task whose runs train `task_epochs` (default: all of them)."""
        return task_epochs

    def finish_phase(self, phase: Phase, *, model: nn.Module, carry: TaskCarry) -> TaskCarry:
        """The carry for the next phase of the same task, from the bare model `phase` trained (default: unchanged)."""
        return carry

    def score_task(
        self, model: nn.Module, task_data: TaskData, *, ks: Sequence[int], batch_size: int
    ) -> dict[str, float]:
        """Recall@K and mAP@R of `model` on a task's test split (query and gallery, self-matches removed).

        The runner scores the student on every task so far with it, and ch. 7's specialist on its
        own task (the model trained on that task alone, which the student is compared with).
        """
        with eval_mode(model), torch.no_grad():
            vectors = embed_dataset(lambda images: self.embed(model, images), task_data.test, batch_size=batch_size)
        return score_embeddings(vectors, task_data.test.labels, ks=ks)

    def task_gallery(self, model: nn.Module, tasks: Sequence[TaskData], *, upto: int, batch_size: int) -> Gallery:
        """What the index after task `upto` holds: the test images of every class seen so far, tagged with their task.

        Items `{"label", "source", "task"}`; thumbnails from the images; the description names the tasks.
        """
        seen = tasks[: upto + 1]
        gallery = concatenate_datasets([task.test for task in seen])
        with eval_mode(model), torch.no_grad():
            vectors = embed_dataset(lambda images: self.embed(model, images), gallery, batch_size=batch_size)
        names = gallery.class_names
        task_of = {class_id: task.index for task in tasks for class_id in task.classes}
        items: list[dict[str, Any]] = [
            {"label": names[label], "source": gallery.source(position), "task": str(task_of[int(label)])}
            for position, label in enumerate(gallery.labels.tolist())
        ]
        return Gallery(
            vectors=vectors,
            items=items,
            thumbnails_from=gallery,
            description={
                "dataset": self.spec.dataset.model_dump(mode="json"),
                "split": "test",
                "tasks": [task.name for task in seen],
                "count": len(gallery),
            },
        )

    def needs_teacher(self, phase: Phase) -> bool:
        """Whether `phase` distils from the frozen previous model (only then is one built)."""
        return self.distils_from_previous_model

    # ------------------------------------------------------------------ task hooks

    def training_data(self, tasks: Sequence[TaskData], task: int) -> ImageDataset:
        """The images task `task` trains on: its own only (the joint bound overrides this)."""
        return tasks[task].train

    def load_training_data(self, task: TaskAssignment | None = None) -> TrainingData:
        """One task's training images and test split; only this task's images (the joint bound: every task's so far).

        Raises:
            ConfigError: no task (an incremental method trains task sequences only).
        """
        from retrieval.data.tasks import build_task_sequence

        if task is None or self.spec.incremental is None:
            raise ConfigError(
                f"method {self.name!r} trains task sequences: its job needs an `incremental` section "
                "and runs through retrieval.train.incremental"
            )
        tasks = build_task_sequence(dataset=self.spec.dataset, incremental=self.spec.incremental)
        train = self.training_data(tasks, task.index)
        return TrainingData(
            train=train,
            evaluation=tasks[task.index].test,
            epochs=task.epochs,
            # A task of two classes cannot fill a batch of five: balance over the classes it has.
            classes_per_batch=min(self.spec.train.classes_per_batch, len(np.unique(train.labels))),
        )

    def begin_task(self, *, model: nn.Module, carry: TaskCarry, phase: Phase, device: torch.device) -> None:
        """Make `model` (fresh, bare) the start of this task and keep what the losses need.

        The model starts from the previous task's weights and its classifier grows to the
        classes seen so far.
        """
        self.carry = carry
        self.phase = phase
        if not isinstance(model, IncrementalNetwork):
            raise TypeError(f"expected an IncrementalNetwork, got {type(model).__name__}")
        self.teacher = None
        if carry.previous_state is not None:
            model.load_state_dict(carry.previous_state)
            if self.needs_teacher(phase):
                teacher = self.build_model()
                teacher.load_state_dict(carry.previous_state)
                self.teacher = _frozen(teacher.to(device))
        model.classifier.grow(carry.seen_classes)

    def finish_task(
        self, *, model: nn.Module, carry: TaskCarry, task_data: TaskData, device: torch.device
    ) -> TaskCarry:
        """The carry for the next task, from the trained bare model of this one."""
        return replace(carry, task=carry.task + 1, classes=(), previous_state=_state_of(model), specialist_state=None)

    # ------------------------------------------------------------------ training step

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the current task's classes (joint: every class so far)."""
        carry = self._require_carry()
        first = 0 if self.reads_old_tasks else carry.old_classes
        return F.cross_entropy(logits[:, first : carry.seen_classes], labels - first)

    def _require_carry(self) -> TaskCarry:
        if self.carry is None:
            raise RuntimeError("begin_task must run before the first training step")
        return self.carry

    def base_terms(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Metric + cross-entropy on the new images; also returns the embeddings and logits."""
        embeddings, logits = model(images)
        terms = dict(loss(embeddings, labels))
        terms["ce"] = self._ce(logits, labels)
        terms["loss"] = self.settings.metric_weight * terms["metric"] + self.settings.ce_weight * terms["ce"]
        return terms, embeddings, logits

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms, _, _ = self.base_terms(model=model, loss=loss, images=images, labels=labels)
        return terms

    def _teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("this task has no teacher (it is the first task)")
        with torch.no_grad():
            embeddings, logits = self.teacher(images)
        return embeddings, logits


class IncrementalFineTune(IncrementalMethod):
    """Lower bound: the previous model fine-tuned on each new task alone."""

    name = "incremental_finetune"
    distils_from_previous_model = False


class IncrementalJoint(IncrementalMethod):
    """Upper bound: each task trains on the images of every task so far."""

    name = "incremental_joint"
    reads_old_tasks = True
    distils_from_previous_model = False

    def training_data(self, tasks: Sequence[TaskData], task: int) -> ImageDataset:
        return concatenate_datasets([tasks[position].train for position in range(task + 1)])


class LearningWithoutForgetting(IncrementalMethod):
    """LwF: KD on the old classes' probabilities of the previous model, for the new images."""

    name = "lwf"

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms, _, logits = self.base_terms(model=model, loss=loss, images=images, labels=labels)
        carry = self._require_carry()
        if self.teacher is not None and carry.old_classes > 0:
            settings = self.spec.method
            assert isinstance(settings, LwfSpec)
            _, teacher_logits = self._teacher_outputs(images)
            old = carry.old_classes
            terms["kd"] = knowledge_distillation(
                logits[:, :old], teacher_logits[:, :old], temperature=settings.kd_temperature
            )
            terms["loss"] = terms["loss"] + settings.kd_weight * terms["kd"]
        return terms


class ElasticWeightConsolidation(IncrementalMethod):
    """EWC: a quadratic penalty per old task, weighted by that task's diagonal Fisher."""

    name = "ewc"
    distils_from_previous_model = False

    def begin_task(self, *, model: nn.Module, carry: TaskCarry, phase: Phase, device: torch.device) -> None:
        super().begin_task(model=model, carry=carry, phase=phase, device=device)
        self._penalties = [
            (
                {name: tensor.to(device) for name, tensor in fisher.items()},
                {name: tensor.to(device) for name, tensor in anchor.items()},
            )
            for fisher, anchor in carry.fisher
        ]

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms, _, _ = self.base_terms(model=model, loss=loss, images=images, labels=labels)
        if self._penalties:
            settings = self.spec.method
            assert isinstance(settings, EwcSpec)
            penalty = sum(
                (ewc_penalty(model, fisher=fisher, anchor=anchor) for fisher, anchor in self._penalties),
                torch.zeros((), device=images.device),
            )
            terms["ewc"] = penalty
            terms["loss"] = terms["loss"] + settings.ewc_weight / 2.0 * penalty
        return terms

    def finish_task(
        self, *, model: nn.Module, carry: TaskCarry, task_data: TaskData, device: torch.device
    ) -> TaskCarry:
        settings = self.spec.method
        assert isinstance(settings, EwcSpec)
        first, seen = task_data.classes[0], task_data.classes[-1] + 1

        def log_likelihood(outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
            # log p(y|x) of the softmax the task's cross-entropy trained: over this task's classes.
            _, logits = outputs
            log_probs = F.log_softmax(logits[:, first:seen], dim=1)
            return log_probs.gather(1, (labels - first).unsqueeze(1)).squeeze(1)

        batches = _sample_batches(task_data, settings.fisher_samples, self.spec, device, salt=1)
        fisher = empirical_fisher(model, batches, log_likelihood, max_samples=settings.fisher_samples)
        anchor = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if name in fisher}
        following = super().finish_task(model=model, carry=carry, task_data=task_data, device=device)
        fishers = [
            *carry.fisher,
            (
                {name: tensor.cpu() for name, tensor in fisher.items()},
                {name: tensor.cpu() for name, tensor in anchor.items()},
            ),
        ]
        return replace(following, fisher=fishers)


class IncrementalKdMmd(IncrementalMethod):
    """Thesis ch. 5: KD on the old classifier's probabilities + multi-kernel MMD on embeddings."""

    name = "incremental_kd_mmd"

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms, embeddings, logits = self.base_terms(model=model, loss=loss, images=images, labels=labels)
        carry = self._require_carry()
        if self.teacher is not None:
            settings = self.spec.method
            assert isinstance(settings, IncrementalKdMmdSpec)
            teacher_embeddings, teacher_logits = self._teacher_outputs(images)
            old = carry.old_classes
            terms["kd"] = knowledge_distillation(
                logits[:, :old], teacher_logits[:, :old], temperature=settings.kd_temperature
            )
            terms["mmd"] = multi_kernel_mmd(
                embeddings, teacher_embeddings, kernels=settings.mmd_kernels, multiplier=settings.mmd_multiplier
            )
            terms["loss"] = terms["loss"] + settings.kd_weight * terms["kd"] + settings.mmd_weight * terms["mmd"]
        return terms


class FeatureEstimation(IncrementalMethod):
    """Thesis ch. 6: correlation distillation from the penultimate model and estimated older models."""

    name = "feature_estimation"

    def begin_task(self, *, model: nn.Module, carry: TaskCarry, phase: Phase, device: torch.device) -> None:
        super().begin_task(model=model, carry=carry, phase=phase, device=device)
        settings = self.spec.method
        assert isinstance(settings, FeatureEstimationSpec)
        # At task t the penultimate model is t-1; the maps of tasks t-1, ..., 1 lead back to models t-2, ..., 0.
        missing = [k for k in range(1, carry.task) if k not in carry.drift]
        if missing:
            raise ValueError(f"task {carry.task} needs the backward maps of tasks {missing}, which the carry lacks")
        self._maps = [carry.drift[k] for k in range(carry.task - 1, 0, -1)]
        # descending_weights is oldest first; the estimates come newest first.
        self._older_weights = descending_weights(len(self._maps), gamma=settings.estimation_gamma)[::-1]
        self._generator = torch.Generator(device="cpu").manual_seed(self.spec.train.seed + carry.task)

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms, embeddings, _ = self.base_terms(model=model, loss=loss, images=images, labels=labels)
        if self.teacher is not None:
            settings = self.spec.method
            assert isinstance(settings, FeatureEstimationSpec)
            temperature = settings.correlation_temperature
            teacher_embeddings, _ = self._teacher_outputs(images)
            terms["corr"] = correlation_distillation(embeddings, teacher_embeddings, temperature=temperature)
            distilled = terms["corr"]
            if self._maps:
                estimates = estimate_older_features(
                    teacher_embeddings, self._maps, noise_scale=settings.estimation_scale, generator=self._generator
                )
                estimated = torch.zeros((), device=images.device)
                for weight, older_features in zip(self._older_weights, estimates, strict=True):
                    estimated = estimated + weight * correlation_distillation(
                        embeddings, older_features, temperature=temperature
                    )
                terms["corr_estimated"] = estimated
                distilled = distilled + estimated
            terms["loss"] = terms["loss"] + settings.correlation_weight * distilled
        return terms

    def finish_task(
        self, *, model: nn.Module, carry: TaskCarry, task_data: TaskData, device: torch.device
    ) -> TaskCarry:
        """Also fits the backward map from this task's model to the previous one on this task's images."""
        following = super().finish_task(model=model, carry=carry, task_data=task_data, device=device)
        if carry.previous_state is None:
            return following
        settings = self.spec.method
        assert isinstance(settings, FeatureEstimationSpec)
        previous = _frozen(self.build_model())
        previous.load_state_dict(carry.previous_state)
        previous.to(device)
        before, after = _paired_embeddings(
            previous, model, task_data, limit=settings.estimation_samples, spec=self.spec, device=device
        )
        return replace(following, drift={**carry.drift, carry.task: fit_backward_map(before, after)})


def _sample_batches(
    task_data: TaskData, limit: int, spec: JobSpec, device: torch.device, *, salt: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `(images, labels)` of a seeded random sample of up to `limit` of a finished task's training images.

    The images take the test transform (no augmentation): what the models are measured on.
    """
    dataset = task_data.train.with_transform(task_data.test.transform)
    generator = torch.Generator().manual_seed(spec.train.seed + 104729 * task_data.index + 7 * salt)
    chosen = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, chosen), batch_size=spec.train.classes_per_batch * spec.train.samples_per_class
    )
    for images, labels, _ in loader:
        yield images.to(device), labels.to(device)


def _paired_embeddings(
    older: nn.Module, newer: nn.Module, task_data: TaskData, *, limit: int, spec: JobSpec, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """`[N, D]` embeddings by two models (eval mode) of a seeded random sample of up to `limit` training images."""
    before: list[np.ndarray] = []
    after: list[np.ndarray] = []
    with eval_mode(older, newer), torch.no_grad():
        for images, _ in _sample_batches(task_data, limit, spec, device):
            before.append(network(older).embedding(images).cpu().numpy())
            after.append(network(newer).embedding(images).cpu().numpy())
    return np.concatenate(before), np.concatenate(after)


class DualDistillation(IncrementalMethod):
    """Thesis ch. 7: old and new professional teachers, a self-motivated student, synthesised replay."""

    name = "dual_distillation"

    def phases(self, task: int) -> list[Phase]:
        return ["student"] if task == 0 else ["specialist", "student"]

    def needs_teacher(self, phase: Phase) -> bool:
        # The specialist fine-tunes alone; only the student distils from the old teacher.
        return phase == "student"

    def begin_task(self, *, model: nn.Module, carry: TaskCarry, phase: Phase, device: torch.device) -> None:
        super().begin_task(model=model, carry=carry, phase=phase, device=device)
        self.new_teacher: nn.Module | None = None
        self._replay: tuple[torch.Tensor, torch.Tensor] | None = None
        if phase == "student" and carry.specialist_state is not None:
            new_teacher = self.build_model()
            new_teacher.load_state_dict(carry.specialist_state)
            self.new_teacher = _frozen(new_teacher.to(device))
        if phase == "student" and carry.replay_images is not None and carry.replay_labels is not None:
            self._replay = (carry.replay_images.to(device), carry.replay_labels.to(device))
        self._generator = torch.Generator(device="cpu").manual_seed(self.spec.train.seed + 7919 * carry.task)

    def _replay_batch(self, size: int) -> torch.Tensor | None:
        if self._replay is None:
            return None
        images, _ = self._replay
        chosen = torch.randperm(images.shape[0], generator=self._generator)[:size]
        return images[chosen.to(images.device)]

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        replay = None if self.phase == "specialist" or self.teacher is None else self._replay_batch(images.shape[0])
        terms, embeddings, _ = self.base_terms(model=model, loss=loss, images=images, labels=labels)
        if replay is not None:
            # A forward pass of its own, BatchNorm on running statistics: the student's batch
            # statistics and running statistics stay those of the real images.
            with batch_norm_in_eval(model):
                student_replay, _ = model(replay)
        if self.phase == "specialist" or self.teacher is None:
            return terms
        settings = self.spec.method
        assert isinstance(settings, DualDistillationSpec)
        temperature = settings.correlation_temperature
        old_embeddings, _ = self._teacher_outputs(images)
        terms["corr_old"] = correlation_distillation(embeddings, old_embeddings, temperature=temperature)
        if replay is not None:
            teacher_replay, _ = self._teacher_outputs(replay)
            terms["corr_replay"] = correlation_distillation(student_replay, teacher_replay, temperature=temperature)
        old_total = terms["corr_old"] + terms.get("corr_replay", torch.zeros((), device=images.device))
        terms["loss"] = terms["loss"] + settings.old_teacher_weight * old_total
        if self.new_teacher is not None:
            with torch.no_grad():
                new_embeddings, _ = self.new_teacher(images)
            terms["corr_new"] = correlation_distillation(embeddings, new_embeddings, temperature=temperature)
            terms["loss"] = terms["loss"] + settings.new_teacher_weight * terms["corr_new"]
        return terms

    def phase_epochs(self, phase: Phase, *, task_epochs: int) -> int:
        settings = self.settings
        assert isinstance(settings, DualDistillationSpec)
        if phase == "specialist" and settings.specialist_epochs:
            return settings.specialist_epochs
        return task_epochs

    def finish_phase(self, phase: Phase, *, model: nn.Module, carry: TaskCarry) -> TaskCarry:
        return self.finish_specialist(model=model, carry=carry) if phase == "specialist" else carry

    def finish_specialist(self, *, model: nn.Module, carry: TaskCarry) -> TaskCarry:
        """The carry of the student phase: the same, plus the specialist (new teacher) just trained."""
        return replace(carry, specialist_state=_state_of(model))

    def finish_task(
        self, *, model: nn.Module, carry: TaskCarry, task_data: TaskData, device: torch.device
    ) -> TaskCarry:
        """Synthesise replay images of this task's classes from the trained model (the next old teacher).

        Also keeps each of this task's classes' mean embedding. The synthesis class term aims at
        the model's classifier head only when cross-entropy trained it; otherwise at the class
        means (a softmax over cosine similarities to every class mean so far).
        """
        following = super().finish_task(model=model, carry=carry, task_data=task_data, device=device)
        settings = self.spec.method
        assert isinstance(settings, DualDistillationSpec)
        synthesis = settings.synthesis
        means = _class_means(model, task_data, spec=self.spec, device=device)
        class_means = means if carry.class_means is None else torch.cat([carry.class_means, means])
        if class_means.shape[0] != task_data.classes[-1] + 1:
            raise ValueError(
                f"the carry holds the means of {class_means.shape[0] - len(means)} classes before task "
                f"{task_data.index}, whose first class is {task_data.classes[0]}: it was saved without class means "
                "(before issue 17); train the sequence again from task 0"
            )
        following = replace(following, class_means=class_means)
        targets = torch.tensor(
            [class_id for class_id in task_data.classes for _ in range(synthesis.images_per_class)], dtype=torch.int64
        )
        teacher = network(copy.deepcopy(model).to(device))
        seen = task_data.classes[-1] + 1
        logits_fn: Callable[[torch.Tensor], torch.Tensor]
        if settings.synthesis_target == "head":

            def logits_fn(batch: torch.Tensor) -> torch.Tensor:
                logits: torch.Tensor = teacher(batch)[1][:, :seen]
                return logits

        else:
            bank = class_means.to(device)

            def logits_fn(batch: torch.Tensor) -> torch.Tensor:
                return class_mean_logits(teacher(batch)[0], bank, temperature=synthesis.class_temperature)

        image_size = self.spec.dataset.image_size
        images = synthesize_images(
            teacher,
            logits_fn,
            targets=targets.to(device),
            image_size=image_size,
            iterations=synthesis.iterations,
            lr=synthesis.lr,
            first_bn_multiplier=synthesis.first_bn_multiplier,
            bn_weight=synthesis.bn_weight,
            ce_weight=synthesis.ce_weight,
            tv_weight=synthesis.tv_weight,
            l2_weight=synthesis.l2_weight,
            jitter=round(synthesis.jitter * image_size),
            flip=synthesis.flip,
            batch_size=synthesis.batch_size,
            seed=self.spec.train.seed + carry.task,
            device=device,
            mean=self.spec.dataset.mean,
            std=self.spec.dataset.std,
        ).cpu()
        if carry.replay_images is not None and carry.replay_labels is not None:
            images, targets = torch.cat([carry.replay_images, images]), torch.cat([carry.replay_labels, targets])
        return replace(following, replay_images=images, replay_labels=targets)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode inside the block, each back in the mode it had after it."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, training in zip(models, modes, strict=True):
            model.train(training)


@contextmanager
def batch_norm_in_eval(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer of `model` in eval mode (running statistics used, not updated) inside the block."""
    layers = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    modes = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.eval()
        yield
    finally:
        for layer, training in zip(layers, modes, strict=True):
            layer.train(training)


def _class_means(model: nn.Module, task_data: TaskData, *, spec: JobSpec, device: torch.device) -> torch.Tensor:
    """`[C_task, D]` the mean embedding of each of the task's classes over its training images, in class order."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    with eval_mode(model), torch.no_grad():
        for images, labels in _sample_batches(task_data, len(task_data.train), spec, device):
            embeddings = network(model).embedding(images).cpu()
            for label in labels.unique().tolist():
                chosen = embeddings[labels.cpu() == label]
                sums[label] = sums.get(label, torch.zeros(embeddings.shape[1])) + chosen.sum(dim=0)
                counts[label] = counts.get(label, 0) + len(chosen)
    missing = [class_id for class_id in task_data.classes if class_id not in counts]
    if missing:
        raise ValueError(f"task {task_data.index} has no training image of class(es) {missing}")
    return torch.stack([sums[class_id] / counts[class_id] for class_id in task_data.classes])
