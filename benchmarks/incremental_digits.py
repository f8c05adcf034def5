"""The thesis' incremental claims (ch. 5-7) as an ablation over seeds, against every baseline.

Runs each method's own code (`begin_task`, `training_step`, `finish_specialist`,
`finish_task`, the same loader the Ray Train workers use) in this one process, with no Ray;
`retrieval train jobs/digits_incremental_kd_mmd.yaml --set method.name=...` runs the same
thing on a cluster. For a given seed every method sees the same splits (`incremental.seed`),
the same batches (`train.seed`) and the same initial weights (`torch.manual_seed`), and every
method trains the same epochs per task.

Scenarios (all bundled data, no download):

- `two_tasks`: digits 0-4, then 5-9.
- `five_tasks`: digits 0-1, 2-3, 4-5, 6-7, 8-9.
- `cross_domain`: all ten digits, then a second domain: images of two real digit glyphs side
  by side (`digit_pairs`, written once as an `image_folder`, one class per unordered pair of
  digits, see `write_digit_pair_folder`).

EWC's lambda is swept on `two_tasks` with seed 0 (the best final mean Recall@1 wins) and the
winner is used for every scenario and seed; the sweep is reported. Ch. 7's specialist (the
new teacher, trained on the new task alone) is scored on its task beside the student.

    python benchmarks/incremental_digits.py --epochs 2 --seeds 0 1 2

Writes the per-seed task x task Recall@1 matrices, the summaries (mean ± std over seeds) and
the markdown tables to `--out` (JSON, rewritten after every run, so `--resume` continues an
interrupted benchmark), the plots next to it, and logs everything to one MLflow parent run
(tracking URI from MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; `--no-mlflow` skips it).
`--report-only` rebuilds tables, plots and the MLflow run from an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.config import INCREMENTAL_METHODS, JobSpec
from retrieval.data.digit_pairs import GLYPH_SIDE, IMAGE_WIDTH, load_digit_pairs
from retrieval.data.tasks import build_task_sequence
from retrieval.evaluation.forgetting import as_matrix, mean_forgetting
from retrieval.methods import build_method
from retrieval.methods.incremental import IncrementalMethod, TaskCarry
from retrieval.methods.training import begin_task, build_optimizer, training_loader

SCENARIO_NAMES = ("two_tasks", "cross_domain", "five_tasks", "cross_domain_long")
#: cross_domain_long: the pair task trains this many times the epochs (its 420 training images give
#: ~11 steps an epoch, against ~31 for the ten digits).
LONG_PAIR_EPOCH_FACTOR = 4
EWC_LAMBDAS = (10.0, 100.0, 1000.0, 10000.0)
#: Version of the digit-pair folder's recipe: a folder written by another recipe is rewritten.
PAIR_FOLDER_VERSION = 1

# ---------------------------------------------------------------------------------- the second domain


def pair_class_name(first: int, second: int) -> str:
    """The class of a two-glyph item: its unordered pair of digits, e.g. "pair-1-3"."""
    low, high = sorted((first, second))
    return f"pair-{low}-{high}"


def write_digit_pair_folder(
    root: Path, *, digits: Sequence[int] = (0, 1, 2, 3, 4), images_per_class: int = 60, size: int = 8000, seed: int = 0
) -> Path:
    """Writes `root/<class>/<image>.png`: the two-glyph `digit_pairs` items of pairs of `digits`.

    `load_digit_pairs(size=size, seed=seed)` draws items of two or three distinct real digit
    glyphs; the two-glyph items whose digits both lie in `digits` are kept, each labelled by its
    unordered pair (so "3 then 1" and "1 then 3" are one class: the image's content, not the
    order, defines it). Each class keeps its first `images_per_class` items in draw order; a
    class with fewer is dropped. Each 24 x 8 strip is written centred on a 24 x 24 black canvas,
    so the square resize of the transforms keeps the glyphs' aspect ratio.

    The folder is deterministic in its arguments; a `MANIFEST.json` records them, and a folder
    written with the same arguments is reused as it is.

    Returns:
        `root`.

    Raises:
        ValueError: fewer than two classes have `images_per_class` items.
    """
    recipe = {
        "version": PAIR_FOLDER_VERSION,
        "digits": sorted(int(digit) for digit in digits),
        "images_per_class": images_per_class,
        "size": size,
        "seed": seed,
    }
    manifest = root / "MANIFEST.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("recipe") == recipe:
        return root
    if root.exists():
        shutil.rmtree(root)
    items = load_digit_pairs(size=size, seed=seed)
    wanted = set(recipe["digits"])
    by_class: dict[str, list[int]] = {}
    for index in range(len(items)):
        assert items.labels is not None
        present = np.flatnonzero(items.labels[index]).tolist()
        if len(present) == 2 and set(present) <= wanted:
            by_class.setdefault(pair_class_name(*present), []).append(index)
    kept = {name: indices[:images_per_class] for name, indices in sorted(by_class.items())}
    kept = {name: indices for name, indices in kept.items() if len(indices) == images_per_class}
    if len(kept) < 2:
        raise ValueError(
            f"only {len(kept)} pair class(es) of digits {recipe['digits']} have {images_per_class} images among "
            f"{size} digit_pairs items: raise size or lower images_per_class"
        )
    staging = Path(tempfile.mkdtemp(prefix=".pairs-", dir=root.parent if root.parent.exists() else None))
    top = (IMAGE_WIDTH - GLYPH_SIDE) // 2
    for name, indices in kept.items():
        (staging / name).mkdir()
        for index in indices:
            canvas = Image.new("L", (IMAGE_WIDTH, IMAGE_WIDTH), color=0)
            canvas.paste(items.load_image(index).convert("L"), (0, top))
            canvas.save(staging / name / f"{index:05d}.png")
    (staging / "MANIFEST.json").write_text(
        json.dumps({"recipe": recipe, "classes": {name: len(indices) for name, indices in kept.items()}}, indent=2)
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(root)
    return root


def scenario_tasks(name: str, *, pair_root: Path | None, epochs: int = 1) -> list[dict[str, Any]]:
    """The task list (`incremental.tasks`) of a scenario (`epochs`: the job's epochs per task)."""
    if name == "two_tasks":
        return [{"name": "0-4", "classes": "0-4"}, {"name": "5-9", "classes": "5-9"}]
    if name == "five_tasks":
        return [{"name": f"{first}-{first + 1}", "classes": f"{first}-{first + 1}"} for first in range(0, 10, 2)]
    if name in ("cross_domain", "cross_domain_long"):
        if pair_root is None:
            raise ValueError(f"the {name} scenario needs the digit-pair folder")
        pairs: dict[str, Any] = {
            "name": "pairs",
            "dataset": {"name": "image_folder", "root": str(pair_root), "image_size": 32},
        }
        if name == "cross_domain_long":
            pairs["epochs"] = LONG_PAIR_EPOCH_FACTOR * epochs
        return [{"name": "digits", "classes": "0-9"}, pairs]
    raise ValueError(f"unknown scenario {name!r}; expected one of {SCENARIO_NAMES}")


# ---------------------------------------------------------------------------------- one run


def job(
    method: str,
    tasks: list[dict[str, Any]],
    *,
    epochs: int,
    synthesis_iterations: int,
    seed: int,
    ewc_weight: float | None = None,
    stem: str = "imagenet",
) -> JobSpec:
    """The job of one method on one sequence with one seed (splits, batches and initial weights)."""
    settings: dict[str, Any] = {"name": method}
    if method == "dual_distillation":
        # Digits are not mirror-symmetric: a flipped "2" is not a "2" to the teacher.
        settings["synthesis"] = {
            "iterations": synthesis_iterations,
            "images_per_class": 8,
            "batch_size": 40,
            "flip": False,
        }
    if method == "ewc" and ewc_weight is not None:
        settings["ewc_weight"] = ewc_weight
    return JobSpec.model_validate(
        {
            "name": f"bench-{method}",
            "method": settings,
            "dataset": {"name": "digits", "image_size": 32},
            "model": {"backbone": "resnet18", "embedding_dim": 128, "stem": stem},
            "optimizer": {"name": "adam", "lr": 0.0005, "schedule": "cosine"},
            "train": {"epochs": epochs, "classes_per_batch": 5, "samples_per_class": 8, "seed": seed},
            "incremental": {"tasks": tasks, "test_fraction": 0.3, "index": False, "seed": seed},
        }
    )


def run_sequence(spec: JobSpec) -> tuple[np.ndarray, list[float | None]]:
    """One method on one sequence.

    Returns:
        The Recall@1 matrix `[T, T]` (row s: after task s; NaN above the diagonal) and, per
        task, the Recall@1 of ch. 7's specialist on that task's test split (None where the
        method trains no specialist).
    """
    assert spec.incremental is not None
    torch.manual_seed(spec.train.seed)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
    device = torch.device("cpu")
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    rows = []
    specialists: list[float | None] = []
    for task in tasks:
        carry = replace(carry, task=task.index, classes=task.classes)
        specialist_recall = None
        for phase in method.phases(task.index):
            # As the runner: a task's own epochs, else train.epochs (ch. 7's specialist: specialist_epochs first).
            epochs = spec.incremental.tasks[task.index].epochs or spec.train.epochs
            if phase == "specialist":
                epochs = getattr(spec.method, "specialist_epochs", None) or epochs
            model = method.build_model()
            train_data, _ = begin_task(
                method, model, task={"index": task.index, "phase": phase}, carry=carry, spec=spec, device=device
            )
            loader, sampler = training_loader(
                train_data,
                training_labels=None,
                classes_per_batch=min(spec.train.classes_per_batch, len(task.classes)),
                spec=spec,
                num_replicas=1,
                rank=0,
            )
            loss = method.build_loss()
            optimizer = build_optimizer(spec.optimizer, model.parameters())
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            model.train()
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                for images, labels, _ in loader:
                    terms = method.training_step(model=model, loss=loss, images=images, labels=labels)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    optimizer.step()
                scheduler.step()
            if phase == "specialist":
                # The model trained on this task alone: what the student's new-task recall is compared with.
                specialist_recall = method.score_task(model, task, ks=[1], batch_size=256)["recall@1"]
                carry = method.finish_specialist(model=model, carry=carry)  # type: ignore[attr-defined]
        model.eval()
        rows.append(
            {
                seen.index: method.score_task(model, seen, ks=[1], batch_size=256)["recall@1"]
                for seen in tasks[: task.index + 1]
            }
        )
        specialists.append(specialist_recall)
        if task.index < len(tasks) - 1:
            # What the next task needs (ch. 7: the replay synthesis); nothing reads it after the last task.
            carry = method.finish_task(model=model, carry=carry, task_data=task, device=device)
    return as_matrix(rows, num_tasks=len(tasks)), specialists


# ---------------------------------------------------------------------------------- summaries


def run_metrics(matrix: np.ndarray, specialists: Sequence[float | None]) -> dict[str, float]:
    """The per-run numbers the tables average over seeds.

    - `new_task`: mean over the new tasks (index >= 1) of the diagonal: each one's Recall@1 right
      after it was learnt (plasticity; the first task is no incremental step);
    - `last_new_task`: the last task's Recall@1 right after it (the newest task);
    - `final_mean`: mean Recall@1 over all tasks after the last task;
    - `forgetting`: mean forgetting of the old tasks after the last task;
    - ch. 7 only: `specialist` (mean over tasks >= 1 of the specialist's Recall@1 on its task) and
      `student_minus_specialist` (the student's diagonal minus it, same tasks).
    """
    last = matrix.shape[0] - 1
    metrics = {
        "new_task": float(np.mean(np.diag(matrix)[1:])) if last > 0 else float(matrix[0, 0]),
        "last_new_task": float(matrix[last, last]),
        "final_mean": float(np.mean(matrix[last])),
        "forgetting": float(mean_forgetting(matrix, after=last) or 0.0),
    }
    scored = [(task, value) for task, value in enumerate(specialists) if value is not None]
    if scored:
        metrics["specialist"] = float(np.mean([value for _, value in scored]))
        metrics["student_minus_specialist"] = float(np.mean([matrix[task, task] - value for task, value in scored]))
    return metrics


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def summarise(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """`summary[scenario][method][metric] = {mean, std, n}` over the seeds run, plus seconds per seed."""
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for scenario, methods in runs.items():
        for method in sorted(methods, key=lambda name: INCREMENTAL_METHODS.index(name)):
            seeds = methods[method]
            if not seeds:
                continue
            per_seed = [run_metrics(np.array(run["matrix"], dtype=float), run["specialist"]) for run in seeds.values()]
            table = {key: mean_std([item[key] for item in per_seed]) for key in per_seed[0]}
            table["seconds"] = mean_std([run["seconds"] for run in seeds.values()])
            summary.setdefault(scenario, {})[method] = table
    return summary


def _cell(stats: dict[str, float] | None, *, signed: bool = False) -> str:
    if stats is None:
        return "n/a"
    sign = "+" if signed else ""
    if stats["n"] < 2:
        return f"{stats['mean']:{sign}.3f}"
    return f"{stats['mean']:{sign}.3f} ± {stats['std']:.3f}"


def paired_differences(
    runs: dict[str, dict[str, Any]], method: str, *, baseline: str = "incremental_finetune"
) -> dict[str, dict[str, float]]:
    """Per metric, mean ± std over seeds of `method - baseline`, paired by seed (same splits, batches, init)."""
    seeds = sorted(set(runs.get(method, {})) & set(runs.get(baseline, {})), key=int)
    per_seed = []
    for seed in seeds:
        ours, theirs = (
            run_metrics(np.array(runs[name][seed]["matrix"], dtype=float), runs[name][seed]["specialist"])
            for name in (method, baseline)
        )
        per_seed.append({key: ours[key] - theirs[key] for key in ("new_task", "final_mean", "forgetting")})
    return {key: mean_std([item[key] for item in per_seed]) for key in per_seed[0]} if per_seed else {}


def paired_tables(results: dict[str, Any]) -> list[str]:
    """Each method minus plain fine-tuning, paired by seed, per scenario (the thesis' lower bound)."""
    lines = [
        "**Against plain fine-tuning, paired by seed** (method − `incremental_finetune` on the same seed; "
        "mean ± std of the per-seed differences; forgetting: negative is less forgetting)",
        "",
        "| scenario | method | Δ new-task R@1 | Δ final mean R@1 | Δ mean forgetting | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIO_NAMES:
        runs = results["runs"].get(scenario, {})
        for method in INCREMENTAL_METHODS:
            if method == "incremental_finetune" or not runs.get(method):
                continue
            deltas = paired_differences(runs, method)
            if deltas:
                lines.append(
                    f"| {scenario} | {method} | {_cell(deltas['new_task'], signed=True)} | "
                    f"{_cell(deltas['final_mean'], signed=True)} | {_cell(deltas['forgetting'], signed=True)} | "
                    f"{deltas['new_task']['n']} |"
                )
    return [*lines, ""]


def markdown_tables(results: dict[str, Any]) -> str:
    """The README tables: one per scenario, ch. 7 student vs specialist, and the EWC sweep."""
    settings = results["settings"]
    summary = results["summary"]
    lines = []
    for scenario in SCENARIO_NAMES:
        if scenario not in summary:
            continue
        methods = summary[scenario]
        seeds = sorted({stats["new_task"]["n"] for stats in methods.values()})
        epochs = f"{settings['epochs']} epoch{'' if settings['epochs'] == 1 else 's'} per task"
        if scenario == "cross_domain_long":
            epochs += f" ({LONG_PAIR_EPOCH_FACTOR * settings['epochs']} on pairs)"
        lines += [
            f"**{scenario}** ({' → '.join(settings['tasks'][scenario])}; Recall@1, mean ± std over "
            f"{'/'.join(str(n) for n in seeds)} seeds; {epochs}, "
            f"{settings['synthesis_iterations']} synthesis iterations (ch. 7), EWC λ = {settings['ewc_lambda']:g})",
            "",
            "| method | new-task R@1 (tasks ≥ 1) | newest task R@1 | final mean R@1 | mean forgetting ↓ | s / seed |",
            "|---|---|---|---|---|---|",
        ]
        for method, stats in methods.items():
            lines.append(
                f"| {method} | {_cell(stats['new_task'])} | {_cell(stats['last_new_task'])} | "
                f"{_cell(stats['final_mean'])} | {_cell(stats['forgetting'], signed=True)} | "
                f"{stats['seconds']['mean']:.0f} |"
            )
        lines.append("")
    lines += paired_tables(results)
    chapter7 = [
        (scenario, summary[scenario]["dual_distillation"])
        for scenario in SCENARIO_NAMES
        if "dual_distillation" in summary.get(scenario, {}) and "specialist" in summary[scenario]["dual_distillation"]
    ]
    if chapter7:
        lines += [
            "**Ch. 7, student vs specialist** on the new tasks (Recall@1 right after each new task, tasks ≥ 1; "
            "the specialist is fine-tuned on the new task alone from the old model, the same epochs)",
            "",
            "| scenario | student | specialist | student − specialist | seeds |",
            "|---|---|---|---|---|",
        ]
        for scenario, stats in chapter7:
            lines.append(
                f"| {scenario} | {_cell(stats['new_task'])} | {_cell(stats['specialist'])} | "
                f"{_cell(stats['student_minus_specialist'], signed=True)} | {stats['specialist']['n']} |"
            )
        lines.append("")
    sweep = results.get("ewc_sweep")
    if sweep:
        lines += [
            f"**EWC λ sweep** ({sweep['scenario']}, seed {sweep['seed']}, one run each; chosen by final mean R@1: "
            + (f"λ = {sweep['chosen']:g})" if "chosen" in sweep else "not finished)"),
            "",
            "| λ | new-task R@1 (tasks ≥ 1) | final mean R@1 | mean forgetting |",
            "|---|---|---|---|",
        ]
        for value, run in sorted(sweep["runs"].items(), key=lambda item: float(item[0])):
            metrics = run_metrics(np.array(run["matrix"], dtype=float), run["specialist"])
            lines.append(
                f"| {float(value):g} | {metrics['new_task']:.3f} | {metrics['final_mean']:.3f} | "
                f"{metrics['forgetting']:+.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots


def plot(results: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """Forgetting vs new-task recall (std error bars), and mean Recall@1 over the tasks seen after each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, runs = results["summary"], results["runs"]
    scenarios = [scenario for scenario in SCENARIO_NAMES if scenario in summary]
    if not scenarios:
        return []
    methods = list(dict.fromkeys(method for scenario in scenarios for method in summary[scenario]))
    colours = {method: plt.get_cmap("tab10")(position) for position, method in enumerate(methods)}
    written = []

    figure, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.4), squeeze=False)
    for axis, scenario in zip(axes[0], scenarios, strict=True):
        for method, stats in summary[scenario].items():
            axis.errorbar(
                stats["forgetting"]["mean"],
                stats["new_task"]["mean"],
                xerr=stats["forgetting"]["std"],
                yerr=stats["new_task"]["std"],
                fmt="o",
                capsize=3,
                color=colours[method],
                label=method,
            )
        seeds = max(stats["new_task"]["n"] for stats in summary[scenario].values())
        axis.set_title(f"{scenario} (n = {seeds} seeds, mean ± std)")
        axis.set_xlabel("mean forgetting of old tasks (R@1), lower is better")
        axis.set_ylabel("new-task R@1 right after each new task (mean, tasks ≥ 1)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    path = folder / f"{stem}_forgetting.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)

    figure, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.4), squeeze=False)
    for axis, scenario in zip(axes[0], scenarios, strict=True):
        names = results["settings"]["tasks"][scenario]
        for method in summary[scenario]:
            seeds = runs[scenario][method]
            curves = np.array(
                [[np.nanmean(row) for row in np.array(run["matrix"], dtype=float)] for run in seeds.values()]
            )
            mean = curves.mean(axis=0)
            std = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
            steps = np.arange(len(mean))
            axis.plot(steps, mean, marker="o", color=colours[method], label=method)
            axis.fill_between(steps, mean - std, mean + std, color=colours[method], alpha=0.15)
        axis.set_xticks(range(len(names)), [f"after {name}" for name in names], rotation=20, fontsize=8)
        axis.set_title(scenario)
        axis.set_ylabel("mean R@1 over the tasks seen so far")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    path = folder / f"{stem}_curves.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------- MLflow


def log_to_mlflow(results: dict[str, Any], artifacts: Sequence[Path]) -> str:
    """One parent run (settings, summary metrics, tables, JSON, plots) with one child run per scenario x method."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow.set_experiment("benchmark-incremental-digits")
    settings = results["settings"]
    with mlflow.start_run(run_name="incremental-digits-seeds") as parent:
        mlflow.log_params(
            {
                "epochs": settings["epochs"],
                "synthesis_iterations": settings["synthesis_iterations"],
                "seeds": " ".join(str(seed) for seed in settings["seeds"]),
                "ewc_lambda": settings["ewc_lambda"],
                "ewc_sweep": " ".join(f"{value:g}" for value in settings["ewc_lambdas"]),
            }
        )
        for scenario, methods in results["summary"].items():
            for method, stats in methods.items():
                for key, values in stats.items():
                    mlflow.log_metric(f"{scenario}.{method}.{key}.mean", values["mean"])
                    mlflow.log_metric(f"{scenario}.{method}.{key}.std", values["std"])
                with mlflow.start_run(run_name=f"{scenario}-{method}", nested=True):
                    mlflow.log_params({"scenario": scenario, "method": method})
                    for seed, run in results["runs"][scenario][method].items():
                        metrics = run_metrics(np.array(run["matrix"], dtype=float), run["specialist"])
                        for key, value in metrics.items():
                            mlflow.log_metric(key, value, step=int(seed))
                        mlflow.log_metric("seconds", run["seconds"], step=int(seed))
        for value, run in results.get("ewc_sweep", {}).get("runs", {}).items():
            metrics = run_metrics(np.array(run["matrix"], dtype=float), run["specialist"])
            mlflow.log_metric("ewc_sweep.final_mean", metrics["final_mean"], step=round(math.log10(float(value))))
            mlflow.log_metric("ewc_sweep.forgetting", metrics["forgetting"], step=round(math.log10(float(value))))
        mlflow.log_text(markdown_tables(results), "tables.md")
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return str(parent.info.run_id)


# ---------------------------------------------------------------------------------- main


def _save(results: dict[str, Any], path: Path) -> None:
    results["summary"] = summarise(results["runs"])
    path.write_text(json.dumps(results, indent=2))


def _record(matrix: np.ndarray, specialists: list[float | None], seconds: float) -> dict[str, Any]:
    return {
        "matrix": [[None if np.isnan(value) else float(value) for value in row] for row in matrix],
        "specialist": specialists,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task (and per ch. 7 specialist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIO_NAMES, default=list(SCENARIO_NAMES))
    parser.add_argument("--methods", nargs="+", choices=INCREMENTAL_METHODS, default=list(INCREMENTAL_METHODS))
    parser.add_argument("--synthesis-iterations", type=int, default=200)
    parser.add_argument("--ewc-lambdas", type=float, nargs="+", default=list(EWC_LAMBDAS))
    parser.add_argument("--ewc-lambda", type=float, default=None, help="skip the sweep and use this lambda")
    parser.add_argument(
        "--seed-major",
        action="store_true",
        help="loop seeds outside scenarios: seed 0 of every scenario, then seed 1, ... (default: every seed of "
        "a scenario before the next scenario)",
    )
    parser.add_argument(
        "--pair-root",
        type=Path,
        default=Path(tempfile.gettempdir()) / "retrieval-benchmarks" / "digit_pair_folder",
        help="cache folder of the cross-domain digit-pair images (written once, deterministically)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/incremental_digits.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out (same settings)")
    parser.add_argument("--report-only", action="store_true", help="tables, plots and MLflow from --out; no training")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--stem",
        choices=["imagenet", "small"],
        default="imagenet",
        help="the backbone's stem (model.stem): imagenet (stride 4) or small (3x3 stride 1, no max-pool)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; on a shared, oversubscribed machine 2 threads spent ~10x the CPU of 1 per step",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    if args.report_only:
        results = json.loads(args.out.read_text())
        _save(results, args.out)
    else:
        crossing = {"cross_domain", "cross_domain_long"} & set(args.scenarios)
        pair_root = write_digit_pair_folder(args.pair_root) if crossing else None
        tasks = {
            scenario: scenario_tasks(scenario, pair_root=pair_root, epochs=args.epochs) for scenario in args.scenarios
        }
        settings = {
            "epochs": args.epochs,
            "synthesis_iterations": args.synthesis_iterations,
            "seeds": args.seeds,
            "ewc_lambdas": args.ewc_lambdas,
            "ewc_lambda": args.ewc_lambda,
            "tasks": {scenario: [task["name"] for task in items] for scenario, items in tasks.items()},
            "pair_folder": json.loads((pair_root / "MANIFEST.json").read_text()) if pair_root else None,
            "torch_threads": torch.get_num_threads(),
            "stem": args.stem,
        }
        results = {"settings": settings, "ewc_sweep": {}, "runs": {}}
        if args.resume and args.out.exists():
            previous = json.loads(args.out.read_text())
            same = {key: previous["settings"].get(key, "imagenet" if key == "stem" else None)
                    for key in ("epochs", "synthesis_iterations", "stem")}  # fmt: skip
            if same != {key: settings[key] for key in same}:
                parser.error(f"--resume: {args.out} was written with {same}; run without --resume to start over")
            results["ewc_sweep"], results["runs"] = previous.get("ewc_sweep", {}), previous.get("runs", {})
            # Scenarios run by an earlier invocation keep their task names (and the pair folder's recipe).
            settings["tasks"] = {**previous["settings"].get("tasks", {}), **settings["tasks"]}
            settings["pair_folder"] = settings["pair_folder"] or previous["settings"].get("pair_folder")
            settings["ewc_lambda"] = settings["ewc_lambda"] or previous["settings"].get("ewc_lambda")

        def run_once(scenario: str, method: str, seed: int, ewc_weight: float | None) -> dict[str, Any]:
            spec = job(
                method,
                tasks[scenario],
                epochs=args.epochs,
                synthesis_iterations=args.synthesis_iterations,
                seed=seed,
                ewc_weight=ewc_weight,
                stem=args.stem,
            )
            started = time.perf_counter()
            matrix, specialists = run_sequence(spec)
            record = _record(matrix, specialists, time.perf_counter() - started)
            metrics = run_metrics(matrix, specialists)
            print(
                f"{scenario:12s} {method:22s} seed {seed} "
                + (f"λ={ewc_weight:g} " if method == "ewc" else "")
                + " ".join(f"{key}={value:.3f}" for key, value in metrics.items())
                + f" ({record['seconds']:.0f} s)",
                flush=True,
            )
            return record

        if "ewc" in args.methods and settings["ewc_lambda"] is None:
            sweep = results["ewc_sweep"] or {"scenario": "two_tasks", "seed": args.seeds[0], "runs": {}}
            results["ewc_sweep"] = sweep
            sweep_tasks = tasks.get("two_tasks") or scenario_tasks("two_tasks", pair_root=None)
            tasks.setdefault("two_tasks", sweep_tasks)
            for value in args.ewc_lambdas:
                if f"{value:g}" not in sweep["runs"]:
                    sweep["runs"][f"{value:g}"] = run_once("two_tasks", "ewc", sweep["seed"], value)
                    _save(results, args.out)
            finals = {
                key: run_metrics(np.array(run["matrix"], dtype=float), run["specialist"])["final_mean"]
                for key, run in sweep["runs"].items()
            }
            sweep["chosen"] = float(max(finals, key=lambda key: finals[key]))
            settings["ewc_lambda"] = sweep["chosen"]
            print(f"EWC lambda sweep on two_tasks seed {sweep['seed']}: {finals} -> {sweep['chosen']:g}", flush=True)
            if "two_tasks" in args.scenarios:
                # The chosen lambda's sweep run is the main run of that seed: the same job, not rerun.
                chosen_run = sweep["runs"][f"{sweep['chosen']:g}"]
                results["runs"].setdefault("two_tasks", {}).setdefault("ewc", {}).setdefault(
                    str(sweep["seed"]), chosen_run
                )
        order = (
            [(scenario, seed) for seed in args.seeds for scenario in args.scenarios]
            if args.seed_major
            else [(scenario, seed) for scenario in args.scenarios for seed in args.seeds]
        )
        for scenario, seed in order:
            for method in args.methods:
                done = results["runs"].setdefault(scenario, {}).setdefault(method, {})
                if str(seed) in done:
                    continue
                done[str(seed)] = run_once(scenario, method, seed, settings["ewc_lambda"] if method == "ewc" else None)
                _save(results, args.out)
        _save(results, args.out)

    artifacts = [args.out, *plot(results, args.out.parent, args.out.stem)]
    tables = markdown_tables(results)
    print("\n" + tables)
    if not args.no_mlflow:
        print(f"MLflow run {log_to_mlflow(results, artifacts)}")


if __name__ == "__main__":
    main()
