"""The rolling swap without Ray: the service's flip, replicas' prepare/release, the swap runner, admin auth.

Shard replicas are the real `ShardDeployment` classes, called in-process over indices built
with `build_shards`; the HTTP API is driven through its ASGI interface directly (httpx, which
FastAPI's TestClient needs, is not installed).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.cli import _default_subcommand, _parser
from retrieval.config import ServingSpec
from retrieval.errors import IndexIntegrityError, ModelNotFoundError
from retrieval.index.manifest import IndexManifest, ModelRef, read_manifest
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import build_shards
from retrieval.serving.deployments import EmbedderDeployment, ShardDeployment, VersionedReplica
from retrieval.serving.errors import (
    BadIndexReferenceError,
    MemoryBudgetError,
    SwapFailedError,
    SwapInProgressError,
    VersionNotLoadedError,
)
from retrieval.serving.http import build_http_api
from retrieval.serving.memory import check_shard_memory
from retrieval.serving.metrics import ServingMetrics
from retrieval.serving.replies import ShardHits
from retrieval.serving.service import SearchService
from retrieval.serving.swap import (
    Desired,
    IndexRef,
    InFlight,
    ReplicaReport,
    SwapBook,
    resolve_index_reference,
    run_swap,
)
from retrieval.serving.swap_client import SwapRequestError, request_swap, resolve_swap_target

DIM = 8
COUNT = 40
TOKEN = "s3cret-admin-token"


@dataclass
class Version:
    manifest: IndexManifest
    path: Path
    vectors: np.ndarray

    @property
    def name(self) -> str:
        return self.manifest.index_version

    def ref(self) -> IndexRef:
        return IndexRef.of(self.manifest, str(self.path))


def build_version(root: Path, name: str, seed: int, *, model_version: str = "1", dim: int = DIM) -> Version:
    vectors = np.random.default_rng(seed).standard_normal((COUNT, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = build_shards(
        vectors=vectors,
        ids=np.arange(COUNT),
        items=[{"label": str(item_id % 5), "built": name} for item_id in range(COUNT)],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="m", version=model_version, uri=f"models:/m/{model_version}"),
        gallery={"dataset": "synthetic"},
        index_version=name,
    )
    manifest, _ = read_manifest(path)
    return Version(manifest=manifest, path=path, vectors=vectors)


@pytest.fixture
def versions(tmp_path: Path) -> dict[str, Version]:
    return {name: build_version(tmp_path, name, seed) for name, seed in (("v1", 1), ("v2", 2))}


class GatedShard:
    """`ShardClient` over an in-process `ShardDeployment`; a search can be held at a gate."""

    remote = True

    def __init__(self, replica: Any) -> None:
        self.replica = replica
        self.gate: asyncio.Event | None = None
        self.reached: asyncio.Event = asyncio.Event()

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.reached.set()
            await gate.wait()
        reply: ShardHits = self.replica.search(queries, k, index_version, params)
        return reply

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        result: np.ndarray | None = self.replica.vector(item_id, index_version)
        return result

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.replica.item(item_id, index_version)
        return result


class NoEmbedder:
    remote = True

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        raise AssertionError("no image search in these tests")


def in_process(deployment: Any, **kwargs: Any) -> Any:
    """The class behind a Serve deployment, constructed in this process (no swap state)."""
    return deployment.func_or_class(**kwargs)


def shard_replicas(spec: ServingSpec, versions: dict[str, Version]) -> list[Any]:
    replicas = [in_process(ShardDeployment, spec=spec, shard=shard) for shard in (0, 1)]
    for replica in replicas:
        for version in versions.values():
            replica.prepare(str(version.path))
    return replicas


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = [(float(np.dot(query.astype(np.float64), row)), item_id) for item_id, row in enumerate(vectors)]
    return [item_id for _, item_id in sorted(scores, key=lambda pair: -pair[0])[:k]]


# --------------------------------------------------------------------------- the flip


def test_requests_started_before_the_flip_finish_on_the_old_version(versions: dict[str, Version]) -> None:
    v1, v2 = versions["v1"], versions["v2"]
    spec = ServingSpec(index=str(v1.path))
    clients = [GatedShard(replica) for replica in shard_replicas(spec, versions)]
    service = SearchService(manifest=v1.manifest, spec=spec, shards=clients, embedder=NoEmbedder())
    query = np.random.default_rng(9).standard_normal(DIM).tolist()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
        gate = asyncio.Event()
        clients[1].gate = gate
        before = asyncio.create_task(service.search_vector(query, 5))
        await clients[1].reached.wait()
        # `before` has pinned v1 and is half-way through its fan-out when the flip happens.
        in_flight = service.in_flight.snapshot()
        service.activate(v2.manifest)
        after = await service.search_vector(query, 5)
        gate.set()
        return (await before).to_json(), after.to_json(), in_flight

    before, after, in_flight = asyncio.run(scenario())
    assert in_flight == {"v1": 1}
    assert service.in_flight.snapshot() == {}
    query_array = np.asarray(query, dtype=np.float32)
    for reply, version in ((before, v1), (after, v2)):
        assert reply["index_version"] == version.name
        assert reply["model"]["version"] == version.manifest.model.version
        # No mixing: every result, from either shard, comes from the pinned version's gallery.
        assert {result["built"] for result in reply["results"]} == {version.name}
        assert [result["id"] for result in reply["results"]] == brute_force(version.vectors, query_array, 5)
    assert service.version_info()["index_version"] == "v2"


def test_activate_refuses_a_manifest_with_another_shard_count(tmp_path: Path, versions: dict[str, Version]) -> None:
    v1 = versions["v1"]
    spec = ServingSpec(index=str(v1.path))
    service = SearchService(
        manifest=v1.manifest, spec=spec, shards=[GatedShard(None), GatedShard(None)], embedder=NoEmbedder()
    )
    three = v1.manifest.model_copy(update={"shards": [*v1.manifest.shards, v1.manifest.shards[0]]})
    with pytest.raises(ValueError, match="has 3 shards but this service has 2 shard clients"):
        service.activate(three)
    assert service.index_version == "v1"


# --------------------------------------------------------------------------- replicas: prepare / release


def test_shard_holds_two_versions_and_release_frees_one(versions: dict[str, Version]) -> None:
    v1, v2 = versions["v1"], versions["v2"]
    replica = in_process(ShardDeployment, spec=ServingSpec(index=str(v1.path)), shard=1)
    assert replica.loaded_versions() == ["v1"]
    assert replica.prepare(str(v2.path)) == "v2"
    assert replica.loaded_versions() == ["v1", "v2"]
    query = v2.vectors[30:31]
    assert replica.search(query, 1, "v2").ids[0, 0] == 30
    assert asyncio.run(replica.release("v1", timeout_s=1.0)) is True
    assert replica.loaded_versions() == ["v2"]
    with pytest.raises(VersionNotLoadedError, match=r"shard 1 does not hold index version v1 \(it holds \['v2'\]\)"):
        replica.search(query, 1, "v1")


def test_release_waits_for_requests_in_flight() -> None:
    in_flight = InFlight()

    async def scenario() -> tuple[bool, bool]:
        with in_flight.hold("v1"):
            timed_out = await in_flight.drained("v1", timeout_s=0.05)
        return timed_out, await in_flight.drained("v1", timeout_s=0.05)

    assert asyncio.run(scenario()) == (False, True)


def corrupt(version: Version, shard: int) -> Path:
    path = version.path.parent / version.manifest.shards[shard].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_corrupt_shard_is_refused_and_the_old_version_keeps_serving(
    tmp_path: Path, versions: dict[str, Version]
) -> None:
    v1 = versions["v1"]
    v3 = build_version(tmp_path, "v3", 3)
    bad_file = corrupt(v3, 0)
    replica = in_process(ShardDeployment, spec=ServingSpec(index=str(v1.path)), shard=0)
    expected = replica.search(v1.vectors[:2], 3, "v1")
    with pytest.raises(IndexIntegrityError, match=f"{bad_file}: sha256 mismatch, manifest expects"):
        replica.prepare(str(v3.path))
    assert replica.loaded_versions() == ["v1"]
    again = replica.search(v1.vectors[:2], 3, "v1")
    np.testing.assert_array_equal(again.ids, expected.ids)


def test_memory_budget_refuses_before_loading(versions: dict[str, Version]) -> None:
    v1, v2 = versions["v1"], versions["v2"]
    info = v1.manifest.shards[0]
    held = sum((v1.path.parent / name).stat().st_size for name in (info.file, info.items_file))
    new_info = v2.manifest.shards[0]
    new = sum((v2.path.parent / name).stat().st_size for name in (new_info.file, new_info.items_file))
    # Room for one copy of the shard, not two.
    budget = held + new - 1
    replica = in_process(ShardDeployment, spec=ServingSpec(index=str(v1.path), shard_memory_bytes=budget), shard=0)
    with pytest.raises(MemoryBudgetError) as raised:
        replica.prepare(str(v2.path))
    message = str(raised.value)
    assert message.startswith(
        f"shard 0 of index v2 does not fit in this replica's memory: it needs {new} bytes and the replica already "
        f"holds {held} bytes, {held + new} bytes in all"
    )
    assert f"over its budget of {budget} bytes" in message and "shard_memory_bytes" in message
    assert replica.loaded_versions() == ["v1"]


def test_memory_default_budget_is_the_available_memory() -> None:
    with pytest.raises(MemoryBudgetError, match=r"shard 2 of index v9 does not fit.*available memory"):
        check_shard_memory(shards="shard 2", index_version="v9", new_bytes=1 << 60, held_bytes=10, budget_bytes=None)
    check_shard_memory(shards="shard 2", index_version="v9", new_bytes=1, held_bytes=10, budget_bytes=None)


def test_embedder_refuses_an_unknown_model_and_a_dimension_mismatch(
    tmp_path: Path, model_package: Path, versions: dict[str, Version]
) -> None:
    root = tmp_path / "embedder"
    model = ModelRef(name="untrained", version="1", uri=str(model_package))
    vectors = np.eye(32, dtype=np.float32)
    first = build_shards(
        vectors=vectors, ids=np.arange(32), items=[{}] * 32, out_root=root, num_shards=1, model=model,
        gallery={}, index_version="e1",
    )  # fmt: skip
    wrong_dim = build_shards(
        vectors=vectors[:, :16], ids=np.arange(32), items=[{}] * 32, out_root=root, num_shards=1, model=model,
        gallery={}, index_version="e2",
    )  # fmt: skip
    replica = in_process(EmbedderDeployment, spec=ServingSpec(index=str(first)))
    with pytest.raises(IndexIntegrityError, match="embeds into 32 dimensions but index e2 holds 16-dimensional"):
        replica.prepare(str(wrong_dim))
    # versions["v2"] names the model models:/m/1, which no registry holds.
    with pytest.raises(ModelNotFoundError):
        replica.prepare(str(versions["v2"].path))
    assert replica._held_versions() == ["e1"]


# --------------------------------------------------------------------------- the swap runner


class BookState:
    """`SwapState` over an in-process `SwapBook`."""

    def __init__(self, book: SwapBook) -> None:
        self.book = book

    async def begin(self, target: IndexRef, owner: str) -> Desired:
        return self.book.begin(target, owner)

    async def heartbeat(self, owner: str) -> Desired:
        return self.book.heartbeat(owner)

    async def flip(self) -> Desired:
        return self.book.flip()

    async def finish(self) -> Desired:
        return self.book.finish()

    async def abort(self) -> Desired:
        return self.book.abort()

    async def live_reports(self) -> list[ReplicaReport]:
        return self.book.live_reports()


class FakeReplica(VersionedReplica):
    """The real replica sync logic (`_apply`) over versions held as names; some fail to load."""

    def __init__(self, name: str, deployment: str, *, fails: dict[str, str] | None = None, router: bool = False):
        self._replica, self._deployment = name, deployment
        self._in_flight = InFlight()
        self._errors: dict[str, str] = {}
        self._epoch = -1
        self._held = ["v1"]
        self._fails = fails or {}
        self._router = router
        self.active = "v1"

    def _held_versions(self) -> list[str]:
        return list(self._held)

    def _load_version(self, ref: IndexRef) -> None:
        if ref.index_version in self._fails:
            raise IndexIntegrityError(self._fails[ref.index_version])
        self._held.append(ref.index_version)

    def _drop_version(self, version: str) -> None:
        self._held.remove(version)

    def _follow(self, desired: Desired) -> None:
        if self._router and desired.active.index_version in self._held:
            self.active = desired.active.index_version

    def _active(self) -> str | None:
        return self.active if self._router else None


async def poll_forever(book: SwapBook, replicas: list[FakeReplica]) -> None:
    while True:
        for replica in replicas:
            await replica._apply(book.report(replica._report()))
        await asyncio.sleep(0.001)


def swap_with(
    book: SwapBook,
    replicas: list[FakeReplica],
    target: IndexRef,
    *,
    timeout_s: float = 5.0,
    metrics: ServingMetrics | None = None,
) -> dict[str, Any]:
    metrics = metrics if metrics is not None else ServingMetrics()
    activated: list[str] = []

    async def scenario() -> dict[str, Any]:
        poller = asyncio.create_task(poll_forever(book, replicas))
        try:

            async def expected() -> dict[str, int]:
                return {"Shard0": 2, "SearchIngress": 1}

            def activate(ref: IndexRef) -> None:
                activated.append(ref.index_version)
                replicas[-1].active = ref.index_version

            return await run_swap(
                state=BookState(book),
                target=target,
                expected_replicas=expected,
                activate=activate,
                timeout_s=timeout_s,
                metrics=metrics,
                drain_timeout_s=2.0,
                poll_s=0.001,
            )
        finally:
            poller.cancel()

    summary = asyncio.run(scenario())
    assert activated == [target.index_version]
    return summary


def replica_set(**fails: dict[str, str]) -> list[FakeReplica]:
    return [
        FakeReplica("s0-a", "Shard0", fails=fails.get("a")),
        FakeReplica("s0-b", "Shard0", fails=fails.get("b")),
        FakeReplica("in-a", "SearchIngress", router=True),
    ]


def test_swap_loads_everywhere_flips_and_frees_the_old_version(versions: dict[str, Version]) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    replicas = replica_set()
    summary = swap_with(book, replicas, versions["v2"].ref())
    assert (summary["from"], summary["to"]) == ("v1", "v2")
    assert summary["model"] == {"name": "m", "version": "1", "uri": "models:/m/1"}
    assert summary["duration_s"] >= 0
    assert {name: state["holds"] for name, state in summary["replicas"].items()} == {
        "s0-a": ["v2"],
        "s0-b": ["v2"],
        "in-a": ["v2"],
    }
    assert book.status()["active"] == "v2" and book.status()["prepared"] is None


def test_failed_load_aborts_and_the_old_version_keeps_serving(versions: dict[str, Version]) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    replicas = replica_set(b={"v2": "shard-000.faiss: sha256 mismatch"})
    with pytest.raises(SwapFailedError) as raised:
        swap_with(book, replicas, versions["v2"].ref())
    assert str(raised.value) == (
        "index v2 failed to load, index v1 keeps serving: Shard0 replica s0-b: shard-000.faiss: sha256 mismatch"
    )
    desired = book.desired()
    assert (desired.active.index_version, desired.prepared) == ("v1", None)
    # After the abort every replica frees v2 on its next poll and holds v1 only.
    for replica in replicas:
        asyncio.run(replica._apply(desired))
        assert replica._held_versions() == ["v1"]
    assert replicas[-1].active == "v1"


def test_every_swap_is_counted_by_outcome(
    versions: dict[str, Version], tmp_path: Path, recorder: Any, recorded: ServingMetrics
) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    swap_with(book, replica_set(), versions["v2"].ref(), metrics=recorded)
    v3 = build_version(tmp_path, "v3", 3)
    with pytest.raises(SwapFailedError):
        swap_with(book, replica_set(b={"v3": "shard-000.faiss: sha256 mismatch"}), v3.ref(), metrics=recorded)
    book.begin(v3.ref())  # another runner's swap is in progress: this one is refused
    with pytest.raises(SwapInProgressError):
        asyncio.run(
            run_swap(
                state=BookState(book),
                target=versions["v1"].ref(),
                expected_replicas=lambda: asyncio.sleep(0, {}),
                activate=lambda ref: None,
                timeout_s=1.0,
                metrics=recorded,
            )
        )
    outcomes = ("completed", "failed", "refused")
    assert [recorder.count("retrieval_swaps", outcome=outcome) for outcome in outcomes] == [1, 1, 1]
    for outcome in outcomes:
        (seconds,) = recorder.observed("retrieval_swap_seconds", outcome=outcome)
        assert seconds >= 0


def test_swap_times_out_when_a_replica_never_reports(versions: dict[str, Version]) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    # Serve runs 2 Shard0 replicas but only one reports: the swap must not flip without the other.
    replicas = [FakeReplica("s0-a", "Shard0"), FakeReplica("in-a", "SearchIngress", router=True)]
    activated: list[str] = []

    async def scenario() -> None:
        poller = asyncio.create_task(poll_forever(book, replicas))
        try:

            async def expected() -> dict[str, int]:
                return {"Shard0": 2, "SearchIngress": 1}

            await run_swap(
                state=BookState(book),
                target=versions["v2"].ref(),
                expected_replicas=expected,
                activate=lambda ref: activated.append(ref.index_version),
                timeout_s=0.05,
                metrics=ServingMetrics(),
                poll_s=0.001,
            )
        finally:
            poller.cancel()

    with pytest.raises(SwapFailedError, match=r"not loaded on every replica within 0 s \(ready: Shard0 1/2\)"):
        asyncio.run(scenario())
    assert activated == [] and book.desired().active.index_version == "v1"


def test_one_swap_at_a_time(versions: dict[str, Version], tmp_path: Path) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    book.begin(versions["v2"].ref())
    v3 = build_version(tmp_path, "v3", 3)
    with pytest.raises(SwapInProgressError, match="a swap is already in progress \\(to index v2\\)"):
        book.begin(v3.ref())
    book.abort()
    with pytest.raises(SwapFailedError, match="index v1 is already the active version"):
        book.begin(versions["v1"].ref())


def test_stale_error_from_an_earlier_attempt_does_not_abort_a_retry(versions: dict[str, Version]) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    replicas = replica_set()
    # Left from an earlier failed attempt, reported before this swap began.
    book.report(ReplicaReport(replica="s0-a", deployment="Shard0", holds=("v1",), errors={"v2": "old"}, epoch=0))
    summary = swap_with(book, replicas, versions["v2"].ref())
    assert summary["to"] == "v2"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_swap_whose_runner_goes_silent_before_the_flip_is_rolled_back(versions: dict[str, Version]) -> None:
    """Issue 16, item 7: the replica running the swap died; the next report settles it."""
    clock = Clock()
    book = SwapBook(initial=versions["v1"].ref(), lease_s=10.0, clock=clock)
    book.begin(versions["v2"].ref(), "ingress-a")
    clock.now = 9.0
    report = ReplicaReport(replica="s0-a", deployment="Shard0", holds=("v1", "v2"))
    assert book.report(report).prepared is not None  # within the lease: nothing happens
    clock.now = 20.0
    desired = book.report(report)
    assert (desired.active.index_version, desired.prepared, desired.retiring) == ("v1", None, None)
    assert book.last_outcome is not None and book.last_outcome["outcome"] == "rolled back"
    assert "ingress-a" in book.last_outcome["reason"] and "had not flipped" in book.last_outcome["reason"]
    book.begin(versions["v2"].ref(), "ingress-b")  # the next swap is not refused


def test_a_swap_whose_runner_goes_silent_after_the_flip_is_completed(versions: dict[str, Version]) -> None:
    clock = Clock()
    book = SwapBook(initial=versions["v1"].ref(), lease_s=10.0, clock=clock)
    book.begin(versions["v2"].ref(), "ingress-a")
    book.flip()
    clock.now = 5.0
    book.heartbeat("ingress-a")
    clock.now = 14.0  # 9 s after the last heartbeat: still leased
    assert book.report(ReplicaReport(replica="in-a", deployment="SearchIngress", holds=("v1", "v2"))).retiring
    clock.now = 16.0
    desired = book.report(ReplicaReport(replica="in-a", deployment="SearchIngress", holds=("v1", "v2")))
    assert (desired.active.index_version, desired.prepared, desired.retiring) == ("v2", None, None)
    assert book.status()["last_outcome"]["outcome"] == "completed"
    # Another owner's heartbeat never renews a lease that is not its own.
    book.begin(versions["v1"].ref(), "ingress-b")
    clock.now = 30.0
    book.heartbeat("ingress-a")
    assert book.report(ReplicaReport(replica="in-a", deployment="SearchIngress", holds=("v2",))).prepared is None


def test_an_operator_abort_cancels_before_the_flip_and_rolls_back_after(versions: dict[str, Version]) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    with pytest.raises(SwapFailedError, match=r"no swap is in progress \(index v1 is active\)"):
        book.roll_back("by hand")
    book.begin(versions["v2"].ref(), "ingress-a")
    desired = book.roll_back("by hand")
    assert (desired.active.index_version, desired.prepared) == ("v1", None)
    book.begin(versions["v2"].ref(), "ingress-a")
    book.flip()
    desired = book.roll_back("by hand")
    # v1 was still held everywhere (retiring): it is active again in one step, and v2 is freed.
    assert (desired.active.index_version, desired.prepared, desired.retiring) == ("v1", None, None)
    assert book.last_outcome == {"to": "v2", "outcome": "rolled back", "reason": "by hand; v1 is active again"}


def test_the_runner_fails_when_an_operator_aborts_its_swap(versions: dict[str, Version]) -> None:
    book = SwapBook(initial=versions["v1"].ref())
    # Shard0 never loads v2 in time: the runner waits, and the operator aborts meanwhile.
    replicas = [FakeReplica("in-a", "SearchIngress", router=True)]

    async def scenario() -> None:
        poller = asyncio.create_task(poll_forever(book, replicas))

        async def expected() -> dict[str, int]:
            return {"Shard0": 1, "SearchIngress": 1}

        async def abort_soon() -> None:
            while book.desired().prepared is None:
                await asyncio.sleep(0.001)
            book.roll_back("aborted by an operator")

        aborting = asyncio.create_task(abort_soon())
        try:
            await run_swap(
                state=BookState(book),
                target=versions["v2"].ref(),
                expected_replicas=expected,
                activate=lambda ref: None,
                timeout_s=5.0,
                metrics=ServingMetrics(),
                poll_s=0.001,
            )
        finally:
            await aborting
            poller.cancel()

    with pytest.raises(SwapFailedError, match="was aborted before its flip; index v1 keeps serving"):
        asyncio.run(scenario())
    assert book.desired().active.index_version == "v1" and not book.in_progress


# --------------------------------------------------------------------------- references


def test_resolve_index_reference(versions: dict[str, Version], tmp_path: Path) -> None:
    served = str(versions["v1"].path)
    assert resolve_index_reference("v2", served_manifest=served) == str(tmp_path / "v2" / "manifest.json")
    assert resolve_index_reference(str(tmp_path / "v2"), served_manifest=served) == str(versions["v2"].path)
    assert resolve_index_reference(str(tmp_path), served_manifest=served) == str(versions["v2"].path)  # CURRENT
    assert (
        resolve_index_reference("s3://b/idx/v7/manifest.json", served_manifest="s3://b/idx/v1/manifest.json")
        == "s3://b/idx/v7/manifest.json"
    )
    assert resolve_index_reference("v7", served_manifest="s3://b/idx/v1/manifest.json") == "s3://b/idx/v7/manifest.json"
    with pytest.raises(BadIndexReferenceError, match="names no index"):
        resolve_index_reference(" ", served_manifest=served)
    with pytest.raises(BadIndexReferenceError, match="is neither an index version"):
        resolve_index_reference("/no/such/dir", served_manifest=served)


def test_model_target_picks_the_newest_index_of_that_model_version(tmp_path: Path) -> None:
    build_version(tmp_path, "a-old", 1, model_version="3")
    build_version(tmp_path, "b-two", 2, model_version="4")
    build_version(tmp_path, "c-new", 3, model_version="3")
    assert resolve_swap_target("model:3", index_root=str(tmp_path)) == "c-new"
    assert resolve_swap_target("b-two", index_root=None) == "b-two"
    with pytest.raises(Exception, match=r"no index version under .* was built by model version 9 .*3, 4"):
        resolve_swap_target("model:9", index_root=str(tmp_path))
    with pytest.raises(Exception, match="needs --index-root"):
        resolve_swap_target("model:3", index_root=None)


def test_cli_keeps_serve_config_and_adds_serve_swap() -> None:
    parser = _parser()
    run = parser.parse_args(_default_subcommand(["-v", "serve", "serve/digits.yaml", "--address", "auto"]))
    assert (run.handler.__name__, run.config, run.address) == ("_serve", "serve/digits.yaml", "auto")
    swap = parser.parse_args(_default_subcommand(["serve", "swap", "--to", "model:2", "--index-root", "idx"]))
    assert (swap.handler.__name__, swap.to, swap.index_root, swap.url) == (
        "_serve_swap",
        "model:2",
        "idx",
        "http://127.0.0.1:8000",
    )


# --------------------------------------------------------------------------- the admin HTTP API


class FakeAdmin:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[str] = []

    async def abort(self) -> dict[str, Any]:
        self.calls.append("abort")
        return {"active": "v1", "prepared": None, "retiring": None, "replicas": {}}

    async def swap(self, index: str) -> dict[str, Any]:
        self.calls.append(index)
        if self.error is not None:
            raise self.error
        return {"from": "v1", "to": index, "model": {}, "duration_s": 0.1, "replicas": {}}

    async def status(self) -> dict[str, Any]:
        return {"active": "v1", "prepared": None, "replicas": {}}


def asgi_call(app: Any, method: str, path: str, *, headers: dict[str, str], body: bytes = b"") -> tuple[int, Any]:
    """One HTTP request through an ASGI app: (status, JSON body)."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(message["status"] for message in messages if message["type"] == "http.response.start")
    content = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    return status, json.loads(content)


