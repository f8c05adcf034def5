"""The search service's fan-out: batching, per-request parameters, deadlines, dead shards, readiness, metrics.

Shards are the real `ShardDeployment` classes over a small IVF index built with `build_shards`,
called in-process through a stub client that counts calls and can be slowed down or killed
(raising `ShardUnavailableError`, what the Serve handle client raises for a dead replica). With
``nprobe`` equal to the number of lists an IVF search visits every vector, so those answers
are checked against a brute-force sort; every other setting is checked batched against
unbatched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.index.manifest import IndexManifest, ModelRef, read_manifest
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import build_shards
from retrieval.serving import shard_pool as shard_pool_module
from retrieval.serving.clients import LocalShardClient
from retrieval.serving.deployments import ShardDeployment
from retrieval.serving.embedder_host import EmbedCall, EmbedderHost
from retrieval.serving.errors import (
    ItemNotFoundError,
    PayloadTooLargeError,
    ShardTimeoutError,
    ShardUnavailableError,
    VersionNotLoadedError,
)
from retrieval.serving.metrics import ServingMetrics
from retrieval.serving.replies import ShardCall, ShardHits
from retrieval.serving.service import SearchService
from retrieval.serving.shard_host import ShardHost

COUNT = 240
DIM = 16
FIRST_ID = 500
LISTS = 4
DEFAULT_NPROBE = 1
MODEL = ModelRef(name="stub", version="1", uri="models:/stub/1")

T = TypeVar("T")


def png(item_id: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), item_id % 256, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Index:
    path: Path
    vectors: np.ndarray
    ids: np.ndarray
    manifest: IndexManifest


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((COUNT, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(FIRST_ID, FIRST_ID + COUNT)
    path = build_shards(
        vectors=vectors,
        ids=ids,
        items=[{"label": str(item_id % 7)} for item_id in ids.tolist()],
        out_root=tmp_path_factory.mktemp("ivf"),
        num_shards=2,
        factory=f"IVF{LISTS},Flat",
        model=MODEL,
        gallery={"dataset": "random"},
        search_defaults={"nprobe": DEFAULT_NPROBE},
        thumbnails=[png(item_id) for item_id in ids.tolist()],
    )
    manifest, _ = read_manifest(path)
    return Index(path=path, vectors=vectors, ids=ids, manifest=manifest)


@dataclass
class Backend:
    """Where the shards live: Serve shard replicas (distributed layout) or the ingress's own `ShardHost` (local)."""

    layout: str
    replicas: list[Any]
    host: ShardHost | None = None
    executor: concurrent.futures.Executor | None = None

    def client(self, shard: int) -> Any:
        if self.host is None:
            return self.replicas[shard]
        assert self.executor is not None
        return LocalShardClient(self.host, shard, self.executor)


@pytest.fixture(scope="module")
def shard_replicas(index: Index) -> list[Any]:
    spec = ServingSpec(index=str(index.path))
    replica_class: Any = ShardDeployment.func_or_class  # type: ignore[attr-defined]
    return [replica_class(spec=spec, shard=info.shard) for info in index.manifest.shards]


@pytest.fixture(scope="module")
def local_host(index: Index) -> Iterator[tuple[ShardHost, concurrent.futures.Executor]]:
    host = ShardHost(spec=ServingSpec(index=str(index.path)))
    host.prepare(str(index.path))
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as executor:
        yield host, executor


@pytest.fixture(params=["distributed", "local"])
def replicas(
    request: pytest.FixtureRequest,
    shard_replicas: list[Any],
    local_host: tuple[ShardHost, concurrent.futures.Executor],
) -> Backend:
    """The shards in both layouts; a test about dead replicas takes ``distributed`` only (indirect param)."""
    if request.param == "local":
        host, executor = local_host
        return Backend(layout="local", replicas=shard_replicas, host=host, executor=executor)
    return Backend(layout="distributed", replicas=shard_replicas)


distributed_only = pytest.mark.parametrize("replicas", ["distributed"], indirect=True)


def dead() -> ShardUnavailableError:
    return ShardUnavailableError("ActorDiedError: The actor died unexpectedly before finishing this task.")


