"""Ablation of the thesis' entropy loss on digit-pairs, over seeds: ch. 3 (hashing) and ch. 4 (adversarial).

Each method is trained with and without its information-entropy loss (`method.entropy_weight`
l > 0 against l = 0) for every seed, in one process, with the method's own code
(`alternating_step`, `encode_split`, `score`, `modality_accuracy`) and the training loop's
optimisers and cosine schedules. The seed is `train.seed`: it sets the initial weights
(`torch.manual_seed`) and the order of the training pairs. The data split is the job's
`dataset.cross_modal.seed`, the same for every variant and seed (the JSON records a digest
of the three splits' item sources to show it).

After training, on the held-out query + retrieval items of both modalities:
- retrieval: ch. 3 mAP@all and mAP@100 (Hamming ranking), ch. 4 R@1/5/10 and rsum, both directions;
- the trained modality classifier's balanced accuracy (0.5 = it cannot tell images from texts),
  on the features and, for hashing, on the relaxed codes;
- a post-hoc probe: a fresh logistic regression on the frozen held-out features (standardised,
  balanced classes), 2-fold cross-validated with each image and its texts in one fold. The
  probe says whether the modality gap closed, whatever the adversary trained against it sees.

The untrained (chance) row is the first seed's network before training.

Tables are mean ± sample std over the seeds. Everything goes to a JSON file, a PNG of bars with
std error bars, and one MLflow parent run (tables, JSON and plot as artifacts; the means and stds
as metrics; one child run per method, variant and seed). The tracking URI is MLFLOW_TRACKING_URI,
else sqlite:///mlflow.db.

    python benchmarks/cross_modal_digit_pairs.py --epochs 2 --seeds 0 1 2 \\
        --out benchmarks/cross_modal_digit_pairs.json --plot benchmarks/cross_modal_digit_pairs.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from retrieval.config import JobSpec, load_job_spec
from retrieval.data.cross_modal import CrossModalSplits, cross_modal_datasets_from_spec
from retrieval.methods.cross_modal import (
    CrossModalMethod,
    EncodedSplit,
    alternating_step,
    method_for,
    modality_accuracy,
)
from retrieval.methods.training import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parent.parent
JOBS = {"hashing": ROOT / "jobs/digit_pairs_hashing.yaml", "adversarial": ROOT / "jobs/digit_pairs_adversarial.yaml"}
HASHING_METRICS = ("i2t/map@all", "t2i/map@all", "i2t/map@100", "t2i/map@100")
ADVERSARIAL_METRICS = (*(f"{d}/recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)), "rsum")
MODALITY_METRICS = {
    "hashing": ("classifier/feature", "classifier/code", "probe/feature", "probe/code", "train_classifier/feature"),
    "adversarial": ("classifier/feature", "probe/feature", "train_classifier/feature"),
}


def split_digest(splits: CrossModalSplits) -> str:
    """A digest of which items are in the train, query and retrieval splits (equal digests: equal splits)."""
    digest = hashlib.sha256()
    for name in ("train", "query", "retrieval"):
        digest.update(name.encode())
        dataset = getattr(splits, name)
        digest.update("\n".join(dataset.source(index) for index in range(len(dataset))).encode())
    return digest.hexdigest()[:16]


def probe_accuracy(held_out: Sequence[EncodedSplit], *, codes: bool, seed: int, folds: int = 2) -> float:
    """Balanced accuracy of a fresh logistic regression telling images from texts, cross-validated on `held_out`.

    Items are split into `folds` folds by image (an image and its texts share a fold); the probe is
    fitted on the other folds' features (standardised, balanced classes) and predicts this fold's.
    """
    features, labels, groups = [], [], []
    offset = 0
    for split in held_out:
        images = split.image_codes if codes else split.image_features
        texts = split.text_codes if codes else split.text_features
        if images is None or texts is None:
            raise ValueError("the split has no features to probe")
        features += [images, texts]
        labels += [np.zeros(len(images), dtype=np.int64), np.ones(len(texts), dtype=np.int64)]
        groups += [offset + np.arange(len(images)), offset + split.owner]
        offset += len(images)
    x, y, group = np.concatenate(features), np.concatenate(labels), np.concatenate(groups)
    fold = np.random.default_rng(seed).permutation(offset)[group] % folds
    predicted = np.empty_like(y)
    for k in range(folds):
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
        )
        probe.fit(x[fold != k], y[fold != k])
        predicted[fold == k] = probe.predict(x[fold == k])
    return float(balanced_accuracy_score(y, predicted))


def train_and_score(spec: JobSpec, *, epochs: int, splits: CrossModalSplits, untrained: bool) -> dict[str, Any]:
    """Train `epochs` epochs in this process, as the Ray Train loop does; held-out scores and modality accuracies."""
    torch.manual_seed(spec.train.seed)
    method: CrossModalMethod = method_for(spec, splits.train)
    model, discriminator = method.build_model(), method.build_discriminator()
    generator_optimizer = build_optimizer(spec.optimizer, [p for p in model.parameters() if p.requires_grad])
    discriminator_spec = spec.optimizer.model_copy(update={"lr": method.discriminator_lr or spec.optimizer.lr})
    discriminator_optimizer = build_optimizer(discriminator_spec, discriminator.parameters())
    generator_scheduler = build_scheduler(spec.optimizer, generator_optimizer, epochs=epochs)
    discriminator_scheduler = build_scheduler(discriminator_spec, discriminator_optimizer, epochs=epochs)
    batch_size = spec.train.embed_batch_size

    def encode(dataset: Any) -> EncodedSplit:
        return method.encode_split(model, dataset, batch_size=batch_size)

    outcome: dict[str, Any] = {}
    if untrained:
        outcome["untrained"] = method.score(encode(splits.query), encode(splits.retrieval))
    generator = torch.Generator().manual_seed(spec.train.seed)
    running: dict[str, list[float]] = {"feature": [], "code": []}
    started = time.perf_counter()
    for epoch in range(epochs):
        method.set_epoch(epoch)
        model.train()
        discriminator.train()
        loader = DataLoader(
            splits.train, batch_size=spec.train.pairs_per_batch, shuffle=True, drop_last=True, generator=generator
        )
        sums: dict[str, float] = {"feature": 0.0, "code": 0.0}
        steps = 0
        for images, indices in loader:
            batch = method.make_batch(model, splits.train, images, indices)
            _, adversary = alternating_step(
                method,
                model=model,
                discriminator=discriminator,
                generator_optimizer=generator_optimizer,
                discriminator_optimizer=discriminator_optimizer,
                batch=batch,
            )
            sums["feature"] += float(adversary["feature_accuracy"])
            sums["code"] += float(adversary.get("code_accuracy", torch.tensor(math.nan)))
            steps += 1
        generator_scheduler.step()
        discriminator_scheduler.step()
        for key in running:
            running[key].append(sums[key] / max(steps, 1))
    outcome["train_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    query, retrieval = encode(splits.query), encode(splits.retrieval)
    outcome["trained"] = method.score(query, retrieval)
    held_out = modality_accuracy(discriminator, [query, retrieval])
    modality = {
        "classifier/feature": held_out["feature_accuracy"],
        "probe/feature": probe_accuracy([query, retrieval], codes=False, seed=spec.train.seed),
        "train_classifier/feature": running["feature"][-1],
    }
    if method.hashing:
        modality["classifier/code"] = held_out["code_accuracy"]
        modality["probe/code"] = probe_accuracy([query, retrieval], codes=True, seed=spec.train.seed)
    outcome["modality"] = modality
    outcome["running_classifier_accuracy"] = running
    outcome["eval_seconds"] = time.perf_counter() - started
    return outcome


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(results: dict[str, Any], seeds: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """`{method/variant: {metric: {mean, std, n}}}` over the seeds present."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for key, run in results["runs"].items():
        method, variant, seed = key.split("|")
        if int(seed) not in seeds:
            continue
        values = grouped.setdefault(f"{method}|{variant}", {})
        for name, value in {**run["trained"], **{f"modality/{k}": v for k, v in run["modality"].items()}}.items():
            values.setdefault(name, []).append(float(value))
        for name, value in (run.get("untrained") or {}).items():
            untrained = grouped.setdefault(f"{method}|untrained", {})
            untrained.setdefault(name, []).append(float(value))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for group, metrics in grouped.items():
        table[group] = {}
        for name, values in metrics.items():
            mean, std = mean_std(values)
            table[group][name] = {"mean": mean, "std": std, "n": len(values)}
    return table