@pytest.fixture
def admin_api(versions: dict[str, Version]) -> Iterator[tuple[Any, FakeAdmin]]:
    spec = ServingSpec(index=str(versions["v1"].path), admin_token_env="TEST_SWAP_ADMIN_TOKEN")
    service = SearchService(
        manifest=versions["v1"].manifest, spec=spec, shards=[GatedShard(None)] * 2, embedder=NoEmbedder()
    )
    admin = FakeAdmin()
    yield build_http_api(service, admin=admin), admin


def swap_call(app: Any, headers: dict[str, str], body: dict[str, Any] | None = None) -> tuple[int, Any]:
    payload = json.dumps(body if body is not None else {"index": "v2"}).encode()
    return asgi_call(app, "POST", "/admin/swap", headers={"content-type": "application/json", **headers}, body=payload)


def test_admin_disabled_without_a_configured_token(
    admin_api: tuple[Any, FakeAdmin], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, admin = admin_api
    monkeypatch.delenv("TEST_SWAP_ADMIN_TOKEN", raising=False)
    status, body = swap_call(app, {"authorization": f"Bearer {TOKEN}"})
    assert status == 403
    assert body["error"]["type"] == "forbidden"
    assert body["error"]["message"].startswith("admin endpoints are disabled")
    assert admin.calls == []


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "admin endpoints need an 'Authorization: Bearer <token>' header"),
        ({"authorization": "Bearer wrong-token"}, "the admin token is not valid"),
        ({"authorization": f"Basic {TOKEN}"}, "admin endpoints need an 'Authorization: Bearer <token>' header"),
    ],
)
def test_admin_refuses_a_missing_or_wrong_token(
    admin_api: tuple[Any, FakeAdmin], monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], message: str
) -> None:
    app, admin = admin_api
    monkeypatch.setenv("TEST_SWAP_ADMIN_TOKEN", TOKEN)
    for status, body in (
        swap_call(app, headers),
        asgi_call(app, "GET", "/admin/status", headers=headers),
    ):
        assert (status, body) == (401, {"error": {"type": "unauthorized", "message": message}})
    assert admin.calls == []


