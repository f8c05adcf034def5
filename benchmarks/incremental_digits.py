"""Every incremental method and baseline on the same digits splits: the task x task Recall@1 table.

Runs each method's own code (`begin_task`, `training_step`, `finish_task`, the same loader the
Ray Train workers use) in this one process, with no Ray, so the whole comparison fits a laptop;
`retrieval train jobs/digits_incremental_kd_mmd.yaml --set method.name=...` runs the same thing
on a cluster. Same seed, same splits, same epochs for every method.

    python benchmarks/incremental_digits.py --epochs 4 --scenario both

Prints, per scenario, one row per method: Recall@1 of every task after the last task, the
mean over tasks, and the mean forgetting; and writes the full matrices as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.config import INCREMENTAL_METHODS, JobSpec
from retrieval.data.tasks import build_task_sequence
from retrieval.evaluation.forgetting import as_matrix, mean_forgetting
from retrieval.evaluation.runs import embed_dataset, score_embeddings
from retrieval.methods import build_method
from retrieval.methods.incremental import IncrementalMethod, TaskCarry
from retrieval.train.worker import begin_task, build_optimizer, training_loader

SCENARIOS = {
    "two_tasks": [{"name": "0-4", "classes": "0-4"}, {"name": "5-9", "classes": "5-9"}],
    "five_tasks": [{"name": f"{first}-{first + 1}", "classes": f"{first}-{first + 1}"} for first in range(0, 10, 2)],
}


def job(method: str, tasks: list[dict[str, Any]], *, epochs: int, synthesis_iterations: int) -> JobSpec:
    settings: dict[str, Any] = {"name": method}
    if method == "dual_distillation":
        # Digits are not mirror-symmetric: a flipped "2" is not a "2" to the teacher.
        settings["synthesis"] = {
            "iterations": synthesis_iterations, "images_per_class": 8, "batch_size": 40, "flip": False
        }
    return JobSpec.model_validate(
        {
            "name": f"bench-{method}",
            "method": settings,
            "dataset": {"name": "digits", "image_size": 32},
            "model": {"backbone": "resnet18", "embedding_dim": 128},
            "optimizer": {"name": "adam", "lr": 0.0005, "schedule": "cosine"},
            "train": {"epochs": epochs, "classes_per_batch": 5, "samples_per_class": 8, "seed": 0},
            "incremental": {"tasks": tasks, "test_fraction": 0.3, "index": False},
        }
    )


def run_sequence(spec: JobSpec) -> np.ndarray:
    """The Recall@1 matrix `[T, T]` of one method on one sequence."""
    assert spec.incremental is not None
    torch.manual_seed(spec.train.seed)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
    device = torch.device("cpu")
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    rows = []
    for task in tasks:
        carry.task, carry.classes = task.index, task.classes
        model = method.build_model()
        for phase in method.phases(task.index):
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
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.train.epochs)
            model.train()
            for epoch in range(spec.train.epochs):
                sampler.set_epoch(epoch)
                for images, labels, _ in loader:
                    terms = method.training_step(model=model, loss=loss, images=images, labels=labels)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    optimizer.step()
                scheduler.step()
            if phase == "specialist":
                carry = method.finish_specialist(model=model, carry=carry)  # type: ignore[attr-defined]
        model.eval()
        row = {}
        for seen in tasks[: task.index + 1]:
            with torch.no_grad():
                vectors = embed_dataset(lambda batch, model=model: method.embed(model, batch), seen.test)
            row[seen.index] = score_embeddings(vectors, seen.test.labels, ks=[1])["recall@1"]
        rows.append(row)
        carry = method.finish_task(model=model, carry=carry, task_data=task, device=device)
    return as_matrix(rows, num_tasks=len(tasks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    parser.add_argument("--methods", nargs="*", default=list(INCREMENTAL_METHODS))
    parser.add_argument("--synthesis-iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/incremental_digits.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        names = [task["name"] for task in SCENARIOS[scenario]]
        print(f"\n{scenario}: Recall@1 on each task's test split after the last task ({args.epochs} epochs per task)")
        print("| method | " + " | ".join(names) + " | mean | mean forgetting | seconds |")
        print("|---" * (len(names) + 4) + "|")
        for method in args.methods:
            started = time.perf_counter()
            spec = job(method, SCENARIOS[scenario], epochs=args.epochs, synthesis_iterations=args.synthesis_iterations)
            matrix = run_sequence(spec)
            seconds = time.perf_counter() - started
            last = matrix[-1]
            forgetting = mean_forgetting(matrix, after=len(names) - 1)
            print(
                f"| {method} | "
                + " | ".join(f"{value:.3f}" for value in last)
                + f" | {np.mean(last):.3f} | {forgetting:+.3f} | {seconds:.0f} |",
                flush=True,
            )
            results.setdefault(scenario, {})[method] = {
                "matrix": [[None if np.isnan(value) else float(value) for value in row] for row in matrix],
                "mean_forgetting": forgetting,
                "seconds": seconds,
            }
    args.out.write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=2))
    print(f"\nmatrices written to {args.out}")


if __name__ == "__main__":
    main()
