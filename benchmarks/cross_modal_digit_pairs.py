"""Cross-modal figures on digit-pairs: ch. 3 mAP per bit length, ch. 4 R@K, each with and without the entropy loss.

Runs each method's own code (`alternating_step`, `encode_split`, `score`) in one process, one
seed, so the variants differ only in what is compared. Prints a Markdown table and writes JSON.
An untrained network of the same architecture is the chance row: on digit-pairs two items
share a digit about half of the time, so mAP starts near 0.5, not 0.

    python benchmarks/cross_modal_digit_pairs.py --epochs 6 --out benchmarks/cross_modal_digit_pairs.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from retrieval.config import JobSpec, load_job_spec
from retrieval.data.cross_modal import cross_modal_datasets_from_spec
from retrieval.methods.cross_modal import alternating_step
from retrieval.train.cross_modal import method_for
from retrieval.train.worker import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def train_and_score(spec: JobSpec, *, epochs: int) -> dict[str, Any]:
    """Train `epochs` epochs in this process; scores before and after, and the classifiers' accuracy per epoch."""
    splits = cross_modal_datasets_from_spec(spec.dataset)
    torch.manual_seed(spec.train.seed)
    method = method_for(spec, splits.train)
    model, discriminator = method.build_model(), method.build_discriminator()
    generator_optimizer = build_optimizer(spec.optimizer, [p for p in model.parameters() if p.requires_grad])
    discriminator_optimizer = build_optimizer(
        spec.optimizer.model_copy(update={"lr": method.discriminator_lr or spec.optimizer.lr}),
        discriminator.parameters(),
    )
    batch_size = spec.train.embed_batch_size

    def score() -> dict[str, float]:
        query = method.encode_split(model, splits.query, batch_size=batch_size)
        retrieval = method.encode_split(model, splits.retrieval, batch_size=batch_size)
        return method.score(query, retrieval)

    before = score()
    generator = torch.Generator().manual_seed(spec.train.seed)
    accuracy: list[float] = []
    started = time.perf_counter()
    for epoch in range(epochs):
        method.set_epoch(epoch)
        model.train()
        loader = DataLoader(
            splits.train, batch_size=spec.train.pairs_per_batch, shuffle=True, drop_last=True, generator=generator
        )
        correct, steps = 0.0, 0
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
            correct += float(adversary["feature_accuracy"])
            steps += 1
        accuracy.append(correct / max(steps, 1))
    seconds = time.perf_counter() - started
    return {"untrained": before, "trained": score(), "feature_accuracy": accuracy, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--ablation-bits", type=int, default=32, help="the code length also trained without L_ent")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hashing-only", action="store_true", help="skip the ch. 4 rows")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, Any] = {"epochs": args.epochs, "hashing": {}, "adversarial": {}}
    rows = ["| method | variant | i2t mAP@all | t2i mAP@all | i2t mAP@100 | t2i mAP@100 | classifier acc. |"]
    rows.append("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for entropy in (0.1, 0.0) if bits == args.ablation_bits else (0.1,):
            spec = load_job_spec(
                ROOT / "jobs/digit_pairs_hashing.yaml",
                [f"method.bits={bits}", f"method.entropy_weight={entropy}", f"train.batch_size={args.batch_size}"],
            )
            outcome = train_and_score(spec, epochs=args.epochs)
            results["hashing"][f"{bits}/entropy={entropy}"] = outcome
            trained = outcome["trained"]
            rows.append(
                f"| ch. 3, {bits} bits | l = {entropy} | {trained['i2t/map@all']:.3f} | {trained['t2i/map@all']:.3f} "
                f"| {trained['i2t/map@100']:.3f} | {trained['t2i/map@100']:.3f} "
                f"| {outcome['feature_accuracy'][-1]:.2f} |"
            )
            print(rows[-1], flush=True)
        untrained = outcome["untrained"]
        rows.append(
            f"| ch. 3, {bits} bits | untrained (chance) | {untrained['i2t/map@all']:.3f} | "
            f"{untrained['t2i/map@all']:.3f} | {untrained['i2t/map@100']:.3f} | {untrained['t2i/map@100']:.3f} | - |"
        )
    rows.append("")
    rows.append(
        "| method | variant | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum | classifier acc. |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|---|")
    for entropy in () if args.hashing_only else (0.1, 0.0):
        spec = load_job_spec(
            ROOT / "jobs/digit_pairs_adversarial.yaml",
            [f"method.entropy_weight={entropy}", f"train.batch_size={args.batch_size}"],
        )
        outcome = train_and_score(spec, epochs=args.epochs)
        results["adversarial"][f"entropy={entropy}"] = outcome
        for variant, scores in ((f"l_e = {entropy}", outcome["trained"]), ("untrained", outcome["untrained"])):
            if variant == "untrained" and entropy == 0.0:
                continue
            rows.append(
                f"| ch. 4 | {variant} | "
                + " | ".join(f"{scores[f'{d}/recall@{k}']:.3f}" for d in ("i2t", "t2i") for k in (1, 5, 10))
                + f" | {scores['rsum']:.1f} | "
                + (f"{outcome['feature_accuracy'][-1]:.2f} |" if variant != "untrained" else "- |")
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
