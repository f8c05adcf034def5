"""The one per-worker training loop that Ray Train runs on every worker of every job, whatever its method.

Each worker runs a `MethodTrainer` (`retrieval.methods.training`): its own shard of the method's
batches, DDP replicas of the method's players, the method's steps; every epoch all workers
report the mean loss terms, and rank 0 also scores the model (the method's `evaluate`), writes
the checkpoint (the trainer's complete state and the spec) and logs the epoch to MLflow. A
restarted worker group resumes from the last reported checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml

from retrieval.config import JobSpec
from retrieval.methods import build_method
from retrieval.methods.base import TaskAssignment, unwrap
from retrieval.methods.training import MethodTrainer, build_optimizer, build_scheduler
from retrieval.serialization import load_state
from retrieval.tracking.runs import TrainingRun

logger = logging.getLogger(__name__)

CHECKPOINT_STATE = "state.pt"
CHECKPOINT_SPEC = "job.yaml"

__all__ = [
    "CHECKPOINT_SPEC",
    "CHECKPOINT_STATE",
    "FaultPlan",
    "RunAddress",
    "WorkerConfig",
    "build_optimizer",
    "build_scheduler",
    "train_loop_per_worker",
    "unwrap",
    "with_system_metrics",
]


@dataclass(frozen=True)
class RunAddress:
    """The MLflow run a job's workers log to."""

    tracking_uri: str
    run_id: str
    experiment_id: str


@dataclass(frozen=True)
class FaultPlan:
    """Test hook: the worker of `rank` dies at the first step of `epoch`, unless `marker` exists."""

    epoch: int
    rank: int
    marker: str


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker of a job's Ray Train run is told, checked on the driver before any worker starts.

    Attributes:
        spec: the job (as JSON, validated again in the worker: the worker may run other code).
        tracking: the MLflow run, or None to log nothing.
        fault: a test's fault to inject, or None.
        task: the task of a sequence this run trains, or None for a whole job.
        carry: with `task`, a Ray object reference to what the earlier tasks left (the method's `carry_type`).
    """

    spec: Mapping[str, Any]
    tracking: RunAddress | None = None
    fault: FaultPlan | None = None
    task: TaskAssignment | None = None
    carry: Any = None

    def __post_init__(self) -> None:
        if (self.task is None) != (self.carry is None):
            raise ValueError("a worker's task assignment and its carry go together")

    def to_loop_config(self) -> dict[str, Any]:
        """Ray Train's `train_loop_config` (a dict) holding this configuration."""
        return {"worker": self}

    @classmethod
    def from_loop_config(cls, config: Mapping[str, Any]) -> WorkerConfig:
        worker = config.get("worker")
        if not isinstance(worker, cls):
            raise TypeError(f"train_loop_config must hold a WorkerConfig under 'worker', got keys {sorted(config)}")
        return worker

    def job(self) -> JobSpec:
        return JobSpec.from_mapping(dict(self.spec), source="train_loop_config")


def with_system_metrics(loop: Callable[[dict[str, Any]], None], config: dict[str, Any]) -> None:
    """Run a worker ``loop`` while the first worker of each node logs the node's system metrics to the job's run.

    The worker configuration's ``tracking`` addresses the run; the spec's
    ``tracking.system_metrics_interval_s`` sets the sampling. On several nodes each node's metrics
    are ``system/node<rank>/...``.
    """
    context = ray.train.get_context()
    worker = WorkerConfig.from_loop_config(config)
    if worker.tracking is None or context.get_local_rank() != 0:
        loop(config)
        return
    from retrieval.tracking.system_metrics import system_metrics_logging

    interval = float(worker.spec.get("tracking", {}).get("system_metrics_interval_s", 10.0))
    single_node = context.get_world_size() == context.get_local_world_size()
    with system_metrics_logging(
        tracking_uri=worker.tracking.tracking_uri,
        run_id=worker.tracking.run_id,
        interval_s=interval,
        node_id=None if single_node else f"node{context.get_node_rank()}",
    ):
        loop(config)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of every job; `config` holds a `WorkerConfig` (`WorkerConfig.to_loop_config`)."""
    worker = WorkerConfig.from_loop_config(config)
    spec = worker.job()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    trainer = MethodTrainer(
        build_method(spec),
        task=worker.task,
        carry=ray.get(worker.carry) if worker.carry is not None else None,
        device=device,
        num_replicas=world_size,
        rank=rank,
        wrap=ray.train.torch.prepare_model,
    )
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder) / CHECKPOINT_STATE, map_location=device)
        start_epoch = trainer.restore(state)
        logger.info("rank %d resumed from the checkpoint of epoch %d", rank, start_epoch - 1)

    run = TrainingRun(**asdict(worker.tracking)) if rank == 0 and worker.tracking is not None else None
    task = worker.task
    prefix, step_offset = ("", 0) if task is None else (f"{task.phase}/", task.step_offset)

    for epoch in range(start_epoch, trainer.epochs):
        sums, steps = trainer.train_epoch(
            epoch, before_step=functools.partial(_fault_at_step, worker.fault, epoch, rank)
        )
        metrics = _mean_across_workers(sums, steps, device=device, world_size=world_size)
        metrics.update(epoch=epoch, lr=trainer.lr, resumed_from_epoch=start_epoch)
        if rank == 0:
            metrics.update(trainer.evaluate())
            if run is not None:
                run.log_metrics(
                    {f"{prefix}{key}": value for key, value in metrics.items() if key != "epoch"},
                    step=step_offset + epoch,
                )
            with tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state(epoch), Path(folder) / CHECKPOINT_STATE)
                (Path(folder) / CHECKPOINT_SPEC).write_text(yaml.safe_dump(dict(worker.spec), sort_keys=False))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics, checkpoint=None)


def _mean_across_workers(
    sums: dict[str, float], steps: int, *, device: torch.device, world_size: int
) -> dict[str, float]:
    """Per-term mean loss over all steps of all workers (every worker calls this: a collective)."""
    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names] + [float(steps)], dtype=torch.float64, device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    count = max(float(totals[-1]), 1.0)
    return {f"train/{name}": float(totals[index]) / count for index, name in enumerate(names)}


def _fault_at_step(fault: FaultPlan | None, epoch: int, rank: int, step: int) -> None:
    _maybe_inject_fault(fault, epoch=epoch, step=step, rank=rank)


def _maybe_inject_fault(fault: FaultPlan | None, *, epoch: int, step: int, rank: int) -> None:
    """Kill this worker process once, for testing recovery (like Faiss contrib's `crash_at`).

    `FaultPlan(epoch=e, rank=r, marker=path)`: the worker of rank r dies at the first
    step of epoch e, unless the marker file exists (so the restarted group runs through).
    It first waits until Ray Train has committed every earlier report: a report still queued
    in a worker that dies is lost with it, which models no real mid-epoch failure.
    """
    if fault is None or epoch != fault.epoch or rank != fault.rank or step != 0:
        return
    marker = Path(fault.marker)
    if marker.exists():
        return
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at epoch {epoch}\n")
    logger.warning("fault injection: killing rank %d at epoch %d", rank, epoch)
    os._exit(1)
