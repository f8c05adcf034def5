"""A node lost under query load, and during a swap (issue 16, the fault tier).

Two applications on the two-node cluster, each deployed by its own driver process, queried over
HTTP through Serve's proxy on the head:

- distributed layout, two shards with two replicas each, at most one replica of a shard per
  node, the ingress on the head (``ingress_resources``): the worker node, holding one replica of
  every shard, is killed while 4 clients query. No request fails, no answer is partial, every
  answer is exact (the ingress retries a call that met a dead replica on the other one). When
  the node comes back, Serve puts the missing replicas on it.
- local layout, two ingress replicas, one per node, each holding both shards: a swap is started
  and, once the replica running it is the worker node's, that node is killed, under load. The
  swap state settles the abandoned swap when its lease lapses (rolled back before the flip,
  completed after it), every live replica converges on the active version, the next swap
  succeeds, and no search fails after one client retry (the few requests in flight on the dead
  replica get a bare 500 from Serve's proxy; searches are idempotent).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from retrieval.index import ModelRef, build_shards

COUNT = 200
K = 5
CLIENTS = 4
TOKEN = "fault-tier-admin-token-0123456789"


@dataclass
class Gallery:
    root: Path
    vectors: dict[str, np.ndarray]  # per index version
    ids: np.ndarray


@pytest.fixture(scope="module")
def gallery(model_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    from retrieval.tracking.registry import load_embedder

    dim = load_embedder(str(model_package)).dim
    root = tmp_path_factory.mktemp("fault-index")
    ids = np.arange(COUNT, dtype=np.int64)
    vectors: dict[str, np.ndarray] = {}
    for seed, version in enumerate(("v1", "v2", "v3")):
        rows = np.random.default_rng(seed).standard_normal((COUNT, dim)).astype(np.float32)
        vectors[version] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        build_shards(
            vectors=vectors[version],
            ids=ids,
            items=[{"label": str(item_id % 10)} for item_id in ids.tolist()],
            out_root=root,
            num_shards=2,
            model=ModelRef(name="untrained", version="1", uri=str(model_package)),
            gallery={"dataset": "random", "version": version},
            index_version=version,
        )
    (root / "CURRENT").write_text("v1\n")
    return Gallery(root=root, vectors=vectors, ids=ids)


@contextmanager
def deployed(cluster: Any, name: str, args: dict[str, Any], http_ready: Any) -> Iterator[str]:
    """Deploy the app from a driver process; yield its URL; delete it (and its swap state) after."""
    state = f"swap-state-{name}"
    cluster.run_driver(
        "import json\n"
        "from ray import serve\n"
        "from retrieval.serving.app import build_search_app\n"
        f"serve.start(proxy_location='HeadOnly', http_options={{'host': '127.0.0.1', 'port': {cluster.serve_port}}})\n"
        f"app = build_search_app(json.loads({json.dumps(json.dumps(args))}), ingress_env={{'RETRIEVAL_ADMIN_TOKEN': "
        f"{TOKEN!r}}}, state_name={state!r})\n"
        f"serve.run(app, name={name!r}, route_prefix='/{name}', logging_config={{'enable_access_log': False}})\n"
    )
    url = f"http://127.0.0.1:{cluster.serve_port}/{name}"
    http_ready(f"{url}/healthz", deadline_s=60)
    try:
        yield url
    finally:
        cluster.run_driver(
            "from ray import serve\n"
            "from retrieval.serving.replica import delete_swap_state\n"
            f"serve.delete({name!r})\n"
            f"delete_swap_state({state!r})\n"
        )


def brute_force(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray) -> list[int]:
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    ranked = sorted(zip(scores.tolist(), ids.tolist(), strict=True), key=lambda pair: (-pair[0], pair[1]))
    return [item_id for _, item_id in ranked[:K]]


def run_load(
    url: str, queries: np.ndarray, *, fault_at: int, fault: Callable[[], None], retries: int
) -> list[tuple[int, int, dict[str, Any]]]:
    """4 clients send every query once; the client that sends query `fault_at` first calls `fault`.

    Returns (query number, final status, body) per query; a status other than 200 is retried up to
    `retries` times.
    """
    numbers = itertools.count()
    lock = threading.Lock()
    outcomes: list[tuple[int, int, dict[str, Any]]] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                number = next(numbers)
            if number >= len(queries):
                return
            if number == fault_at:
                fault()
            for _ in range(retries + 1):
                try:
                    response = session.post(
                        f"{url}/search/vector", json={"vector": queries[number].tolist(), "k": K}, timeout=60
                    )
                    status, body = response.status_code, response.json() if response.content else {}
                except (requests.RequestException, ValueError) as error:
                    status, body = -1, {"error": str(error)}
                if status == 200:
                    break
            with lock:
                outcomes.append((number, status, body))

    with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result(timeout=600)
    return outcomes


def admin_status(url: str) -> dict[str, Any]:
    reply = requests.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    reply.raise_for_status()
    return dict(reply.json())


def test_losing_the_node_of_one_replica_per_shard_under_load_loses_no_request(
    two_nodes: Any, gallery: Gallery, http_ready: Any, poll: Any
) -> None:
    args = {
        "index": str(gallery.root),
        "layout": "distributed",
        "embedder_layout": "local",
        "shard_replicas": 2,
        "max_replicas_per_node": 1,
        "ingress_resources": {"head_node": 1},
        "shard_num_cpus": 0.25,
        "ingress_num_cpus": 0.25,
        "health_check_period_s": 0.5,
    }
    with deployed(two_nodes, "fault-shards", args, http_ready) as url:
        worker = two_nodes.worker_node_id()
        for shard in ("Shard0", "Shard1"):
            poll(
                lambda shard=shard: len(set(two_nodes.running_on("fault-shards", shard))) == 2,
                timeout=120,
                what=f"{shard}'s two replicas on two nodes",
            )
            assert worker in two_nodes.running_on("fault-shards", shard)
        queries = np.random.default_rng(7).standard_normal((240, gallery.vectors["v1"].shape[1])).astype(np.float32)
        outcomes = run_load(url, queries, fault_at=40, fault=two_nodes.kill_worker, retries=0)

        assert len(outcomes) == len(queries)
        failed = [(number, status, body) for number, status, body in outcomes if status != 200]
        assert failed == [], f"{len(failed)} requests failed, first: {failed[:3]}"
        assert [number for number, _, body in outcomes if body["partial"] or body["missing_shards"]] == []
        for number, _, body in outcomes:
            assert [hit["id"] for hit in body["results"]] == brute_force(
                gallery.vectors["v1"], gallery.ids, queries[number]
            ), number

        # The node comes back; Serve puts each shard's missing replica on it.
        two_nodes.start_worker()
        back = two_nodes.worker_node_id()
        for shard in ("Shard0", "Shard1"):
            poll(
                lambda shard=shard: (
                    back in two_nodes.running_on("fault-shards", shard)
                    and len(two_nodes.running_on("fault-shards", shard)) == 2
                ),
                timeout=180,
                what=f"{shard}'s replica back on the returned node",
            )


def test_losing_the_node_running_a_swap_settles_it_and_loses_no_search(
    two_nodes: Any, gallery: Gallery, http_ready: Any, poll: Any
) -> None:
    args = {
        "index": str(gallery.root),
        "layout": "local",
        "embedder_layout": "local",
        "ingress_replicas": 2,
        "max_replicas_per_node": 1,
        "shard_num_cpus": 0.25,
        "health_check_period_s": 0.5,
    }
    with deployed(two_nodes, "fault-swap", args, http_ready) as url:
        poll(
            lambda: len(set(two_nodes.running_on("fault-swap", "SearchIngress"))) == 2,
            timeout=120,
            what="one ingress replica on each node",
        )
        worker = two_nodes.worker_node_id()
        worker_replicas = {
            replica["replica_id"]
            for replica in two_nodes.serve_replicas("fault-swap", "SearchIngress")
            if replica["node_id"] == worker
        }
        # Swap until the replica that runs a swap is the worker node's (the proxy picks one of the
        # two); a swap run by the head's replica just completes and the next goes the other way.
        active, owner, seen = "v1", None, []
        for _ in range(10):
            target = "v2" if active != "v2" else "v3"
            swapping = threading.Thread(
                target=lambda target=target: requests.post(
                    f"{url}/admin/swap", json={"index": target}, headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=120,
                ),
                daemon=True,
            )  # fmt: skip
            swapping.start()
            owners: list[str] = []

            def owner_known(owners: list[str] = owners, swapping: threading.Thread = swapping) -> bool:
                status = admin_status(url)
                if status.get("swap_owner"):
                    owners.append(status["swap_owner"])
                return bool(owners) or not swapping.is_alive()

            poll(owner_known, timeout=60, what="the swap to start", interval=0.02)
            seen.append(owners[:1])
            if owners and owners[0].rsplit(" ", 1)[-1] in worker_replicas:
                owner = owners[0]
                break
            swapping.join(timeout=120)
            poll(lambda: admin_status(url)["prepared"] is None, timeout=60, what=f"the swap to {target} to end")
            active = admin_status(url)["active"]
        assert owner is not None, f"no swap was run by the worker node's replica {worker_replicas} in 10 tries: {seen}"

        queries = np.random.default_rng(8).standard_normal((160, gallery.vectors["v1"].shape[1])).astype(np.float32)
        outcomes = run_load(url, queries, fault_at=20, fault=two_nodes.kill_worker, retries=1)
        failed = [(number, status, body) for number, status, body in outcomes if status != 200]
        assert failed == [], f"{len(failed)} searches failed after one retry, first: {failed[:3]}"
        for number, _, body in outcomes:
            version = body["index_version"]
            assert [hit["id"] for hit in body["results"]] == brute_force(
                gallery.vectors[version], gallery.ids, queries[number]
            ), (number, version)

        def settled() -> bool:
            status = admin_status(url)
            return status["prepared"] is None and status["retiring"] is None

        poll(settled, timeout=120, what="the swap state to settle the swap of the lost node")
        status = admin_status(url)
        assert status["active"] in (active, target)
        if status["last_outcome"] is not None:
            assert status["last_outcome"]["outcome"] in ("rolled back", "completed")

        def converged() -> bool:
            now = admin_status(url)
            return all(state["holds"] == [now["active"]] for state in now["replicas"].values())

        poll(
            converged,
            timeout=60,
            what="every live replica to hold the active version only",
        )
        again = "v1" if status["active"] != "v1" else "v2"
        reply = requests.post(
            f"{url}/admin/swap", json={"index": again}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        )
        assert reply.status_code == 200, reply.text
