"""The one method protocol: what every thesis method provides to training, registration, evaluation and serving.

Every method, whatever its family (image metric learning, incremental task sequences, image-text
retrieval), is a `RetrievalMethod` registered by name in `retrieval.methods.registry.METHODS`,
trained by the one loop (`retrieval.methods.training.MethodTrainer`, which every Ray Train worker
runs: `retrieval.train.worker`), registered by the one path (`retrieval.train.outcome.register_package`,
after the method's own `evaluate_package` in `retrieval.train.driver.register_checkpoint`) and
indexed by the one writer (`retrieval.index.gallery.write_gallery_index`, fed by the method's
`gallery`). What differs between families is the method's own code, in the optional parts below;
the edge never asks which family a method is.

Required: `build_model`, `training_step` (or `train_step`), `embed`. Optional parts, each with
a default that fits an image metric-learning method:

- data: `load_training_data` (the training set and what the method scores each epoch),
  `prepare_training` (labels mined from the initial weights), `training_loader` (P x K batches);
- a second player: `build_adversary` and `adversary_optimizer` (an adversarial method's modality
  classifiers), trained inside the method's own `train_step`;
- task sequences: `begin_task` with a typed carry (`carry_type`), `phases`;
- scoring: `evaluate` (every epoch), `evaluate_package` (the registered model, beside baselines,
  with its plots), `evaluate_suite` (`retrieval evaluate --model`);
- the package: `package_files` / `load_package_files` (what the architecture takes from the
  training data), `embedding_dim`, `code_bits`, `modalities`, `embed_texts`, `registration_tags`;
- the index: `gallery` (what an index of this model holds).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from retrieval.config import JobSpec, OptimizerSpec
from retrieval.errors import BadRequestError, ConfigError, DatasetError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from retrieval.evaluation.suite import SuiteResult
    from retrieval.methods.package import ModelPackage

Modality = Literal["image", "text"]
GalleryName = Literal["test", "train", "all"]
# Which model a run of a task trains: the student, or (ch. 7) the specialist trained on the task alone.
Phase = Literal["student", "specialist"]


@dataclass(frozen=True)
class TaskAssignment:
    """One task of an incremental sequence, as the runner hands it to every worker of a Ray Train run.

    Attributes:
        index: the task's position in the sequence (0 first).
        phase: which model this run trains (`"student"`; ch. 7 also trains a `"specialist"`).
        epochs: epochs of this run.
        step_offset: epochs of the earlier tasks, so the run's MLflow steps continue theirs.
    """

    index: int
    phase: Phase
    epochs: int
    step_offset: int

    def __post_init__(self) -> None:
        if self.index < 0 or self.epochs < 1 or self.step_offset < 0:
            raise ValueError(f"not a task assignment: {self}")


@dataclass(frozen=True)
class TrainingData:
    """What one worker trains on, how many epochs, and what the method scores every epoch.

    Attributes:
        train: the training items (what `training_loader` draws batches from).
        evaluation: what `evaluate` reads (a test split, or an image-text method's query and
            retrieval splits).
        epochs: how many epochs to train.
        classes_per_batch: classes per P x K batch (a task may have fewer than the job asks for).
    """

    train: Dataset[Any]
    evaluation: Any
    epochs: int
    classes_per_batch: int


@dataclass
class Players:
    """What a training step updates: the model and its optimiser, and an adversary where the method has one.

    `model` and `adversary` may be DDP-wrapped; `bare_*` are the modules inside.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    adversary: nn.Module | None = None
    adversary_optimizer: torch.optim.Optimizer | None = None

    @property
    def bare_model(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def bare_adversary(self) -> nn.Module | None:
        return None if self.adversary is None else unwrap(self.adversary)

    def train(self) -> None:
        self.model.train()
        if self.adversary is not None:
            self.adversary.train()


@dataclass
class Evaluation:
    """A registered model's scores and what to log beside them (plots, tables, JSON).

    Attributes:
        metrics: the trained model's scores on the held-out data (gate and tags read these).
        baselines: each baseline's scores, by name.
        figures: artifact path -> matplotlib figure (closed by whoever logs them).
        texts: artifact path -> text (e.g. a Markdown table).
        documents: artifact path -> JSON-able dict.
    """

    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    documents: dict[str, Any] = field(default_factory=dict)


@dataclass
class Gallery:
    """What an index of a model holds: one vector, id and metadata record per item.

    Attributes:
        vectors: `[N, D]` float32 (±1 codes for a hashing model).
        items: per item, JSON-able metadata (label, source, ...).
        thumbnails_from: the image dataset whose item `i` is the gallery's item `i`, to draw
            thumbnails from (anything with `__len__` and `load_image(i)`); None where the items are
            not images (texts).
        description: what the manifest records of the gallery (dataset, split, modality, ...).
        modality: what the items are (`"image"` or `"text"`).
    """

    vectors: np.ndarray
    items: list[dict[str, Any]]
    thumbnails_from: Any
    description: dict[str, Any]
    modality: Modality = "image"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class RetrievalMethod(ABC):
    """A thesis method: its model, one training step, how it embeds, scores, packages and indexes.

    A method holds no training state of its own (the worker loop owns the model, optimisers and
    checkpoints), so the same method runs unchanged in a plain process, on one CPU, or in every
    worker of a Ray Train job. What it derives from the training data before the first step
    (mined pseudo-labels, a text vocabulary, the carry of earlier tasks) it may keep.

    The worker loop calls, per worker: `load_training_data`, `build_model`, `begin_task` (task
    sequences only), `prepare_training` (on the fresh model, before it is wrapped for DDP, before
    the optimiser exists and before a checkpoint is loaded), `build_adversary`, `training_loader`,
    then per epoch `set_epoch` and `train_step` per batch, and on rank 0 `evaluate`.

    Args:
        spec: the validated job spec.
    """

    name: ClassVar[str]
    # What the model embeds into one space: images, or images and texts.
    modalities: ClassVar[tuple[Modality, ...]] = ("image",)
    # The type of what `begin_task` receives from the earlier tasks (None: no task sequences).
    carry_type: ClassVar[type | None] = None
    # Files `package_files` must provide for the package to load again.
    required_package_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.epoch = 0

    # ----------------------------------------------------------------- the model and its step

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model with the spec's architecture (backbone weights per the spec)."""

    def build_loss(self) -> nn.Module:
        """The loss module; called once per worker, moved to the device by the loop. Default: none."""
        return nn.Identity()

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """What the model's optimiser steps (default: every parameter of the model)."""
        return model.parameters()

    def build_adversary(self) -> nn.Module | None:
        """A second player trained against the model (e.g. modality classifiers), or None (the default)."""
        return None

    def adversary_optimizer(self) -> OptimizerSpec:
        """The adversary's optimiser settings (default: the job's)."""
        return self.spec.optimizer

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; `"loss"` is the weighted total to back-propagate.

        Args:
            model: the (possibly DDP-wrapped) model.
            loss: what `build_loss` returned.
            images: `[B, 3, H, W]`.
            labels: `[B]`.
        """
        raise NotImplementedError(f"method {self.name!r} defines neither training_step nor train_step")

    def indexed_training_step(
        self,
        *,
        model: nn.Module,
        loss: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`training_step` for a batch whose dataset indices are known.

        A method whose mining looks up per-item state from `prepare_training` overrides this;
        the default ignores the indices.

        Args:
            model, loss, images: as in `training_step`.
            labels: `[B]`, from `prepare_training`'s labels where it returned some, else the dataset's.
            indices: `[B]` int64, each image's index in the training dataset.
        """
        return self.training_step(model=model, loss=loss, images=images, labels=labels)

    def train_step(
        self,
        players: Players,
        *,
        loss: nn.Module,
        batch: Any,
        training_labels: np.ndarray | None,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch of `training_loader`; returns the loss terms to report.

        The default: the terms of `indexed_training_step` on `(images, labels, indices)`, then one
        step of the model's optimiser on `"loss"`. A method with an adversary steps both players here.

        Args:
            players: the model and optimiser (and adversary).
            loss: what `build_loss` returned, on the device.
            batch: what the loader yields.
            training_labels: what `prepare_training` returned.
            device: this worker's device.
        """
        images, labels, indices = batch
        if training_labels is not None:
            labels = torch.from_numpy(training_labels)[indices]
        terms = self.indexed_training_step(
            model=players.model,
            loss=loss,
            images=images.to(device),
            labels=labels.to(device),
            indices=indices.to(device),
        )
        players.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        players.optimizer.step()
        return terms

    def set_epoch(self, epoch: int) -> None:
        """The epoch about to be trained (a loss may change with it, e.g. a ranking warm-up)."""
        self.epoch = epoch

    @abstractmethod
    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Retrieval embeddings `[B, D]` of images `[B, 3, H, W]` (L2-normalised, or ±1 codes)."""

    # ----------------------------------------------------------------- data

    def load_training_data(self, task: TaskAssignment | None = None) -> TrainingData:
        """The training split and the held-out split scored every epoch (called on every worker).

        Args:
            task: the task of a sequence this run trains, or None for a whole job.
        """
        if task is not None:
            raise ConfigError(f"method {self.name!r} does not train task sequences")
        from retrieval.data.from_spec import datasets_from_spec

        splits = datasets_from_spec(self.spec.dataset)
        return TrainingData(
            train=splits.train,
            evaluation=splits.test,
            epochs=self.spec.train.epochs,
            classes_per_batch=self.spec.train.classes_per_batch,
        )

    def check_inputs(self) -> None:
        """Fail before any worker starts on inputs that would only fail inside one.

        Raises:
            DatasetError: the data cannot be read or split as specified, or is too small for a batch.
        """
        from retrieval.data.from_spec import datasets_from_spec

        splits = datasets_from_spec(self.spec.dataset)
        train_classes = len(set(splits.train.labels.tolist()))
        if train_classes < self.spec.train.classes_per_batch:
            raise DatasetError(
                f"train.classes_per_batch is {self.spec.train.classes_per_batch} but the training split of "
                f"{self.spec.dataset.name!r} has only {train_classes} classes"
            )

    def prepare_training(self, *, model: nn.Module, dataset: Any, device: torch.device) -> np.ndarray | None:
        """Prepare to train `model` on `dataset`; returns the labels batches are drawn by.

        Called once per worker, by every worker, before training (a method may use collective
        `torch.distributed` calls here). The default does nothing.

        Args:
            model: the fresh model from `build_model`, not DDP-wrapped, its initial weights.
            dataset: the training split (training transform).
            device: this worker's device.

        Returns:
            None to draw batches by the dataset's labels; or labels `[N]` int64, one per dataset
            item, that the batch sampler balances on and `indexed_training_step` receives as
            `labels`, where -1 leaves an item out of training.
        """
        return None

    def training_loader(
        self,
        data: TrainingData,
        *,
        training_labels: np.ndarray | None,
        num_replicas: int,
        rank: int,
    ) -> tuple[DataLoader[Any], Any]:
        """The loader of one worker and its sampler (the loop calls `sampler.set_epoch` each epoch).

        The default: this worker's shard of P x K batches (`ClassBalancedBatchSampler`), drawn by
        `training_labels` where `prepare_training` returned some (-1 leaves an item out).
        """
        from retrieval.data.sampler import ClassBalancedBatchSampler

        train_data = data.train
        train_set: Dataset[Any] = train_data
        sampler_labels = train_data.labels  # type: ignore[attr-defined]
        if training_labels is not None:
            # Items labelled -1 are left out; a Subset keeps each item's own dataset index.
            kept = np.flatnonzero(training_labels >= 0)
            train_set, sampler_labels = Subset(train_data, kept.tolist()), training_labels[kept]
        sampler = ClassBalancedBatchSampler(
            labels=sampler_labels,
            classes_per_batch=data.classes_per_batch,
            samples_per_class=self.spec.train.samples_per_class,
            num_replicas=num_replicas,
            rank=rank,
            seed=self.spec.train.seed,
        )
        return DataLoader(train_set, batch_sampler=sampler, num_workers=self.spec.train.loader_workers), sampler

    # ----------------------------------------------------------------- task sequences

    def begin_task(self, *, model: nn.Module, carry: Any, phase: Phase, device: torch.device) -> None:
        """Set `model` and the method up for one task of a sequence, from the earlier tasks' `carry`.

        Raises:
            ConfigError: the method trains no task sequences (the default).
        """
        raise ConfigError(f"method {self.name!r} does not train task sequences")

    # ----------------------------------------------------------------- scoring

    def evaluate(
        self, model: nn.Module, data: TrainingData, *, device: torch.device, adversary: nn.Module | None = None
    ) -> dict[str, float]:
        """Scores of the bare `model` (eval mode) on `data.evaluation`, reported every epoch.

        The default: recall@k and MAP@R of the test split's embeddings, by its labels.
        """
        from retrieval.evaluation.runs import embed_dataset, score_embeddings

        test = data.evaluation
        vectors = embed_dataset(
            functools.partial(self.embed, model), test, batch_size=self.spec.train.embed_batch_size, device=device
        )
        return score_embeddings(vectors, test.labels, ks=self.spec.evaluation.recall_ks)

    def evaluate_package(self, package: ModelPackage, *, history: Sequence[Mapping[str, Any]] = ()) -> Evaluation:
        """The registered model's scores beside the job's baselines, with the plots to log.

        The default: recall@k and MAP@R on the held-out classes (and on held-out images of the
        training classes under `seen_classes/` where the split keeps some), beside the spec's
        baselines; a results table, recall bars and curves, and the training curves of `history`.
        """
        from retrieval.methods.evaluation import evaluate_image_package

        return evaluate_image_package(self, package, history=history)

    def evaluate_suite(self, model: nn.Module, *, spec: JobSpec, device: torch.device | str) -> SuiteResult:
        """`retrieval evaluate --model`: the model's scores under `spec`'s protocol (its dataset and evaluation)."""
        from retrieval.evaluation.suite import evaluate_suite

        return evaluate_suite(spec, embedders={"trained": functools.partial(self.embed, model)}, device=device)

    # ----------------------------------------------------------------- the package

    @property
    def embeds_texts(self) -> bool:
        """Embeds texts into the images' space (text queries are possible)."""
        return "text" in self.modalities

    @property
    def embedding_dim(self) -> int | None:
        """Width of `embed`'s vectors, where the spec fixes it (None: the backbone's channels)."""
        return self.spec.model.embedding_dim

    @property
    def code_bits(self) -> int | None:
        """K for a hashing model, whose every embedding is a sign code of ±1.0; None for float embeddings."""
        return None

    def embed_texts(self, model: nn.Module, texts: Sequence[str], tags: np.ndarray | None = None) -> torch.Tensor:
        """Retrieval vectors `[T, D]` of texts, for a method that embeds texts.

        Raises:
            BadRequestError: the method embeds images only (the default).
        """
        raise BadRequestError(
            f"model of method {self.name!r} embeds images only; text queries need a model that embeds texts"
        )

    def package_files(self) -> dict[str, str]:
        """Text files saved with the model (what the architecture took from the training data). Default: none."""
        return {}

    def load_package_files(self, folder: Path) -> None:  # noqa: B027 (optional part: nothing to read by default)
        """Read back what `package_files` saved, before `build_model` of a stored model. Default: nothing."""

    def registration_tags(self) -> dict[str, str]:
        """Tags of the registered model version beyond the job and its scores (e.g. its modalities)."""
        return {"retrieval.modalities": ",".join(self.modalities)}

    # ----------------------------------------------------------------- the index

    def gallery(self, package: ModelPackage, gallery: GalleryName, *, modality: Modality, batch_size: int) -> Gallery:
        """What an index of this model holds: the embedded `gallery` split of the job's dataset.

        Raises:
            ConfigError: a `modality` the model does not embed.
        """
        from retrieval.methods.gallery import image_gallery

        if modality != "image":
            raise ConfigError(
                f"index modality {modality!r} needs a model that embeds texts, but {package.source} "
                f"(method {self.name!r}) embeds images only"
            )
        return image_gallery(package, gallery, batch_size=batch_size)