class ShardStub:
    """`ShardClient` over a shard replica or a local shard client: counts calls, can hang (``gate``) or be dead.

    ``remote`` follows the backend: a stub over a Serve replica stands for a shard deployment,
    one over a `LocalShardClient` for a shard held in the ingress (which cannot die alone, so
    only distributed tests set ``dead_calls``).
    """

    def __init__(self, inner: Any, *, remote: bool) -> None:
        self.inner = inner
        self.remote = remote
        self.calls = 0
        self.queries = 0
        self.dead_calls = 0  # the next this many calls fail as if the replica died
        self.gate: asyncio.Event | None = None  # searches wait here while it is unset
        self.versions: list[str] | None = None  # what `loaded_versions` claims (None: the truth)

    def _check_alive(self) -> None:
        if self.dead_calls:
            self.dead_calls -= 1
            raise dead()

    async def _answer(self, name: str, *args: Any) -> Any:
        result = getattr(self.inner, name)(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        self.calls += 1
        self.queries += len(queries)
        self._check_alive()
        if self.gate is not None:
            await self.gate.wait()
        reply: ShardHits = await self._answer("search", queries, k, index_version, params)
        return reply

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        self._check_alive()
        result: np.ndarray | None = await self._answer("vector", item_id, index_version)
        return result

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        self._check_alive()
        result: dict[str, Any] | None = await self._answer("item", item_id, index_version)
        return result

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        self._check_alive()
        result: bytes | None = await self._answer("thumbnail", item_id, index_version)
        return result

    async def loaded_versions(self) -> list[str]:
        self._check_alive()
        if self.gate is not None:
            await self.gate.wait()
        if self.versions is not None:
            return list(self.versions)
        return list(await self._answer("loaded_versions"))


class EmbedderStub:
    """`EmbedderClient`: an image's first pixel value picks a gallery vector; can hang or be dead."""

    remote = True

    def __init__(self, index: Index) -> None:
        self.index = index
        self.dead_calls = 0
        self.gate: asyncio.Event | None = None

    async def _checked(self) -> None:
        if self.dead_calls:
            self.dead_calls -= 1
            raise dead()
        if self.gate is not None:
            await self.gate.wait()

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        await self._checked()
        pixel = Image.open(io.BytesIO(image_bytes)).getpixel((0, 0))
        return self.index.vectors[int(pixel)]  # type: ignore[arg-type]

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        await self._checked()
        return self.index.vectors[len(text)]

    async def loaded_versions(self) -> list[str]:
        await self._checked()
        return [self.index.manifest.index_version]


class JsonService:
    """The service with its replies as the JSON the API sends (`to_json`), for assertions on plain dicts."""

    def __init__(self, service: SearchService) -> None:
        self.typed = service

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.typed, name)
        if name not in ("search_vector", "search_vectors", "search_image", "search_text", "search_id", "item",
                        "readiness"):  # fmt: skip
            return attribute

        async def as_json(*args: Any, **kwargs: Any) -> Any:
            return (await attribute(*args, **kwargs)).to_json()

        return as_json


@dataclass
class Served:
    service: Any  # JsonService
    shards: list[ShardStub]
    embedder: EmbedderStub


def serve(index: Index, replicas: Backend, metrics: ServingMetrics | None = None, **spec_fields: Any) -> Served:
    spec = ServingSpec(index=str(index.path), max_k=50, default_k=5, max_query_vectors=4, **spec_fields)
    shards = [
        ShardStub(replicas.client(info.shard), remote=replicas.layout == "distributed")
        for info in index.manifest.shards
    ]
    embedder = EmbedderStub(index)
    service = SearchService(manifest=index.manifest, spec=spec, shards=shards, embedder=embedder, metrics=metrics)
    return Served(service=JsonService(service), shards=shards, embedder=embedder)


def brute_force(index: Index, query: np.ndarray, k: int, *, exclude: int | None = None) -> list[int]:
    """The top-k ids over every vector, by a plain sort of float64 inner products."""
    scores = index.vectors.astype(np.float64) @ query.astype(np.float64)
    ranked = sorted(zip(scores.tolist(), index.ids.tolist(), strict=True), key=lambda pair: (-pair[0], pair[1]))
    return [item_id for _, item_id in ranked if item_id != exclude][:k]


def ids_of(reply: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in reply["results"]]


def run(coroutine: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coroutine())  # type: ignore[arg-type]


