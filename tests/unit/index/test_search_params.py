"""Per-request search parameters (nprobe, efSearch) against brute force, bad settings, concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import BadRequestError
from retrieval.index.manifest import ModelRef, read_manifest
from retrieval.index.search_params import SearchParams, ivf_of
from retrieval.index.shards import LoadedShard, build_shards, load_shard
from retrieval.models.codes import pack_codes

MODEL = ModelRef(name="synthetic", version="1", uri="models:/synthetic/1")
NLIST = 16


def clustered(count: int, dim: int, seed: int, *, clusters: int = 24) -> np.ndarray:
    """Gaussian blobs around random centres, overlapping enough that some neighbours sit in other cells."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 3.0
    members = rng.integers(0, clusters, size=count)
    return (centres[members] + rng.standard_normal((count, dim)).astype(np.float32)).astype(np.float32)


def one_shard(
    tmp_path: Path, vectors: np.ndarray, factory: str, *, metric: str = "l2", **options: object
) -> LoadedShard:
    path = build_shards(
        vectors=vectors,
        ids=np.arange(len(vectors), dtype=np.int64),
        items=[{"row": row} for row in range(len(vectors))],
        out_root=tmp_path / factory.replace(",", "_"),
        num_shards=1,
        factory=factory,
        metric=metric,  # type: ignore[arg-type]
        model=MODEL,
        gallery={"dataset": "synthetic"},
        **options,  # type: ignore[arg-type]
    )
    manifest, version_dir = read_manifest(path)
    return load_shard(manifest=manifest, version_dir=version_dir, shard=0)


def brute_force_l2(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by squared L2 in float64 numpy: ``(distances [Q, k], ids [Q, k])``."""
    distances = ((queries[:, None, :].astype(np.float64) - vectors[None, :, :].astype(np.float64)) ** 2).sum(-1)
    ids = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, ids, axis=1), ids


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact top-k ids found, over all queries."""
    hits = sum(len(set(row.tolist()) & set(truth.tolist())) for row, truth in zip(found, exact, strict=True))
    return hits / exact.size


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray]:
    vectors = clustered(3000, 16, seed=0)
    queries = np.random.default_rng(1).standard_normal((60, 16)).astype(np.float32) * 3.0
    return vectors, queries