def test_admin_swap_and_status_with_the_token(
    admin_api: tuple[Any, FakeAdmin], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, admin = admin_api
    monkeypatch.setenv("TEST_SWAP_ADMIN_TOKEN", TOKEN)
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert swap_call(app, auth) == (
        200,
        {"from": "v1", "to": "v2", "model": {}, "duration_s": 0.1, "replicas": {}},
    )
    assert asgi_call(app, "GET", "/admin/status", headers=auth) == (
        200,
        {"active": "v1", "prepared": None, "replicas": {}},
    )
    status, body = swap_call(app, auth, {"version": "v2"})
    assert status == 422 and body["error"]["type"] == "validation_error"
    assert "body.index: Field required" in body["error"]["message"]
    assert admin.calls == ["v2"]


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (SwapInProgressError("a swap is already in progress (to index v3)"), 409, "swap_in_progress"),
        (SwapFailedError("index v2 failed to load, index v1 keeps serving: ..."), 409, "swap_failed"),
        (BadIndexReferenceError("cannot swap to 'v9': ... does not exist"), 422, "bad_index_reference"),
    ],
)
def test_admin_swap_errors_keep_the_stable_shape(
    admin_api: tuple[Any, FakeAdmin], monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, error_type: str
) -> None:
    app, admin = admin_api
    admin.error = error
    monkeypatch.setenv("TEST_SWAP_ADMIN_TOKEN", TOKEN)
    assert swap_call(app, {"authorization": f"Bearer {TOKEN}"}) == (
        status,
        {"error": {"type": error_type, "message": str(error)}},
    )


