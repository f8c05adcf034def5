"""MLflow record of an evaluation run: parameters, every variant's scores, a table and a bar plot."""

from __future__ import annotations

import uuid

import matplotlib.pyplot as plt

from retrieval.config import JobSpec
from retrieval.evaluation.plots import variant_bar_figure
from retrieval.evaluation.suite import SuiteResult
from retrieval.tracking.runs import TrainingRun, code_version


def log_suite_result(result: SuiteResult, *, spec: JobSpec, model: str | None = None) -> str:
    """Log a suite result as a new MLflow run in the job's experiment; returns its run id.

    Metrics are named `<variant>/<metric>` (e.g. `gem+pcaw/recall_at_1`); the table lands as
    `evaluation/table.md` and `evaluation/results.json`, the primary metric as a bar plot.
    """
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=spec.tracking.uri(),
        experiment=spec.tracking.experiment,
        artifact_location=spec.tracking.artifact_location,
        run_key=f"evaluate:{spec.name}:{uuid.uuid4().hex}",  # every evaluation is a run of its own
        run_name=f"{spec.name}-evaluation",
        params=spec.model_dump(mode="json"),
        tags={
            "retrieval.kind": "evaluation",
            "retrieval.dataset": spec.dataset.name,
            "retrieval.protocol": result.protocol,
            "retrieval.model": model or "off-the-shelf",
            "retrieval.code_version": code_version() or "unknown",
        },
    )
    try:
        for variant, scores in result.rows.items():
            run.log_metrics({f"{variant}/{metric}": value for metric, value in scores.items() if value == value})
        run.log_dict({"protocol": result.protocol, "rows": result.rows}, "evaluation/results.json")
        run.client.log_text(run.run_id, result.markdown() + "\n", "evaluation/table.md")
        figure = variant_bar_figure(
            result.rows, metric=result.primary_metric, title=f"{spec.name} on {spec.dataset.name}"
        )
        run.log_figure(figure, f"evaluation/{result.primary_metric.replace('@', '_at_')}.png")
        plt.close(figure)
    except BaseException:
        run.finish(status="FAILED")
        raise
    run.finish()
    return run.run_id
