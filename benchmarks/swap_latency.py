"""Query latency and throughput before, during and after a rolling swap of the live index.

Deploys the search application on a local Ray cluster (2 shards x `--shard-replicas`, one
embedder, one ingress) over a random gallery, sends `/search/vector` queries from
`--clients` threads, and in the same run swaps v1 -> v2 through `POST /admin/swap`. Every
request is put in the phase it started in: before the swap request, while it ran, after it
returned. Prints a markdown table: requests, failures, p50/p99 latency and throughput per
phase, the versions that answered, and the swap's duration (as the client saw it and as the
server measured it). Bounded: `--phase-s` seconds before and after, at most `--max-requests`.

Run: `RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/swap_latency.py`
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import secrets
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import ray
import requests
import torch
from ray import serve

from retrieval.config import JobSpec
from retrieval.index.manifest import ModelRef
from retrieval.index.shards import build_shards
from retrieval.methods.package import save_model_package
from retrieval.methods.registry import build_method
from retrieval.serving.app import build_search_app
from retrieval.serving.deployments import delete_swap_state

APP_NAME = "swap-benchmark"
STATE_NAME = "swap-state-benchmark"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200_000, help="gallery vectors per version")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--shard-replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="threads sending queries back to back")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds of load before and after the swap")
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray cluster")
    parser.add_argument("--port", type=int, default=8765)
    return parser.parse_args()


def _package(folder: Path, *, dim: int) -> Path:
    spec = JobSpec.model_validate(
        {
            "name": "swap_benchmark",
            "method": {"name": "deep_metric"},
            "dataset": {
                "name": "digits",
                "image_size": 32,
                "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
            },
            "model": {"backbone": "resnet18", "weights": None, "embedding_dim": dim},
        }
    )
    torch.manual_seed(0)
    return save_model_package(folder, spec=spec, state_dict=build_method(spec).build_model().state_dict())


def _version(root: Path, name: str, *, items: int, dim: int, seed: int, model_uri: str) -> Path:
    vectors = np.random.default_rng(seed).standard_normal((items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return build_shards(
        vectors=vectors,
        ids=np.arange(items),
        items=[{"label": str(item_id % 100)} for item_id in range(items)],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="benchmark", version=str(seed), uri=model_uri),
        gallery={"dataset": "random", "count": items},
        index_version=name,
    )


@dataclass
class Sample:
    started: float
    seconds: float
    ok: bool
    version: str | None


class Load:
    """``clients`` threads sending queries back to back until stopped (bounded)."""

    def __init__(self, *, url: str, queries: np.ndarray, k: int, clients: int, max_requests: int) -> None:
        self.url, self.queries, self.k, self.max_requests = url, queries, k, max_requests
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(clients)]

    def _run(self, seed: int) -> None:
        session = requests.Session()
        position = seed
        while not self.stop.is_set() and len(self.samples) < self.max_requests:
            query = self.queries[position % len(self.queries)].tolist()
            position += len(self.threads)
            started = time.perf_counter()
            try:
                response = session.post(f"{self.url}/search/vector", json={"vector": query, "k": self.k}, timeout=60)
                ok, version = response.status_code == 200, response.json().get("index_version")
            except (requests.RequestException, ValueError):
                ok, version = False, None
            with self.lock:
                self.samples.append(Sample(started, time.perf_counter() - started, ok, version))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _row(name: str, samples: list[Sample], seconds: float) -> str:
    latencies = sorted(sample.seconds * 1000 for sample in samples)
    if not latencies:
        return f"| {name} | 0 | 0 | - | - | - | - |"
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    failed = sum(not sample.ok for sample in samples)
    versions = ", ".join(sorted({sample.version or "error" for sample in samples}))
    return (
        f"| {name} | {len(samples)} | {failed} | {statistics.median(latencies):.1f} | {p99:.1f} | "
        f"{len(samples) / seconds:.0f} | {versions} |"
    )


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="swap-benchmark-") as folder:
        root = Path(folder) / "index"
        model_uri = str(_package(Path(folder) / "package", dim=args.dim))
        v1 = _version(root, "v1", items=args.items, dim=args.dim, seed=1, model_uri=model_uri)
        _version(root, "v2", items=args.items, dim=args.dim, seed=2, model_uri=model_uri)
        queries = np.random.default_rng(0).standard_normal((256, args.dim)).astype(np.float32)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_search_app(
            {"index": str(v1), "shard_replicas": args.shard_replicas, "shard_num_cpus": 0.25},
            ingress_env={"RETRIEVAL_ADMIN_TOKEN": token},
            state_name=STATE_NAME,
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        try:
            with Load(url=url, queries=queries, k=args.k, clients=args.clients, max_requests=args.max_requests) as load:
                time.sleep(args.phase_s)
                swap_started = time.perf_counter()
                response = requests.post(
                    f"{url}/admin/swap",
                    json={"index": "v2"},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=300,
                )
                swap_finished = time.perf_counter()
                time.sleep(args.phase_s)
            load_started = min(sample.started for sample in load.samples)
            load_finished = max(sample.started + sample.seconds for sample in load.samples)
        finally:
            serve.delete(APP_NAME)
            delete_swap_state(STATE_NAME)
            serve.shutdown()
            ray.shutdown()

    if response.status_code != 200:
        raise SystemExit(f"the swap failed: HTTP {response.status_code} {response.text}")
    summary = response.json()
    phases = {
        "before": [sample for sample in load.samples if sample.started < swap_started],
        "during": [sample for sample in load.samples if swap_started <= sample.started < swap_finished],
        "after": [sample for sample in load.samples if sample.started >= swap_finished],
    }
    spans = {
        "before": swap_started - load_started,
        "during": swap_finished - swap_started,
        "after": load_finished - swap_finished,
    }
    print(
        f"rolling swap v1 -> v2: {args.items} x {args.dim} vectors per version in 2 shards x {args.shard_replicas} "
        f"replicas, {args.clients} client threads, k={args.k}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Ray CPUs {args.cpus}"
    )
    print()
    print("| phase | requests | failed | p50 ms | p99 ms | req/s | versions |")
    print("|---|---|---|---|---|---|---|")
    for name, samples in phases.items():
        print(_row(name, samples, spans[name]))
    print()
    print(
        f"swap duration: {swap_finished - swap_started:.2f} s as the client saw it, {summary['duration_s']:.2f} s "
        f"measured by the server (load on every replica, flip, drain, free v1); {len(summary['replicas'])} replicas"
    )


if __name__ == "__main__":
    main()
