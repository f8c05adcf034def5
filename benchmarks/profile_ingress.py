"""Where the search ingress spends its CPU under load: py-spy samples of every Serve process, grouped.

Deploys the platform's Serve app (``--layout``, a 1-shard Flat index of ``--n`` x ``--dim`` unit
vectors, built by `benchmarks/serving_load.py`'s cache) on a local Ray cluster, loads it with
`benchmarks/load_client.py` at ``--concurrency`` clients, and meanwhile records the ingress
replica and Serve's HTTP proxy with ``py-spy record --format raw --nonblocking`` (``--rate``
samples a second, native frames off). Each sample's leaf frame is attributed to a group by the
file it runs in: Serve's request path, Ray core, asyncio, Starlette / FastAPI, pydantic, JSON,
logging, Prometheus metrics, Faiss (the search itself), the platform's own serving code, other.

Prints, per process: samples (active ones, py-spy skips idle threads), the share of each group,
and the top functions by self time; writes the same to ``--out`` (JSON) with the raw stacks
beside it for a flame graph (``inferno-flamegraph`` or speedscope read them).

Run: ``RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/profile_ingress.py --layout local --n 100000``
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serving_load  # noqa: E402  (the benchmark's data, index cache, Serve cluster and client helpers)

logger = logging.getLogger("profile_ingress")

APP_NAME = "profile-ingress"
STATE_NAME = "profile-ingress-state"
# (group, path fragments): the first group whose fragment is in a frame's file wins.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("faiss search", ("faiss/",)),
    ("retrieval serving", ("retrieval/serving/", "retrieval/index/")),
    ("ray serve request path", ("ray/serve/",)),
    ("ray core", ("ray/_private/", "ray/_raylet", "ray/util/", "ray/actor", "ray/remote_function", "ray/exceptions")),
    ("starlette / fastapi", ("starlette/", "fastapi/", "uvicorn/", "anyio/", "h11/", "httptools/")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("json", ("json/", "orjson")),
    ("logging", ("logging/",)),
    ("prometheus metrics", ("prometheus_client/",)),
    ("asyncio", ("asyncio/", "selectors.py", "concurrent/futures/")),
    ("numpy", ("numpy/",)),
    ("threading / queue", ("threading.py", "queue.py")),
]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=["local", "distributed"], default="local")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long py-spy records (the load runs longer)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--shard-num-cpus", type=float, default=0.5)
    parser.add_argument("--embedder-num-cpus", type=float, default=0.25)
    parser.add_argument("--batching", choices=["on", "off"], default="on")
    parser.add_argument("--serve-port", type=int, default=8766)
    parser.add_argument(
        "--cache-dir", default=os.environ.get("RETRIEVAL_BENCH_CACHE", str(Path.home() / ".cache" / "retrieval-bench"))
    )
    parser.add_argument(
        "--before",
        action="store_true",
        help=(
            "profile the serving code as it was before issue 15 (run with "
            "PYTHONPATH=<a checkout of 00c5845>/platform): its one layout (a deployment per shard), "
            "its modules, and Serve's default access logs"
        ),
    )
    parser.add_argument("--out", default=str(HERE / "profile_ingress.json"))
    return parser.parse_args()


def group_of(frame: str) -> str:
    for name, fragments in GROUPS:
        if any(fragment in frame for fragment in fragments):
            return name
    return "other"


def summarise_raw(raw: str, *, top: int = 25) -> dict[str, Any]:
    """Group shares and top self-time functions from py-spy's raw (collapsed-stack) output."""
    groups: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # The first frame names the thread ("process 1234:"/"thread (0x..)"): skip non-code frames.
        code = [frame for frame in frames if "(" in frame and ".py" in frame]
        if not code:
            continue
        total += count
        leaf = code[-1]
        groups[group_of(leaf)] += count
        functions[leaf] += count
        for group in {group_of(frame) for frame in code}:
            inclusive[group] += count
    return {
        "samples": total,
        "self_share": {name: round(count / total, 4) for name, count in groups.most_common()} if total else {},
        "inclusive_share": {name: round(count / total, 4) for name, count in inclusive.most_common()} if total else {},
        "top_self": [[frame, round(count / total, 4)] for frame, count in functions.most_common(top)] if total else [],
    }


