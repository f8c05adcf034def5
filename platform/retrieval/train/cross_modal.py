"""Cross-modal jobs (thesis ch. 3-4) under Ray Train: the alternating adversarial loop and registration.

Each worker trains DDP replicas of two players on its shard of the training pairs: per step,
the encoders embed the batch once; the modality classifiers take `discriminator_steps` steps on
the detached features (and codes); then the encoders step on their loss, whose entropy term
reads the just-updated classifiers. The schedule has no randomness of its own, so a seed fixes
it. Rank 0 scores the model every epoch on the query and retrieval splits and checkpoints both
players with both optimisers and schedulers; a restarted group resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import ray.train
import ray.train.torch
import torch
import yaml
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from retrieval.config import JobSpec
from retrieval.data.cross_modal import CrossModalSplits, cross_modal_datasets_from_spec
from retrieval.evaluation.cross_modal import hamming_pr_curve, precision_at_n
from retrieval.evaluation.cross_modal_plots import (
    discriminator_accuracy_figure,
    pr_curve_figure,
    precision_at_n_figure,
)
from retrieval.evaluation.plots import training_curve_figure
from retrieval.evaluation.suite import format_table
from retrieval.methods.cross_modal import (
    CrossModalMethod,
    EncodedSplit,
    TextContext,
    alternating_step,
    build_cross_modal_method,
    modality_accuracy,
    relevance_labels,
)
from retrieval.methods.package import load_model_package, save_model_package
from retrieval.models.codes import pack_codes
from retrieval.serialization import load_state
from retrieval.tracking.registry import register_model_package
from retrieval.tracking.runs import TrainingRun
from retrieval.train.outcome import TrainingOutcome, apply_gate
from retrieval.train.worker import (
    CHECKPOINT_SPEC,
    CHECKPOINT_STATE,
    _maybe_inject_fault,
    _mean_across_workers,
    build_optimizer,
    build_scheduler,
    unwrap,
)

logger = logging.getLogger(__name__)

TEXT_CONTEXT_FILE = "text_context.json"
# The classifiers' running accuracy on the training batches, and their accuracy after each epoch
# on the held-out query and retrieval items (what `score_model` adds with a discriminator).
DISCRIMINATOR_KEYS = (
    "train/disc/feature_accuracy",
    "train/disc/code_accuracy",
    "disc/feature_accuracy",
    "disc/code_accuracy",
)
HELD_OUT_DISCRIMINATOR_PREFIX = "disc/"


def cross_modal_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a cross-modal job; `config` as `retrieval.train.worker.train_loop_per_worker`'s."""
    spec = JobSpec.from_mapping(config["spec"], source="train_loop_config")
    context_ = ray.train.get_context()
    rank, world_size = context_.get_world_rank(), context_.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.train.seed)

    splits = cross_modal_datasets_from_spec(spec.dataset)
    method = method_for(spec, splits.train)
    model = ray.train.torch.prepare_model(method.build_model())
    discriminator = ray.train.torch.prepare_model(method.build_discriminator())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    generator_optimizer = build_optimizer(spec.optimizer, trainable)
    discriminator_spec = spec.optimizer.model_copy(update={"lr": method.discriminator_lr or spec.optimizer.lr})
    discriminator_optimizer = build_optimizer(discriminator_spec, discriminator.parameters())
    epochs = spec.train.epochs
    generator_scheduler = build_scheduler(spec.optimizer, generator_optimizer, epochs=epochs)
    discriminator_scheduler = build_scheduler(discriminator_spec, discriminator_optimizer, epochs=epochs)

    sampler: DistributedSampler[Any] = DistributedSampler(
        splits.train, num_replicas=world_size, rank=rank, shuffle=True, seed=spec.train.seed, drop_last=True
    )
    batch_size = min(spec.train.pairs_per_batch, max(len(splits.train) // world_size, 2))
    loader = DataLoader(
        splits.train,
        batch_sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=True),
        num_workers=spec.train.loader_workers,
    )

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder) / CHECKPOINT_STATE, map_location=device)
        unwrap(model).load_state_dict(state["model"])
        unwrap(discriminator).load_state_dict(state["discriminator"])
        generator_optimizer.load_state_dict(state["optimizer"])
        discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        generator_scheduler.load_state_dict(state["scheduler"])
        discriminator_scheduler.load_state_dict(state["discriminator_scheduler"])
        start_epoch = int(state["epoch"]) + 1
        logger.info("rank %d resumed from the checkpoint of epoch %d", rank, state["epoch"])

    run = TrainingRun(**config["tracking"]) if rank == 0 and config.get("tracking") else None
    fault = config.get("fault") or {}
    bare_model, bare_discriminator = unwrap(model), unwrap(discriminator)

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        method.set_epoch(epoch)
        model.train()
        discriminator.train()
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for step, (images, indices) in enumerate(loader):
            _maybe_inject_fault(fault, epoch=epoch, step=step, rank=rank)
            batch = method.make_batch(bare_model, splits.train, images, indices).to(device)
            terms, adversary = alternating_step(
                method,
                model=model,
                discriminator=discriminator,
                generator_optimizer=generator_optimizer,
                discriminator_optimizer=discriminator_optimizer,
                batch=batch,
            )
            for name, value in terms.items():
                sums[name] += float(value.detach())
            for name, value in adversary.items():
                sums[f"disc/{name}"] += float(value.detach())
            steps += 1
        generator_scheduler.step()
        discriminator_scheduler.step()

        metrics = _mean_across_workers(sums, steps, device=device, world_size=world_size)
        metrics.update(epoch=epoch, lr=generator_scheduler.get_last_lr()[0], resumed_from_epoch=start_epoch)
        if rank == 0:
            metrics.update(
                score_model(
                    method, bare_model, spec=spec, splits=splits, device=device, discriminator=bare_discriminator
                )
            )
            if run is not None:
                run.log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step=epoch)
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        "model": bare_model.state_dict(),
                        "discriminator": bare_discriminator.state_dict(),
                        "optimizer": generator_optimizer.state_dict(),
                        "discriminator_optimizer": discriminator_optimizer.state_dict(),
                        "scheduler": generator_scheduler.state_dict(),
                        "discriminator_scheduler": discriminator_scheduler.state_dict(),
                        "epoch": epoch,
                        "text_context": method.context.to_json(),
                    },
                    Path(folder) / CHECKPOINT_STATE,
                )
                (Path(folder) / CHECKPOINT_SPEC).write_text(yaml.safe_dump(config["spec"], sort_keys=False))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics, checkpoint=None)


