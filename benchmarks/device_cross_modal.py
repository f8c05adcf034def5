"""Cross-modal training step and embedding throughput on a GPU against the same machine's CPU.

Runs each cross-modal method's own code (`alternating_step`, `embed`, `embed_texts`) on digit-pairs
images resized to `--image-size`, with a ResNet-50 trunk (random weights), so the step costs what
a real job's step costs. The batch is moved to the device once: this measures the model, not the
data loader. Imports no Ray, MLflow or Faiss (the GPU machine has torch and torchvision only).

    python benchmarks/device_cross_modal.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from retrieval.config import JobSpec
from retrieval.data.cross_modal import cross_modal_datasets_from_spec
from retrieval.methods.cross_modal import alternating_step, method_for

METHODS: dict[str, dict[str, Any]] = {
    "cross_modal_hashing (ch. 3, 64 bits, BoW tags)": {
        "name": "cross_modal_hashing",
        "bits": 64,
        "feature_dim": 512,
        "text": {"kind": "bow", "hidden_dim": 1024},
    },
    "adversarial_cross_modal (ch. 4, GRU over 5 captions)": {
        "name": "adversarial_cross_modal",
        "embedding_dim": 1024,
        "text": {"kind": "gru", "word_dim": 300, "hidden_dim": 1024, "max_words": 16},
    },
}


def spec_for(method: dict[str, Any], *, image_size: int, batch_size: int, use_gpu: bool) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "name": "device_check",
            "method": method,
            "dataset": {
                "name": "digit_pairs",
                "image_size": image_size,
                "augment": False,
                "cross_modal": {"size": 1200, "query_size": 100, "train_size": 1000},
            },
            "model": {"backbone": "resnet50", "weights": None, "pooling": "gem"},
            "optimizer": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0},
            "train": {"batch_size": batch_size},
            "scaling": {"num_workers": 1, "use_gpu": use_gpu},
        },
        source="device_cross_modal",
    )


def measure(
    method_settings: dict[str, Any], *, device: torch.device, image_size: int, batch_size: int, steps: int
) -> dict[str, float]:
    spec = spec_for(method_settings, image_size=image_size, batch_size=batch_size, use_gpu=device.type == "cuda")
    splits = cross_modal_datasets_from_spec(spec.dataset)
    torch.manual_seed(0)
    method = method_for(spec, splits.train)
    model = method.build_model().to(device)
    discriminator = method.build_discriminator().to(device)
    # Adam, as the jobs use (`retrieval.methods.training.build_optimizer` with the jobs' settings).
    generator_optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=spec.optimizer.lr)
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=spec.optimizer.lr)
    images, indices = next(iter(DataLoader(splits.train, batch_size=batch_size, shuffle=False)))
    batch = method.make_batch(model, splits.train, images, indices).to(device)

    def step() -> None:
        alternating_step(
            method,
            model=model,
            discriminator=discriminator,
            generator_optimizer=generator_optimizer,
            discriminator_optimizer=discriminator_optimizer,
            batch=batch,
        )

    def timed(function: Any, repeats: int) -> float:
        function()  # warm-up (cuDNN autotuning, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats

    model.train()
    step_seconds = timed(step, steps)
    model.eval()
    captions = [caption for index in range(batch_size) for caption in splits.train.captions[index]]
    embed_seconds = timed(lambda: method.embed(model, batch.images), steps)
    text_seconds = timed(lambda: method.embed_texts(model, captions), steps)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "train_pairs_per_s": batch_size / step_seconds,
        "embed_images_per_s": batch_size / embed_seconds,
        "embed_texts_per_s": len(captions) / text_seconds,
        "peak_gpu_memory_gib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu-steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"torch": torch.__version__, "image_size": args.image_size, "batch": args.batch_size}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    results["cpu_threads"] = torch.get_num_threads()
    for label, settings in METHODS.items():
        row: dict[str, Any] = {}
        if torch.cuda.is_available():
            row["cuda"] = measure(
                settings,
                device=torch.device("cuda"),
                image_size=args.image_size,
                batch_size=args.batch_size,
                steps=args.steps,
            )
        row["cpu"] = measure(
            settings,
            device=torch.device("cpu"),
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=args.cpu_steps,
        )
        if "cuda" in row:
            row["speedup"] = {key: row["cuda"][key] / row["cpu"][key] for key in row["cpu"] if key.endswith("_per_s")}
        results[label] = row
        print(label, json.dumps(row, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
