"""The per-worker training loop that Ray Train runs on every worker of a job.

Each worker gets its own shard of P x K batches, trains a DDP replica, and every epoch
reports the same metrics; rank 0 also evaluates, writes the checkpoint (model, optimiser,
scheduler, epoch, spec) and logs the epoch to MLflow. A restarted worker group resumes
from the last reported checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from retrieval.config import JobSpec, OptimizerSpec
from retrieval.data.base import ImageDataset
from retrieval.data.from_spec import datasets_from_spec
from retrieval.data.sampler import ClassBalancedBatchSampler
from retrieval.evaluation.runs import embed_dataset, score_embeddings
from retrieval.methods import build_method
from retrieval.serialization import load_state
from retrieval.tracking.runs import TrainingRun

logger = logging.getLogger(__name__)

CHECKPOINT_STATE = "state.pt"
CHECKPOINT_SPEC = "job.yaml"


def build_optimizer(spec: OptimizerSpec, parameters: Any) -> torch.optim.Optimizer:
    if spec.name == "adamw":
        return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def build_scheduler(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, *, epochs: int) -> Any:
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def with_system_metrics(loop: Callable[[dict[str, Any]], None], config: dict[str, Any]) -> None:
    """Run a worker ``loop`` while the first worker of each node logs the node's system metrics to the job's run.

    ``config["tracking"]`` addresses the run; the spec's ``tracking.system_metrics_interval_s``
    sets the sampling. On several nodes each node's metrics are ``system/node<rank>/...``.
    """
    context = ray.train.get_context()
    tracking = config.get("tracking")
    if not tracking or context.get_local_rank() != 0:
        loop(config)
        return
    from retrieval.tracking.system_metrics import system_metrics_logging

    interval = float(config["spec"].get("tracking", {}).get("system_metrics_interval_s", 10.0))
    single_node = context.get_world_size() == context.get_local_world_size()
    with system_metrics_logging(
        tracking_uri=tracking["tracking_uri"],
        run_id=tracking["run_id"],
        interval_s=interval,
        node_id=None if single_node else f"node{context.get_node_rank()}",
    ):
        loop(config)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: `spec` (JobSpec as JSON), `tracking` (run address), `fault`."""
    spec = JobSpec.from_mapping(config["spec"], source="train_loop_config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.train.seed)

    method = build_method(spec)
    initial_model = method.build_model()
    task = config.get("task")
    epochs, step_offset, classes_per_batch = spec.train.epochs, 0, spec.train.classes_per_batch
    if task is None:
        splits = datasets_from_spec(spec.dataset)
        train_data, test_data = splits.train, splits.test
    else:
        carry = ray.get(task["carry"])
        train_data, test_data = begin_task(method, initial_model, task=task, carry=carry, spec=spec, device=device)
        epochs, step_offset = int(task["epochs"]), int(task["step_offset"])
        # A task of two classes cannot fill a batch of five: balance over the classes it has.
        classes_per_batch = min(classes_per_batch, len(np.unique(train_data.labels)))
    # Before DDP wrapping and before a checkpoint is loaded: a method mines from the initial weights.
    training_labels = method.prepare_training(model=initial_model, dataset=train_data, device=device)
    loader, sampler = training_loader(
        train_data,
        training_labels=training_labels,
        classes_per_batch=classes_per_batch,
        spec=spec,
        num_replicas=world_size,
        rank=rank,
    )

    model = ray.train.torch.prepare_model(initial_model)
    loss_module = method.build_loss().to(device)
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    scheduler = build_scheduler(spec.optimizer, optimizer, epochs=epochs)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder) / CHECKPOINT_STATE, map_location=device)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        logger.info("rank %d resumed from the checkpoint of epoch %d", rank, state["epoch"])

    run = TrainingRun(**config["tracking"]) if rank == 0 and config.get("tracking") else None
    fault = config.get("fault") or {}

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for step, (images, labels, indices) in enumerate(loader):
            _maybe_inject_fault(fault, epoch=epoch, step=step, rank=rank)
            if training_labels is not None:
                labels = torch.from_numpy(training_labels)[indices]
            terms = method.indexed_training_step(
                model=model,
                loss=loss_module,
                images=images.to(device),
                labels=labels.to(device),
                indices=indices.to(device),
            )
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] += float(value.detach())
            steps += 1
        scheduler.step()

        metrics = _mean_across_workers(sums, steps, device=device, world_size=world_size)
        metrics.update(epoch=epoch, lr=scheduler.get_last_lr()[0], resumed_from_epoch=start_epoch)
        if rank == 0:
            bare = unwrap(model)
            bare.eval()
            vectors = embed_dataset(
                functools.partial(method.embed, bare),
                test_data,
                batch_size=spec.train.embed_batch_size,
                device=device,
            )
            metrics.update(score_embeddings(vectors, test_data.labels, ks=spec.evaluation.recall_ks))
            if run is not None:
                prefix = "" if task is None else f"{task['phase']}/"
                run.log_metrics(
                    {f"{prefix}{key}": value for key, value in metrics.items() if key != "epoch"},
                    step=step_offset + epoch,
                )
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        "model": bare.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                    },
                    Path(folder) / CHECKPOINT_STATE,
                )
                (Path(folder) / CHECKPOINT_SPEC).write_text(yaml.safe_dump(config["spec"], sort_keys=False))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics, checkpoint=None)


