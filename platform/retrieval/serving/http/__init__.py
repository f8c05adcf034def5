"""The HTTP API of the search service (FastAPI), over a `SearchService`, and its search page.

Endpoints::

    POST /search            JSON {"text" | "vector" | "id" | "image": ..., "k": int?, "params": {...}?},
                            exactly one query field; "image" is the image file base64-encoded
    POST /search/vector     JSON {"vector": [float, ...], "k": int?, "params": {...}?}
    POST /search/vectors    JSON {"vectors": [[float, ...], ...], "k": int?, "params": {...}?}  a batch:
                            "results" holds one list of hits per vector, in order
    POST /search/image      multipart form: file (image bytes), k, nprobe, ef_search (optional form fields)
    POST /search/id         JSON {"id": int, "k": int?, "params": {...}?}  neighbours, excluding the item
    POST /search/text       JSON {"text": str, "k": int?, "params": {...}?}  cross-modal models: search by a sentence
    GET  /items/{id}        the stored metadata of one gallery item
    GET  /items/{id}/thumbnail   its thumbnail (image/png), for indices built with thumbnails
    GET  /healthz           {"status": "ok"}: the ingress is alive (liveness)
    GET  /readyz            200 when every shard and the embedder hold the active version, else 503;
                            the body says which: {"ready", "index_version", "layout", "shards": [...],
                            "embedder": {...}}
    GET  /version           {"model": {...}, "index_version": str, "manifest": {...}, "text_queries": bool}
    GET  /metrics           Prometheus text (`retrieval.serving.metrics`) where the app runs without Ray;
                            under Ray Serve a 404 pointing at Ray's metrics export, which has every replica
    GET  /                  the search page (HTML; its script and style under /ui/)
    POST /admin/swap        JSON {"index": "<version name under the served root> | <manifest path or s3:// URI>"}
                            -> {"from", "to", "model", "duration_s", "replicas"}   (rolling swap)
    GET  /admin/status      {"active", "model", "prepared", "retiring", "epoch", "replicas": {...}}

``params`` holds per-request index settings, ``{"nprobe": int}`` for IVF indices and
``{"ef_search": int}`` for HNSW ones (`retrieval.index.search_params.SearchParams`); a setting
the index does not have, an unknown key or a value below 1 is a 400.

Routes live on one router per access level (`retrieval.serving.http.routes`); a route that
declares no access needs the query token (`retrieval.serving.http.auth`).

Authentication. The admin routes need ``Authorization: Bearer <token>``, the token being the
value of the environment variable ``ServingSpec.admin_token_env`` (default
``RETRIEVAL_ADMIN_TOKEN``) on the ingress replica, read per request; when that variable is unset
or empty they are disabled (403). When ``ServingSpec.query_token_env`` names a variable, the
query routes (``/search*``, ``/items*``, ``/version``) need ``Authorization: Bearer <its value>``
too (401 without it; 403 while the variable is unset on the replica). ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json`` and the search page stay open: probes and scrapers carry no
token, and the page asks the user for one. ``ServingSpec.cors_origins`` lists the origins a
browser may call the API from (GET and POST, headers Authorization and Content-Type).

Limits. ``k`` is 1..``max_k``; an uploaded image is at most ``max_upload_bytes``; a batch holds at
most ``max_query_vectors`` vectors; a text at most 10,000 characters. The body of each POST route
is limited to what that route can legitimately carry (`retrieval.serving.http.gate.BodyLimits`:
one vector of the index's dimension, ``max_query_vectors`` of them, an upload of
``max_upload_bytes`` plus 64 KiB of form overhead, a base64 image for ``POST /search``), refused
from its Content-Length before it is read, or as soon as a streamed body passes the limit.
``nprobe`` and ``ef_search`` are at most 2**31 - 1 (Faiss takes them as C ints).

Every search reply is ``{"model": {"name", "version", "uri"}, "index_version", "modality", "k",
"partial", "missing_shards", "params", "results": [{"id", "score", <item fields, e.g. label,
source>}, ...]}``, best first (highest ``score``); ``modality`` ("image" or "text") says what
the indexed items are; ``partial`` is true when a shard missed the deadline and the answer
comes from the others (``missing_shards`` names them). A binary (hashing) index also gives each
result its Hamming ``distance``, with ``score = 1 - 2 * distance / bits`` (the cosine of the
two ±1 codes, in [-1, 1]); its vector queries hold one real value per bit, of which only the
sign counts. When the index holds thumbnails each result has ``"thumbnail_url":
"items/<id>/thumbnail"``, relative to the application's root (so it holds under any route prefix).

Every error reply is ``{"error": {"type": str, "message": str}}`` (ARCHITECTURE invariant 4):

    422 validation_error    the request does not fit the schema: malformed JSON, a missing
                            or unknown field, a value of the wrong type, not exactly one
                            query field in POST /search (FastAPI's RequestValidationError,
                            reshaped)
    400 bad_request         well-formed but invalid: wrong vector length, non-finite values,
                            k outside 1..max_k, an empty or blank text, a text query to a model
                            that embeds images only, an "image" that is not base64, bad params
    400 not_an_image        the upload is not a readable image
    413 payload_too_large   the upload is bigger than max_upload_bytes, a body over its limit,
                            more than max_query_vectors vectors, or a text longer than
                            MAX_TEXT_CHARS (10,000) characters
    404 not_found           unknown gallery id, an item without a thumbnail, unknown route, or
                            GET /metrics under Ray Serve (the message says where the metrics are)
    405 method_not_allowed  a known route with the wrong method
    503 version_unavailable no replica holds the pinned index version (retry later)
    503 shard_unavailable   a shard has no live replica (retry later)
    503 not_ready           GET /readyz while not ready (with the readiness fields beside "error")
    504 shard_timeout       a shard missed the deadline and the spec says on_shard_timeout: error
    401 unauthorized        a protected route without a bearer token, or with a wrong one
    403 forbidden           admin routes (or, with query_token_env, query routes) are disabled:
                            no token configured on the server
    409 swap_in_progress    another swap is running
    409 swap_failed         the swap was refused or aborted (the reason); the old version serves on
    422 bad_index_reference the swap names no readable index version / manifest
    500 internal_error      anything else (a bug): the reply names an error id and nothing else;
                            the ingress's log holds the detail under that id; the replica keeps serving
"""

from retrieval.serving.http.api import build_http_api
from retrieval.serving.http.gate import json_body_limit, upload_body_limit
from retrieval.serving.http.responses import decode_base64_image, error_response, text_queries_supported

__all__ = [
    "build_http_api",
    "decode_base64_image",
    "error_response",
    "json_body_limit",
    "text_queries_supported",
    "upload_body_limit",
]