def test_nprobe_nlist_is_exact_and_nprobe_one_misses_neighbours(
    tmp_path: Path, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = gallery
    k = 10
    shard = one_shard(tmp_path, vectors, f"IVF{NLIST},Flat")
    exact_distances, exact_ids = brute_force_l2(vectors, queries, k)

    distances, ids = shard.search(queries, k, SearchParams(nprobe=NLIST))
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(distances, exact_distances, rtol=1e-4, atol=1e-3)

    _, coarse = shard.search(queries, k, SearchParams(nprobe=1))
    assert recall(coarse, exact_ids) < 0.95
    middle = recall(shard.search(queries, k, SearchParams(nprobe=4))[1], exact_ids)
    assert recall(coarse, exact_ids) <= middle <= 1.0
    # Without params the index's own setting (Faiss's nprobe 1) applies, untouched by the calls above.
    np.testing.assert_array_equal(shard.search(queries, k)[1], coarse)
    assert ivf_of(shard.index).nprobe == 1


def test_ivf_pq_with_all_lists_finds_most_exact_neighbours(
    tmp_path: Path, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = gallery
    # 4-bit codes (16 centroids per sub-quantizer) keep training fast; PQ{m} alone means 8 bits.
    shard = one_shard(tmp_path, vectors, f"IVF{NLIST},PQ8x4", train_sample=1000)
    _, exact_ids = brute_force_l2(vectors, queries, 10)
    low = recall(shard.search(queries, 10, SearchParams(nprobe=1))[1], exact_ids)
    high = recall(shard.search(queries, 10, SearchParams(nprobe=NLIST))[1], exact_ids)
    # PQ compresses 16 floats to 4 bytes: approximate even with every list, but better than one list.
    assert high > 0.4 and low < high


def test_manifest_defaults_fill_unset_params(tmp_path: Path, gallery: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = gallery
    shard = one_shard(tmp_path, vectors, f"IVF{NLIST},Flat", search_defaults={"nprobe": NLIST})
    manifest, _ = read_manifest(tmp_path / f"IVF{NLIST}_Flat")
    assert manifest.search_defaults == {"nprobe": NLIST}
    _, exact_ids = brute_force_l2(vectors, queries, 5)
    np.testing.assert_array_equal(shard.search(queries, 5)[1], exact_ids)
    np.testing.assert_array_equal(shard.search(queries, 5, SearchParams())[1], exact_ids)
    # An explicit setting beats the default.
    assert recall(shard.search(queries, 5, SearchParams(nprobe=1))[1], exact_ids) < 1.0


def test_hnsw_ef_search_raises_recall(tmp_path: Path, gallery: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = gallery
    k = 10
    shard = one_shard(tmp_path, vectors, "HNSW4")
    _, exact_ids = brute_force_l2(vectors, queries, k)
    recalls = [recall(shard.search(queries, k, SearchParams(ef_search=ef))[1], exact_ids) for ef in (1, 8, 32, 256)]
    assert recalls == sorted(recalls), recalls
    assert recalls[0] < recalls[-1] and recalls[-1] > 0.95


def test_binary_ivf_nprobe_and_binary_hnsw_ef_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    codes = pack_codes(np.where(rng.random((1500, 32)) < 0.5, -1.0, 1.0).astype(np.float32))
    queries = codes[:40]
    exact = np.stack([np.sort(np.unpackbits(codes ^ query, axis=1).sum(axis=1))[:5] for query in queries])

    ivf = one_shard(tmp_path, codes, "BIVF8", metric="hamming")
    distances, _ = ivf.search(queries, 5, SearchParams(nprobe=8))
    np.testing.assert_array_equal(distances, exact)
    with pytest.raises(BadRequestError, match="between 1 and 8"):
        ivf.search(queries, 5, SearchParams(nprobe=9))

    hnsw = one_shard(tmp_path, codes, "BHNSW8", metric="hamming")
    wide, _ = hnsw.search(queries, 5, SearchParams(ef_search=500))
    narrow, _ = hnsw.search(queries, 5, SearchParams(ef_search=1))
    assert (wide <= narrow).all() and (wide.sum(axis=1) <= narrow.sum(axis=1)).all()
    with pytest.raises(BadRequestError, match="nprobe applies to IVF indices; this index is 'BHNSW8'"):
        hnsw.search(queries, 5, SearchParams(nprobe=2))


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        ("Flat", {"nprobe": 4}, "nprobe applies to IVF indices; this index is 'Flat'"),
        ("Flat", {"ef_search": 4}, "ef_search applies to HNSW indices; this index is 'Flat'"),
        ("IVF8,Flat", {"nprobe": 9}, r"nprobe must be between 1 and 8 \(the index's lists\), got 9"),
        ("IVF8,Flat", {"ef_search": 16}, "ef_search applies to HNSW indices; this index is 'IVF8,Flat'"),
        ("HNSW8", {"nprobe": 2}, "nprobe applies to IVF indices; this index is 'HNSW8'"),
    ],
)
def test_settings_the_index_does_not_have_are_bad_requests(
    tmp_path: Path, factory: str, params: dict[str, int], message: str
) -> None:
    vectors = clustered(400, 8, seed=2)
    shard = one_shard(tmp_path, vectors, factory)
    with pytest.raises(BadRequestError, match=message):
        shard.search(vectors[:2], 3, SearchParams.from_mapping(params))
    # The same setting as a manifest default is refused when the index is built.
    with pytest.raises(ValueError, match=f"search_defaults .* do not fit factory '{factory}'"):
        one_shard(tmp_path / "defaults", vectors, factory, search_defaults=params)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nprobe": 0}, "nprobe must be a positive integer, got 0"),
        ({"ef_search": -3}, "ef_search must be a positive integer, got -3"),
        ({"nprobe": 2.5}, "nprobe must be a positive integer, got 2.5"),
        ({"nprobe": True}, "nprobe must be a positive integer, got True"),
        ({"nprob": 4}, r"unknown search parameters \['nprob'\]"),
        ({"ef_search": 4, "efSearch": 8}, "ef_search is given twice"),
    ],
)
def test_malformed_params_name_the_setting(data: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        SearchParams.from_mapping(data)


def test_params_parse_and_merge_with_defaults() -> None:
    assert SearchParams.from_mapping({"efSearch": 40}) == SearchParams(ef_search=40)
    assert SearchParams.from_mapping(None).is_default
    merged = SearchParams(nprobe=3).with_defaults({"nprobe": 8, "ef_search": 5})
    assert merged == SearchParams(nprobe=3, ef_search=5)
    assert merged.as_dict() == {"nprobe": 3, "ef_search": 5}


def test_concurrent_searches_with_different_nprobe_each_get_their_own(
    tmp_path: Path, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = gallery
    shard = one_shard(tmp_path, vectors, f"IVF{NLIST},Flat")
    settings = [1, NLIST]
    expected = {nprobe: shard.search(queries, 10, SearchParams(nprobe=nprobe))[1] for nprobe in settings}
    assert not np.array_equal(expected[1], expected[NLIST])
    rounds = 30
    start = threading.Barrier(len(settings))
    results: dict[int, list[np.ndarray]] = {nprobe: [] for nprobe in settings}

    def searcher(nprobe: int) -> None:
        start.wait()
        for _ in range(rounds):
            results[nprobe].append(shard.search(queries, 10, SearchParams(nprobe=nprobe))[1])

    threads = [threading.Thread(target=searcher, args=(nprobe,)) for nprobe in settings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for nprobe in settings:
        assert len(results[nprobe]) == rounds
        for found in results[nprobe]:
            np.testing.assert_array_equal(found, expected[nprobe])


def test_a_setting_beyond_a_c_int_is_a_bad_request_before_it_reaches_faiss() -> None:
    assert SearchParams(nprobe=2**31 - 1).nprobe == 2**31 - 1
    with pytest.raises(BadRequestError, match=r"ef_search must be at most 2147483647, got 2147483648"):
        SearchParams.from_mapping({"efSearch": 2**31})


def test_params_still_reach_faiss_after_torch_utils_replaced_index_search(
    tmp_path: Path, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    """pytorch-metric-learning imports `faiss.contrib.torch_utils`, whose `search` takes no `params`."""
    vectors, queries = gallery
    shard = one_shard(tmp_path, vectors, f"IVF{NLIST},Flat")
    one_list = shard.search(queries, 5, SearchParams(nprobe=1))
    import faiss.contrib.torch_utils  # noqa: F401  (patches every index class, as in a process using pml)

    np.testing.assert_array_equal(shard.search(queries, 5, SearchParams(nprobe=1))[1], one_list[1])
    _, every_list = shard.search(queries, 5, SearchParams(nprobe=NLIST))
    np.testing.assert_array_equal(every_list, brute_force_l2(vectors, queries, 5)[1])