PAIRED_METRICS = {
    "hashing": (*HASHING_METRICS, "modality/classifier/feature", "modality/classifier/code", "modality/probe/feature"),
    "adversarial": (*ADVERSARIAL_METRICS, "modality/classifier/feature", "modality/probe/feature"),
}


def paired_differences(
    results: dict[str, Any], seeds: Sequence[int], *, weights: dict[str, float]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric: (with the entropy loss) - (without), paired by seed; mean, std, n, and how many > 0."""
    paired: dict[str, dict[str, dict[str, float]]] = {}
    for method, names in PAIRED_METRICS.items():
        for name in names:
            differences = []
            for seed in seeds:
                with_ = results["runs"].get(f"{method}|l={weights[method]}|{seed}")
                without = results["runs"].get(f"{method}|l=0.0|{seed}")
                if with_ is None or without is None:
                    continue
                flat = [
                    {**run["trained"], **{f"modality/{k}": v for k, v in run["modality"].items()}}
                    for run in (with_, without)
                ]
                if name in flat[0] and name in flat[1]:
                    differences.append(float(flat[0][name]) - float(flat[1][name]))
            if differences:
                mean, std = mean_std(differences)
                paired.setdefault(method, {})[name] = {
                    "mean": mean,
                    "std": std,
                    "n": len(differences),
                    "positive": sum(d > 0 for d in differences),
                }
    return paired


def paired_table(paired: dict[str, dict[str, dict[str, float]]], *, weights: dict[str, float]) -> str:
    """Markdown: with minus without, paired by seed, for the retrieval metrics and the modality accuracies."""
    lines = [
        "Paired by seed, (with the entropy loss) - (without): mean ± std, and in how many seeds it is > 0:",
        "",
        "| method | metric | difference | seeds > 0 |",
        "|---|---|---|---|",
    ]
    for method, chapter in (("hashing", "ch. 3"), ("adversarial", "ch. 4")):
        for name, stats in paired.get(method, {}).items():
            lines.append(
                f"| {chapter} | {name.replace('modality/', 'modality ')} | {stats['mean']:+.3f} ± {stats['std']:.3f} "
                f"| {int(stats['positive'])}/{int(stats['n'])} |"
            )
    return "\n".join(lines) + "\n"


def _cell(stats: dict[str, dict[str, float]], name: str, digits: int = 3) -> str:
    if name not in stats:
        return "-"
    if stats[name]["n"] == 1:
        return f"{stats[name]['mean']:.{digits}f}"
    return f"{stats[name]['mean']:.{digits}f} ± {stats[name]['std']:.{digits}f}"


def markdown_tables(summary: dict[str, dict[str, dict[str, float]]], *, weights: dict[str, float]) -> str:
    """The three tables: ch. 3 mAP, ch. 4 R@K, and the modality classifier / probe balanced accuracy."""

    def n_of(group: str) -> int:
        stats = summary.get(group) or {}
        return int(next(iter(stats.values()))["n"]) if stats else 0

    lines = ["Ch. 3, 32-bit Hamming ranking (relevant = shares a digit), mean ± std over seeds:", ""]
    lines.append("| variant | n | i2t mAP@all | t2i mAP@all | i2t mAP@100 | t2i mAP@100 |")
    lines.append("|---|---|---|---|---|---|")
    for variant, label in (
        (f"l={weights['hashing']}", f"l = {weights['hashing']} (with the entropy loss)"),
        ("l=0.0", "l = 0 (without)"),
        ("untrained", "untrained (chance)"),
    ):
        group = f"hashing|{variant}"
        if group in summary:
            stats = summary[group]
            lines.append(
                f"| {label} | {n_of(group)} | " + " | ".join(_cell(stats, name) for name in HASHING_METRICS) + " |"
            )
    lines += ["", "Ch. 4, image <-> caption recall on the 200 query images and their 1,000 captions:", ""]
    lines.append("| variant | n | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for variant, label in (
        (f"l={weights['adversarial']}", f"l_e = {weights['adversarial']} (with the entropy loss)"),
        ("l=0.0", "l_e = 0 (without)"),
        ("untrained", "untrained (chance)"),
    ):
        group = f"adversarial|{variant}"
        if group in summary:
            stats = summary[group]
            lines.append(
                f"| {label} | {n_of(group)} | "
                + " | ".join(_cell(stats, name) for name in ADVERSARIAL_METRICS[:-1])
                + f" | {_cell(stats, 'rsum', 2)} |"
            )
    lines += [
        "",
        "Modality balanced accuracy on the held-out query + retrieval items (0.5 = images and texts "
        "indistinguishable):",
        "",
        "| method | variant | n | trained classifier, features | trained classifier, codes "
        "| fresh linear probe, features | fresh linear probe, codes | classifier on its last training epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, chapter in (("hashing", "ch. 3"), ("adversarial", "ch. 4")):
        for variant in (f"l={weights[method]}", "l=0.0"):
            group = f"{method}|{variant}"
            if group not in summary:
                continue
            stats = summary[group]
            lines.append(
                f"| {chapter} | {variant.replace('l=', 'l = ')} | {n_of(group)} | "
                + " | ".join(
                    _cell(stats, f"modality/{name}")
                    for name in (
                        "classifier/feature",
                        "classifier/code",
                        "probe/feature",
                        "probe/code",
                        "train_classifier/feature",
                    )
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict[str, float]]], *, weights: dict[str, float], path: Path, seeds: int) -> Any:
    """Bars (mean) with std error bars: ch. 3 mAP, ch. 4 R@K, and the modality balanced accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("hashing", "ch. 3 (32 bits): mAP", HASHING_METRICS, None),
        ("adversarial", "ch. 4: recall", ADVERSARIAL_METRICS[:-1], None),
        ("hashing", "ch. 3: modality balanced accuracy", MODALITY_METRICS["hashing"], 0.5),
        ("adversarial", "ch. 4: modality balanced accuracy", MODALITY_METRICS["adversarial"], 0.5),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    for axis, (method, title, names, chance) in zip(axes.ravel(), panels, strict=True):
        variants = [(f"l={weights[method]}", f"l = {weights[method]}"), ("l=0.0", "l = 0"), ("untrained", "untrained")]
        present = [
            (v, label)
            for v, label in variants
            if any(key in summary.get(f"{method}|{v}", {}) for name in names for key in (name, f"modality/{name}"))
        ]
        width = 0.8 / max(len(present), 1)
        positions = np.arange(len(names))
        for offset, (variant, label) in enumerate(present):
            stats = summary[f"{method}|{variant}"]
            keys = [name if name in stats else f"modality/{name}" for name in names]
            means = [stats[key]["mean"] if key in stats else np.nan for key in keys]
            stds = [stats[key]["std"] if key in stats else 0.0 for key in keys]
            axis.bar(positions + offset * width, means, width, yerr=stds, capsize=3, label=label)
        if chance is not None:
            axis.axhline(chance, color="black", linestyle="--", linewidth=1, label="0.5 (no modality gap)")
            axis.set_ylim(0.0, 1.05)
        axis.set_xticks(positions + width * (len(present) - 1) / 2)
        axis.set_xticklabels([name.replace("/", "\n") for name in names], fontsize=8)
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.suptitle(f"digit-pairs, entropy loss on/off: mean ± std over {seeds} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure


def metric_name(name: str) -> str:
    """An MLflow metric key: `@` becomes `_at_`, `=` `-`, anything else MLflow refuses `_`."""
    name = name.replace("@", "_at_").replace("=", "-")
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def log_to_mlflow(
    results: dict[str, Any], *, tables: str, out: Path | None, plot_path: Path | None, figure: Any
) -> str:
    """One parent run (params, mean/std metrics, tables/JSON/plot artifacts) and a child run per trained model."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow.set_experiment("retrieval-benchmarks")
    with mlflow.start_run(run_name="cross_modal_digit_pairs_ablation") as parent:
        mlflow.set_tag("retrieval.benchmark", "cross_modal_digit_pairs")
        mlflow.log_params(
            {
                "epochs": results["epochs"],
                "seeds": " ".join(map(str, results["seeds"])),
                "entropy_weights": json.dumps(results["entropy_weights"]),
                "split_digest": results["split_digest"],
                "bits": results["bits"],
            }
        )
        metrics = {}
        for group, stats in results["summary"].items():
            for name, values in stats.items():
                base = metric_name(f"{group.replace('|', '.')}.{name}")
                metrics[f"{base}.mean"] = values["mean"]
                metrics[f"{base}.std"] = values["std"]
        mlflow.log_metrics(metrics)
        mlflow.log_text(tables, "ablation/tables.md")
        mlflow.log_dict(results, "ablation/results.json")
        if figure is not None:
            mlflow.log_figure(figure, "ablation/bars.png")
        for key, run in results["runs"].items():
            method, variant, seed = key.split("|")
            with mlflow.start_run(run_name=f"{method}-{variant}-seed{seed}", nested=True):
                mlflow.log_params({"method": method, "variant": variant, "seed": seed})
                flat = {**run["trained"], **{f"modality/{k}": v for k, v in run["modality"].items()}}
                mlflow.log_metrics({metric_name(name): float(value) for name, value in flat.items()})
                mlflow.log_metric("train_seconds", run["train_seconds"])
        return str(parent.info.run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each repeat")
    parser.add_argument("--bits", type=int, default=32, help="ch. 3 code length")
    parser.add_argument("--hashing-entropy", type=float, default=0.1, help="ch. 3's l of the 'with' variant")
    parser.add_argument("--adversarial-entropy", type=float, default=0.1, help="ch. 4's l_e of the 'with' variant")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a shared CPU)")
    parser.add_argument("--methods", nargs="+", choices=sorted(JOBS), default=["hashing", "adversarial"])
    parser.add_argument("--out", type=Path, default=None, help="JSON results (written after every run)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of bars with std error bars")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the others")
    parser.add_argument(
        "--resume-from",
        type=Path,
        nargs="+",
        default=[],
        help="also keep the runs of these JSON files (same settings), e.g. to merge a per-method split of the work",
    )
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra job override for both methods (a.b=value)"
    )
    args = parser.parse_args()
    if len(args.seeds) != len(set(args.seeds)):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    weights = {"hashing": args.hashing_entropy, "adversarial": args.adversarial_entropy}
    results: dict[str, Any] = {
        "epochs": args.epochs,
        "seeds": list(args.seeds),
        "bits": args.bits,
        "batch_size": args.batch_size,
        "entropy_weights": weights,
        "overrides": list(args.overrides),
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}",
        "runs": {},
    }
    sources = list(args.resume_from)
    if args.resume and args.out is not None and args.out.exists():
        sources.append(args.out)
    for source in sources:
        previous = json.loads(source.read_text())
        same = ("epochs", "bits", "batch_size", "entropy_weights", "overrides")
        differing = [name for name in same if previous.get(name) != results[name]]
        if differing:
            raise SystemExit(f"{source}: its runs used other settings ({', '.join(differing)}); not merged")
        results["runs"].update(previous.get("runs", {}))
        # What the merged runs cost where they were trained (this invocation only adds the tables).
        results.setdefault("merged_from", {})[str(source)] = {
            "wall_seconds": previous.get("wall_seconds_this_invocation"),
            "runs": sorted(previous.get("runs", {})),
        }
    started = time.perf_counter()
    digests = set()
    for seed in args.seeds:
        for method in args.methods:
            for weight in (weights[method], 0.0):
                key = f"{method}|l={weight}|{seed}"
                overrides = [f"method.entropy_weight={weight}", f"train.batch_size={args.batch_size}"]
                overrides += [f"train.seed={seed}", f"train.epochs={args.epochs}", *args.overrides]
                if method == "hashing":
                    overrides.append(f"method.bits={args.bits}")
                spec = load_job_spec(JOBS[method], overrides)
                splits = cross_modal_datasets_from_spec(spec.dataset)
                digests.add(split_digest(splits))
                if key in results["runs"]:
                    continue
                first = seed == args.seeds[0] and weight != 0.0
                run = train_and_score(spec, epochs=args.epochs, splits=splits, untrained=first)
                run["split_digest"] = split_digest(splits)
                results["runs"][key] = run
                shown = {
                    k: round(v, 3) for k, v in run["trained"].items() if k in HASHING_METRICS + ADVERSARIAL_METRICS
                }
                print(f"{key}: {shown} modality {run['modality']} ({run['train_seconds']:.0f} s)", flush=True)
                if args.out is not None:
                    args.out.write_text(json.dumps(results, indent=2))
    if len(digests) != 1:
        raise RuntimeError(f"the variants saw different data splits: {sorted(digests)}")
    results["split_digest"] = digests.pop()
    results["wall_seconds_this_invocation"] = time.perf_counter() - started
    results["summary"] = aggregate(results, args.seeds)
    results["paired_differences"] = paired_differences(results, args.seeds, weights=weights)
    tables = markdown_tables(results["summary"], weights=weights)
    tables += "\n" + paired_table(results["paired_differences"], weights=weights)
    results["tables_markdown"] = tables
    figure = None
    if args.plot is not None:
        figure = plot(results["summary"], weights=weights, path=args.plot, seeds=len(args.seeds))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    print(tables)
    if not args.no_mlflow:
        run_id = log_to_mlflow(results, tables=tables, out=args.out, plot_path=args.plot, figure=figure)
        print(f"MLflow parent run {run_id}")
        if args.out is not None:
            results["mlflow_parent_run_id"] = run_id
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
