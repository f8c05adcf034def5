"""Sharded search against unsharded Faiss and brute force; manifests, checksums, versions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.errors import IndexIntegrityError
from retrieval.index import ModelRef, build_shards, load_shard, merge_topk, read_manifest
from retrieval.index import shards as shards_module
from retrieval.index.metadata import ItemStore
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import _validate_inputs, file_sha256

MODEL = ModelRef(name="digits-deep-metric", version="3", uri="models:/digits-deep-metric/3", run_id="abc123")
GALLERY = {"dataset": "synthetic", "split": "test"}


def integer_gallery(count: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer vectors: every dot product and distance is an exact float32 integer,
    whatever the summation order, and many scores tie, which tests the tie handling."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, size=(count, dim)).astype(np.float32)
    # Shuffled, non-contiguous ids: shards must sort them and still return global ids.
    ids = rng.permutation(np.arange(count) * 7 + 100).astype(np.int64)
    return vectors, ids


def items_for(ids: np.ndarray) -> list[dict[str, str]]:
    return [{"label": str(item_id % 10), "source": f"synthetic:{item_id}"} for item_id in ids.tolist()]


def build(tmp_path: Path, vectors: np.ndarray, ids: np.ndarray, **options: object) -> Path:
    arguments: dict[str, object] = {
        "vectors": vectors,
        "ids": ids,
        "items": items_for(ids),
        "out_root": tmp_path / "index",
        "num_shards": 2,
        "model": MODEL,
        "gallery": GALLERY,
    }
    arguments.update(options)
    return build_shards(**arguments)  # type: ignore[arg-type]


def sharded_search(root: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    manifest, version_dir = read_manifest(root)
    per_shard = [
        load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard).search(queries, k)
        for info in manifest.shards
    ]
    return merge_topk(results=per_shard, k=k, metric=manifest.metric)


def brute_force_scores(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """[Q, N] scores computed in float64 with a plain loop (exact for integer data)."""
    scores = np.empty((len(queries), len(vectors)))
    for row, query in enumerate(queries.astype(np.float64)):
        for column, vector in enumerate(vectors.astype(np.float64)):
            scores[row, column] = query @ vector if metric == "ip" else ((query - vector) ** 2).sum()
    return scores


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_sharded_search_equals_unsharded_search(tmp_path: Path, num_shards: int, metric: str) -> None:
    vectors, ids = integer_gallery(count=157, dim=6, seed=num_shards)
    queries = np.random.default_rng(99).integers(-2, 3, size=(25, 6)).astype(np.float32)
    k = 12
    build(tmp_path, vectors, ids, num_shards=num_shards, metric=metric)

    scores, found = sharded_search(tmp_path / "index", queries, k)

    reference = faiss.IndexFlatIP(6) if metric == "ip" else faiss.IndexFlatL2(6)
    reference = faiss.IndexIDMap2(reference)
    reference.add_with_ids(vectors, ids)
    reference_scores, reference_ids = reference.search(queries, k)
    exact = brute_force_scores(vectors, queries, metric)
    score_of = [dict(zip(ids.tolist(), row.tolist(), strict=True)) for row in exact]

    np.testing.assert_array_equal(scores, reference_scores)
    for row in range(len(queries)):
        assert len(set(found[row].tolist())) == k
        # Each returned id really has the score reported beside it.
        assert [score_of[row][item] for item in found[row].tolist()] == scores[row].tolist()
        kth = scores[row, -1]
        for value in np.unique(scores[row]):
            ours = set(found[row][scores[row] == value].tolist())
            theirs = set(reference_ids[row][reference_scores[row] == value].tolist())
            if value == kth:
                # The group cut by k may hold any of the tied ids, in both results.
                tied = {item for item, score in score_of[row].items() if score == value}
                assert ours <= tied and theirs <= tied
            else:
                assert ours == theirs
            # Ties come in ascending id order, deterministically.
            group = found[row][scores[row] == value].tolist()
            assert group == sorted(group)


def test_manifest_round_trip_and_shard_contents(tmp_path: Path) -> None:
    vectors, ids = integer_gallery(count=40, dim=4, seed=1)
    manifest_path = build(tmp_path, vectors, ids, num_shards=3, index_version="v1", factory="Flat")

    manifest, version_dir = read_manifest(manifest_path)
    assert (manifest, version_dir) == read_manifest(tmp_path / "index")
    assert version_dir == tmp_path / "index" / "v1"
    assert manifest.model == MODEL
    assert manifest.gallery == GALLERY
    assert (manifest.dim, manifest.metric, manifest.factory, manifest.num_items) == (4, "ip", "Flat", 40)
    assert json.loads(manifest_path.read_text()) == json.loads(manifest.model_dump_json())

    sorted_ids = np.sort(ids)
    assert [info.count for info in manifest.shards] == [14, 13, 13]
    covered = []
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        held = sorted(shard.items)
        assert (held[0], held[-1]) == (info.id_min, info.id_max)
        covered.extend(held)
        for item_id in held:
            position = int(np.flatnonzero(ids == item_id)[0])
            np.testing.assert_array_equal(shard.vector(item_id), vectors[position])
            assert shard.items[item_id] == {"id": item_id, **items_for(ids[position : position + 1])[0]}
        with pytest.raises(KeyError):
            shard.vector(int(sorted_ids[-1]) + 1)
    # Contiguous id ranges: the concatenation of the shards is the sorted id list.
    assert covered == sorted_ids.tolist()


def test_flipped_byte_in_a_shard_is_refused(tmp_path: Path) -> None:
    vectors, ids = integer_gallery(count=30, dim=4, seed=2)
    build(tmp_path, vectors, ids, index_version="v1")
    manifest, version_dir = read_manifest(tmp_path / "index")
    shard_file = version_dir / manifest.shards[1].file
    content = bytearray(shard_file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(content))

    with pytest.raises(IndexIntegrityError) as error:
        load_shard(manifest=manifest, version_dir=version_dir, shard=1)
    message = str(error.value)
    assert "sha256" in message and str(shard_file) in message and manifest.shards[1].sha256 in message
    # The other shard is untouched and still loads.
    assert load_shard(manifest=manifest, version_dir=version_dir, shard=0).index.ntotal == 15


def test_corrupt_items_file_and_missing_shard_are_refused(tmp_path: Path) -> None:
    vectors, ids = integer_gallery(count=30, dim=4, seed=3)
    build(tmp_path, vectors, ids, index_version="v1")
    manifest, version_dir = read_manifest(tmp_path / "index")
    items_file = version_dir / manifest.shards[0].items_file
    content = bytearray(items_file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    items_file.write_bytes(bytes(content))
    with pytest.raises(IndexIntegrityError, match="sha256 mismatch"):
        load_shard(manifest=manifest, version_dir=version_dir, shard=0)

    (version_dir / manifest.shards[1].file).unlink()
    with pytest.raises(IndexIntegrityError, match="missing"):
        load_shard(manifest=manifest, version_dir=version_dir, shard=1)
    with pytest.raises(IndexIntegrityError, match="no shard 7"):
        load_shard(manifest=manifest, version_dir=version_dir, shard=7)


def test_second_version_becomes_current_and_keeps_the_first_intact(tmp_path: Path) -> None:
    vectors, ids = integer_gallery(count=30, dim=4, seed=4)
    first_path = build(tmp_path, vectors, ids)
    first_bytes = {path.name: path.read_bytes() for path in first_path.parent.iterdir()}
    second_path = build(tmp_path, vectors[:20] * 2, ids[:20], num_shards=3)

    root = tmp_path / "index"
    first, _ = read_manifest(first_path)
    second, _ = read_manifest(second_path)
    assert first.index_version < second.index_version  # default names sort by creation time
    assert (root / "CURRENT").read_text().strip() == second.index_version
    assert read_manifest(root) == (second, second_path.parent)
    assert {path.name: path.read_bytes() for path in first_path.parent.iterdir()} == first_bytes
    for info in first.shards:
        load_shard(manifest=first, version_dir=first_path.parent, shard=info.shard)
    # Nothing but the two versions and CURRENT is left in the root (no staging leftovers).
    assert sorted(path.name for path in root.iterdir()) == sorted(
        ["CURRENT", first.index_version, second.index_version]
    )

    with pytest.raises(ValueError, match="already exists"):
        build(tmp_path, vectors, ids, index_version=first.index_version)


def test_ivf_factory_trains_and_finds_each_vector(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((400, 8)).astype(np.float32)
    ids = np.arange(400, dtype=np.int64)
    build(tmp_path, vectors, ids, factory="IVF4,Flat", metric="l2", train_sample=150)

    manifest, version_dir = read_manifest(tmp_path / "index")
    assert manifest.factory == "IVF4,Flat"
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        members = np.array(sorted(shard.items))
        # A query equal to a stored vector falls in that vector's own list: found at distance 0.
        scores, found = shard.search(vectors[members], 1)
        np.testing.assert_array_equal(found[:, 0], members)
        np.testing.assert_array_equal(scores[:, 0], 0.0)
        np.testing.assert_array_equal(shard.vector(int(members[3])), vectors[members[3]])


def test_k_larger_than_the_gallery_pads_like_faiss(tmp_path: Path) -> None:
    vectors, ids = integer_gallery(count=6, dim=3, seed=6)
    build(tmp_path, vectors, ids, num_shards=3)
    scores, found = sharded_search(tmp_path / "index", vectors[:2], 9)
    assert found.shape == (2, 9)
    assert sorted(found[0, :6].tolist()) == sorted(ids.tolist())
    assert (found[:, 6:] == -1).all()
    assert (scores[:, 6:] == -np.finfo(np.float32).max).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ids": np.arange(9)}, r"ids must have shape \[N\] = \(10,\)"),
        ({"vectors": np.zeros(10, np.float32)}, r"2-D array \[N, D\]"),
        ({"items": [{}] * 9}, "10 vectors but 9 items"),
        ({"num_shards": 0}, "num_shards must be between 1 and the number of vectors \\(10\\), got 0"),
        ({"num_shards": 11}, "got 11"),
        ({"ids": np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])}, r"ids must be unique; 1 repeat, e.g. \[8\]"),
        ({"ids": np.arange(10) - 1}, "ids must be >= 0"),
        ({"vectors": np.full((10, 3), np.nan, np.float32)}, "non-finite .* first at row 0"),
        ({"metric": "cosine"}, "metric must be one of"),
        ({"factory": "NoSuchIndex"}, "cannot build factory 'NoSuchIndex'"),
        ({"index_version": "../escape"}, "index_version '../escape'"),
        ({"items": [{"label": object()}] * 10}, "not JSON-serialisable"),
    ],
)
def test_bad_inputs_raise_value_errors(tmp_path: Path, change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "vectors": np.ones((10, 3), np.float32),
        "ids": np.arange(10),
        "items": [{"label": "x"}] * 10,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        build(tmp_path, **arguments)  # type: ignore[arg-type]
    # A failed build leaves no version behind and does not create CURRENT.
    root = tmp_path / "index"
    assert not root.exists() or sorted(path.name for path in root.iterdir()) == []


def test_read_manifest_errors_name_the_path_and_problem(tmp_path: Path) -> None:
    with pytest.raises(IndexIntegrityError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(IndexIntegrityError, match="neither an index root"):
        read_manifest(tmp_path)

    vectors, ids = integer_gallery(count=10, dim=3, seed=7)
    manifest_path = build(tmp_path, vectors, ids, index_version="v1")
    root = tmp_path / "index"
    (root / "CURRENT").write_text("v2\n")
    with pytest.raises(IndexIntegrityError, match=r"names version 'v2' but .* does not exist"):
        read_manifest(root)

    (root / "CURRENT").write_text("v1\n")
    raw = json.loads(manifest_path.read_text())
    raw["num_items"] = 11
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(IndexIntegrityError, match="num_items is 11 but the shard counts sum to 10"):
        read_manifest(root)
    raw["num_items"] = 10
    raw["unexpected"] = 1
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(IndexIntegrityError, match="unexpected"):
        read_manifest(root)
    manifest_path.write_text("{not json")
    with pytest.raises(IndexIntegrityError, match=f"{manifest_path}: cannot read the manifest as JSON"):
        read_manifest(root)


# --------------------------------------------------------------------------- index types, streaming, mmap, items


def test_ivf_with_fewer_training_vectors_than_lists_names_factory_and_counts(tmp_path: Path) -> None:
    vectors = np.random.default_rng(8).standard_normal((60, 4)).astype(np.float32)
    with pytest.raises(
        ValueError, match=r"factory 'IVF32,Flat' needs at least 32 training vectors .* shard 0 trains on 30"
    ):
        build(tmp_path, vectors, np.arange(60), factory="IVF32,Flat")
    with pytest.raises(ValueError, match=r"needs at least 16 training vectors .* trains on 10 \(train_sample 10\)"):
        build(tmp_path, vectors, np.arange(60), factory="IVF16,Flat", train_sample=10)
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == []


@pytest.mark.parametrize(("factory", "widest"), [("IVF8,Flat", {"nprobe": 8}), ("HNSW8", {"ef_search": 64})])
def test_index_types_find_each_stored_vector_and_keep_ids(tmp_path: Path, factory: str, widest: dict[str, int]) -> None:
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    ids = rng.permutation(300).astype(np.int64) * 5
    # A batch size that does not divide the shards: the last batch of each is short.
    build(tmp_path, vectors, ids, factory=factory, metric="l2", num_shards=2, add_batch_size=37)
    manifest, version_dir = read_manifest(tmp_path / "index")
    assert manifest.factory == factory and manifest.search_defaults == {} and manifest.thumbnails is False
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        assert shard.index.ntotal == info.count
        members = np.array(sorted(shard.items))
        rows = np.array([int(np.flatnonzero(ids == member)[0]) for member in members])
        distances, found = shard.search(vectors[rows], 1, SearchParams.from_mapping(widest))
        np.testing.assert_array_equal(found[:, 0], members)
        np.testing.assert_array_equal(distances[:, 0], 0.0)


def test_memory_mapped_gallery_streams_without_a_full_copy(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    vectors = rng.standard_normal((500, 6))  # float64 on disk: converted to float32 a batch at a time
    np.save(tmp_path / "gallery.npy", vectors)
    mapped = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    ids = np.arange(500, dtype=np.int64)

    checked, _ = _validate_inputs(
        vectors=mapped, ids=ids, items=[{}] * 500, num_shards=2, index_version=None, train_sample=10,
        add_batch_size=64, metric="l2", thumbnails=None,
    )  # fmt: skip
    assert np.shares_memory(checked, mapped)

    build(tmp_path, mapped, ids, metric="l2", add_batch_size=64, index_version="mapped")
    build(tmp_path, vectors.astype(np.float32), ids, metric="l2", index_version="plain")
    queries = rng.standard_normal((7, 6)).astype(np.float32)
    mapped_result = sharded_search(tmp_path / "index" / "mapped", queries, 5)
    plain_result = sharded_search(tmp_path / "index" / "plain", queries, 5)
    np.testing.assert_array_equal(mapped_result[1], plain_result[1])
    np.testing.assert_array_equal(mapped_result[0], plain_result[0])


def test_non_finite_rows_are_found_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_module, "_CHECK_CHUNK_ROWS", 4)
    vectors = np.ones((20, 3))
    vectors[9, 1] = np.inf
    vectors[17, 0] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in 2 rows, first at row 9"):
        build(tmp_path, vectors, np.arange(20))


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
def test_memory_mapped_shard_answers_like_a_loaded_one(tmp_path: Path, factory: str) -> None:
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((400, 8)).astype(np.float32)
    build(tmp_path, vectors, np.arange(400), factory=factory, metric="l2")
    manifest, version_dir = read_manifest(tmp_path / "index")
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    for info in manifest.shards:
        loaded = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        mapped = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard, mmap=True)
        assert mapped.mmap and not loaded.mmap
        for first, second in zip(loaded.search(queries, 6), mapped.search(queries, 6), strict=True):
            np.testing.assert_array_equal(first, second)
        member = next(iter(mapped.items))
        np.testing.assert_array_equal(mapped.vector(member), vectors[member])


def test_binary_shard_loads_memory_mapped(tmp_path: Path) -> None:
    codes = np.random.default_rng(12).integers(0, 256, size=(50, 4)).astype(np.uint8)
    build(tmp_path, codes, np.arange(50), metric="hamming", items=[{}] * 50)
    manifest, version_dir = read_manifest(tmp_path / "index")
    loaded = load_shard(manifest=manifest, version_dir=version_dir, shard=1)
    mapped = load_shard(manifest=manifest, version_dir=version_dir, shard=1, mmap=True)
    assert mapped.mmap
    for first, second in zip(loaded.search(codes[:5], 4), mapped.search(codes[:5], 4), strict=True):
        np.testing.assert_array_equal(first, second)


def test_items_are_parquet_with_thumbnails_and_corrupt_parquet_is_refused(tmp_path: Path) -> None:
    vectors, ids = integer_gallery(count=12, dim=3, seed=13)
    thumbnails = [f"png-{item_id}".encode() if item_id % 2 else None for item_id in ids.tolist()]
    build(tmp_path, vectors, ids, thumbnails=thumbnails, index_version="v1")
    manifest, version_dir = read_manifest(tmp_path / "index")
    assert manifest.thumbnails is True
    assert [info.items_file for info in manifest.shards] == ["shard-000.items.parquet", "shard-001.items.parquet"]
    thumbnail_of = dict(zip(ids.tolist(), thumbnails, strict=True))
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        assert shard.items.has_thumbnails
        for item_id in shard.items:
            assert shard.items.thumbnail(item_id) == thumbnail_of[item_id]
            assert "thumbnail" not in shard.items[item_id]

    items_path = version_dir / manifest.shards[0].items_file
    items_path.write_bytes(items_path.read_bytes()[:-20])
    with pytest.raises(IndexIntegrityError, match=f"{items_path}: cannot read the items file as Parquet"):
        load_shard(manifest=manifest, version_dir=version_dir, shard=0, verify=False)


def test_index_written_before_parquet_and_search_defaults_still_loads(tmp_path: Path) -> None:
    """An older version: JSONL items and a manifest without search_defaults / thumbnails."""
    vectors, ids = integer_gallery(count=20, dim=4, seed=14)
    manifest_path = build(tmp_path, vectors, ids, index_version="old")
    version_dir = manifest_path.parent
    raw = json.loads(manifest_path.read_text())
    del raw["search_defaults"], raw["thumbnails"]
    for entry in raw["shards"]:
        legacy = entry["items_file"].replace(".parquet", ".jsonl")
        store = ItemStore.open(version_dir / entry["items_file"])
        lines = [json.dumps(store[item_id], sort_keys=True) for item_id in store]
        (version_dir / legacy).write_text("".join(line + "\n" for line in lines))
        (version_dir / entry["items_file"]).unlink()
        entry["items_file"], entry["items_sha256"] = legacy, file_sha256(version_dir / legacy)
    manifest_path.write_text(json.dumps(raw))

    manifest, _ = read_manifest(tmp_path / "index")
    assert manifest.search_defaults == {} and manifest.thumbnails is False
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        assert not shard.items.has_thumbnails
        for item_id in shard.items:
            position = int(np.flatnonzero(ids == item_id)[0])
            assert shard.items[item_id] == {"id": item_id, **items_for(ids[position : position + 1])[0]}
    assert sharded_search(tmp_path / "index", vectors[:3], 4)[1].shape == (3, 4)


def test_each_shard_logs_a_line_and_no_progress_bar_off_a_terminal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    vectors, ids = integer_gallery(count=30, dim=3, seed=15)
    with caplog.at_level(logging.INFO, logger="retrieval.index.shards"):
        build(tmp_path, vectors, ids, num_shards=3, index_version="v1", add_batch_size=4)
    written = [record.getMessage() for record in caplog.records if "written" in record.getMessage()]
    assert written == [
        f"index v1: shard {shard}/3 written (10 vectors, ids {low}..{high}, factory Flat)"
        for shard, (low, high) in enumerate(
            [(int(part[0]), int(part[-1])) for part in np.array_split(np.sort(ids), 3)], start=1
        )
    ]
    # The progress bar goes to stderr only on a terminal; captured stderr is not one.
    assert "vec" not in capfd.readouterr().err
