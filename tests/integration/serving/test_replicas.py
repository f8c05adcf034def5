"""Replicas killed under load, inside Ray Serve, queried over HTTP like a user would.

Three scenarios, one application each (deployed for its test and deleted after it):

- distributed layout, two replicas per shard: a shard replica killed while 4 clients send
  queries loses no request, and every reply is complete (the ingress retries a call that met
  the dead replica once, and Serve routes the retry to the live one);
- distributed layout, one replica per shard, ``on_shard_timeout: error``: while the killed
  replica is down, requests fail with a 503 JSON error naming the shard; once Serve has
  restarted it, they succeed again;
- local layout, two ingress replicas (each holding every shard): one killed under load. Serve
  routes every new request to the live replica at once; the few requests the dead one was
  answering get no reply from the application (Serve's proxy answers them with a bare 500), and a
  client retries such a search once, as searches are idempotent. No request fails after its
  retry, every answer is exact, and Serve brings the replica back.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from retrieval.index import ModelRef, build_shards

COUNT = 120
FIRST_ID = 2000
K = 5
CLIENTS = 4
REQUESTS = 300


@dataclass
class Deployed:
    name: str
    url: str
    vectors: np.ndarray
    ids: np.ndarray


@pytest.fixture(scope="module")
def index_root(model_package: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    from retrieval.tracking.registry import load_embedder

    dim = load_embedder(str(model_package)).dim
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((COUNT, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(FIRST_ID, FIRST_ID + COUNT, dtype=np.int64)
    root = tmp_path_factory.mktemp("replica-index")
    build_shards(
        vectors=vectors,
        ids=ids,
        items=[{"label": str(item_id % 10)} for item_id in ids.tolist()],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="untrained", version="1", uri=str(model_package)),
        gallery={"dataset": "random", "count": COUNT},
    )
    return root, vectors, ids


@contextmanager
def deployed_app(
    name: str, args: dict[str, Any], *, cluster: Any, index: tuple[Path, np.ndarray, np.ndarray], http_ready: Any
) -> Iterator[Deployed]:
    from ray import serve

    from retrieval.serving.app import build_search_app
    from retrieval.serving.deployments import delete_swap_state

    root, vectors, ids = index
    state_name = f"swap-state-{name}"
    serve.run(build_search_app({"index": str(root), **args}, state_name=state_name), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{cluster.serve_port}/{name}"
    http_ready(f"{url}/healthz", deadline_s=60)
    try:
        yield Deployed(name=name, url=url, vectors=vectors, ids=ids)
    finally:
        serve.delete(name)
        delete_swap_state(state_name)


def brute_force(deployed: Deployed, query: np.ndarray, k: int) -> list[int]:
    scores = deployed.vectors.astype(np.float64) @ query.astype(np.float64)
    ranked = sorted(zip(scores.tolist(), deployed.ids.tolist(), strict=True), key=lambda pair: (-pair[0], pair[1]))
    return [item_id for _, item_id in ranked[:k]]


def replica_actors(app: str, deployment: str) -> list[str]:
    """The actor names of a deployment's replicas: ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace "serve"."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
    )