def serve_pids(app_name: str) -> dict[str, int]:
    """The pids of the app's replicas and of Serve's HTTP proxy, by the process titles Ray gives them.

    Ray titles an actor's worker ``ray::<class>...``: Serve replicas ``ray::ServeReplica:<app>:<deployment>``,
    the proxy ``ray::ProxyActor``.
    """
    pids: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            title = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{app_name}:"):
            deployment = title.split(":")[4].split()[0]
            pids[f"{deployment} {entry.name}"] = int(entry.name)
        elif title.startswith("ray::ProxyActor"):
            pids["proxy"] = int(entry.name)
    return pids


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    os.environ.update(serving_load.SERVE_ENV)
    cache = Path(args.cache_dir)
    gallery, queries = serving_load.gallery_and_queries(
        cache=cache, n=args.n, dim=args.dim, seed=args.seed, queries=args.queries
    )
    queries_path = cache / f"queries-{args.queries}x{args.dim}-seed{args.seed}.npy"
    package = serving_load.model_package(cache, dim=args.dim)
    root = cache / f"flat-{args.n}x{args.dim}-seed{args.seed}-1shard"
    manifest, _ = serving_load.cached_index(
        root, gallery=gallery, num_shards=1, factory="Flat", package=package, train_sample=1, rebuild=False
    )

    from ray import serve

    from retrieval.serving.app import build_search_app

    if args.before:
        from retrieval.serving.deployments import delete_swap_state  # type: ignore[attr-defined]
    else:
        from retrieval.serving.replica import delete_swap_state

    settings = argparse.Namespace(cpus=args.cpus, serve_port=args.serve_port)
    url = f"http://127.0.0.1:{args.serve_port}"
    result: dict[str, Any] = {"settings": vars(args), "processes": {}}
    with serving_load.serve_cluster(settings, optimized=True):
        serve_args = {
            "index": str(manifest),
            "batching": args.batching == "on",
            "shard_num_cpus": args.shard_num_cpus,
            "embedder_num_cpus": args.embedder_num_cpus,
        }
        if not args.before:
            serve_args["layout"] = args.layout
        serve.run(
            build_search_app(serve_args, state_name=STATE_NAME),
            name=APP_NAME,
            route_prefix="/",
            logging_config=None if args.before else serving_load.SERVE_LOGGING,
        )
        try:
            serving_load.wait_until_answering(url, queries[0], k=args.k, timeout_s=300)
            pids = serve_pids(APP_NAME)
            logger.warning("recording %s", pids)
            load = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "load_client.py"),
                    "--url",
                    url,
                    "--queries",
                    str(queries_path),
                    "--concurrency",
                    str(args.concurrency),
                    "--requests",
                    "1000000",
                    "--max-seconds",
                    str(args.seconds + 6),
                    "--warmup",
                    "100",
                    "--k",
                    str(args.k),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(3)  # past the warm-up
            raw_dir = Path(args.out).with_suffix("")
            raw_dir.mkdir(parents=True, exist_ok=True)
            cpu_before = {label: serving_load.tree_cpu_seconds(pid) for label, pid in pids.items()}
            recorded_from = time.perf_counter()
            recorders = {
                label: subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        str(args.rate),
                        "--duration",
                        str(int(args.seconds)),
                        "--nonblocking",
                        "--format",
                        "raw",
                        "--output",
                        str(raw_dir / f"{label.replace(' ', '-')}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for label, pid in pids.items()
            }
            for recorder in recorders.values():
                recorder.wait(timeout=args.seconds + 120)
            recorded_s = time.perf_counter() - recorded_from
            cpu_s = {label: serving_load.tree_cpu_seconds(pid) - cpu_before[label] for label, pid in pids.items()}
            for label, recorder in recorders.items():
                _, errors = recorder.communicate(timeout=60)
                path = raw_dir / f"{label.replace(' ', '-')}.txt"
                if not path.is_file():
                    raise RuntimeError(f"py-spy wrote nothing for {label}: {errors[-1000:]}")
                result["processes"][label] = {
                    "pid": pids[label],
                    "cpu_s": cpu_s[label],
                    "recorded_s": recorded_s,
                    **summarise_raw(path.read_text()),
                }
            output, _ = load.communicate(timeout=args.seconds + 120)
            result["load"] = json.loads(output.strip().splitlines()[-1])
            for profile in result["processes"].values():
                # CPU per query: the process's CPU over the recording, at the load's steady rate.
                profile["cpu_ms_per_query"] = profile["cpu_s"] * 1000.0 / (result["load"]["qps"] * recorded_s)
        finally:
            serve.delete(APP_NAME)
            delete_swap_state(STATE_NAME)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    load_summary = result["load"]
    layout = "before issue 15 (distributed)" if args.before else args.layout
    print(
        f"{layout} layout, {args.n:,} x {args.dim}, {args.concurrency} clients: "
        f"{load_summary['qps']:.0f} QPS, p50 {load_summary['latency_ms']['p50']:.1f} ms"
    )
    for label, profile in result["processes"].items():
        shares = ", ".join(f"{name} {share:.0%}" for name, share in profile["self_share"].items() if share >= 0.01)
        print(
            f"\n{label} (pid {profile['pid']}): {profile['cpu_ms_per_query']:.2f} CPU ms per query, "
            f"{profile['samples']} active samples; self time: {shares}"
        )
        for frame, share in profile["top_self"][:12]:
            print(f"  {share:6.1%}  {frame}")


if __name__ == "__main__":
    main()