def scraped(service: Any) -> str:
    """The service's metrics as ``GET /metrics`` serves them without Ray (its own prometheus-client registry)."""
    text = service.metrics.exposition()
    assert text is not None
    return str(text.decode())


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in ``text`` (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if found == labels:
            return float(match.group(2))
    return 0.0


def test_batched_equals_unbatched_equals_brute_force_for_mixed_k_and_params(index: Index, replicas: Backend) -> None:
    queries = np.random.default_rng(1).standard_normal((12, DIM)).astype(np.float32)
    exact = SearchParams(nprobe=LISTS)
    cases: list[tuple[str, Any, int, SearchParams | None]] = [
        ("vector", queries[number], (1, 5, 10)[number % 3], (None, exact, SearchParams(nprobe=2))[number % 3 - 1])
        for number in range(12)
    ]
    cases += [("id", FIRST_ID + 7 * number, (3, 8)[number % 2], (exact, None)[number % 2]) for number in range(6)]

    async def answers(served: Served) -> list[dict[str, Any]]:
        async def one(kind: str, query: Any, k: int, params: SearchParams | None) -> dict[str, Any]:
            if kind == "vector":
                return await served.service.search_vector(query.tolist(), k, params)
            return await served.service.search_id(query, k, params)

        return list(await asyncio.gather(*(one(*case) for case in cases)))

    batched = serve(index, replicas, batching=True, max_batch_size=64, batch_wait_timeout_s=0.01)
    unbatched = serve(index, replicas, batching=False)
    batched_replies = run(lambda: answers(batched))
    unbatched_replies = run(lambda: answers(unbatched))

    for (kind, query, k, params), with_batching, alone in zip(cases, batched_replies, unbatched_replies, strict=True):
        assert ids_of(with_batching) == ids_of(alone), (kind, k, params)
        np.testing.assert_allclose(
            [hit["score"] for hit in with_batching["results"]], [hit["score"] for hit in alone["results"]], rtol=1e-6
        )
        assert len(with_batching["results"]) == k and with_batching["k"] == k
        used = (params or SearchParams()).with_defaults({"nprobe": DEFAULT_NPROBE}).as_dict()
        assert with_batching["params"] == alone["params"] == used
        assert (with_batching["partial"], with_batching["missing_shards"]) == (False, [])
        if params == exact:
            vector = query if kind == "vector" else index.vectors[query - FIRST_ID]
            assert ids_of(with_batching) == brute_force(index, vector, k, exclude=query if kind == "id" else None)
        assert all(hit["label"] == str(hit["id"] % 7) for hit in with_batching["results"])
    # Unbatched: one call per request and shard; batched: the vector queries of one setting share calls.
    assert [stub.calls for stub in unbatched.shards] == [len(cases)] * 2
    assert all(stub.calls < len(cases) for stub in batched.shards)


def test_concurrent_searches_share_shard_calls_and_the_batch_sizes_are_recorded(
    index: Index, replicas: Backend
) -> None:
    served = serve(index, replicas, batching=True, max_batch_size=8, batch_wait_timeout_s=0.0)
    queries = np.random.default_rng(2).standard_normal((20, DIM)).astype(np.float32)
    exact = SearchParams(nprobe=LISTS)

    async def main() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(served.service.search_vector(row.tolist(), 4, exact) for row in queries)))

    replies = run(main)
    for row, reply in zip(queries, replies, strict=True):
        assert ids_of(reply) == brute_force(index, row, 4)
    # All 20 arrive in one event-loop turn: batches of 8, 8 and 4 queries, one call each per shard.
    assert [stub.calls for stub in served.shards] == [3, 3]
    assert [stub.queries for stub in served.shards] == [20, 20]
    text = scraped(served.service)
    assert metric_value(text, "retrieval_batch_size_count", stage="router") == 3
    assert metric_value(text, "retrieval_batch_size_sum", stage="router") == 20
    assert metric_value(text, "retrieval_shard_requests_total", shard="0", outcome="ok") == 3
    # Replies are counted per request, not per fan-out: 20 requests in 3 batches.
    assert metric_value(text, "retrieval_search_replies_total", answer="complete") == 20
    assert metric_value(text, "retrieval_index_info", index_version=index.manifest.index_version, model="stub/1") == 1


def test_search_vectors_answers_each_vector_like_a_single_search(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas)
    queries = np.random.default_rng(3).standard_normal((3, DIM)).astype(np.float32)
    exact = SearchParams(nprobe=LISTS)

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        many = await served.service.search_vectors([row.tolist() for row in queries], 6, exact)
        singles = [await served.service.search_vector(row.tolist(), 6, exact) for row in queries]
        return many, singles

    many, singles = run(main)
    assert (many["k"], many["partial"], many["missing_shards"], many["params"]) == (6, False, [], {"nprobe": LISTS})
    assert many["index_version"] == index.manifest.index_version
    assert many["results"] == [single["results"] for single in singles]
    assert [[hit["id"] for hit in hits] for hits in many["results"]] == [brute_force(index, row, 6) for row in queries]


