"""How an image-retrieval model is scored when it is registered: beside its baselines, with its plots.

The default of `RetrievalMethod.evaluate_package`; an image-text method scores itself.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from retrieval.config import JobSpec
from retrieval.data.from_spec import datasets_from_spec
from retrieval.evaluation.plots import recall_curve_figure, training_curve_figure, variant_bar_figure
from retrieval.evaluation.runs import SEEN_CLASSES_PREFIX, embed_dataset, raw_pixel_embeddings, score_embeddings
from retrieval.evaluation.suite import format_table

if TYPE_CHECKING:
    from retrieval.data.base import ImageDataset
    from retrieval.methods.base import Evaluation, RetrievalMethod
    from retrieval.methods.package import ModelPackage


def evaluate_image_package(
    method: RetrievalMethod, package: ModelPackage, *, history: Sequence[Mapping[str, Any]] = ()
) -> Evaluation:
    """Scores of a packaged image model and of its job's baselines, a results table and plots.

    Keys as `score_embeddings` names them (`recall@1`, `map@r`, ...) are the test split; when the
    split holds out images of the training classes (`dataset.split.seen_test_fraction`), the same
    scores on those images follow under `seen_classes/` (`seen_classes/recall@1`).
    """
    from retrieval.methods.base import Evaluation

    spec = package.spec
    metrics, baselines = evaluate_with_baselines(method, package)
    table = {"trained": metrics, **baselines}
    columns = [f"recall@{k}" for k in spec.evaluation.recall_ks] + ["map@r"]
    first = f"recall@{spec.evaluation.recall_ks[0]}"
    figures = {
        "evaluation/recall_bars.png": variant_bar_figure(table, metric=first, title=f"{spec.name}: held-out {first}"),
        "evaluation/recall_at_k.png": recall_curve_figure(
            table, ks=spec.evaluation.recall_ks, title=f"{spec.name}: held-out classes"
        ),
    }
    if history:
        figures["training/curves.png"] = training_curve_figure(list(history), keys=["train/loss", "recall@1"])
    return Evaluation(
        metrics=metrics,
        baselines=baselines,
        figures=figures,
        texts={"evaluation/table.md": format_table(table, columns, markdown=True, label="model") + "\n"},
        documents={"evaluation/results.json": table},
    )


def evaluate_with_baselines(
    method: RetrievalMethod, package: ModelPackage
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Scores of the trained model and of the spec's baselines on the held-out split(s)."""
    spec = package.spec
    splits = datasets_from_spec(spec.dataset)
    trained: dict[str, float] = {}
    baselines: dict[str, dict[str, float]] = {baseline: {} for baseline in spec.evaluation.baselines}
    held_out = [("", splits.test)]
    if splits.seen_test is not None:
        held_out.append((SEEN_CLASSES_PREFIX, splits.seen_test))
    for prefix, test in held_out:
        vectors = embed_dataset(
            functools.partial(method.embed, package.model), test, batch_size=spec.train.embed_batch_size
        )
        trained.update(_prefixed(prefix, score_embeddings(vectors, test.labels, ks=spec.evaluation.recall_ks)))
        for baseline, values in _score_baselines(method, spec, test).items():
            baselines[baseline].update(_prefixed(prefix, values))
    return trained, baselines


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in values.items()}


def _score_baselines(method: RetrievalMethod, spec: JobSpec, test: ImageDataset) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = {}
    for baseline in spec.evaluation.baselines:
        if baseline == "raw_pixels":
            vectors = raw_pixel_embeddings(test, batch_size=spec.train.embed_batch_size)
        else:
            # Seeded by the job: the same untrained network on every split.
            torch.manual_seed(spec.train.seed)
            untrained = method.build_model().eval()
            vectors = embed_dataset(
                functools.partial(method.embed, untrained), test, batch_size=spec.train.embed_batch_size
            )
        scores[baseline] = score_embeddings(vectors, test.labels, ks=spec.evaluation.recall_ks)
    return scores
