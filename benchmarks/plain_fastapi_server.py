"""The baseline a user would write without the platform: one uvicorn process, FastAPI, one Faiss index.

Loads a Faiss index file (e.g. ``shard-000.faiss`` of a 1-shard version built by
`retrieval.index.shards.build_shards`) and, optionally, the items file beside it
(``shard-000.items.parquet`` with an ``id`` column, or ``.jsonl`` with an ``id`` per line) into
a dict, then answers

    POST /search/vector   {"vector": [float, ...], "k": int}  ->  {"k", "results": [{"id", "score", ...item}]}
    POST /search/vectors  {"vectors": [[float, ...], ...], "k": int}  ->  {"k", "results": [[hit, ...], ...]}
    GET  /healthz         {"status": "ok", "ntotal": int}

The search route is a plain ``def``: FastAPI runs it in its thread pool, and Faiss releases
the GIL while it searches, so concurrent requests overlap the way they would in a typical
hand-written service. There is no batching, no validation beyond pydantic's types, and no
sharding: the point is the cost of the HTTP layer around one ``index.search`` call. The batch
route answers N query vectors ``[N, D]`` with one ``index.search`` call (what a user who batches
on the client side would write); it takes at most 64 vectors, like the platform's default
``max_query_vectors``.

Faiss's OpenMP threads per call come from ``OMP_NUM_THREADS`` (set it in the environment:
``faiss.omp_set_num_threads`` in the main thread would not reach the request threads). For
single queries on a busy machine, 1 is much faster than a team of threads waiting for each
other; Ray sets 1 in its workers too, so the benchmark driver starts this server with 1.

Run: ``.venv/bin/python benchmarks/plain_fastapi_server.py --index shard-000.faiss --port 8100``
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

logger = logging.getLogger(__name__)


class VectorQuery(BaseModel):
    """Body of ``POST /search/vector``."""

    vector: list[float]
    k: int = 10


class VectorsQuery(BaseModel):
    """Body of ``POST /search/vectors``: query vectors ``[N, D]``."""

    vectors: list[list[float]]
    k: int = 10


MAX_QUERY_VECTORS = 64


def read_items(path: Path) -> dict[int, dict[str, Any]]:
    """The items file as ``{id: item}``: Parquet with an ``id`` column, or JSON lines with an ``id`` each."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {int(row["id"]): row for row in pq.read_table(path).to_pylist()}
    items: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as stream:
        for line in stream:
            item = json.loads(line)
            items[int(item["id"])] = item
    return items


def build_api(index: Any, items: dict[int, dict[str, Any]]) -> FastAPI:
    """The FastAPI app over one loaded Faiss index ``index`` (dimension ``index.d``) and its items."""
    api = FastAPI(title="plain faiss search")

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "ntotal": int(index.ntotal), "faiss_threads": faiss.omp_get_max_threads()}

    def hits(ids: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        return [
            {**items.get(item_id, {}), "id": item_id, "score": float(score)}
            for item_id, score in zip(ids.tolist(), scores.tolist(), strict=True)
            if item_id >= 0
        ]

    @api.post("/search/vector")
    def search_vector(query: VectorQuery) -> dict[str, Any]:
        if len(query.vector) != index.d or not 1 <= query.k <= 100:
            raise HTTPException(status_code=400, detail=f"need a vector of {index.d} floats and 1 <= k <= 100")
        vector = np.asarray(query.vector, dtype=np.float32)[None, :]
        scores, ids = index.search(vector, query.k)
        return {"k": query.k, "results": hits(ids[0], scores[0])}

    @api.post("/search/vectors")
    def search_vectors(query: VectorsQuery) -> dict[str, Any]:
        shapes_ok = 1 <= len(query.vectors) <= MAX_QUERY_VECTORS and all(len(row) == index.d for row in query.vectors)
        if not shapes_ok or not 1 <= query.k <= 100:
            raise HTTPException(
                status_code=400,
                detail=f"need 1 to {MAX_QUERY_VECTORS} vectors of {index.d} floats and 1 <= k <= 100",
            )
        vectors = np.asarray(query.vectors, dtype=np.float32)
        scores, ids = index.search(vectors, query.k)
        answers = [hits(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores, strict=True)]
        return {"k": query.k, "results": answers}

    return api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="a Faiss index file")
    parser.add_argument("--items", default=None, help="the items .parquet or .jsonl beside it (optional)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    index = faiss.read_index(args.index)
    items = read_items(Path(args.items)) if args.items else {}
    uvicorn.run(build_api(index, items), host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
