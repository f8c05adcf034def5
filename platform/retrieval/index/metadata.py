"""Per-shard item metadata in a columnar file (Parquet), looked up by id without per-item objects.

A shard's items file ``shard-XXX.items.parquet`` holds one row per gallery id: the column
``id`` (int64, sorted ascending), one column per top-level item field, and optionally a
``thumbnail`` column of PNG bytes (large_binary). Pyarrow infers each field's column type; a field whose
values do not survive that (mixed types, ints mixed with floats, dicts with different keys) or
that some items lack is stored as a column of JSON strings instead, named in the file's schema
metadata, so every item reads back exactly as it was written (an absent field stays absent).

`ItemStore` keeps the Arrow table (read through a memory map; zstd pages are decompressed into
Arrow buffers, one per column chunk, not one object per item) and a numpy view of the sorted ids;
a lookup is a binary search, and a page of results is one ``take``.
Indices written before this format hold ``shard-XXX.items.jsonl`` (one JSON object a line);
`ItemStore.open` reads those into the same in-memory table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.errors import IndexIntegrityError

logger = logging.getLogger(__name__)

ID_COLUMN = "id"
THUMBNAIL_COLUMN = "thumbnail"
PARQUET_SUFFIX = ".items.parquet"
LEGACY_JSONL_SUFFIX = ".items.jsonl"
# Schema metadata key: which columns hold JSON text rather than typed values.
_METADATA_KEY = b"retrieval.items"
_FORMAT = 1


def _encode_json(item_id: int, field: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"item for id {item_id} is not JSON-serialisable (field {field!r}): {error}") from error


def _typed_column(values: list[Any]) -> pa.Array | None:
    """The values as a typed Arrow array, or None when the array would not read back as the same values.

    Equality alone would accept 1 read back as 1.0, or a dict gaining a key set to None; the
    JSON text of both sides tells those apart.
    """
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError):
        return None
    try:
        same = json.dumps(array.to_pylist(), sort_keys=True) == json.dumps(values, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return array if same else None


def items_table(
    ids: np.ndarray, items: Sequence[Mapping[str, Any]], thumbnails: Sequence[bytes | None] | None = None
) -> pa.Table:
    """The Arrow table of the items file, rows sorted by id.

    Args:
        ids: item ids ``[N]`` (unique integers, any order).
        items: one mapping per id, JSON-serialisable; an ``"id"`` field must equal its id.
        thumbnails: one PNG (or None) per id, or None for no thumbnail column.

    Returns:
        The table: ``id`` int64 sorted, one column per field (sorted by name), then ``thumbnail``.

    Raises:
        ValueError: lengths differ, ids repeat, an item's ``"id"`` disagrees, an item has a
            field named ``"thumbnail"``, or a value is not JSON-serialisable.
    """
    id_array = np.asarray(ids, dtype=np.int64)
    if id_array.ndim != 1 or len(items) != len(id_array):
        raise ValueError(f"items must hold one mapping per id: {len(id_array)} ids but {len(items)} items")
    if thumbnails is not None and len(thumbnails) != len(id_array):
        raise ValueError(f"thumbnails must hold one entry per id: {len(id_array)} ids but {len(thumbnails)}")
    order = np.argsort(id_array, kind="stable")
    sorted_ids = id_array[order]
    if sorted_ids.size > 1 and not (np.diff(sorted_ids) > 0).all():
        raise ValueError("item ids must be unique")
    rows = [items[position] for position in order.tolist()]
    fields: dict[str, None] = {}
    for item_id, item in zip(sorted_ids.tolist(), rows, strict=True):
        if ID_COLUMN in item and item[ID_COLUMN] != item_id:
            raise ValueError(f"item for id {item_id} carries a different 'id' field: {item[ID_COLUMN]!r}")
        if THUMBNAIL_COLUMN in item:
            raise ValueError(f"item for id {item_id} has a field {THUMBNAIL_COLUMN!r}, a name reserved for images")
        fields.update(dict.fromkeys(item))
    fields.pop(ID_COLUMN, None)

    columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(sorted_ids, type=pa.int64())}
    json_columns: list[str] = []
    for field in sorted(fields):
        present = all(field in item for item in rows)
        array = _typed_column([item[field] for item in rows]) if present else None
        if array is None:
            # Null marks an absent field; a present None is the JSON text "null".
            text = [
                _encode_json(item_id, field, item[field]) if field in item else None
                for item_id, item in zip(sorted_ids.tolist(), rows, strict=True)
            ]
            array = pa.array(text, type=pa.string())
            json_columns.append(field)
        columns[field] = array
    if thumbnails is not None:
        # 64-bit offsets: a shard of many thumbnails can pass the 2 GiB a plain binary column holds.
        columns[THUMBNAIL_COLUMN] = pa.array(
            [thumbnails[position] for position in order.tolist()], type=pa.large_binary()
        )
    metadata = {_METADATA_KEY: json.dumps({"format": _FORMAT, "json_columns": json_columns}).encode("utf-8")}
    return pa.table(columns).replace_schema_metadata(metadata)


def write_items_parquet(
    path: str | Path,
    ids: np.ndarray,
    items: Sequence[Mapping[str, Any]],
    thumbnails: Sequence[bytes | None] | None = None,
) -> Path:
    """Write a shard's items file (Parquet, zstd).

    Args:
        path: the file to write (conventionally ``shard-XXX.items.parquet``).
        ids: item ids ``[N]``, unique integers.
        items: one JSON-serialisable mapping per id (``{"label": "7", "source": "digits:12"}``).
        thumbnails: one PNG (bytes) or None per id; None for no ``thumbnail`` column.

    Returns:
        ``path``.

    Raises:
        ValueError: see `items_table`.
    """
    path = Path(path)
    pq.write_table(items_table(ids, items, thumbnails), path, compression="zstd")
    return path


class ItemStore:
    """Read-only item metadata of one shard, looked up by id in an Arrow table.

    Holds no Python object per item: the table's columns and a numpy view of its sorted
    ``id`` column, searched with `np.searchsorted`.

    Args:
        table: a table as `items_table` makes it (``id`` sorted ascending).
        source: the file it came from, named in errors.

    Raises:
        IndexIntegrityError: no ``id`` column, ids not sorted and unique, or unreadable metadata.
    """

    def __init__(self, table: pa.Table, *, source: str | Path) -> None:
        self._source = str(source)
        if ID_COLUMN not in table.column_names:
            raise IndexIntegrityError(f"{source}: items file has no {ID_COLUMN!r} column (has {table.column_names})")
        ids = np.asarray(table.column(ID_COLUMN).to_numpy(), dtype=np.int64)
        if ids.size > 1 and not (np.diff(ids) > 0).all():
            raise IndexIntegrityError(f"{source}: item ids are not sorted and unique")
        raw = (table.schema.metadata or {}).get(_METADATA_KEY)
        try:
            json_columns = set(json.loads(raw)["json_columns"]) if raw else set()
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise IndexIntegrityError(f"{source}: unreadable items metadata: {error}") from error
        self._ids = ids
        self._ids.flags.writeable = False
        self._json_columns = json_columns
        self._field_names = [name for name in table.column_names if name not in (ID_COLUMN, THUMBNAIL_COLUMN)]
        # One chunk per column: a take over the row groups' many chunks is some 20 times slower.
        self._fields = table.select(self._field_names).combine_chunks()
        self._thumbnails = (
            table.column(THUMBNAIL_COLUMN).combine_chunks() if THUMBNAIL_COLUMN in table.column_names else None
        )

    @classmethod
    def open(cls, path: str | Path) -> ItemStore:
        """Read an items file: Parquet (memory-mapped), or a legacy ``.items.jsonl``.

        Raises:
            IndexIntegrityError: the file is missing, truncated or corrupt; the message names it.
        """
        path = Path(path)
        if not path.is_file():
            raise IndexIntegrityError(f"{path}: items file is missing")
        if path.name.endswith(LEGACY_JSONL_SUFFIX):
            return cls.from_jsonl(path)
        try:
            table = pq.read_table(path, memory_map=True)
        except (pa.ArrowException, OSError, ValueError) as error:
            raise IndexIntegrityError(f"{path}: cannot read the items file as Parquet: {error}") from error
        return cls(table, source=path)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ItemStore:
        """Read a legacy items file (one JSON object with an ``"id"`` a line) into a store.

        Raises:
            IndexIntegrityError: a line is not an object with an integer ``"id"``, or ids repeat.
        """
        path = Path(path)
        ids: list[int] = []
        items: list[dict[str, Any]] = []
        with path.open(encoding="utf-8") as stream:
            for line_number, line in enumerate(stream, start=1):
                try:
                    item = json.loads(line)
                    ids.append(int(item["id"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    raise IndexIntegrityError(f"{path}:{line_number}: not an item with an 'id': {error}") from error
                items.append(item)
        try:
            table = items_table(np.asarray(ids, dtype=np.int64), items)
        except ValueError as error:
            raise IndexIntegrityError(f"{path}: {error}") from error
        return cls(table, source=path)

    def __len__(self) -> int:
        return int(self._ids.size)

    def __contains__(self, item_id: object) -> bool:
        if isinstance(item_id, bool) or not isinstance(item_id, int | np.integer):
            return False
        return self._position(int(item_id)) is not None

    def __iter__(self) -> Iterator[int]:
        """The ids, ascending."""
        return iter(self._ids.tolist())

    def __getitem__(self, item_id: int) -> dict[str, Any]:
        """The item of ``item_id`` (fields and ``"id"``).

        Raises:
            KeyError: the id is not held here.
        """
        item = self.get(item_id)
        if item is None:
            raise KeyError(item_id)
        return item

    @property
    def ids(self) -> np.ndarray:
        """The held ids ``[N]`` int64, sorted ascending, read-only."""
        return self._ids

    @property
    def has_thumbnails(self) -> bool:
        """Whether the file has a thumbnail column (some rows may still be null)."""
        return self._thumbnails is not None

    def _position(self, item_id: int) -> int | None:
        position = int(np.searchsorted(self._ids, item_id))
        if position < self._ids.size and self._ids[position] == item_id:
            return position
        return None

    def get(self, item_id: int) -> dict[str, Any] | None:
        """The item of ``item_id`` (its fields and ``"id"``, never the thumbnail), or None."""
        return self.get_many([item_id]).get(int(item_id))

    def get_many(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The items of those ``ids`` held here, in one ``take``; ids not held (and ``-1``) are left out.

        Args:
            ids: item ids (e.g. a result page ``[Q * k]``, padding and repeats allowed).

        Returns:
            ``{id: {"id": id, **fields}}``.
        """
        wanted = np.unique(
            ids.astype(np.int64, copy=False)
            if isinstance(ids, np.ndarray)
            else np.fromiter((int(item_id) for item_id in ids), dtype=np.int64)
        )
        if wanted.size == 0 or self._ids.size == 0:
            return {}
        positions = np.searchsorted(self._ids, wanted)
        inside = positions < self._ids.size
        found = np.zeros(wanted.shape, dtype=bool)
        found[inside] = self._ids[positions[inside]] == wanted[inside]
        if not found.any():
            return {}
        taken = self._fields.take(pa.array(positions[found]))
        # Column by column: Table.to_pylist builds rows some 20 times slower.
        columns = [(name, name in self._json_columns, taken.column(name).to_pylist()) for name in self._field_names]
        result: dict[int, dict[str, Any]] = {}
        for row, item_id in enumerate(wanted[found].tolist()):
            item: dict[str, Any] = {}
            for name, is_json, values in columns:
                value = values[row]
                if not is_json:
                    item[name] = value
                elif value is not None:
                    # JSON columns mark an absent field with null.
                    item[name] = json.loads(value)
            item[ID_COLUMN] = item_id
            result[item_id] = item
        return result

    def thumbnail(self, item_id: int) -> bytes | None:
        """The stored PNG bytes of ``item_id``, or None (no thumbnail, or the id is not held)."""
        if self._thumbnails is None:
            return None
        position = self._position(int(item_id))
        if position is None:
            return None
        value: bytes | None = self._thumbnails[position].as_py()
        return value

    def __repr__(self) -> str:
        return f"ItemStore({self._source!r}, items={len(self)}, thumbnails={self.has_thumbnails})"