def test_search_vectors_limits_and_checks_each_vector(index: Index, replicas: Backend) -> None:
    service = serve(index, replicas).service
    good = [0.1] * DIM
    with pytest.raises(PayloadTooLargeError, match="5 query vectors in one request, the limit is 4"):
        run(lambda: service.search_vectors([good] * 5, 3))
    with pytest.raises(BadRequestError, match="vectors is empty"):
        run(lambda: service.search_vectors([], 3))
    with pytest.raises(BadRequestError, match=r"vectors\[1\]: vector has 3 dimensions, the index expects 16"):
        run(lambda: service.search_vectors([good, [0.1] * 3], 3))


def test_a_setting_the_index_lacks_is_a_bad_request_not_a_missing_shard(index: Index, replicas: Backend) -> None:
    service = serve(index, replicas, on_shard_timeout="partial").service
    with pytest.raises(BadRequestError, match="ef_search applies to HNSW indices"):
        run(lambda: service.search_vector([0.1] * DIM, 3, SearchParams(ef_search=16)))


def test_a_shard_past_the_deadline_gives_a_partial_reply(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, shard_timeout_s=0.05, on_shard_timeout="partial")
    query = np.random.default_rng(4).standard_normal(DIM).astype(np.float32)

    async def main() -> dict[str, Any]:
        served.shards[1].gate = asyncio.Event()  # never set: shard 1 does not answer
        return await served.service.search_vector(query.tolist(), 5, SearchParams(nprobe=LISTS))

    reply = run(main)
    assert (reply["partial"], reply["missing_shards"]) == (True, [1])
    first_half = Index(
        path=index.path, vectors=index.vectors[: COUNT // 2], ids=index.ids[: COUNT // 2], manifest=index.manifest
    )
    assert ids_of(reply) == brute_force(first_half, query, 5)
    text = scraped(served.service)
    assert metric_value(text, "retrieval_search_replies_total", answer="partial") == 1
    assert metric_value(text, "retrieval_search_replies_total", answer="complete") == 0
    assert metric_value(text, "retrieval_shard_requests_total", shard="1", outcome="timeout") == 1
    assert metric_value(text, "retrieval_shard_requests_total", shard="0", outcome="ok") == 1


def test_a_partial_batched_fan_out_counts_one_partial_reply_per_request(
    index: Index, replicas: Backend, recorder: Any, recorded: ServingMetrics
) -> None:
    served = serve(
        index,
        replicas,
        metrics=recorded,
        batching=True,
        max_batch_size=8,
        batch_wait_timeout_s=0.0,
        shard_timeout_s=0.05,
        on_shard_timeout="partial",
    )
    queries = np.random.default_rng(5).standard_normal((5, DIM)).astype(np.float32)

    async def main() -> list[dict[str, Any]]:
        served.shards[1].gate = asyncio.Event()  # never set: shard 1 misses the deadline
        return list(await asyncio.gather(*(served.service.search_vector(row.tolist(), 3) for row in queries)))

    replies = run(main)
    assert all(reply["missing_shards"] == [1] for reply in replies)
    # One fan-out (one batch of 5) missed shard 1 once, and answered 5 requests partially.
    assert recorder.observed("retrieval_batch_size", stage="router") == [5]
    assert recorder.count("retrieval_shard_requests", shard="1", outcome="timeout") == 1
    assert recorder.count("retrieval_search_replies", answer="partial") == 5
    assert recorder.count("retrieval_search_replies", answer="complete") == 0


def test_a_shard_past_the_deadline_is_a_504_in_error_mode_and_every_shard_late_always_is(
    index: Index, replicas: Backend
) -> None:
    served = serve(index, replicas, shard_timeout_s=0.05, on_shard_timeout="error")

    async def one_late() -> dict[str, Any]:
        served.shards[1].gate = asyncio.Event()
        return await served.service.search_vector([0.1] * DIM, 3)

    with pytest.raises(ShardTimeoutError, match=r"shard 1 did not answer within 0\.05 s"):
        run(one_late)

    partial = serve(index, replicas, shard_timeout_s=0.05, on_shard_timeout="partial")

    async def all_late() -> dict[str, Any]:
        for stub in partial.shards:
            stub.gate = asyncio.Event()
        return await partial.service.search_vector([0.1] * DIM, 3)

    with pytest.raises(ShardTimeoutError, match=r"shards 0, 1 did not answer within 0\.05 s"):
        run(all_late)


@distributed_only
def test_a_dead_replica_is_retried_once_and_the_reply_is_complete(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, batching=False)
    served.shards[0].dead_calls = 1  # the first call hits the dead replica, the retry a live one
    reply = run(lambda: served.service.search_vector([0.1] * DIM, 4))
    assert (reply["partial"], reply["missing_shards"], len(reply["results"])) == (False, [], 4)
    assert [stub.calls for stub in served.shards] == [2, 1]


@distributed_only
def test_a_dead_shard_is_missing_fails_fast_while_down_and_comes_back(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, batching=False, on_shard_timeout="partial")
    query = [0.1] * DIM

    async def main() -> None:
        served.shards[1].dead_calls = 10**6
        reply = await served.service.search_vector(query, 4)
        assert (reply["partial"], reply["missing_shards"]) == (True, [1])
        assert served.shards[1].calls == 2  # the call and its one retry
        # Down: the next request does not wait for shard 1 and does not call it.
        again = await served.service.search_vector(query, 4)
        assert again["missing_shards"] == [1] and served.shards[1].calls == 2
        readiness = await served.service.readiness()
        assert readiness["ready"] is False
        # The kind of failure only: /readyz is open, and a remote error's text may carry addresses.
        assert readiness["shards"][1]["error"] == "no live replica"
        # Serve replaced the replica: the background probe sees it answer, and shard 1 is back.
        served.shards[1].dead_calls = 0
        deadline = time.monotonic() + 10
        while not (await served.service.readiness())["ready"]:
            assert time.monotonic() < deadline, "shard 1 was not probed back within 10 s"
            await asyncio.sleep(0.05)
        complete = await served.service.search_vector(query, 4)
        assert (complete["partial"], complete["missing_shards"]) == (False, [])

    run(main)
    text = scraped(served.service)
    assert metric_value(text, "retrieval_shard_requests_total", shard="1", outcome="unavailable") == 2
    assert metric_value(text, "retrieval_search_replies_total", answer="partial") == 2
    assert metric_value(text, "retrieval_search_replies_total", answer="complete") == 1


@distributed_only
def test_a_dead_shard_is_a_503_naming_it_in_error_mode_and_all_dead_always_is(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, on_shard_timeout="error")
    served.shards[0].dead_calls = 10**6
    with pytest.raises(ShardUnavailableError, match=r"shard 0 has no live replica \(ActorDiedError"):
        run(lambda: served.service.search_vector([0.1] * DIM, 4))

    partial = serve(index, replicas, on_shard_timeout="partial")
    for stub in partial.shards:
        stub.dead_calls = 10**6
    with pytest.raises(ShardUnavailableError, match=r"shard 0 has no live replica.*shard 1 has no live replica"):
        run(lambda: partial.service.search_vector([0.1] * DIM, 4))


@distributed_only
def test_id_lookups_and_the_embedder_are_bounded_by_the_deadline_too(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, shard_timeout_s=0.05)
    served.shards[1].dead_calls = 2
    with pytest.raises(ShardUnavailableError, match="shard 1 has no live replica"):
        run(lambda: served.service.search_id(FIRST_ID + COUNT - 1, 3))
    served.embedder.dead_calls = 2
    with pytest.raises(ShardUnavailableError, match=r"the embedder has no live replica \(ActorDiedError"):
        run(lambda: served.service.search_text("seven", 3))

    async def slow_embedder() -> dict[str, Any]:
        served.embedder.gate = asyncio.Event()
        return await served.service.search_image(png(3), 3)

    with pytest.raises(ShardTimeoutError, match=r"the embedder did not answer within 0\.05 s"):
        run(slow_embedder)
    # One dead call is retried: the embedder answers and the image's vector (gallery row 3) is found first.
    served.embedder.gate = None
    served.embedder.dead_calls = 1
    reply = run(lambda: served.service.search_image(png(3), 3, SearchParams(nprobe=LISTS)))
    assert ids_of(reply)[0] == FIRST_ID + 3


def test_readiness_says_which_shard_lacks_the_version_or_does_not_answer(
    index: Index, replicas: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_pool_module, "READINESS_TIMEOUT_S", 0.05)
    version = index.manifest.index_version
    served = serve(index, replicas)
    ready = run(served.service.readiness)
    assert ready == {
        "ready": True,
        "index_version": version,
        "layout": replicas.layout,
        "shards": [
            {"shard": 0, "ready": True, "versions": [version]},
            {"shard": 1, "ready": True, "versions": [version]},
        ],
        "embedder": {"ready": True, "versions": [version]},
    }

    served.shards[0].versions = ["older"]

    async def not_ready() -> dict[str, Any]:
        served.shards[1].gate = asyncio.Event()
        return await served.service.readiness()

    state = run(not_ready)
    assert state["ready"] is False
    assert state["shards"] == [
        {"shard": 0, "ready": False, "versions": ["older"]},
        {"shard": 1, "ready": False, "error": "no answer within 0.05 s"},
    ]
    assert state["embedder"]["ready"] is True

    embedder_down = serve(index, replicas)
    embedder_down.embedder.dead_calls = 1
    state = run(embedder_down.service.readiness)
    assert state["ready"] is False and state["embedder"]["error"] == "no live replica"


def test_thumbnails_and_items_by_id(index: Index, replicas: Backend) -> None:
    service = serve(index, replicas).service
    assert run(lambda: service.thumbnail(FIRST_ID + 130)) == png(FIRST_ID + 130)
    assert run(lambda: service.item(FIRST_ID + 2))["item"] == {"id": FIRST_ID + 2, "label": str((FIRST_ID + 2) % 7)}
    with pytest.raises(ItemNotFoundError, match=f"no thumbnail for id {FIRST_ID + COUNT}"):
        run(lambda: service.thumbnail(FIRST_ID + COUNT))
    without = index.manifest.model_copy(update={"thumbnails": False})
    service.activate(without)
    with pytest.raises(ItemNotFoundError, match="was built without thumbnails"):
        run(lambda: service.thumbnail(FIRST_ID))


def test_a_shard_answers_a_batch_of_calls_with_one_search_per_setting(index: Index, shard_replicas: list[Any]) -> None:
    replica = shard_replicas[0]
    version = index.manifest.index_version
    rng = np.random.default_rng(5)
    exact, narrow = SearchParams(nprobe=LISTS), SearchParams(nprobe=1)
    calls = [
        ShardCall(queries=rng.standard_normal((2, DIM)).astype(np.float32), k=3, index_version=version, params=exact),
        ShardCall(queries=rng.standard_normal((1, DIM)).astype(np.float32), k=7, index_version=version, params=narrow),
        ShardCall(queries=rng.standard_normal((3, DIM)).astype(np.float32), k=5, index_version=version, params=exact),
        ShardCall(queries=rng.standard_normal((1, DIM)).astype(np.float32), k=2, index_version="gone", params=exact),
    ]
    searched: list[int] = []
    loaded = replica._host.loaded(0, version)
    original = loaded.search

    def counting(queries: np.ndarray, k: int, params: SearchParams | None = None) -> Any:
        searched.append(len(queries))
        return original(queries, k, params)

    loaded.search = counting
    try:
        results = replica.search_calls(calls)
    finally:
        loaded.search = original
    assert sorted(searched) == [1, 5]  # one Faiss call per (version, setting) that exists
    for call, result in zip(calls[:3], results[:3], strict=True):
        alone = replica.search(call.queries, call.k, version, call.params)
        assert isinstance(result, ShardHits)
        np.testing.assert_array_equal(result.ids, alone.ids)
        np.testing.assert_allclose(result.scores, alone.scores, rtol=1e-6)
        assert set(result.items) == {item_id for item_id in alone.ids.ravel().tolist() if item_id >= 0}
    assert isinstance(results[3], VersionNotLoadedError)


class CountingModel:
    """A model with `embed_images` / `embed_texts` that records how many inputs each call got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def embed_images(self, images: list[Any]) -> np.ndarray:
        self.calls.append(("image", len(images)))
        return np.array([[float(image.getpixel((0, 0))[0]), 1.0] for image in images], dtype=np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.calls.append(("text", len(texts)))
        return np.array([[float(len(text)), 2.0] for text in texts], dtype=np.float32)


def test_the_embedder_answers_a_batch_with_one_model_call_per_kind_and_version() -> None:
    # The host's state without `prepare` (which loads a model package from MLflow).
    embedder = EmbedderHost(spec=ServingSpec(index="unused"))
    model = CountingModel()
    embedder._models = {"v1": ("models:/stub/1", model)}
    embedder.default_version = "v1"
    calls = [
        EmbedCall(kind="image", data=png(9), index_version="v1"),
        EmbedCall(kind="text", data="seven", index_version=None),
        EmbedCall(kind="image", data=b"not an image", index_version="v1"),
        EmbedCall(kind="image", data=png(4), index_version=None),
        EmbedCall(kind="text", data="two", index_version="v0"),
    ]
    results = embedder.embed_calls(calls)
    assert sorted(model.calls) == [("image", 2), ("text", 1)]
    np.testing.assert_array_equal(results[0], [9.0, 1.0])
    np.testing.assert_array_equal(results[1], [5.0, 2.0])
    np.testing.assert_array_equal(results[3], [4.0, 1.0])
    assert type(results[2]).__name__ == "NotAnImageError"
    assert isinstance(results[4], VersionNotLoadedError) and "not v0" in str(results[4])


@distributed_only
def test_a_dead_replica_whose_retry_waits_past_the_deadline_is_a_503_not_a_504(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, batching=False, shard_timeout_s=0.05, on_shard_timeout="error")

    async def main() -> dict[str, Any]:
        # The replica died and Serve queues the retry for a replacement that is not there yet.
        served.shards[1].dead_calls = 1
        served.shards[1].gate = asyncio.Event()
        return await served.service.search_vector([0.1] * DIM, 3)

    with pytest.raises(ShardUnavailableError, match=r"shard 1 has no live replica \(ActorDiedError.*none answered"):
        run(main)


@distributed_only
def test_a_shard_marked_down_by_a_watcher_is_missing_without_a_call(index: Index, replicas: Backend) -> None:
    served = serve(index, replicas, batching=False, on_shard_timeout="partial")

    async def main() -> dict[str, Any]:
        served.shards[0].gate = asyncio.Event()  # the probe waits, as Serve queues it for a replica
        served.service.mark_shard_down(0, "Serve reports no running replica of Shard0")
        return await served.service.search_vector([0.1] * DIM, 3)

    reply = run(main)
    assert (reply["partial"], reply["missing_shards"], served.shards[0].calls) == (True, [0], 0)
    with pytest.raises(ValueError, match="shard 2 does not exist"):
        served.service.mark_shard_down(2, "no such shard")


@distributed_only
def test_a_call_waiting_on_a_shard_that_goes_down_gives_up_at_once(index: Index, replicas: Backend) -> None:
    # A deadline far away: the 503 below comes from the shard going down, not from the deadline.
    served = serve(index, replicas, batching=False, shard_timeout_s=30.0, on_shard_timeout="error")

    async def main() -> dict[str, Any]:
        served.shards[0].gate = asyncio.Event()  # queued, as Serve queues a call for a missing replica
        search = asyncio.ensure_future(served.service.search_vector([0.1] * DIM, 3))
        while served.shards[0].calls == 0:
            await asyncio.sleep(0)
        served.service.mark_shard_down(0, "Serve reports no running replica of Shard0")
        return await search

    with pytest.raises(ShardUnavailableError, match=r"shard 0 has no live replica \(Serve reports .*replacing it"):
        run(main)


@distributed_only
def test_only_a_shard_with_a_call_in_flight_and_no_answer_for_a_while_is_stalled(
    index: Index, replicas: Backend
) -> None:
    served = serve(index, replicas, shard_timeout_s=10.0)
    query = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)

    async def main() -> tuple[list[int], list[int], list[int], list[int]]:
        idle = served.service.stalled_shards(after_s=0.0)
        served.shards[1].gate = asyncio.Event()
        search = asyncio.ensure_future(served.service.search_vector(query.tolist(), 5))
        # Shard 0 answers at once; shard 1 holds its call until the gate opens.
        while served.shards[1].calls == 0 or served.service.stalled_shards(after_s=0.0) != [1]:
            await asyncio.sleep(0)
        hanging = served.service.stalled_shards(after_s=0.0)
        not_yet = served.service.stalled_shards(after_s=3600.0)
        served.shards[1].gate.set()
        await search
        return idle, hanging, not_yet, served.service.stalled_shards(after_s=0.0)

    idle, hanging, not_yet, answered = run(main)
    assert idle == [] and hanging == [1] and not_yet == [] and answered == []
