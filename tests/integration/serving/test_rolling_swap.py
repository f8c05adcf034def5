"""Rolling swaps of the live index inside Ray Serve, under continuous query load.

One application per layout, so "loaded on every replica" is exercised in both: distributed, 2
shards with 2 replicas each, one embedder, one ingress; local, 2 ingress replicas each holding
both shards, one embedder. Index versions over a synthetic gallery of 10 classes:

    v1  classes 0-4 clustered, classes 5-9 pure noise           (model version 1)
    v2  every class clustered, plus 20 new ids 300-319          (model version 2)
    v3  every class clustered (another draw), plus ids 400-419  (model version 3)
    v4  a copy of v3 whose shard-001.faiss is corrupt

so the label agreement of the neighbours of class 5-9 items rises after v1 -> v2, and a result
id that exists only in a later version gives away an answer mixing versions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from retrieval.index import ModelRef, build_shards, read_manifest

APP_NAME = "retrieval-rolling-swap-test"
ROUTE = "/rolling-swap-test"
STATE_NAME = "swap-state-rolling-swap-test"
TOKEN = "rolling-swap-test-token"
PER_CLASS = 20
CLASSES = 10
NEW_CLASSES = range(5, 10)
K = 5
MAX_QUERIES = 3000
MAX_LOAD_S = 90.0


@dataclass
class Version:
    name: str
    model_version: str
    manifest_path: Path
    labels: dict[int, int]


# Per layout: the application's replicas by deployment, and the deployment a corrupt shard fails in.
REPLICAS = {
    "distributed": ["Embedder", "SearchIngress", "Shard0", "Shard0", "Shard1", "Shard1"],
    "local": ["Embedder", "SearchIngress", "SearchIngress"],
}
SHARD_HOLDER = {"distributed": "Shard1", "local": "SearchIngress"}


@dataclass
class Deployed:
    layout: str
    app_name: str
    url: str
    versions: dict[str, Version]
    query_ids: list[int]


@dataclass
class Reply:
    started: float
    finished: float
    status: int
    query_id: int
    body: dict[str, Any] = field(default_factory=dict)


def gallery(seed: int, *, noise_classes: range, extra_ids: range) -> tuple[np.ndarray, list[int], list[int]]:
    """Unit vectors ``[N, 32]``, their ids and labels: tight clusters, except ``noise_classes``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, 32))
    ids = list(range(CLASSES * PER_CLASS))
    labels = [item_id // PER_CLASS for item_id in ids]
    ids += list(extra_ids)
    labels += [NEW_CLASSES[position % len(NEW_CLASSES)] for position in range(len(extra_ids))]
    rows = []
    for label in labels:
        if label in noise_classes:
            rows.append(rng.standard_normal(32))
        else:
            rows.append(centers[label] + 0.15 * rng.standard_normal(32))
    vectors = np.asarray(rows, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, ids, labels


def build_version(root: Path, name: str, *, seed: int, model_version: str, model_uri: str, **kw: Any) -> Version:
    vectors, ids, labels = gallery(seed, **kw)
    path = build_shards(
        vectors=vectors,
        ids=np.asarray(ids),
        items=[{"label": str(label), "built": name} for label in labels],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="untrained", version=model_version, uri=model_uri),
        gallery={"dataset": "synthetic", "version": name},
        index_version=name,
    )
    return Version(name, model_version, path, dict(zip(ids, labels, strict=True)))


@pytest.fixture(scope="module", params=["local", "distributed"])
def deployed(
    request: pytest.FixtureRequest,
    ray_cluster: Any,
    serve_instance: str,
    model_package: Path,
    tmp_path_factory: pytest.TempPathFactory,
    http_ready: Any,
) -> Iterator[Deployed]:
    from ray import serve

    from retrieval.serving.app import build_search_app
    from retrieval.serving.deployments import delete_swap_state

    root = tmp_path_factory.mktemp("swap-index")
    uri = str(model_package)
    versions = {
        "v1": build_version(
            root, "v1", seed=1, model_version="1", model_uri=uri, noise_classes=NEW_CLASSES, extra_ids=range(0)
        ),
        "v2": build_version(
            root, "v2", seed=2, model_version="2", model_uri=uri, noise_classes=range(0), extra_ids=range(300, 320)
        ),
        "v3": build_version(
            root, "v3", seed=3, model_version="3", model_uri=uri, noise_classes=range(0), extra_ids=range(400, 420)
        ),
    }
    v4 = build_version(
        root, "v4", seed=3, model_version="4", model_uri=uri, noise_classes=range(0), extra_ids=range(400, 420)
    )
    manifest, version_dir = read_manifest(v4.manifest_path)
    corrupt = version_dir / manifest.shards[1].file
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    versions["v4"] = v4

    layout = request.param
    replicas = {"shard_replicas": 2} if layout == "distributed" else {"ingress_replicas": 2}
    app_name, route, state_name = f"{APP_NAME}-{layout}", f"{ROUTE}-{layout}", f"{STATE_NAME}-{layout}"
    app = build_search_app(
        {
            "index": str(versions["v1"].manifest_path),
            "layout": layout,
            **replicas,
            "shard_num_cpus": 0.25,
            "swap_timeout_s": 60,
        },
        ingress_env={"RETRIEVAL_ADMIN_TOKEN": TOKEN},
        state_name=state_name,
    )
    serve.run(app, name=app_name, route_prefix=route)
    url = f"http://127.0.0.1:{ray_cluster.serve_port}{route}"
    http_ready(f"{url}/healthz", deadline_s=60)
    query_ids = [item_id for item_id in range(CLASSES * PER_CLASS) if item_id // PER_CLASS in NEW_CLASSES]
    try:
        yield Deployed(layout=layout, app_name=app_name, url=url, versions=versions, query_ids=query_ids)
    finally:
        serve.delete(app_name)
        delete_swap_state(state_name)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


class QueryLoad:
    """Sends ``/search/id`` queries one after another from a thread until stopped (bounded)."""

    def __init__(self, deployed: Deployed) -> None:
        self.deployed = deployed
        self.replies: list[Reply] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + MAX_LOAD_S
        position = 0
        while not self.stop.is_set() and len(self.replies) < MAX_QUERIES and time.monotonic() < deadline:
            query_id = self.deployed.query_ids[position % len(self.deployed.query_ids)]
            position += 1
            started = time.monotonic()
            try:
                response = session.post(f"{self.deployed.url}/search/id", json={"id": query_id, "k": K}, timeout=30)
                status, body = response.status_code, response.json()
            except (requests.RequestException, ValueError) as error:
                status, body = -1, {"error": str(error)}
            self.replies.append(Reply(started, time.monotonic(), status, query_id, body))

    def __enter__(self) -> QueryLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def wait_for(self, count: int) -> None:
        """Block until ``count`` more replies arrived (the load thread is bounded in time)."""
        target = len(self.replies) + count
        while len(self.replies) < target and self.thread.is_alive():
            self.thread.join(timeout=0.01)


def label_agreement(deployed: Deployed, replies: list[Reply]) -> float:
    hits = total = 0
    for reply in replies:
        labels = deployed.versions[reply.body["index_version"]].labels
        for result in reply.body["results"]:
            hits += int(result["label"]) == labels[reply.query_id]
            total += 1
    return hits / total


def swap(deployed: Deployed, index: str) -> tuple[float, float, requests.Response]:
    started = time.monotonic()
    response = requests.post(f"{deployed.url}/admin/swap", json={"index": index}, headers=auth(), timeout=120)
    return started, time.monotonic(), response


def test_rolling_swaps_under_load_lose_nothing_and_never_mix(deployed: Deployed) -> None:
    assert requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"] == "v1"
    windows = {}
    with QueryLoad(deployed) as load:
        load.wait_for(20)
        for target, previous in (("v2", "v1"), ("v3", "v2")):
            started, finished, response = swap(deployed, target)
            assert response.status_code == 200, response.text
            summary = response.json()
            assert (summary["from"], summary["to"]) == (previous, target)
            assert summary["model"]["version"] == deployed.versions[target].model_version
            assert summary["duration_s"] > 0
            # Every replica of every deployment, each holding only the new version.
            assert len(summary["replicas"]) == len(REPLICAS[deployed.layout])
            assert all(state["holds"] == [target] for state in summary["replicas"].values()), summary["replicas"]
            windows[target] = (started, finished)
            load.wait_for(20)
    replies = load.replies

    failed = [reply for reply in replies if reply.status != 200]
    assert not failed, f"{len(failed)} of {len(replies)} requests failed, e.g. {failed[0]}"
    for reply in replies:
        version = deployed.versions[reply.body["index_version"]]
        assert reply.body["index_version"] in ("v1", "v2", "v3")
        assert reply.body["model"]["version"] == version.model_version
        # One version end to end: every result exists in that version's gallery and was stored by it.
        for result in reply.body["results"]:
            assert result["id"] in version.labels, (reply.body["index_version"], result)
            assert result["built"] == version.name

    def started_between(low: float, high: float) -> list[Reply]:
        return [reply for reply in replies if low < reply.started < high]

    # Requests really ran while each swap was in progress...
    assert started_between(*windows["v2"]) and started_between(*windows["v3"])
    # ...and every request sent after a swap returned was answered by the new version.
    after_v2 = started_between(windows["v2"][1], windows["v3"][0])
    after_v3 = started_between(windows["v3"][1], float("inf"))
    assert after_v2 and {reply.body["index_version"] for reply in after_v2} == {"v2"}
    assert after_v3 and {reply.body["index_version"] for reply in after_v3} == {"v3"}

    v1_replies = [reply for reply in replies if reply.body["index_version"] == "v1"]
    v2_replies = [reply for reply in replies if reply.body["index_version"] == "v2"]
    before, after = label_agreement(deployed, v1_replies), label_agreement(deployed, v2_replies)
    assert after > 0.9 and before < 0.5, (before, after)

    status = requests.get(f"{deployed.url}/admin/status", headers=auth(), timeout=10).json()
    assert (status["active"], status["prepared"], status["retiring"]) == ("v3", None, None)
    assert status["model"]["version"] == "3"
    deployments = sorted(state["deployment"] for state in status["replicas"].values())
    assert deployments == REPLICAS[deployed.layout]


def test_corrupt_shard_is_refused_and_the_previous_version_keeps_serving(deployed: Deployed, poll: Any) -> None:
    active = requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"]
    with QueryLoad(deployed) as load:
        load.wait_for(5)
        _, _, response = swap(deployed, "v4")
        load.wait_for(5)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["type"] == "swap_failed"
    holder = SHARD_HOLDER[deployed.layout]
    assert error["message"].startswith(f"index v4 failed to load, index {active} keeps serving: {holder} replica ")
    assert "shard-001.faiss: sha256 mismatch, manifest expects" in error["message"]
    assert load.replies and all(reply.status == 200 for reply in load.replies)
    assert {reply.body["index_version"] for reply in load.replies} == {active}
    assert requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"] == active

    def v4_freed() -> bool:
        status = requests.get(f"{deployed.url}/admin/status", headers=auth(), timeout=10).json()
        return status["prepared"] is None and all(state["holds"] == [active] for state in status["replicas"].values())

    poll(v4_freed, timeout=30, what="every replica to free the refused v4")


def test_swap_without_the_token_is_refused(deployed: Deployed) -> None:
    active = requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"]
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        response = requests.post(f"{deployed.url}/admin/swap", json={"index": "v1"}, headers=headers, timeout=10)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "unauthorized"
    assert requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"] == active


def test_a_replica_restarted_after_swaps_comes_up_on_the_active_version(deployed: Deployed, poll: Any) -> None:
    import ray

    active = requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"]
    before = requests.get(f"{deployed.url}/admin/status", headers=auth(), timeout=10).json()["replicas"]
    holder = SHARD_HOLDER[deployed.layout]
    victim = sorted(replica for replica, state in before.items() if state["deployment"] == holder)[0]
    # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<replica id> in namespace "serve".
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{deployed.app_name}#{holder}#{victim}", namespace="serve"), no_restart=True)

    def replaced() -> bool:
        try:
            replicas = requests.get(f"{deployed.url}/admin/status", headers=auth(), timeout=10).json()["replicas"]
        except (requests.RequestException, ValueError):
            return False  # the request met the killed ingress replica (local layout)
        fresh = [state for replica, state in replicas.items() if replica not in before]
        return bool(fresh) and all(state["deployment"] == holder and state["holds"] == [active] for state in fresh)

    # The fresh replica read the swap state in its constructor: it holds the active version, not
    # the v1 its deployment arguments name.
    poll(replaced, timeout=60, what=f"Serve to replace {holder} replica {victim} with one holding {active}")
    response = requests.post(f"{deployed.url}/search/id", json={"id": 150, "k": K}, timeout=30)
    assert response.status_code == 200 and response.json()["index_version"] == active


def admin_status(deployed: Deployed) -> dict[str, Any] | None:
    try:
        response = requests.get(f"{deployed.url}/admin/status", headers=auth(), timeout=10)
    except requests.RequestException:
        return None  # met an ingress replica that is being killed
    return response.json() if response.status_code == 200 else None


def test_a_swap_whose_caller_disconnects_still_completes(deployed: Deployed, poll: Any) -> None:
    """Issue 16, item 7: the client gives up at once; the swap runs on and finishes."""
    active = requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"]
    target = "v2" if active != "v2" else "v1"
    with pytest.raises(requests.Timeout):
        requests.post(f"{deployed.url}/admin/swap", json={"index": target}, headers=auth(), timeout=0.05)

    def finished() -> bool:
        # The state finishes first; each replica frees the old version on its next poll.
        status = admin_status(deployed)
        return (
            status is not None
            and (status["active"], status["prepared"], status["retiring"]) == (target, None, None)
            and all(state["holds"] == [target] for state in status["replicas"].values())
        )

    poll(finished, timeout=60, what=f"the abandoned swap to {target} to finish and every replica to free the old index")
    assert requests.post(f"{deployed.url}/search/id", json={"id": 150, "k": K}, timeout=30).json()["index_version"] == (
        target
    )


def test_killing_the_replica_running_a_swap_settles_it(deployed: Deployed, poll: Any) -> None:
    """Issue 16, item 7: the ingress running the swap dies; the state settles the swap when its lease lapses."""
    if deployed.layout != "local":
        pytest.skip("needs a second ingress replica to keep answering (the local app runs two)")
    import ray

    active = requests.get(f"{deployed.url}/version", timeout=10).json()["index_version"]
    target = "v3" if active != "v3" else "v2"
    swapping = threading.Thread(target=lambda: swap(deployed, target), daemon=True)
    swapping.start()
    owners: list[str] = []

    def owner_known() -> bool:
        status = admin_status(deployed)
        if status and status.get("swap_owner"):
            owners.append(status["swap_owner"])
        return bool(owners)

    poll(owner_known, timeout=30, what="the swap to start", interval=0.02)
    replica = owners[0].rsplit(" ", 1)[-1]
    name = f"SERVE_REPLICA::{deployed.app_name}#SearchIngress#{replica}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def settled() -> bool:
        status = admin_status(deployed)
        return status is not None and status["prepared"] is None and status["retiring"] is None

    poll(settled, timeout=90, what="the swap state to settle the abandoned swap")
    status = admin_status(deployed)
    assert status is not None and status["active"] in (active, target)
    if status["last_outcome"] is not None:
        assert status["last_outcome"]["outcome"] in ("rolled back", "completed")
    # Every live replica converges on the active version alone, and queries answer from it.
    poll(
        lambda: (
            (state := admin_status(deployed)) is not None
            and all(replica_state["holds"] == [state["active"]] for replica_state in state["replicas"].values())
        ),
        timeout=60,
        what="every replica to hold the active version only",
    )
    reply = requests.post(f"{deployed.url}/search/id", json={"id": 150, "k": K}, timeout=30).json()
    assert reply["index_version"] == status["active"]
    # The next swap is not refused.
    again = "v1" if status["active"] != "v1" else "v2"
    _, _, response = swap(deployed, again)
    assert response.status_code == 200, response.text