# --------------------------------------------------------------------------- the Python client


class RefusingHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        request = json.loads(self.rfile.read(length))
        reply: dict[str, Any]
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            status, reply = 401, {"error": {"type": "unauthorized", "message": "the admin token is not valid"}}
        elif request["index"] == "v2":
            status, reply = 200, {"from": "v1", "to": "v2", "model": {}, "duration_s": 1.5, "replicas": {}}
        else:
            status, reply = 409, {"error": {"type": "swap_failed", "message": "shard-000.faiss: sha256 mismatch"}}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=5)


def test_request_swap_returns_the_summary_or_raises_the_servers_reason(refusing_server: str) -> None:
    assert request_swap(refusing_server, index="v2", token=TOKEN)["duration_s"] == 1.5
    with pytest.raises(SwapRequestError) as raised:
        request_swap(refusing_server, index="v4", token=TOKEN)
    assert (raised.value.status, raised.value.error_type) == (409, "swap_failed")
    assert str(raised.value).endswith("(HTTP 409, swap_failed): shard-000.faiss: sha256 mismatch")
    with pytest.raises(SwapRequestError, match=r"HTTP 401, unauthorized\): the admin token is not valid"):
        request_swap(refusing_server, index="v2", token="nope")
    with pytest.raises(SwapRequestError, match="cannot reach"):
        request_swap("http://127.0.0.1:9", index="v2", token=TOKEN, timeout_s=2)


