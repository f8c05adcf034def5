"""Feature-extraction throughput: one Ray worker against several, on this machine.

Embeds a fixed number of digits images, upscaled to `--image-size`, with an untrained
resnet18 (`weights=None`) through `extract_features_distributed`, once per worker count,
and prints a markdown table of images/s per worker, the aggregate rate and the ratio to one
worker. Each Ray task takes one CPU, and Ray sets `OMP_NUM_THREADS` to it, so a worker
embeds on one thread; the first row is the same extraction in this process with torch's
default thread count, without Ray, for reference.

Run: `RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/extraction_throughput.py --images 1024`
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

from retrieval.config import JobSpec
from retrieval.index.extraction import FeaturePart, extract_features
from retrieval.methods.gallery import gallery_dataset
from retrieval.methods.package import load_model_package, save_model_package
from retrieval.methods.registry import build_method
from retrieval.train.extract import extract_features_distributed


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="images to embed (at most 1797 digits)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the upscaled square input")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration (median reported)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray cluster")
    return parser.parse_args()


def _package(folder: Path, *, image_size: int) -> Path:
    spec = JobSpec.model_validate(
        {
            "name": "extraction_benchmark",
            "method": {"name": "deep_metric"},
            "dataset": {
                "name": "digits",
                "image_size": image_size,
                "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
            },
            "model": {"backbone": "resnet18", "weights": None, "embedding_dim": 128},
        }
    )
    torch.manual_seed(0)
    return save_model_package(folder, spec=spec, state_dict=build_method(spec).build_model().state_dict())


@dataclass
class Runs:
    """The measurements of one configuration, one entry per repeat."""

    name: str
    workers: int
    wall: list[float] = field(default_factory=list)
    per_worker: list[float] = field(default_factory=list)
    aggregate: list[float] = field(default_factory=list)

    def add(self, *, wall: float, parts: list[FeaturePart], images: int) -> None:
        self.wall.append(wall)
        self.per_worker.append(statistics.mean(part.images_per_second for part in parts))
        # The parts run side by side: the slowest one decides when the gallery is done.
        self.aggregate.append(images / max(part.seconds for part in parts))


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    local = Runs(name=f"no Ray, 1 process, {torch.get_num_threads()} torch threads", workers=1)
    distributed = [Runs(name=f"Ray, {workers} worker(s) x 1 CPU", workers=workers) for workers in args.workers]
    with tempfile.TemporaryDirectory() as scratch:
        package_dir = _package(Path(scratch) / "package", image_size=args.image_size)
        package = load_model_package(package_dir)
        gallery = gallery_dataset(package, "all").subset(list(range(args.images)))
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            # Configurations alternate within each repeat, so a busy spell on a shared machine
            # slows all of them rather than one.
            for _ in range(args.repeats):
                began = time.perf_counter()
                written = extract_features(
                    package.embed_tensor,
                    gallery,
                    out_dir=Path(scratch) / "local",
                    batch_size=args.batch_size,
                    dtype=args.dtype,
                    model=str(package_dir),
                    source={"benchmark": "extraction_throughput"},
                    progress=False,
                )
                local.add(wall=time.perf_counter() - began, parts=written.parts, images=args.images)
                for runs in distributed:
                    began = time.perf_counter()
                    result = extract_features_distributed(
                        package_dir=package_dir,
                        out_dir=Path(scratch) / f"ray-{runs.workers}",
                        num_workers=runs.workers,
                        batch_size=args.batch_size,
                        dtype=args.dtype,
                        split="all",
                        limit=args.images,
                    )
                    runs.add(wall=time.perf_counter() - began, parts=result.parts, images=args.images)
        finally:
            ray.shutdown()

    print(
        f"\nresnet18 (weights=None, 128-d), {args.images} digits images at {args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, {args.dtype}; median of {args.repeats} alternating repeats; "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; torch {torch.__version__}, ray {ray.__version__}\n"
    )
    print(
        "| run | workers | wall s (with task start, merge) | images/s per worker | images/s aggregate "
        "| aggregate vs 1 Ray worker |"
    )
    print("|---|---|---|---|---|---|")
    one_worker = next((statistics.median(runs.aggregate) for runs in distributed if runs.workers == 1), None)
    for runs in [local, *distributed]:
        aggregate = statistics.median(runs.aggregate)
        ratio = f"{aggregate / one_worker:.2f}x" if one_worker else "-"
        print(
            f"| {runs.name} | {runs.workers} | {statistics.median(runs.wall):.1f} | "
            f"{statistics.median(runs.per_worker):.1f} | {aggregate:.1f} "
            f"(range {min(runs.aggregate):.1f}-{max(runs.aggregate):.1f}) | {ratio} |"
        )


if __name__ == "__main__":
    main()