def method_for(spec: JobSpec, train_split: Any) -> CrossModalMethod:
    """The job's method with the text context of its training split."""
    settings = spec.method
    text = getattr(settings, "text", None)
    if text is None:
        raise TypeError(f"method {settings.name!r} is not cross-modal")
    return build_cross_modal_method(spec, context=TextContext.from_dataset(train_split, text=text))


def score_model(
    method: CrossModalMethod,
    model: torch.nn.Module,
    *,
    spec: JobSpec,
    splits: CrossModalSplits | None = None,
    device: torch.device | str = "cpu",
    discriminator: torch.nn.Module | None = None,
) -> dict[str, float]:
    """The method's metrics of `model` on the job's query and retrieval splits (read from the spec if not given).

    With the trained `discriminator`, also its balanced accuracy on the features (and codes) of
    both modalities of those held-out items: `disc/feature_accuracy` (and `disc/code_accuracy`);
    0.5 when the modality classifier cannot tell images from texts.
    """
    query, retrieval = encode_evaluation_splits(method, model, spec=spec, splits=splits, device=device)
    scores = method.score(query, retrieval)
    if discriminator is not None:
        held_out = modality_accuracy(discriminator, [query, retrieval])
        scores.update({f"{HELD_OUT_DISCRIMINATOR_PREFIX}{key}": value for key, value in held_out.items()})
    return scores


def encode_evaluation_splits(
    method: CrossModalMethod,
    model: torch.nn.Module,
    *,
    spec: JobSpec,
    splits: CrossModalSplits | None = None,
    device: torch.device | str = "cpu",
) -> tuple[EncodedSplit, EncodedSplit]:
    # A worker passes the splits it already holds: a caption JSON is not parsed again every epoch.
    splits = splits or cross_modal_datasets_from_spec(spec.dataset)
    batch_size = spec.train.embed_batch_size
    query = method.encode_split(model, splits.query, batch_size=batch_size, device=device)
    retrieval = method.encode_split(model, splits.retrieval, batch_size=batch_size, device=device)
    return query, retrieval


