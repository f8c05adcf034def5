"""The ch. 2 evaluation suite: every off-the-shelf variant of a job on its dataset's protocol.

One run scores a table of variants, each a pooling of the backbone (MAC, SPoC, GeM,
R-MAC, CroW; or the trained model), optionally a late fusion with other backbones,
then optionally PCA-whitening learnt on held-out images, then optionally average or
alpha query expansion. The protocol follows the dataset:

- class datasets (digits, CUB-200-2011, Cars, Dogs, image folders): every image of the
  held-out split is a query against the rest; Recall@K and mAP@R.
- landmark benchmarks: revisited Oxford/Paris mAP Easy/Medium/Hard (junk ignored),
  INRIA Holidays mAP, UKBench N-S score; queries against the database.

Core module: no Ray, no MLflow. `retrieval evaluate` logs the result.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrieval.config import JobSpec, small_stem_supported
from retrieval.data.base import ImageDataset
from retrieval.data.from_spec import benchmark_from_spec, datasets_from_spec
from retrieval.data.landmarks import LandmarkBenchmark
from retrieval.data.transforms import eval_transform
from retrieval.errors import ConfigError
from retrieval.evaluation.enhancement import PCAWhitening, alpha_query_expansion, average_query_expansion
from retrieval.evaluation.landmarks import landmark_metrics
from retrieval.evaluation.metrics import retrieval_metrics
from retrieval.evaluation.runs import SEEN_CLASSES_PREFIX, embed_dataset
from retrieval.models.embedding import EmbeddingNetwork
from retrieval.models.fusion import late_fusion

logger = logging.getLogger(__name__)

EmbedFunction = Callable[[torch.Tensor], torch.Tensor]

PRIMARY_METRIC = {"class": "recall@1", "revisited": "mAP_medium", "holidays": "mAP", "ukbench": "ns_score"}
_QE_LABEL = {"average": "aqe", "alpha": "alpha_qe"}


@dataclass
class SuiteResult:
    """Scores of every variant: `rows[variant][metric]`, in the order they were computed."""

    job: str
    protocol: str
    rows: dict[str, dict[str, float]]
    # The headline metric, where the protocol's usual one (`PRIMARY_METRIC`) does not apply.
    primary: str | None = None

    @property
    def primary_metric(self) -> str:
        return self.primary or PRIMARY_METRIC[self.protocol]

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(key for metrics in self.rows.values() for key in metrics))

    def table(self) -> str:
        """Plain-text table, one row per variant."""
        return format_table(self.rows, self.columns)

    def markdown(self) -> str:
        return format_table(self.rows, self.columns, markdown=True)


def format_table(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], *, markdown: bool = False, label: str = "variant"
) -> str:
    """A table of `rows[name][column]` scores (4 decimals; a missing score prints as nan)."""
    header = [label, *columns]
    body = [[name, *(f"{values.get(column, math.nan):.4f}" for column in columns)] for name, values in rows.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[0]) if index == 0 else cell.rjust(widths[index]) for index, cell in enumerate(line))
        for line in [header, *body]
    )


@dataclass(frozen=True)
class _EvaluationData:
    """Queries and database of the protocol (the same held-out split for class datasets)."""

    protocol: str
    database: ImageDataset
    queries: ImageDataset | None
    benchmark: LandmarkBenchmark | None
    held_out: ImageDataset | None
    batch_size: int


def _evaluation_data(spec: JobSpec) -> _EvaluationData:
    settings = spec.evaluation
    dataset = spec.dataset
    if dataset.kind == "image_text":
        raise ConfigError(
            f"{spec.name}: an image-text dataset has no off-the-shelf protocol; a cross-modal model is scored "
            "with its trained encoders: `retrieval evaluate --model models:/<name>@champion`"
        )
    held_out: ImageDataset | None = None
    if settings.whitening:
        held_out = _held_out_images(spec)
    protocol = dataset.info.protocol  # set for the landmark benchmarks only (the dataset table)
    if protocol is not None:
        benchmark = benchmark_from_spec(dataset)
        # Landmark images keep their aspect ratio, so sizes differ within a batch.
        return _EvaluationData(
            protocol=protocol,
            database=benchmark.database,
            queries=benchmark.queries,
            benchmark=benchmark,
            held_out=held_out,
            batch_size=1,
        )
    test = datasets_from_spec(dataset).test
    return _EvaluationData(
        protocol="class",
        database=test,
        queries=None,
        benchmark=None,
        held_out=held_out,
        batch_size=spec.train.embed_batch_size,
    )


def _held_out_images(spec: JobSpec) -> ImageDataset:
    """Images disjoint from the evaluated ones, to learn PCA-whitening on.

    A class dataset learns it on its own train split (class-disjoint from the retrieved
    classes); a landmark benchmark on `evaluation.whitening_dataset` (another benchmark's
    database, or a class dataset's train split).
    """
    source = spec.evaluation.whitening_dataset if spec.dataset.kind == "landmark" else spec.dataset
    if source is None:
        raise ValueError(f"PCA-whitening on {spec.dataset.name!r} needs evaluation.whitening_dataset")
    if source.kind == "landmark":
        return benchmark_from_spec(source).database
    # The train split: class-disjoint from the retrieved classes, seen without augmentation.
    train = datasets_from_spec(source).train
    return train.with_transform(eval_transform(image_size=source.image_size, mean=source.mean, std=source.std))


def off_the_shelf_network(spec: JobSpec, *, pooling: str | None = None, backbone: str | None = None) -> nn.Module:
    """The job's backbone with `pooling` and no projection head, in eval mode (seeded by the job)."""
    update: dict[str, object] = {"embedding_dim": None}
    if pooling is not None:
        update["pooling"] = pooling
    if backbone is not None:
        update["backbone"] = backbone
        update["fusion_layers"] = None
        # A late-fusion partner keeps the job's small stem where it has one (`auto` is resolved already).
        update["stem"] = spec.model.stem if small_stem_supported(backbone) else "imagenet"
    torch.manual_seed(spec.train.seed)
    return EmbeddingNetwork.from_spec(spec.model.model_copy(update=update)).eval()


def evaluate_suite(
    spec: JobSpec,
    *,
    embedders: Mapping[str, EmbedFunction] | None = None,
    device: torch.device | str = "cpu",
) -> SuiteResult:
    """Score every variant the job's `evaluation` section asks for.

    Args:
        spec: the job; its dataset decides the protocol.
        embedders: named embed functions to evaluate (e.g. `{"trained": ...}` for a trained
            model). Default: the off-the-shelf backbone with each of `evaluation.poolings`
            (or the model's own pooling when that list is empty).
        device: where the networks run.

    Returns:
        The table of variants and their scores.
    """
    settings = spec.evaluation
    data = _evaluation_data(spec)
    if embedders is None:
        poolings: list[str] = [*settings.poolings] or [spec.model.pooling]
        embedders = {
            pooling: _network_embedder(off_the_shelf_network(spec, pooling=pooling), device=device)
            for pooling in poolings
        }
    rows: dict[str, dict[str, float]] = {}
    fused_parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
    for name, embed in embedders.items():
        logger.info("evaluating %s on %s (%s protocol)", name, spec.dataset.name, data.protocol)
        vectors = _embed_all(embed, data, device=device)
        rows.update(_score_variants(name, vectors, spec=spec, data=data))
        if not fused_parts:
            fused_parts.append(vectors)
    if settings.late_fusion_backbones:
        first_pooling = settings.poolings[0] if settings.poolings else spec.model.pooling
        for backbone in settings.late_fusion_backbones:
            network = off_the_shelf_network(spec, pooling=first_pooling, backbone=backbone)
            fused_parts.append(_embed_all(_network_embedder(network, device=device), data, device=device))
        fused = tuple(
            None if parts[0] is None else late_fusion(list(parts), mode=settings.late_fusion_mode)
            for parts in zip(*fused_parts, strict=True)
        )
        name = "+".join([f"{spec.model.backbone}", *settings.late_fusion_backbones])
        rows.update(_score_variants(f"fusion({name})", fused, spec=spec, data=data))  # type: ignore[arg-type]
    return SuiteResult(job=spec.name, protocol=data.protocol, rows=rows)


def _network_embedder(network: nn.Module, *, device: torch.device | str) -> EmbedFunction:
    network.to(device)
    return network


def _embed_all(
    embed: EmbedFunction, data: _EvaluationData, *, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(database, queries or None, held-out or None) vectors."""
    run = functools.partial(embed_dataset, embed, batch_size=data.batch_size, device=device)
    with torch.no_grad():
        database = run(data.database)
        queries = run(data.queries) if data.queries is not None else None
        held_out = run(data.held_out) if data.held_out is not None else None
    return database, queries, held_out


def _score_variants(
    name: str,
    vectors: tuple[np.ndarray, np.ndarray | None, np.ndarray | None],
    *,
    spec: JobSpec,
    data: _EvaluationData,
) -> dict[str, dict[str, float]]:
    settings = spec.evaluation
    database, queries, held_out = vectors
    rows = {name: _score(database, queries, spec=spec, data=data)}
    base_name = name
    if settings.whitening and held_out is not None:
        dim = min(settings.whitening_dim or database.shape[1], database.shape[1], held_out.shape[0] - 1)
        whitening = PCAWhitening.fit(held_out, dim=dim)
        database = whitening.transform(database)
        queries = whitening.transform(queries) if queries is not None else None
        base_name = f"{name}+pcaw"
        rows[base_name] = _score(database, queries, spec=spec, data=data)
    for expansion in settings.query_expansion:
        expanded = _expand(expansion, database, queries, spec=spec)
        rows[f"{base_name}+{_QE_LABEL[expansion]}"] = _score(database, expanded, spec=spec, data=data, expanded=True)
    return rows


def _expand(expansion: str, database: np.ndarray, queries: np.ndarray | None, *, spec: JobSpec) -> np.ndarray:
    settings = spec.evaluation
    leave_one_out = queries is None
    searched = database if queries is None else queries
    top_n = min(settings.qe_top_n, database.shape[0] - int(leave_one_out))
    if expansion == "average":
        return average_query_expansion(searched, database, top_n=top_n, exclude_self=leave_one_out)
    return alpha_query_expansion(searched, database, top_n=top_n, alpha=settings.qe_alpha, exclude_self=leave_one_out)


def _score(
    database: np.ndarray,
    queries: np.ndarray | None,
    *,
    spec: JobSpec,
    data: _EvaluationData,
    expanded: bool = False,
) -> dict[str, float]:
    if data.protocol == "class":
        labels = data.database.labels
        return retrieval_metrics(
            embeddings=database, labels=labels, ks=spec.evaluation.recall_ks, queries=queries if expanded else None
        )
    if data.benchmark is None or queries is None:
        raise ValueError("a landmark protocol needs its benchmark's queries")
    return landmark_metrics(
        queries=queries,
        database=database,
        ground_truth=data.benchmark.ground_truth,
        protocol=data.protocol,  # type: ignore[arg-type]
    )


def format_results_table(
    metrics: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]], *, ks: Sequence[int]
) -> str:
    """A plain-text table: one row per model, Recall@K columns and mAP@R.

    With scores on held-out images of the training classes (`seen_classes/...` keys), two
    titled tables: that catalogue-search protocol first, then the unseen classes of the test split.
    """
    rows = {"trained": metrics, **baselines}
    columns = [f"recall@{k}" for k in ks] + ["map@r"]
    if not any(key.startswith(SEEN_CLASSES_PREFIX) for key in metrics):
        return format_table(rows, columns, label="model")
    seen = {
        name: {
            key.removeprefix(SEEN_CLASSES_PREFIX): value
            for key, value in values.items()
            if key.startswith(SEEN_CLASSES_PREFIX)
        }
        for name, values in rows.items()
    }
    return "\n".join(
        [
            "held-out images of the training classes (catalogue search: seen_classes/...):",
            format_table(seen, columns, label="model"),
            "unseen classes (the test split, metric-learning protocol):",
            format_table(rows, columns, label="model"),
        ]
    )