def test_abort_route_needs_the_admin_token(admin_api: tuple[Any, FakeAdmin], monkeypatch: pytest.MonkeyPatch) -> None:
    app, admin = admin_api
    monkeypatch.setenv("TEST_SWAP_ADMIN_TOKEN", TOKEN)
    status, body = asgi_call(app, "POST", "/admin/swap/abort", headers={})
    assert status == 401 and body["error"]["type"] == "unauthorized" and admin.calls == []
    status, body = asgi_call(app, "POST", "/admin/swap/abort", headers={"authorization": f"Bearer {TOKEN}"})
    assert (status, body["active"], admin.calls) == (200, "v1", ["abort"])


def test_request_swap_never_follows_a_redirect_with_its_token() -> None:
    """Issue 16 (low): urllib would send the Authorization header on to wherever a redirect points."""
    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            return None

    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in (elsewhere, redirecting)]
    for thread in threads:
        thread.start()
    try:
        with pytest.raises(SwapRequestError, match=r"HTTP 302 redirecting to .*/steal; not following it") as raised:
            request_swap(f"http://127.0.0.1:{redirecting.server_address[1]}", index="v2", token=TOKEN, timeout_s=10)
        assert raised.value.status == 302
    finally:
        for server in (elsewhere, redirecting):
            server.shutdown()
    assert seen == []