def register_cross_modal_checkpoint(
    spec: JobSpec,
    *,
    checkpoint: ray.train.Checkpoint,
    run: TrainingRun,
    history: Sequence[Mapping[str, Any]] = (),
    promote_with_gate: bool,
    tags: Mapping[str, str] | None = None,
) -> Any:
    """Score a cross-modal checkpoint, log its metrics, curves and plots to `run`, and register it.

    The version gets `candidate`, and `champion` when `promote_with_gate` and the job's gate holds.
    Returns a `retrieval.train.driver.TrainingOutcome`.
    """

    with tempfile.TemporaryDirectory() as folder:
        with checkpoint.as_directory() as checkpoint_dir:
            state = load_state(Path(checkpoint_dir) / CHECKPOINT_STATE)
        package_dir = save_model_package(
            Path(folder) / "package",
            spec=spec,
            state_dict=state["model"],
            extra_files={TEXT_CONTEXT_FILE: state["text_context"]},
        )
        package = load_model_package(package_dir)
        method = package.method
        if not isinstance(method, CrossModalMethod):
            raise TypeError(f"{package_dir}: not a cross-modal model package")
        query, retrieval = encode_evaluation_splits(method, package.model, spec=spec)
        metrics = method.score(query, retrieval)
        run.log_metrics({f"test/{key}": value for key, value in metrics.items()})
        run.log_dict({"trained": metrics}, "evaluation/results.json")
        log_cross_modal_figures(
            run, method=method, spec=spec, metrics=metrics, query=query, retrieval=retrieval, history=history
        )

        registered = register_model_package(
            package_dir,
            tracking_uri=run.tracking_uri,
            run_id=run.run_id,
            registered_model=spec.registered_model_name,
            aliases=("candidate",),
            tags={
                "retrieval.job": spec.name,
                "retrieval.modalities": "image,text",
                **{f"test.{key}": f"{value:.6f}" for key, value in metrics.items()},
                **(tags or {}),
            },
        )

    registered, promoted, gate = apply_gate(
        spec, registered=registered, metrics=metrics, run=run, promote_with_gate=promote_with_gate
    )
    return TrainingOutcome(
        metrics=metrics,
        baselines={},
        model=registered,
        promoted=promoted,
        gate=gate,
        run_id=run.run_id,
        checkpoint_path=checkpoint.path,
        epochs_run=[int(row["epoch"]) for row in history if "epoch" in row],
    )


def log_cross_modal_figures(
    run: TrainingRun,
    *,
    method: CrossModalMethod,
    spec: JobSpec,
    metrics: Mapping[str, float],
    query: EncodedSplit,
    retrieval: EncodedSplit,
    history: Sequence[Mapping[str, Any]],
) -> None:
    """The results table, training curves, the discriminator's accuracy and (hashing) PR and P@N curves."""
    columns = sorted(metrics)
    run.client.log_text(
        run.run_id,
        format_table({"trained": metrics}, columns, markdown=True, label="model") + "\n",
        "evaluation/table.md",
    )
    rows = [dict(row) for row in history]
    if rows:
        keys = [key for key in DISCRIMINATOR_KEYS if any(key in row for row in rows)]
        if keys:
            figure = discriminator_accuracy_figure(
                rows, keys=keys, title=f"{spec.name}: modality classifier accuracy (0.5 = maximally uncertain)"
            )
            run.log_figure(figure, "training/discriminator_accuracy.png")
            plt.close(figure)
        loss_keys = [key for key in ("train/loss", "train/entropy") if any(key in row for row in rows)]
        figure = training_curve_figure(rows, keys=loss_keys)
        run.log_figure(figure, "training/curves.png")
        plt.close(figure)
    if not method.hashing:
        return
    query_labels, retrieval_labels = relevance_labels(query), relevance_labels(retrieval)
    directions = {
        "i2t": (query.images, query_labels, retrieval.texts, retrieval_labels[retrieval.owner]),
        "t2i": (query.texts, query_labels[query.owner], retrieval.images, retrieval_labels),
    }
    bits = query.images.shape[1]
    pr_curves, p_at_n = {}, {}
    for direction, (queries, labels_q, gallery, labels_r) in directions.items():
        packed_queries, packed_gallery = pack_codes(queries), pack_codes(gallery)
        name = f"{direction} {bits} bits"
        pr_curves[name] = hamming_pr_curve(packed_queries, labels_q, packed_gallery, labels_r)
        # A cut-off beyond the gallery counts the whole gallery, as in the method's own scores.
        ns = sorted({min(n, len(gallery)) for n in spec.evaluation.precision_ns})
        p_at_n[name] = precision_at_n(packed_queries, labels_q, packed_gallery, labels_r, ns=ns)
    run.log_dict(
        {
            "pr_curves": {
                name: {"precision": list(map(float, p)), "recall": list(map(float, r))}
                for name, (p, r) in pr_curves.items()
            },
            "precision_at_n": {name: {str(n): v for n, v in values.items()} for name, values in p_at_n.items()},
        },
        "evaluation/curves.json",
    )
    figure = pr_curve_figure(pr_curves, title=f"{spec.name}: precision-recall (Hamming radius)")
    run.log_figure(figure, "evaluation/pr_curves.png")
    plt.close(figure)
    figure = precision_at_n_figure(p_at_n, title=f"{spec.name}: precision@N")
    run.log_figure(figure, "evaluation/precision_at_n.png")
    plt.close(figure)
