"""Per-request search parameters: ``nprobe`` for IVF indices, ``efSearch`` for HNSW ones.

They travel with each request down to the shard and reach Faiss as a `faiss.SearchParameters`
object for that one call, never by setting ``index.nprobe`` on a shared index: two requests
with different settings can run on the same shard at once without seeing each other's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss

from retrieval.errors import BadRequestError

# Faiss takes both settings as C ints; a larger value would overflow inside the shard.
MAX_SETTING = 2**31 - 1


@dataclass(frozen=True)
class SearchParams:
    """Search settings for one query; None means the index's default (from its manifest).

    Attributes:
        nprobe: inverted lists visited per query (IVF indices, float or binary); 1..nlist.
        ef_search: candidate list size of the graph search (HNSW indices); >= 1.
    """

    nprobe: int | None = None
    ef_search: int | None = None

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BadRequestError(f"{name} must be a positive integer, got {value!r}")
            if value is not None and value > MAX_SETTING:
                raise BadRequestError(f"{name} must be at most {MAX_SETTING}, got {value}")

    @property
    def is_default(self) -> bool:
        """Whether no setting is given (the index's defaults apply)."""
        return self.nprobe is None and self.ef_search is None

    def key(self) -> tuple[int | None, int | None]:
        """A hashable key: queries with equal keys can share one Faiss call."""
        return (self.nprobe, self.ef_search)

    def with_defaults(self, defaults: Mapping[str, int] | None) -> SearchParams:
        """These settings, the unset ones taken from ``defaults`` (``{"nprobe": .., "ef_search": ..}``)."""
        if not defaults:
            return self
        return SearchParams(
            nprobe=self.nprobe if self.nprobe is not None else defaults.get("nprobe"),
            ef_search=self.ef_search if self.ef_search is not None else defaults.get("ef_search"),
        )

    def as_dict(self) -> dict[str, int]:
        """The settings given, e.g. ``{"nprobe": 16}`` (for replies and logs)."""
        return {name: value for name, value in (("nprobe", self.nprobe), ("ef_search", self.ef_search)) if value}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> SearchParams:
        """Parse ``{"nprobe": 16, "ef_search": 64}`` (``efSearch`` is accepted too).

        Raises:
            BadRequestError: an unknown key or a value that is not a positive integer.
        """
        if not data:
            return cls()
        known = {"nprobe": "nprobe", "ef_search": "ef_search", "efSearch": "ef_search"}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise BadRequestError(f"unknown search parameters {unknown}; known: nprobe, ef_search")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if known[name] in values:
                raise BadRequestError(f"search parameter {known[name]} is given twice (as ef_search and efSearch)")
            values[known[name]] = value
        return cls(**values)


def _unwrapped(index: Any) -> Any:
    """The index inside an id map (float or binary), downcast to its concrete type; others as given."""
    if isinstance(index, faiss.IndexBinaryIDMap | faiss.IndexBinaryIDMap2):
        return faiss.downcast_IndexBinary(index.index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def hnsw_of(index: Any) -> Any | None:
    """The HNSW graph index inside ``index`` (`IndexHNSW` or `IndexBinaryHNSW`, through an id map), or None."""
    inner = _unwrapped(index)
    return inner if isinstance(inner, faiss.IndexHNSW | faiss.IndexBinaryHNSW) else None


def ivf_of(index: Any) -> Any | None:
    """The IVF index inside ``index`` (float or binary, through an id map), or None."""
    inner = _unwrapped(index)
    if isinstance(inner, faiss.IndexBinary):
        return inner if isinstance(inner, faiss.IndexBinaryIVF) else None
    try:
        return faiss.extract_index_ivf(inner)
    except RuntimeError:
        return None


@dataclass(frozen=True)
class IndexKnobs:
    """Which per-search settings an index has: looked up once per index, since finding the IVF or
    HNSW part inside the wrappers costs more than a small search.

    Attributes:
        nlist: the IVF index's number of inverted lists (the largest ``nprobe``); None when not IVF.
        hnsw: whether the index is an HNSW graph (takes ``ef_search``).
    """

    nlist: int | None
    hnsw: bool


def index_knobs(index: Any) -> IndexKnobs:
    """The settings ``index`` (float or binary, possibly inside an id map) takes per search."""
    ivf = ivf_of(index)
    return IndexKnobs(nlist=None if ivf is None else int(ivf.nlist), hnsw=hnsw_of(index) is not None)


def faiss_search_parameters(
    index: Any, params: SearchParams, *, factory: str, knobs: IndexKnobs | None = None
) -> Any | None:
    """The `faiss.SearchParameters` for one search of ``index`` with ``params``, or None for the defaults.

    Args:
        index: a shard's Faiss index (float or binary, usually inside an IDMap2).
        params: the request's settings.
        factory: the index's factory string, named in errors.
        knobs: ``index_knobs(index)`` computed once by the caller (default: looked up now).

    Raises:
        BadRequestError: a setting the index does not have (``nprobe`` on a non-IVF index,
            ``ef_search`` on a non-HNSW one) or ``nprobe`` above the number of lists.
    """
    if params.is_default:
        return None
    knobs = knobs if knobs is not None else index_knobs(index)
    if params.nprobe is not None and knobs.nlist is None:
        raise BadRequestError(f"nprobe applies to IVF indices; this index is {factory!r}")
    if params.ef_search is not None and not knobs.hnsw:
        raise BadRequestError(f"ef_search applies to HNSW indices; this index is {factory!r}")
    if knobs.nlist is not None and params.nprobe is not None:
        if params.nprobe > knobs.nlist:
            raise BadRequestError(
                f"nprobe must be between 1 and {knobs.nlist} (the index's lists), got {params.nprobe}"
            )
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = params.nprobe
        return ivf_params
    if knobs.hnsw and params.ef_search is not None:
        # faiss's bundled type stubs lack SearchParametersHNSW, which the module has.
        hnsw_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        hnsw_params.efSearch = params.ef_search
        return hnsw_params
    return None