def test_serve_status_prints_what_the_app_serves(
    versions: dict[str, Version], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`retrieval serve status` reads GET /admin/status (admin token) and prints it for a person or as JSON."""
    from retrieval.cli import main

    book = SwapBook(initial=versions["v1"].ref())
    swap_with(book, replica_set(), versions["v2"].ref())
    status = book.status()

    class StatusHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/admin/status" and self.headers.get("authorization") == f"Bearer {TOKEN}"
            reply = status if ok else {"error": {"type": "unauthorized", "message": "the admin token is not valid"}}
            data = json.dumps(reply).encode()
            self.send_response(200 if ok else 401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("RETRIEVAL_ADMIN_TOKEN", TOKEN)
        assert main(["serve", "status", "--url", url]) == 0
        out = capsys.readouterr().out
        assert f"{url}: index v2, model m version 1" in out
        assert "swap in progress" not in out and "3 replicas:" in out
        assert "SearchIngress    in-a         holds v2, answers with v2, 0 in flight" in out
        assert "Shard0           s0-a         holds v2" in out
        assert main(["serve", "status", "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(status))
        monkeypatch.setenv("RETRIEVAL_ADMIN_TOKEN", "not-the-admin-token")
        assert main(["serve", "status", "--url", url]) == 2
        assert "status refused by" in capsys.readouterr().err
    finally:
        server.shutdown()