def training_loader(
    train_data: ImageDataset,
    *,
    training_labels: np.ndarray | None,
    classes_per_batch: int,
    spec: JobSpec,
    num_replicas: int,
    rank: int,
) -> tuple[DataLoader[Any], ClassBalancedBatchSampler]:
    """The loader of one worker: its shard of P x K batches (call `sampler.set_epoch` each epoch).

    Args:
        train_data: the training images.
        training_labels: labels `[N]` from `prepare_training` (-1 leaves an item out), or None
            to draw batches by the dataset's labels.
    """
    train_set: Dataset[Any] = train_data
    sampler_labels = train_data.labels
    if training_labels is not None:
        # Items labelled -1 are left out; a Subset keeps each item's own dataset index.
        kept = np.flatnonzero(training_labels >= 0)
        train_set, sampler_labels = Subset(train_data, kept.tolist()), training_labels[kept]
    sampler = ClassBalancedBatchSampler(
        labels=sampler_labels,
        classes_per_batch=classes_per_batch,
        samples_per_class=spec.train.samples_per_class,
        num_replicas=num_replicas,
        rank=rank,
        seed=spec.train.seed,
    )
    return DataLoader(train_set, batch_sampler=sampler, num_workers=spec.train.loader_workers), sampler


def begin_task(
    method: Any, model: nn.Module, *, task: dict[str, Any], carry: Any, spec: JobSpec, device: torch.device
) -> tuple[ImageDataset, ImageDataset]:
    """Set `model` and `method` up for one task of an incremental sequence; its train and test data.

    `task`: `index`, `phase`, `epochs`, `step_offset`; `carry`: the `TaskCarry` the runner built
    from the earlier tasks (weights and statistics, no images).
    Only this task's training images are loaded (the joint upper bound asks for every task's).
    """
    from retrieval.data.tasks import build_task_sequence
    from retrieval.methods.incremental import IncrementalMethod

    if not isinstance(method, IncrementalMethod) or spec.incremental is None:
        raise TypeError(f"method {spec.method.name!r} does not train task sequences")
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
    method.begin_task(model=model, carry=carry, phase=task["phase"], device=device)
    index = int(task["index"])
    return method.training_data(tasks, index), tasks[index].test


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


def _maybe_inject_fault(fault: dict[str, Any], *, epoch: int, step: int, rank: int) -> None:
    """Kill this worker process once, for testing recovery (like Faiss contrib's `crash_at`).

    `fault = {"epoch": e, "rank": r, "marker": path}`: the worker of rank r dies at the first
    step of epoch e, unless the marker file exists (so the restarted group runs through).
    It first waits until Ray Train has committed every earlier report: a report still queued
    in a worker that dies is lost with it, which models no real mid-epoch failure.
    """
    if not fault or epoch != fault["epoch"] or rank != fault["rank"] or step != 0:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at epoch {epoch}\n")
    logger.warning("fault injection: killing rank %d at epoch %d", rank, epoch)
    os._exit(1)
