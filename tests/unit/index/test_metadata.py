"""Item metadata in Parquet: exact round trips, lookups by id, thumbnails, legacy JSONL, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval.errors import IndexIntegrityError
from retrieval.index.metadata import ItemStore, write_items_parquet

# Typed fields, a field mixing ints and floats, one mixing types, nested values, a field some items lack.
IDS = np.array([42, 7, 1000, 3, 15], dtype=np.int64)
ITEMS: list[dict[str, Any]] = [
    {"label": "7", "source": "digits:42", "score": 1, "mixed": "a", "captions": ["one", "two"], "extra": {"k": 1}},
    {"label": "1", "source": "digits:7", "score": 2.5, "mixed": 3, "captions": [], "extra": None},
    {"label": None, "source": "digits:1000", "score": 3, "mixed": [1, 2], "captions": ["x"]},
    {"label": "3", "source": "digits:3", "score": 4, "mixed": {"deep": [1, {"z": None}]}, "captions": ["y"]},
    {"label": "5", "source": "digits:15", "score": -1, "mixed": None, "captions": ["p", "q"], "id": 15},
]
THUMBNAILS = [b"\x89PNG-42", None, b"\x89PNG-1000", b"", b"\x89PNG-15"]


def expected_item(position: int) -> dict[str, Any]:
    return {**ITEMS[position], "id": int(IDS[position])}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return write_items_parquet(tmp_path / "shard-000.items.parquet", IDS, ITEMS, THUMBNAILS)


def test_every_item_reads_back_exactly_with_its_value_types(store_path: Path) -> None:
    store = ItemStore.open(store_path)
    assert len(store) == 5 and list(store) == sorted(IDS.tolist())
    for position, item_id in enumerate(IDS.tolist()):
        item = store.get(item_id)
        assert item == expected_item(position)
        assert item is not None
        # Equality would accept 1.0 for 1; the JSON text does not.
        assert json.dumps(item, sort_keys=True) == json.dumps(expected_item(position), sort_keys=True)
    assert "extra" not in store.get(1000)  # type: ignore[operator]
    assert store[3]["mixed"] == {"deep": [1, {"z": None}]}
    assert store.get(8) is None and 8 not in store and 7 in store and "7" not in store
    with pytest.raises(KeyError):
        store[8]


def test_file_layout_sorted_ids_typed_columns_zstd(store_path: Path) -> None:
    table = pq.read_table(store_path)
    assert table.column("id").to_pylist() == sorted(IDS.tolist())
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("label").type == pa.string()
    assert table.schema.field("captions").type == pa.list_(pa.string())
    assert table.schema.field("thumbnail").type == pa.large_binary()
    # Columns that would not read back as written hold JSON text, and the file says which.
    recorded = json.loads(table.schema.metadata[b"retrieval.items"])
    assert sorted(recorded["json_columns"]) == ["extra", "mixed", "score"]
    assert table.schema.field("score").type == pa.string()
    column = pq.ParquetFile(store_path).metadata.row_group(0).column(0)
    assert column.compression == "ZSTD"


def test_get_many_takes_a_result_page_with_padding_and_repeats(store_path: Path) -> None:
    store = ItemStore.open(store_path)
    page = np.array([[15, 3, -1], [42, 15, 999_999]])
    found = store.get_many(page.ravel().tolist())
    positions = {int(item_id): position for position, item_id in enumerate(IDS.tolist())}
    assert found == {item_id: expected_item(positions[item_id]) for item_id in (3, 15, 42)}
    assert store.get_many([]) == {} and store.get_many([-1, 5]) == {}


def test_thumbnails_are_separate_from_item_fields(store_path: Path, tmp_path: Path) -> None:
    store = ItemStore.open(store_path)
    assert store.has_thumbnails
    for position, item_id in enumerate(IDS.tolist()):
        assert store.thumbnail(item_id) == THUMBNAILS[position]
        assert "thumbnail" not in store[item_id]
    assert store.thumbnail(8) is None
    plain = ItemStore.open(write_items_parquet(tmp_path / "plain.items.parquet", IDS, ITEMS))
    assert not plain.has_thumbnails and plain.thumbnail(42) is None
    assert "thumbnail" not in pq.read_table(tmp_path / "plain.items.parquet").column_names


def test_items_without_fields_still_give_their_ids(tmp_path: Path) -> None:
    store = ItemStore.open(write_items_parquet(tmp_path / "bare.items.parquet", np.array([9, 2]), [{}, {}]))
    assert store.get_many([2, 9, 4]) == {2: {"id": 2}, 9: {"id": 9}}


def test_legacy_jsonl_items_load_into_the_same_store(tmp_path: Path) -> None:
    legacy = tmp_path / "shard-000.items.jsonl"
    legacy.write_text("".join(json.dumps(expected_item(position)) + "\n" for position in range(len(ITEMS))))
    store = ItemStore.open(legacy)
    assert len(store) == 5 and not store.has_thumbnails
    for position, item_id in enumerate(IDS.tolist()):
        assert store[item_id] == expected_item(position)
    legacy.write_text('{"id": 1}\n{"label": "no id"}\n')
    with pytest.raises(IndexIntegrityError, match=rf"{legacy}:2: not an item with an 'id'"):
        ItemStore.open(legacy)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_parquet_names_the_file(store_path: Path, damage: str) -> None:
    content = store_path.read_bytes()
    store_path.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"not parquet at all" * 10)
    with pytest.raises(IndexIntegrityError, match=f"{store_path}: cannot read the items file as Parquet"):
        ItemStore.open(store_path)
    store_path.unlink()
    with pytest.raises(IndexIntegrityError, match=f"{store_path}: items file is missing"):
        ItemStore.open(store_path)


@pytest.mark.parametrize(
    ("ids", "items", "message"),
    [
        (np.array([1, 2]), [{"id": 5}, {}], "item for id 1 carries a different 'id' field: 5"),
        (np.array([1, 2]), [{"thumbnail": "x"}, {}], "field 'thumbnail', a name reserved for images"),
        (np.array([1, 1]), [{}, {}], "item ids must be unique"),
        (np.array([1, 2]), [{}], "2 ids but 1 items"),
        (np.array([1, 2]), [{"label": object()}, {"label": "b"}], "item for id 1 is not JSON-serialisable"),
    ],
)
def test_bad_items_are_refused(tmp_path: Path, ids: np.ndarray, items: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_items_parquet(tmp_path / "bad.items.parquet", ids, items)