def kill(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return sum(count for state, count in states.items() if state == "RUNNING")


def search(deployed: Deployed, query: np.ndarray, session: requests.Session | None = None) -> requests.Response:
    poster = session or requests
    return poster.post(f"{deployed.url}/search/vector", json={"vector": query.tolist(), "k": K}, timeout=60)


def test_killing_one_of_two_replicas_under_load_loses_no_request(
    ray_cluster: Any, serve_instance: str, index_root: tuple[Path, np.ndarray, np.ndarray], http_ready: Any, poll: Any
) -> None:
    args = {"layout": "distributed", "shard_replicas": 2, "shard_num_cpus": 0.25, "health_check_period_s": 0.5}
    with deployed_app("replicas-two", args, cluster=ray_cluster, index=index_root, http_ready=http_ready) as deployed:
        poll(lambda: len(replica_actors(deployed.name, "Shard0")) == 2, timeout=60, what="two Shard0 replicas")
        victim = replica_actors(deployed.name, "Shard0")[0]
        queries = np.random.default_rng(5).standard_normal((REQUESTS, deployed.vectors.shape[1])).astype(np.float32)
        numbers = itertools.count()
        lock = threading.Lock()
        killed = threading.Event()
        outcomes: list[tuple[int, bool, int, dict[str, Any]]] = []  # (query, after the kill, status, body)

        def client() -> None:
            session = requests.Session()
            while True:
                with lock:
                    number = next(numbers)
                if number >= REQUESTS:
                    return
                if number == REQUESTS // 4:
                    kill(victim)
                    killed.set()
                after_kill = killed.is_set()
                try:
                    response = search(deployed, queries[number], session)
                    status, body = response.status_code, response.json()
                except (requests.RequestException, ValueError) as error:
                    status, body = -1, {"error": str(error)}
                with lock:
                    outcomes.append((number, after_kill, status, body))

        with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            for future in [pool.submit(client) for _ in range(CLIENTS)]:
                future.result(timeout=600)

        assert killed.is_set() and len(outcomes) == REQUESTS
        failed = [(number, status, body) for number, _, status, body in outcomes if status != 200]
        assert failed == [], f"{len(failed)} requests failed, first: {failed[:3]}"
        incomplete = [number for number, _, _, body in outcomes if body["partial"] or body["missing_shards"]]
        assert incomplete == []
        assert sum(after_kill for _, after_kill, _, _ in outcomes) >= REQUESTS // 2
        for number, _, _, body in outcomes:
            assert [hit["id"] for hit in body["results"]] == brute_force(deployed, queries[number], K), number
        # Serve replaces the killed replica; the shard is back to two.
        poll(
            lambda: (
                victim not in replica_actors(deployed.name, "Shard0") and running_replicas(deployed.name, "Shard0") == 2
            ),
            timeout=120,
            what=f"Serve to replace {victim}",
        )


def test_with_one_replica_requests_fail_with_a_503_naming_the_shard_until_serve_restarts_it(
    ray_cluster: Any, serve_instance: str, index_root: tuple[Path, np.ndarray, np.ndarray], http_ready: Any, poll: Any
) -> None:
    args = {
        "layout": "distributed",
        "shard_replicas": 1,
        "on_shard_timeout": "error",
        "shard_timeout_s": 3.0,
        "health_check_period_s": 0.5,
    }
    with deployed_app("replicas-one", args, cluster=ray_cluster, index=index_root, http_ready=http_ready) as deployed:
        query = np.random.default_rng(6).standard_normal(deployed.vectors.shape[1]).astype(np.float32)
        expected = brute_force(deployed, query, K)
        before = search(deployed, query)
        assert before.status_code == 200 and [hit["id"] for hit in before.json()["results"]] == expected
        (victim,) = replica_actors(deployed.name, "Shard1")
        kill(victim)

        # While Shard1 has no replica: a 503 with the stable JSON error shape, naming the shard.
        # Every answer until Serve has restarted it is kept and checked below.
        failures: list[tuple[int, str]] = []

        def recovered() -> bool:
            response = search(deployed, query)
            if response.status_code == 200:
                return True
            failures.append((response.status_code, response.text))
            return False

        poll(recovered, timeout=180, what="Serve to restart the killed Shard1 replica")
        assert failures, "no request met the dead shard: the kill did not take effect"
        for status, text in failures:
            body = json.loads(text)
            assert status == 503 and set(body) == {"error"} and body["error"]["type"] == "shard_unavailable", text
            assert "shard 1 has no live replica" in body["error"]["message"], text
        after = search(deployed, query).json()
        assert [hit["id"] for hit in after["results"]] == expected
        assert (after["partial"], after["missing_shards"]) == (False, [])
        assert victim not in replica_actors(deployed.name, "Shard1")


def answered_by_the_application(status: int, body: dict[str, Any]) -> bool:
    """Whether a reply came from the application (a 200, or its JSON error), not from Serve's proxy alone."""
    return status == 200 or (isinstance(body.get("error"), dict) and "type" in body["error"])


def test_killing_one_of_two_ingress_replicas_in_the_local_layout_loses_no_search(
    ray_cluster: Any, serve_instance: str, index_root: tuple[Path, np.ndarray, np.ndarray], http_ready: Any, poll: Any
) -> None:
    args = {
        "layout": "local",
        "ingress_replicas": 2,
        "ingress_num_cpus": 0.25,
        "embedder_num_cpus": 0.25,
        "health_check_period_s": 0.5,
    }
    with deployed_app("ingress-two", args, cluster=ray_cluster, index=index_root, http_ready=http_ready) as deployed:
        poll(lambda: len(replica_actors(deployed.name, "SearchIngress")) == 2, timeout=60, what="two ingress replicas")
        assert sorted(serve_deployments(deployed.name)) == ["Embedder", "SearchIngress"]
        victim = replica_actors(deployed.name, "SearchIngress")[0]
        queries = np.random.default_rng(8).standard_normal((REQUESTS, deployed.vectors.shape[1])).astype(np.float32)
        numbers = itertools.count()
        lock = threading.Lock()
        killed = threading.Event()
        outcomes: list[tuple[int, bool, int, dict[str, Any], int]] = []  # (query, after kill, status, body, tries)

        def client() -> None:
            session = requests.Session()
            while True:
                with lock:
                    number = next(numbers)
                if number >= REQUESTS:
                    return
                if number == REQUESTS // 4:
                    kill(victim)
                    killed.set()
                after_kill = killed.is_set()
                tries = 0
                while tries < 2:
                    tries += 1
                    try:
                        response = search(deployed, queries[number], session)
                        status, body = response.status_code, response.json() if response.content else {}
                    except (requests.RequestException, ValueError) as error:
                        status, body = -1, {"transport": str(error)}
                    if answered_by_the_application(status, body):
                        break
                with lock:
                    outcomes.append((number, after_kill, status, body, tries))

        with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            for future in [pool.submit(client) for _ in range(CLIENTS)]:
                future.result(timeout=600)

        assert killed.is_set() and len(outcomes) == REQUESTS
        failed = [(number, status, body) for number, _, status, body, _ in outcomes if status != 200]
        assert failed == [], f"{len(failed)} requests failed after one retry, first: {failed[:3]}"
        retried = [number for number, _, _, _, tries in outcomes if tries > 1]
        # Only requests the dead replica held could need their retry: at most one per client.
        assert len(retried) <= CLIENTS, retried
        assert sum(after_kill for _, after_kill, _, _, _ in outcomes) >= REQUESTS // 2
        for number, _, _, body, _ in outcomes:
            assert (body["partial"], body["missing_shards"]) == (False, [])
            assert [hit["id"] for hit in body["results"]] == brute_force(deployed, queries[number], K), number
        poll(
            lambda: (
                victim not in replica_actors(deployed.name, "SearchIngress")
                and running_replicas(deployed.name, "SearchIngress") == 2
            ),
            timeout=120,
            what=f"Serve to replace {victim}",
        )


def serve_deployments(app: str) -> list[str]:
    from ray import serve

    return list(serve.status().applications[app].deployments)
