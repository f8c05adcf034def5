"""The one training loop of every method, without Ray: what each Ray Train worker runs, and what tests drive.

`MethodTrainer` builds a method's players (its model and optimiser, and an adversary where the
method has one) with their schedulers, draws this worker's batches, takes the method's steps,
scores on the held-out data, and writes and restores the complete training state. The Ray Train
worker (`retrieval.train.worker`) wraps it with the device, DDP, checkpoints and reports; a test or
benchmark drives it in a plain process.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from retrieval.config import JobSpec, OptimizerSpec
from retrieval.data.base import ImageDataset
from retrieval.data.sampler import ClassBalancedBatchSampler
from retrieval.methods.base import Players, RetrievalMethod, TaskAssignment, TrainingData, unwrap
from retrieval.methods.registry import build_method

logger = logging.getLogger(__name__)

# Keys of the training state beside the model's: the second player's are written only where there is one.
ADVERSARY_KEYS = ("discriminator", "discriminator_optimizer", "discriminator_scheduler")


def build_optimizer(spec: OptimizerSpec, parameters: Iterable[Any]) -> torch.optim.Optimizer:
    if spec.name == "adamw":
        return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def build_scheduler(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, *, epochs: int) -> Any:
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class MethodTrainer:
    """One worker's training of a method: data, players, schedulers, steps, scores and state.

    Args:
        method: the method, bound to its job spec.
        task: the task of a sequence this run trains (with `carry`, what the earlier tasks left),
            or None for a whole job.
        carry: of the method's `carry_type`; only with `task`.
        device: this worker's device.
        num_replicas, rank: the data-parallel group (each worker draws its own shard of batches).
        wrap: puts a fresh module on the device and wraps it for data parallelism (Ray Train's
            `prepare_model` in a worker; the default only moves it to `device`).
    """

    def __init__(
        self,
        method: RetrievalMethod,
        *,
        task: TaskAssignment | None = None,
        carry: Any = None,
        device: torch.device | str = "cpu",
        num_replicas: int = 1,
        rank: int = 0,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        spec = method.spec
        self.method = method
        self.task = task
        self.device = torch.device(device)
        wrap = wrap or (lambda module: module.to(self.device))
        if (task is None) != (carry is None):
            raise ValueError("a task assignment and its carry go together")
        if carry is not None and method.carry_type is not None and not isinstance(carry, method.carry_type):
            raise TypeError(
                f"method {method.name!r} carries a {method.carry_type.__name__}, got {type(carry).__name__}"
            )

        self.data: TrainingData = method.load_training_data(task)
        # Seeded right before the model: every worker, and a restarted one, starts from the same weights.
        torch.manual_seed(spec.train.seed)
        initial_model = method.build_model()
        if task is not None:
            method.begin_task(model=initial_model, carry=carry, phase=task.phase, device=self.device)
        # Before DDP wrapping and before a checkpoint is loaded: a method mines from the initial weights.
        self.training_labels = method.prepare_training(model=initial_model, dataset=self.data.train, device=self.device)
        self.loader, self.sampler = method.training_loader(
            self.data, training_labels=self.training_labels, num_replicas=num_replicas, rank=rank
        )
        model = wrap(initial_model)
        optimizer = build_optimizer(spec.optimizer, method.trainable_parameters(model))
        self.schedulers: dict[str, Any] = {
            "scheduler": build_scheduler(spec.optimizer, optimizer, epochs=self.data.epochs)
        }
        adversary = method.build_adversary()
        adversary_optimizer = None
        if adversary is not None:
            adversary = wrap(adversary)
            adversary_spec = method.adversary_optimizer()
            adversary_optimizer = build_optimizer(adversary_spec, adversary.parameters())
            self.schedulers["discriminator_scheduler"] = build_scheduler(
                adversary_spec, adversary_optimizer, epochs=self.data.epochs
            )
        self.players = Players(
            model=model, optimizer=optimizer, adversary=adversary, adversary_optimizer=adversary_optimizer
        )
        self.loss = method.build_loss().to(self.device)

    @property
    def epochs(self) -> int:
        return self.data.epochs

    @property
    def lr(self) -> float:
        return float(self.schedulers["scheduler"].get_last_lr()[0])

    def train_epoch(
        self, epoch: int, *, before_step: Callable[[int], None] | None = None, max_steps: int | None = None
    ) -> tuple[dict[str, float], int]:
        """Train one epoch; returns the sum of each loss term over its steps and the number of steps.

        Args:
            epoch: which epoch (the sampler's shuffle and the method's schedule read it).
            before_step: called with the step's index before each step (a test's fault hook).
            max_steps: stop after this many steps (a test's short epoch); the schedulers still step.
        """
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.method.set_epoch(epoch)
        self.players.train()
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for step, batch in enumerate(self.loader):
            if max_steps is not None and step >= max_steps:
                break
            if before_step is not None:
                before_step(step)
            terms = self.method.train_step(
                self.players, loss=self.loss, batch=batch, training_labels=self.training_labels, device=self.device
            )
            for name, value in terms.items():
                sums[name] += float(value.detach())
            steps += 1
        for scheduler in self.schedulers.values():
            scheduler.step()
        return dict(sums), steps

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The method's scores of the bare model on the held-out data (both players in eval mode)."""
        model, adversary = self.players.bare_model, self.players.bare_adversary
        model.eval()
        if adversary is not None:
            adversary.eval()
        return self.method.evaluate(model, self.data, device=self.device, adversary=adversary)

    def state(self, epoch: int) -> dict[str, Any]:
        """The complete training state after `epoch`: what a checkpoint holds and `restore` reads.

        Its tensors are the trainer's own (not copies): save it before the next step.
        """
        players = self.players
        state: dict[str, Any] = {
            "model": players.bare_model.state_dict(),
            "optimizer": players.optimizer.state_dict(),
            "scheduler": self.schedulers["scheduler"].state_dict(),
            "epoch": epoch,
            "package_files": self.method.package_files(),
        }
        if players.bare_adversary is not None and players.adversary_optimizer is not None:
            state["discriminator"] = players.bare_adversary.state_dict()
            state["discriminator_optimizer"] = players.adversary_optimizer.state_dict()
            state["discriminator_scheduler"] = self.schedulers["discriminator_scheduler"].state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> int:
        """Load a training state written by `state`; returns the epoch to start from."""
        players = self.players
        players.bare_model.load_state_dict(state["model"])
        players.optimizer.load_state_dict(state["optimizer"])
        self.schedulers["scheduler"].load_state_dict(state["scheduler"])
        if players.bare_adversary is not None and players.adversary_optimizer is not None:
            missing = [key for key in ADVERSARY_KEYS if key not in state]
            if missing:
                raise ValueError(f"the training state lacks the adversary's {missing}")
            players.bare_adversary.load_state_dict(state["discriminator"])
            players.adversary_optimizer.load_state_dict(state["discriminator_optimizer"])
            self.schedulers["discriminator_scheduler"].load_state_dict(state["discriminator_scheduler"])
        return int(state["epoch"]) + 1


def training_loader(
    train_data: ImageDataset,
    *,
    training_labels: np.ndarray | None,
    classes_per_batch: int,
    spec: JobSpec,
    num_replicas: int,
    rank: int,
) -> tuple[DataLoader[Any], ClassBalancedBatchSampler]:
    """The P x K loader of one worker of an image method (`RetrievalMethod.training_loader`'s default).

    For a test or benchmark that drives the steps itself; `MethodTrainer` calls the method's own.
    """
    data = TrainingData(
        train=train_data, evaluation=None, epochs=spec.train.epochs, classes_per_batch=classes_per_batch
    )
    method = build_method(spec)
    loader, sampler = RetrievalMethod.training_loader(
        method, data, training_labels=training_labels, num_replicas=num_replicas, rank=rank
    )
    return loader, sampler


def begin_task(
    method: Any,
    model: nn.Module,
    *,
    task: Mapping[str, Any] | TaskAssignment,
    carry: Any,
    spec: JobSpec,
    device: torch.device,
) -> tuple[ImageDataset, ImageDataset]:
    """Set `model` and `method` up for one task of an incremental sequence; its train and test data.

    What `MethodTrainer` does for a task, for a benchmark or test that drives the steps itself.
    """
    if not isinstance(task, TaskAssignment):
        task = TaskAssignment(
            index=int(task["index"]),
            phase=task["phase"],
            epochs=int(task.get("epochs", spec.train.epochs)),
            step_offset=int(task.get("step_offset", 0)),
        )
    data = method.load_training_data(task)
    method.begin_task(model=model, carry=carry, phase=task.phase, device=device)
    return data.train, data.evaluation


def package_files_of(state: dict[str, Any]) -> dict[str, str]:
    """The package files a training state keeps (a state written before they were kept: its text context)."""
    if "package_files" in state:
        return dict(state["package_files"])
    if "text_context" in state:
        from retrieval.methods.cross_modal import TEXT_CONTEXT_FILE

        return {TEXT_CONTEXT_FILE: state["text_context"]}
    return {}


__all__ = [
    "ADVERSARY_KEYS",
    "MethodTrainer",
    "begin_task",
    "build_optimizer",
    "build_scheduler",
    "package_files_of",
    "training_loader",
    "unwrap",
]
