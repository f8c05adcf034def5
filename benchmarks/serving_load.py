"""Serving throughput and latency: Faiss in-process vs a plain FastAPI server vs the Serve app; index types.

Same run, same machine. A synthetic gallery ``[N, D]`` float32 (unit-norm Gaussian, seeded)
is written once to ``--cache-dir`` as ``.npy`` and memory-mapped back, then built into
sharded Flat indices with `retrieval.index.shards.build_shards` (1 and 2 shards). Queries
are drawn from the same distribution with another seed.

Part 1, serving (``/search/vector``, k=10), at each of ``--concurrency`` levels:

- (a) ``inprocess``: the 1-shard file loaded with ``faiss.read_index`` in this process; N
  Python threads each call ``index.search(q[None], k)`` back to back (closed loop). Faiss
  releases the GIL during the search, so the threads overlap as much as the cores allow.
  This is the limit: no HTTP, no serialisation.
- (b) ``plain-fastapi``: `benchmarks/plain_fastapi_server.py` (one uvicorn process, FastAPI,
  the same 1-shard index and items file), loaded from a separate client process.
- (c) ``serve-<layout>-<S>shard-batch-<on|off>``: the platform's Serve app
  (`retrieval.serving.app.build_app` + ``serve.run``) over the 1- and 2-shard versions, in each
  ``--layouts`` (``local``: the ingress searches the shards in-process; ``distributed``: one
  Serve deployment per shard), with ``batching`` true and false in the `ServingSpec`, on a
  local Ray cluster of ``--cpus`` CPUs.
- (d) ``serve-noop``: a Ray Serve app with one FastAPI ingress deployment (same CPUs and
  ``max_ongoing_requests`` as the platform's ingress) whose ``POST /search/vector`` validates
  the body and returns a canned reply of k hits: the ceiling Ray Serve itself puts on the
  machine, with no search and no handle calls.

Every system's CPU is measured too: the CPU seconds (user + system, from /proc) of all its
processes over each level, per query vector answered (``cpu_ms_per_query``): the in-process
threads; the plain server's process; for the Serve rows every process of the local Ray cluster
(raylet, GCS, proxy, controller, replicas), the load client excluded. So the ratios hold per core
as well as per second. Every Serve app, the no-op included, runs with Serve's per-request access
log off (``logging_config: {enable_access_log: false}``, as the platform's Serve configs ship).

The Serve rows run with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` and
``RAY_SERVE_ENABLE_DIRECT_INGRESS=0`` in the environment of the local Ray cluster (set in
``os.environ`` before ``ray.init``; the raylet and its workers inherit it; ``--serve-default-env``
runs without them). One comparison level (``--env-compare-concurrency``, 1 shard, batching on)
runs on a second cluster with the other environment.

Client-side batching (``--client-batch`` vectors per request at ``--client-batch-concurrency``
clients): (a) threads search ``[B, D]`` per call, (b) and (c) get ``POST /search/vectors``;
QPS counts query vectors.

(b), (c) and (d) are loaded by `benchmarks/load_client.py`, a separate process on 127.0.0.1
(asyncio + aiohttp, closed loop, ``--warmup`` untimed requests, then at most ``--requests``
requests or ``--max-seconds``). Every level reports its failures. The ratios
(c)/(a), (c)/(b) and (c)/(d) are QPS ratios at the same concurrency and batch.

Part 2, index types (in-process), on a clustered gallery (``--clusters`` Gaussian centres,
points = centre + noise of norm ``--cluster-noise`` x the centre's, unit-normalised; queries
from the same mixture): a unit Gaussian gallery has no neighbourhood structure, so IVF and
HNSW recall on it means nothing. Recall@10 against exact search, and QPS for a batch of
``--queries`` queries in one call and for single queries, for Flat, IVF{4 sqrt N},PQ16,
IVF{4 sqrt N},Flat and HNSW32 at several nprobe / efSearch values, each index built by
`build_shards` (1 shard; IVF trained on a sample) and searched with per-call
`faiss.SearchParameters` from `retrieval.index.search_params.faiss_search_parameters`.

Writes every figure and the machine description to ``--out`` (JSON), prints markdown
tables, and with ``--readme`` replaces the generated block of benchmarks/README.md.

Run (quick, 100k): ``RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/serving_load.py --quick --readme``
1M, serving only: ``RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/serving_load.py --quick --n 1000000
--skip types --out benchmarks/serving_load_1m.json --readme``. The README block shows every
result file of ``README_SOURCES`` that exists (100k and 1M).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import faiss
import numpy as np
import requests
import torch
from pydantic import BaseModel

from retrieval.config import JobSpec, ServingSpec
from retrieval.errors import ConfigError
from retrieval.index.manifest import ModelRef, read_manifest
from retrieval.index.search_params import SearchParams, faiss_search_parameters
from retrieval.index.shards import build_shards, load_shard
from retrieval.methods.package import save_model_package
from retrieval.methods.registry import build_method

logger = logging.getLogger("serving_load")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APP_NAME = "serving-load-benchmark"
STATE_NAME = "serving-load-benchmark-state"
README_BEGIN = "<!-- serving_load:begin (generated by benchmarks/serving_load.py --readme) -->"
README_END = "<!-- serving_load:end -->"
LABELS = [{"label": str(digit)} for digit in range(10)]
GENERATE_CHUNK = 100_000
README_SOURCES = {"100k": HERE / "serving_load.json", "1M": HERE / "serving_load_1m.json"}
# Serve's throughput mode: user code and router on the replica's event loop (no extra thread or
# loop), buffered request-path logs, gRPC between replicas, GC frozen after start-up. Direct
# ingress, which the mode also turns on, stays off so requests still go through Serve's HTTP
# proxy. Measured separately on this machine: a minimal app at 1 client went from 12 to 8.5 ms p50.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
NOOP_APP_NAME = "serving-load-noop"
SERVE_LOGGING = {"enable_access_log": False}


class NoopQuery(BaseModel):
    """Body of the no-op app's ``POST /search/vector`` (the platform's fields, minus params)."""

    vector: list[float]
    k: int = 10


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k gallery, 1000 requests / 8 s per level")
    parser.add_argument("--n", type=int, default=None, help="gallery size (default 100000; --quick: 100000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=None, help="timed requests per level (default 2000; quick 1000)"
    )
    parser.add_argument("--max-seconds", type=float, default=None, help="time cap per level (default 20; quick 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed requests per level (default 100; quick 50)")
    parser.add_argument("--queries", type=int, default=1000, help="query vectors (also the batched-search batch)")
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="CPUs of the local Ray cluster")
    parser.add_argument("--shard-num-cpus", type=float, default=0.5, help="ServingSpec.shard_num_cpus")
    parser.add_argument("--embedder-num-cpus", type=float, default=0.25, help="ServingSpec.embedder_num_cpus")
    parser.add_argument("--plain-port", type=int, default=8100)
    parser.add_argument("--serve-port", type=int, default=8765)
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("RETRIEVAL_BENCH_CACHE", str(Path.home() / ".cache" / "retrieval-bench")),
        help="gallery, indices and model package are kept here between runs",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the cached indices (e.g. after a change of the index format)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["inprocess", "plain", "noop", "serve", "types"])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["local", "distributed"],
        choices=["local", "distributed"],
        help="ServingSpec.layout of the platform's Serve rows (the first also runs the other-environment level)",
    )
    parser.add_argument(
        "--serve-default-env",
        action="store_true",
        help=f"run the Serve rows without {' '.join(f'{key}={value}' for key, value in SERVE_ENV.items())}",
    )
    parser.add_argument(
        "--env-compare-concurrency",
        type=int,
        default=32,
        help="clients of the one comparison level run with the other Serve environment (1 shard, batching on; 0: none)",
    )
    parser.add_argument("--client-batch", type=int, default=16, help="query vectors per request of the batch rows")
    parser.add_argument(
        "--client-batch-concurrency", type=int, default=8, help="clients of the client-side batch rows (0: none)"
    )
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian centres of the index-types gallery")
    parser.add_argument(
        "--cluster-noise",
        type=float,
        default=1.5,
        help="noise norm / centre norm of the index-types gallery (before unit-normalising)",
    )
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument(
        "--pq", default="PQ16np", help="the PQ part of the IVF-PQ factory ('np': no polysemous training, see README)"
    )
    parser.add_argument(
        "--plain-threads",
        type=int,
        nargs="+",
        default=[1],
        help="OMP_NUM_THREADS of the plain server, one run each (1: 'plain-fastapi', n: 'plain-fastapi-ompN'); "
        "add the core count to see Faiss's own default, which a plain server gets unless told otherwise",
    )
    parser.add_argument(
        "--faiss-threads",
        type=int,
        default=1,
        help="OpenMP threads per single-query Faiss call in (a), (b) and the single-query index runs",
    )
    parser.add_argument("--single-queries", type=int, default=300, help="single-query calls per index setting")
    parser.add_argument("--out", default=str(HERE / "serving_load.json"))
    parser.add_argument("--readme", action="store_true", help="replace the generated block of benchmarks/README.md")
    args = parser.parse_args()
    defaults = {"n": 100_000, "requests": 1000 if args.quick else 2000, "max_seconds": 8.0 if args.quick else 20.0}
    defaults["warmup"] = 50 if args.quick else 100
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --------------------------------------------------------------------------- machine


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, load average and package versions of this machine."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    packages = ["faiss-cpu", "numpy", "ray", "fastapi", "uvicorn", "aiohttp", "torch", "starlette", "pydantic"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname_cores": os.cpu_count(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "machine": platform.machine(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "faiss_compile_options": faiss.get_compile_options(),
        "versions": {package: _version_of(package) for package in packages},
        "load_average_start": _load_average(),
    }


def batching_support(index_manifest: Path) -> dict[str, Any]:
    """Whether the `ServingSpec` accepts ``batching`` and whether the serving code uses it.

    The spec check validates real args; the code check reads the deployments' and the
    service's source for ``serve.batch`` / ``max_batch_size`` (a build without them accepts
    the key but ignores it, so batching on and off measure the same thing).
    """
    try:
        ServingSpec.from_mapping({"index": str(index_manifest), "batching": False}, source="benchmark")
        accepted = True
        refusal = None
    except ConfigError as error:
        accepted, refusal = False, str(error)
    from retrieval.serving import deployments, service

    deployment_source = inspect.getsource(deployments)
    service_source = inspect.getsource(service)
    return {
        "spec_accepts_batching_key": accepted,
        "spec_refusal": refusal,
        "deployments_use_serve_batch": "serve.batch" in deployment_source,
        "service_uses_max_batch_size": "max_batch_size" in service_source,
        "spec_defaults": {
            name: ServingSpec.model_fields[name].default
            for name in ("batching", "max_batch_size", "batch_wait_timeout_s")
            if name in ServingSpec.model_fields
        },
    }


# --------------------------------------------------------------------------- data and indices


def gallery_and_queries(*, cache: Path, n: int, dim: int, seed: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """The gallery ``float32 [n, dim]`` (memory-mapped) and queries ``float32 [queries, dim]``, unit norm.

    Written once per (n, dim, seed) in chunks, so a 1M gallery never needs two copies in memory.
    """
    cache.mkdir(parents=True, exist_ok=True)
    gallery_path = cache / f"gallery-{n}x{dim}-seed{seed}.npy"
    queries_path = cache / f"queries-{queries}x{dim}-seed{seed}.npy"
    if not gallery_path.is_file():
        rng = np.random.default_rng(seed)
        partial = gallery_path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, GENERATE_CHUNK):
            chunk = rng.standard_normal((min(GENERATE_CHUNK, n - start), dim), dtype=np.float32)
            out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        out.flush()
        del out
        partial.rename(gallery_path)
    if not queries_path.is_file():
        rng = np.random.default_rng(seed + 1_000_003)
        chunk = rng.standard_normal((queries, dim), dtype=np.float32)
        np.save(queries_path, chunk / np.linalg.norm(chunk, axis=1, keepdims=True))
    return np.load(gallery_path, mmap_mode="r"), np.load(queries_path)


def clustered_gallery_and_queries(
    *, cache: Path, n: int, dim: int, clusters: int, noise: float, seed: int, queries: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """A Gaussian-mixture gallery ``float32 [n, dim]`` (memory-mapped), queries ``[queries, dim]`` and its name.

    ``clusters`` centres drawn from a unit Gaussian and unit-normalised; each point is a
    uniformly chosen centre plus isotropic Gaussian noise whose expected norm is ``noise``
    (times the centre's norm, 1), then unit-normalised. The queries come from the same
    mixture (same centres, other seed), so true neighbours share a cluster and approximate
    indices have structure to find, as with trained embeddings.
    """
    cache.mkdir(parents=True, exist_ok=True)
    name = f"clustered-{n}x{dim}-c{clusters}-noise{noise:g}-seed{seed}"
    gallery_path = cache / f"{name}.npy"
    queries_path = cache / f"{name}-queries{queries}.npy"
    centres = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = np.float32(noise / math.sqrt(dim))

    def draw(rng: np.random.Generator, count: int) -> np.ndarray:
        points = centres[rng.integers(0, clusters, size=count)]
        points += scale * rng.standard_normal((count, dim), dtype=np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    if not gallery_path.is_file():
        rng = np.random.default_rng(seed + 1)
        partial = gallery_path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, GENERATE_CHUNK):
            out[start : start + min(GENERATE_CHUNK, n - start)] = draw(rng, min(GENERATE_CHUNK, n - start))
        out.flush()
        del out
        partial.rename(gallery_path)
    if not queries_path.is_file():
        np.save(queries_path, draw(np.random.default_rng(seed + 1_000_003), queries))
    return np.load(gallery_path, mmap_mode="r"), np.load(queries_path), name


def model_package(cache: Path, *, dim: int) -> Path:
    """An untrained model package (resnet18, ``weights=None``) whose embedding size is ``dim``.

    The Serve app's embedder loads it; the vector route never calls it.
    """
    folder = cache / f"package-{dim}"
    if (folder / "package.json").is_file():
        return folder
    spec = JobSpec.model_validate(
        {
            "name": "serving_load_benchmark",
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


def cached_index(
    root: Path,
    *,
    gallery: np.ndarray,
    num_shards: int,
    factory: str,
    package: Path,
    train_sample: int,
    rebuild: bool = False,
    description: str = "synthetic unit Gaussian",
) -> tuple[Path, float | None]:
    """The manifest of ``root``'s version ``v1``, built with `build_shards` unless already there (or ``rebuild``).

    Returns:
        The manifest path and the build time in seconds (from the build's record when cached).
    """
    manifest_path = root / "v1" / "manifest.json"
    timing = root / "build_seconds.json"
    if manifest_path.is_file() and timing.is_file() and not rebuild:
        return manifest_path, json.loads(timing.read_text())["seconds"]
    if root.exists():
        # An interrupted or outdated build: its "v1" folder would refuse a new "v1".
        shutil.rmtree(root)
    count = len(gallery)
    started = time.perf_counter()
    manifest_path = build_shards(
        vectors=gallery,
        ids=np.arange(count),
        items=[LABELS[item_id % 10] for item_id in range(count)],
        out_root=root,
        num_shards=num_shards,
        factory=factory,
        metric="ip",
        model=ModelRef(name="serving-load-benchmark", version="0", uri=str(package)),
        gallery={"dataset": description, "count": count},
        index_version="v1",
        train_sample=train_sample,
    )
    seconds = time.perf_counter() - started
    timing.write_text(json.dumps({"seconds": seconds}))
    return manifest_path, seconds


# --------------------------------------------------------------------------- CPU accounting

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far, user + system) of every process in /proc."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after its last ")".
        fields = text[text.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)
    return table


def tree_cpu_seconds(root: int, *, include_root: bool = True) -> float:
    """CPU seconds used so far by ``root`` and every process below it (a Ray cluster, a server and its workers)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    total = 0.0
    stack, seen = [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if pid in table and (include_root or pid != root):
            total += table[pid][1]
        stack.extend(children.get(pid, []))
    return total


def ray_cluster_cpu_seconds() -> float:
    """CPU seconds of the local Ray cluster this process started (raylet, GCS, proxy, controller, replicas)."""
    return tree_cpu_seconds(os.getpid(), include_root=False)


# --------------------------------------------------------------------------- statistics


def summarise(
    latencies_s: list[float], *, seconds: float, sent: int, failed: int, concurrency: int, batch: int = 1
) -> dict[str, Any]:
    """The same summary shape as `load_client.py` prints, for the in-process runs (``qps``: query vectors/s)."""
    ordered = sorted(latencies_s)

    def rank(fraction: float) -> float:
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] * 1000.0

    return {
        "concurrency": concurrency,
        "batch": batch,
        "completed": sent,
        "ok": len(ordered),
        "failed": failed,
        "failures": {},
        "seconds": seconds,
        "requests_per_s": len(ordered) / seconds if seconds > 0 else 0.0,
        "qps": len(ordered) * batch / seconds if seconds > 0 else 0.0,
        "latency_ms": {
            "p50": rank(0.5),
            "p90": rank(0.9),
            "p99": rank(0.99),
            "mean": float(np.mean(ordered)) * 1000.0 if ordered else float("nan"),
            "max": ordered[-1] * 1000.0 if ordered else float("nan"),
        },
    }


# --------------------------------------------------------------------------- (a) in-process


def inprocess_level(
    search: Callable[[np.ndarray], Any],
    queries: np.ndarray,
    *,
    concurrency: int,
    requests_count: int,
    max_seconds: float,
    warmup: int,
    faiss_threads: int,
    batch: int = 1,
) -> dict[str, Any]:
    """``concurrency`` threads calling ``search(queries [batch, D])`` back to back, like the HTTP clients.

    Bounded like the load client: at most ``requests_count`` timed calls, none started after
    ``max_seconds``; ``warmup`` untimed calls first.
    """
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    failures = [0]

    def run(limit: int, deadline: float, record: bool) -> None:
        # OpenMP's thread count is per thread: set in the main thread, it would not reach this one.
        faiss.omp_set_num_threads(faiss_threads)
        while True:
            with lock:
                position = state["next"]
                if position >= limit or time.perf_counter() >= deadline:
                    return
                state["next"] += 1
            rows = [(position * batch + offset) % len(queries) for offset in range(batch)]
            query = queries[rows]
            started = time.perf_counter()
            try:
                search(query)
            except RuntimeError:
                with lock:
                    failures[0] += 1
                continue
            elapsed = time.perf_counter() - started
            if record:
                with lock:
                    latencies.append(elapsed)

    def phase(limit: int, record: bool) -> float:
        state["next"] = 0
        deadline = time.perf_counter() + max_seconds
        threads = [threading.Thread(target=run, args=(limit, deadline, record)) for _ in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    phase(warmup, False)
    failures[0] = 0
    cpu_before = time.process_time()
    seconds = phase(requests_count, True)
    cpu_s = time.process_time() - cpu_before
    summary = summarise(
        latencies, seconds=seconds, sent=state["next"], failed=failures[0], concurrency=concurrency, batch=batch
    )
    answered = max(1, summary["ok"] * batch)
    return {**summary, "cpu_s": cpu_s, "cpu_ms_per_query": cpu_s * 1000.0 / answered}


# --------------------------------------------------------------------------- (b), (c) over HTTP


def wait_until_answering(url: str, query: np.ndarray, *, k: int, timeout_s: float, process: Any = None) -> float:
    """Poll ``POST url/search/vector`` until it answers 200 (replicas loaded); returns the seconds waited.

    Raises:
        RuntimeError: no 200 within ``timeout_s``, or ``process`` exited.
    """
    started = time.perf_counter()
    body = {"vector": [float(value) for value in query], "k": k}
    last = "no reply"
    while time.perf_counter() - started < timeout_s:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with status {process.returncode} before answering")
        try:
            response = requests.post(f"{url}/search/vector", json=body, timeout=10)
            if response.status_code == 200:
                return time.perf_counter() - started
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as error:
            last = str(error)
        time.sleep(0.25)
    raise RuntimeError(f"{url}/search/vector did not answer 200 within {timeout_s:.0f} s (last: {last})")


def client_level(
    url: str,
    queries_path: Path,
    *,
    concurrency: int,
    args: argparse.Namespace,
    batch: int = 1,
    cpu_of: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """One level of `load_client.py` in its own process (``batch`` vectors per request); its JSON summary.

    With ``cpu_of`` (the CPU seconds of the system under test so far), the summary also gives the
    system's CPU seconds over the whole level and per query vector (warm-up requests included,
    the load client's own CPU excluded).
    """
    command = [
        sys.executable,
        str(HERE / "load_client.py"),
        "--url",
        url,
        "--queries",
        str(queries_path),
        "--concurrency",
        str(concurrency),
        "--requests",
        str(args.requests),
        "--max-seconds",
        str(args.max_seconds),
        "--warmup",
        str(args.warmup),
        "--k",
        str(args.k),
        "--batch",
        str(batch),
    ]
    cpu_before = cpu_of() if cpu_of is not None else 0.0
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=args.max_seconds * 3 + 180, check=False, cwd=REPO
    )
    cpu_after = cpu_of() if cpu_of is not None else 0.0
    if completed.returncode != 0:
        raise RuntimeError(f"load_client.py failed ({completed.returncode}): {completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    if cpu_of is not None:
        answered = max(1, (result["completed"] + args.warmup) * batch)
        result["cpu_s"] = cpu_after - cpu_before
        result["cpu_ms_per_query"] = result["cpu_s"] * 1000.0 / answered
    return result


@contextmanager
def plain_server(
    index_file: Path, items_file: Path, *, port: int, faiss_threads: int
) -> Iterator[subprocess.Popen[bytes]]:
    """`plain_fastapi_server.py` running on 127.0.0.1:``port`` for the duration of the block."""
    command = [
        sys.executable,
        str(HERE / "plain_fastapi_server.py"),
        "--index",
        str(index_file),
        "--items",
        str(items_file),
        "--port",
        str(port),
    ]
    # The per-thread OpenMP setting must come from the environment to reach the request threads.
    environment = {**os.environ, "OMP_NUM_THREADS": str(faiss_threads)}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def run_levels(
    name: str,
    url: str,
    queries_path: Path,
    args: argparse.Namespace,
    extra: dict[str, Any],
    *,
    levels: list[tuple[int, int]] | None = None,
    cpu_of: Callable[[], float] | None = None,
) -> list[dict[str, Any]]:
    """`client_level` at each ``(concurrency, batch)`` of ``levels`` (default: ``--concurrency``, batch 1)."""
    rows = []
    for concurrency, batch in levels if levels is not None else [(level, 1) for level in args.concurrency]:
        result = client_level(url, queries_path, concurrency=concurrency, args=args, batch=batch, cpu_of=cpu_of)
        rows.append({"system": name, **extra, **result, "load_average": _load_average()})
        logger.warning(
            "%s c=%d batch=%d: %.0f QPS, p50 %.1f ms, p99 %.1f ms, %.2f CPU ms/query, failed %d",
            name,
            concurrency,
            batch,
            result["qps"],
            result["latency_ms"]["p50"],
            result["latency_ms"]["p99"],
            result.get("cpu_ms_per_query", float("nan")),
            result["failed"],
        )
    return rows


def _environment_of(keys: list[str]) -> dict[str, str | None]:
    """``os.environ[key]`` (None when unset) for each key, as seen by the process that runs this."""
    return {key: os.environ.get(key) for key in keys}


@contextmanager
def serve_cluster(args: argparse.Namespace, *, optimized: bool) -> Iterator[dict[str, str | None]]:
    """A local Ray cluster with Serve started, with or without `SERVE_ENV`; yields the env a Ray worker sees.

    The variables go into ``os.environ`` before ``ray.init``: the raylet it starts, and every
    worker (controller, proxy, replicas), inherit them. The driver's own Serve constants are
    fixed when it first imports ``ray.serve``; the driver is not on the request path.
    """
    import ray
    from ray import serve

    saved = {key: os.environ.get(key) for key in SERVE_ENV}
    for key, value in SERVE_ENV.items():
        if optimized:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    try:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            seen = ray.get(ray.remote(num_cpus=0)(_environment_of).remote(list(SERVE_ENV)), timeout=300)
            serve.start(http_options={"host": "127.0.0.1", "port": args.serve_port})
            yield seen
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        for key, previous in saved.items():
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous


def noop_application(*, dim: int, num_cpus: float) -> Any:
    """(d): one FastAPI ingress deployment that validates ``POST /search/vector`` and returns k canned hits.

    Same ``num_cpus`` and ``max_ongoing_requests`` as the platform's local-layout ingress, no
    other deployments, no handle calls, no search: what Ray Serve's proxy and one replica cost.
    """
    from fastapi import FastAPI, HTTPException
    from ray import serve

    from retrieval.serving.app import INGRESS_MAX_ONGOING_REQUESTS

    api = FastAPI(title="serve no-op")

    def typed(function: Callable[..., Any]) -> Callable[..., Any]:
        # With postponed annotations FastAPI would resolve "NoopQuery" in the function's globals,
        # which cloudpickle ships without it (the code never names it): give it the class itself.
        function.__annotations__ = {"query": NoopQuery}
        return function

    class NoopIngress:
        @api.post("/search/vector", response_model=None)
        @typed
        async def search_vector(self, query: NoopQuery) -> dict[str, Any]:
            if len(query.vector) != dim or not 1 <= query.k <= 100:
                raise HTTPException(status_code=400, detail=f"need a vector of {dim} floats and 1 <= k <= 100")
            hits = [{"id": item_id, "score": 0.0, **LABELS[item_id % 10]} for item_id in range(query.k)]
            return {"k": query.k, "partial": False, "missing_shards": [], "results": hits}

    deployment = serve.deployment(
        name="NoopIngress",
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
    )(serve.ingress(api)(NoopIngress))
    return deployment.bind()


def measure_application(
    name: str,
    application: Any,
    *,
    app_name: str,
    queries: np.ndarray,
    queries_path: Path,
    args: argparse.Namespace,
    extra: dict[str, Any],
    levels: list[tuple[int, int]],
) -> list[dict[str, Any]]:
    """Deploy ``application`` at ``/``, wait until it answers, run ``levels``, delete it."""
    from ray import serve

    url = f"http://127.0.0.1:{args.serve_port}"
    started = time.perf_counter()
    # Every Serve app runs as the platform's Serve configs ship: no per-request access log line.
    serve.run(application, name=app_name, route_prefix="/", logging_config=SERVE_LOGGING)
    ready_s = time.perf_counter() - started + wait_until_answering(url, queries[0], k=args.k, timeout_s=300)
    logger.warning("%s ready after %.1f s", name, ready_s)
    try:
        return run_levels(
            name,
            url,
            queries_path,
            args,
            {**extra, "ready_s": ready_s},
            levels=levels,
            cpu_of=ray_cluster_cpu_seconds,
        )
    finally:
        serve.delete(app_name)


def client_batch_levels(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The ``(concurrency, batch)`` of the client-side batching rows (none when switched off)."""
    if args.client_batch_concurrency <= 0 or args.client_batch <= 1:
        return []
    return [(args.client_batch_concurrency, args.client_batch)]


def serve_runs(
    manifests: dict[int, Path],
    queries: np.ndarray,
    queries_path: Path,
    args: argparse.Namespace,
    support: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """(c) and (d): the no-op app, the Serve app over each shard count with batching on and off.

    Returns:
        The rows, notes, and the environment of each Ray cluster (``{label: worker env}``).
    """
    from retrieval.serving.app import build_search_app
    from retrieval.serving.deployments import delete_swap_state

    notes: list[str] = []
    batching_values: list[bool | None] = [True, False] if support["spec_accepts_batching_key"] else [None]
    if not support["spec_accepts_batching_key"]:
        notes.append(f"ServingSpec refuses 'batching' ({support['spec_refusal']}); ran with the defaults only")
    elif not (support["deployments_use_serve_batch"] or support["service_uses_max_batch_size"]):
        notes.append(
            "ServingSpec accepts 'batching' but the serving code does not use it yet (no serve.batch in "
            "deployments.py, no max_batch_size in service.py): batching on and off run the same code"
        )
    single_levels = [(level, 1) for level in args.concurrency]
    environments: dict[str, Any] = {}

    def platform_app(
        layout: str,
        num_shards: int,
        batching: bool | None,
        *,
        suffix: str,
        env: str,
        levels: list[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        serve_args: dict[str, Any] = {
            "index": str(manifests[num_shards]),
            "layout": layout,
            "shard_num_cpus": args.shard_num_cpus,
            "embedder_num_cpus": args.embedder_num_cpus,
        }
        if batching is not None:
            serve_args["batching"] = batching
        label = "default" if batching is None else ("on" if batching else "off")
        try:
            return measure_application(
                f"serve-{layout}-{num_shards}shard-batch-{label}{suffix}",
                build_search_app(serve_args, state_name=STATE_NAME),
                app_name=APP_NAME,
                queries=queries,
                queries_path=queries_path,
                args=args,
                extra={
                    "layout": layout,
                    "shards": num_shards,
                    "batching": batching,
                    "serve_args": serve_args,
                    "serve_env": env,
                },
                levels=levels,
            )
        finally:
            delete_swap_state(STATE_NAME)

    rows: list[dict[str, Any]] = []
    optimized = not args.serve_default_env
    env_names = {True: "optimized", False: "default"}
    with serve_cluster(args, optimized=optimized) as seen:
        environments[env_names[optimized]] = seen
        if "serve" not in args.skip:
            for layout in args.layouts:
                for num_shards in manifests:
                    for batching in batching_values:
                        levels = single_levels + (client_batch_levels(args) if batching is not False else [])
                        rows += platform_app(
                            layout, num_shards, batching, suffix="", env=env_names[optimized], levels=levels
                        )
        # After the platform's apps, so that it does not meet the cluster's start-up work.
        if "noop" not in args.skip:
            rows += measure_application(
                "serve-noop",
                noop_application(dim=queries.shape[1], num_cpus=args.shard_num_cpus),
                app_name=NOOP_APP_NAME,
                queries=queries,
                queries_path=queries_path,
                args=args,
                extra={"serve_env": env_names[optimized]},
                levels=single_levels,
            )
    if "serve" not in args.skip and args.env_compare_concurrency > 0:
        other = env_names[not optimized]
        with serve_cluster(args, optimized=not optimized) as seen:
            environments[other] = seen
            rows += platform_app(
                args.layouts[0],
                1,
                batching_values[0],
                suffix=f" ({other} env)",
                env=other,
                levels=[(args.env_compare_concurrency, 1)],
            )
    return rows, notes, environments


# --------------------------------------------------------------------------- part 2: index types


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact top-k row found in the same row of ``found`` (both ``[Q, k]``)."""
    hits = sum(len(set(row.tolist()) & set(reference.tolist())) for row, reference in zip(found, exact, strict=True))
    return hits / exact.size


def exact_neighbours(gallery: np.ndarray, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products ``float32 [Q, k]`` and ids ``int64 [Q, k]`` (the ground truth)."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    for start in range(0, len(gallery), GENERATE_CHUNK * 5):
        index.add(np.ascontiguousarray(gallery[start : start + GENERATE_CHUNK * 5]))
    scores, ids = index.search(queries, k)
    return scores, ids


def index_type_runs(
    gallery: np.ndarray, queries: np.ndarray, *, name: str, cache: Path, package: Path, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Recall@k and batched / single-query QPS per index type and search setting.

    Args:
        gallery: ``float32 [N, D]``, unit norm (the clustered gallery).
        queries: ``float32 [Q, D]`` from the same distribution.
        name: the gallery's name, which keys its cached indices.

    Returns:
        One row per setting, and the mean cosine of each query's exact 1st and k-th neighbour
        and of random gallery pairs (how tight the neighbourhoods are).
    """
    count = len(gallery)
    nlist = round(4 * math.sqrt(count))
    # Faiss k-means wants about 39 points per centroid; 50 leaves a margin, capped by the gallery.
    train_sample = min(count, 50 * nlist)
    exact_scores, exact = exact_neighbours(gallery, queries, k=args.k)
    pairs = np.random.default_rng(args.seed).integers(0, count, size=(2, 2000))
    random_cosines = np.einsum("ij,ij->i", gallery[np.sort(pairs[0])], gallery[np.sort(pairs[1])])
    neighbourhoods = {
        "top1_cosine": float(exact_scores[:, 0].mean()),
        f"top{args.k}_cosine": float(exact_scores[:, -1].mean()),
        "random_pair_cosine_mean": float(random_cosines.mean()),
        "random_pair_cosine_std": float(random_cosines.std()),
    }
    batch_threads = faiss.omp_get_max_threads()
    settings: list[tuple[str, list[SearchParams]]] = [
        ("Flat", [SearchParams()]),
        (f"IVF{nlist},{args.pq}", [SearchParams(nprobe=value) for value in args.nprobe if value <= nlist]),
        (f"IVF{nlist},Flat", [SearchParams(nprobe=value) for value in args.nprobe if value <= nlist]),
        (f"HNSW{args.hnsw_m}", [SearchParams(ef_search=value) for value in args.ef_search]),
    ]
    rows: list[dict[str, Any]] = []
    for factory, grid in settings:
        folder = cache / f"types-{name}" / factory.replace(",", "_")
        manifest_path, build_s = cached_index(
            folder,
            gallery=gallery,
            num_shards=1,
            factory=factory,
            package=package,
            train_sample=train_sample,
            rebuild=args.rebuild,
            description=name,
        )
        manifest, version_dir = read_manifest(manifest_path)
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=0, verify=False)
        size_mb = (version_dir / manifest.shards[0].file).stat().st_size / 1024**2
        for params in grid:
            faiss_params = faiss_search_parameters(shard.index, params, factory=factory)
            faiss.omp_set_num_threads(batch_threads)
            started = time.perf_counter()
            _, ids = shard.index.search(queries, args.k, params=faiss_params)
            batched_s = time.perf_counter() - started
            faiss.omp_set_num_threads(args.faiss_threads)
            single_count = min(args.single_queries, len(queries))
            started = time.perf_counter()
            done = 0
            for row in range(single_count):
                shard.index.search(queries[row : row + 1], args.k, params=faiss_params)
                done += 1
                if time.perf_counter() - started > args.max_seconds:
                    break
            single_s = time.perf_counter() - started
            row_result = {
                "factory": factory,
                "params": params.as_dict(),
                "recall_at_k": recall_at_k(ids, exact),
                "k": args.k,
                "batched_queries": len(queries),
                "batched_qps": len(queries) / batched_s,
                "single_queries": done,
                "single_qps": done / single_s,
                "single_ms_mean": single_s / done * 1000.0,
                "build_s": build_s,
                "train_sample": train_sample if "IVF" in factory else None,
                "index_file_mb": round(size_mb, 1),
                "batch_threads": batch_threads,
                "single_threads": args.faiss_threads,
            }
            rows.append(row_result)
            logger.warning(
                "%s %s: recall@%d %.3f, batched %.0f QPS, single %.0f QPS",
                factory,
                params.as_dict() or "-",
                args.k,
                row_result["recall_at_k"],
                row_result["batched_qps"],
                row_result["single_qps"],
            )
        del shard
        faiss.omp_set_num_threads(batch_threads)
    return rows, neighbourhoods


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def serving_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per system, concurrency and batch, with the QPS ratios to (a), (b) and (d)."""
    reference = {(row["system"], row["concurrency"], row.get("batch", 1)): row["qps"] for row in rows}
    cpu_reference = {
        (row["system"], row["concurrency"], row.get("batch", 1)): row.get("cpu_ms_per_query") for row in rows
    }
    lines = [
        "| system | clients | vectors / request | QPS (vectors/s) | p50 ms | p99 ms | ok / failed "
        "| vs (a) in-process | vs (b) plain FastAPI | vs (d) Serve no-op | CPU ms / query "
        "| queries per CPU-s vs (b) | 1-min load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        key = (row["concurrency"], row.get("batch", 1))
        ratios = []
        for system in ("inprocess", "plain-fastapi", "serve-noop"):
            base = reference.get((system, *key))
            ratios.append(f"{row['qps'] / base:.2f}x" if base else "-")
        cpu = row.get("cpu_ms_per_query")
        plain_cpu = cpu_reference.get(("plain-fastapi", *key))
        per_core = f"{plain_cpu / cpu:.2f}x" if cpu and plain_cpu else "-"
        lines.append(
            f"| {row['system']} | {row['concurrency']} | {row.get('batch', 1)} | {_fmt(row['qps'])} | "
            f"{_fmt(row['latency_ms']['p50'], 1)} | {_fmt(row['latency_ms']['p99'], 1)} | "
            f"{row['ok']} / {row['failed']} | {' | '.join(ratios)} | {_fmt(cpu, 2)} | {per_core} | "
            f"{row['load_average'][0]} |"
        )
    return "\n".join(lines)


def types_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: recall@k and QPS per index type and search setting."""
    lines = [
        "| index | setting | recall@10 | QPS, batch of queries | QPS, single queries | build s | file MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        setting = ", ".join(f"{name}={value}" for name, value in row["params"].items()) or "exact"
        lines.append(
            f"| {row['factory']} | {setting} | {row['recall_at_k']:.3f} | {_fmt(row['batched_qps'])} | "
            f"{_fmt(row['single_qps'])} | {_fmt(row['build_s'], 1)} | {row['index_file_mb']} |"
        )
    return "\n".join(lines)


def report_markdown(result: dict[str, Any]) -> str:
    """One result file as markdown: the command and machine, the serving table, notes, the index-types table."""
    machine = result["machine"]
    settings = result["settings"]
    support = result["batching_support"]
    envs = result.get("serve_env", {})
    env_text = "; ".join(
        f"{label} env: " + (", ".join(f"{key}={value}" for key, value in seen.items() if value is not None) or "none")
        for label, seen in envs.items()
    )
    header = (
        f"{settings['n']:,} x {settings['dim']} float32 gallery (unit Gaussian, seed {settings['seed']}), "
        f"k={settings['k']}, {settings['requests']} timed requests or {settings['max_seconds']:.0f} s per level "
        f"after {settings['warmup']} warm-up; {machine['nproc']} CPUs ({machine['cpu']}), "
        f"Ray CPUs {settings['cpus']}; 1-min load average "
        f"{machine['load_average_start'][0]} before the run, {machine['load_average_end'][0]} at end; "
        f"faiss {machine['versions']['faiss-cpu']}, ray {machine['versions']['ray']}, "
        f"fastapi {machine['versions']['fastapi']}, uvicorn {machine['versions']['uvicorn']}; "
        f"total {result['total_s']:.0f} s"
    )
    parts = [f"```\n$ {result['command']}\n{header}\n```"]
    if env_text:
        parts.append(
            f"Serve rows: Ray cluster environment as seen by a worker ({env_text}); the rows marked "
            f"'(default env)' or '(optimized env)' ran on a second cluster with the other one."
        )
    if result["serving"]:
        parts.append(serving_table(result["serving"]))
    batching = (
        f"Batching: ServingSpec accepts `batching`: {support['spec_accepts_batching_key']}; "
        f"`serve.batch` in deployments.py: {support['deployments_use_serve_batch']}; "
        f"`max_batch_size` in service.py: {support['service_uses_max_batch_size']}."
    )
    parts.append(batching)
    parts += [f"Note: {note}" for note in result["notes"]]
    if result["index_types"]:
        types = result.get("types_gallery", {})
        if types:
            kth_cosine = types[f"top{settings['k']}_cosine"]
            parts.append(
                f"Index types on a clustered gallery: {types['n']:,} x {settings['dim']}, {types['clusters']} "
                f"Gaussian centres, noise norm {types['noise']:g} x the centre's, unit-normalised, seed "
                f"{settings['seed']}; mean cosine of a query's exact 1st neighbour {types['top1_cosine']:.2f}, "
                f"of its {settings['k']}th {kth_cosine:.2f}, of random pairs "
                f"{types['random_pair_cosine_mean']:.2f} +- {types['random_pair_cosine_std']:.2f}; exact "
                f"top-{settings['k']} as truth."
            )
        parts.append(types_table(result["index_types"]))
    return "\n\n".join(parts)


def readme_markdown(current: dict[str, Any], current_path: Path) -> str:
    """The README block: every result file of `README_SOURCES` that exists (the current run's included)."""
    sections = []
    shown = False
    for label, path in README_SOURCES.items():
        if path.resolve() == current_path.resolve():
            result, shown = current, True
        elif path.is_file():
            result = json.loads(path.read_text(encoding="utf-8"))
        else:
            continue
        sections.append(f"#### {label}: {result['settings']['n']:,} vectors\n\n{report_markdown(result)}")
    if not shown:
        sections.insert(0, f"#### {current_path.name}\n\n{report_markdown(current)}")
    return "\n\n".join(sections)


def update_readme(markdown: str, readme: Path) -> None:
    """Replace the generated block of ``readme`` (between the markers), or append one."""
    text = readme.read_text(encoding="utf-8")
    block = f"{README_BEGIN}\n\n{markdown}\n\n{README_END}"
    if README_BEGIN in text and README_END in text:
        before, rest = text.split(README_BEGIN, 1)
        _, after = rest.split(README_END, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    began = time.perf_counter()
    machine = machine_info()
    # Before anything imports ray.serve (batching_support does), so the driver agrees with its cluster.
    if not args.serve_default_env:
        os.environ.update(SERVE_ENV)
    cache = Path(args.cache_dir)
    gallery, queries = gallery_and_queries(cache=cache, n=args.n, dim=args.dim, seed=args.seed, queries=args.queries)
    queries_path = cache / f"queries-{args.queries}x{args.dim}-seed{args.seed}.npy"
    package = model_package(cache, dim=args.dim)
    # The Flat indices of part 1: the whole gallery trains nothing, so the sample size is moot.
    manifests: dict[int, Path] = {}
    build_seconds: dict[int, float | None] = {}
    for num_shards in (1, 2):
        root = cache / f"flat-{args.n}x{args.dim}-seed{args.seed}-{num_shards}shard"
        manifests[num_shards], build_seconds[num_shards] = cached_index(
            root,
            gallery=gallery,
            num_shards=num_shards,
            factory="Flat",
            package=package,
            train_sample=1,
            rebuild=args.rebuild,
        )
    support = batching_support(manifests[1])
    one_shard, one_shard_dir = read_manifest(manifests[1])
    index_file = Path(one_shard_dir) / one_shard.shards[0].file
    items_file = Path(one_shard_dir) / one_shard.shards[0].items_file

    serving: list[dict[str, Any]] = []
    notes: list[str] = []
    if "inprocess" not in args.skip:
        index = faiss.read_index(str(index_file))

        def search_one(query: np.ndarray) -> Any:
            return index.search(query, args.k)

        for concurrency in args.concurrency:
            result = inprocess_level(
                search_one,
                queries,
                concurrency=concurrency,
                requests_count=args.requests,
                max_seconds=args.max_seconds,
                warmup=args.warmup,
                faiss_threads=args.faiss_threads,
            )
            serving.append({"system": "inprocess", **result, "load_average": _load_average()})
            logger.warning("inprocess c=%d: %.0f QPS", concurrency, result["qps"])
        for concurrency, batch in client_batch_levels(args):
            result = inprocess_level(
                search_one,
                queries,
                concurrency=concurrency,
                requests_count=args.requests,
                max_seconds=args.max_seconds,
                warmup=args.warmup,
                faiss_threads=args.faiss_threads,
                batch=batch,
            )
            serving.append({"system": "inprocess", **result, "load_average": _load_average()})
            logger.warning("inprocess c=%d batch=%d: %.0f QPS", concurrency, batch, result["qps"])
        del index
    if "plain" not in args.skip:
        url = f"http://127.0.0.1:{args.plain_port}"
        for threads in args.plain_threads:
            name = "plain-fastapi" if threads == 1 else f"plain-fastapi-omp{threads}"
            with plain_server(index_file, items_file, port=args.plain_port, faiss_threads=threads) as process:
                ready_s = wait_until_answering(url, queries[0], k=args.k, timeout_s=300, process=process)
                health = requests.get(f"{url}/healthz", timeout=10).json()
                levels = [(level, 1) for level in args.concurrency]
                if threads == args.plain_threads[0]:
                    levels += client_batch_levels(args)
                serving += run_levels(
                    name,
                    url,
                    queries_path,
                    args,
                    {"ready_s": ready_s, "server": health},
                    levels=levels,
                    cpu_of=lambda pid=process.pid: tree_cpu_seconds(pid),
                )
    serve_env: dict[str, Any] = {}
    if "serve" not in args.skip or "noop" not in args.skip:
        rows, serve_notes, serve_env = serve_runs(manifests, queries, queries_path, args, support)
        serving += rows
        notes += serve_notes
    failed = sum(row["failed"] for row in serving)
    if failed:
        notes.append(f"{failed} requests failed in total: see 'failures' and 'failure_examples' per level")

    index_types: list[dict[str, Any]] = []
    types_gallery: dict[str, Any] = {}
    if "types" not in args.skip:
        types_vectors, types_queries, types_name = clustered_gallery_and_queries(
            cache=cache,
            n=args.n,
            dim=args.dim,
            clusters=args.clusters,
            noise=args.cluster_noise,
            seed=args.seed,
            queries=args.queries,
        )
        index_types, neighbourhoods = index_type_runs(
            types_vectors, types_queries, name=types_name, cache=cache, package=package, args=args
        )
        types_gallery = {
            "name": types_name,
            "n": args.n,
            "clusters": args.clusters,
            "noise": args.cluster_noise,
            **neighbourhoods,
        }
    notes.append("digits model: not measured by this script (synthetic vectors only)")

    machine["load_average_end"] = _load_average()
    result = {
        "command": " ".join(["RAY_AUTH_MODE=disabled", ".venv/bin/python", *map(shlex.quote, sys.argv)]),
        "settings": {
            key: value
            for key, value in vars(args).items()
            if key not in {"out", "readme", "cache_dir", "skip", "rebuild"}
        },
        "machine": machine,
        "batching_support": support,
        "serve_env": serve_env,
        "types_gallery": types_gallery,
        "flat_build_s": build_seconds,
        "serving": serving,
        "index_types": index_types,
        "notes": notes,
        "total_s": time.perf_counter() - began,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(report_markdown(result) + "\n")
    if args.readme:
        update_readme(readme_markdown(result, Path(args.out)), HERE / "README.md")


if __name__ == "__main__":
    main()
