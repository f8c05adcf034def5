"""Closed-loop HTTP load generator for ``POST /search/vector(s)``, run as its own process.

``--concurrency`` asyncio workers share one aiohttp session (one keep-alive connection each)
and send queries back to back: each worker waits for its reply before sending the next
request, so at most ``--concurrency`` requests are in flight. The run is bounded twice: it
stops after ``--requests`` timed requests or after ``--max-seconds``, whichever comes first.
``--warmup`` requests go out first (same concurrency) and are not timed.

Queries are rows of a ``.npy`` file (``float32 [Q, D]``), taken in turn. With ``--batch 1`` (the
default) each request is ``POST /search/vector`` ``{"vector": [...], "k": k}``; with ``--batch N``
each request is ``POST /search/vectors`` ``{"vectors": [[...] x N], "k": k}`` carrying the next N
rows, and the reply must be ``{"results": [[...] x N]}``. A request counts as failed on a
transport error, a timeout, a status other than 200, or a 200 reply without a ``results`` list
of ``k`` entries (with ``--batch N``: N lists of ``k`` entries). Prints one JSON object on stdout::

    {"concurrency", "batch", "requested", "completed", "ok", "failed", "failures": {reason: count},
     "failure_examples": [...], "seconds", "requests_per_s", "qps",
     "latency_ms": {"p50", "p90", "p99", "mean", "max"}, "stopped_by": "count" | "time"}

``requests_per_s`` counts successful replies per second of the timed phase, and ``qps`` the
query vectors they answered (``batch x requests_per_s``); latencies are per request.

Run: ``.venv/bin/python benchmarks/load_client.py --url http://127.0.0.1:8000 --queries q.npy --concurrency 8``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

MAX_FAILURE_EXAMPLES = 5


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--path", default=None, help="endpoint path (default /search/vector, with --batch > 1 /search/vectors)"
    )
    parser.add_argument("--batch", type=int, default=1, help="query vectors per request (> 1: /search/vectors)")
    parser.add_argument("--queries", required=True, help=".npy file of float32 query vectors [Q, D]")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (closed loop)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests at most")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time cap of the timed phase")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests sent first")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--params", default=None, help="JSON search parameters, e.g. '{\"nprobe\": 16}'")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    return parser.parse_args()


@dataclass
class Tally:
    """What the timed phase saw: per-request latencies of successes and failure reasons."""

    latencies_s: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    sent: int = 0

    def fail(self, reason: str, detail: str) -> None:
        self.failures[reason] += 1
        if len(self.examples) < MAX_FAILURE_EXAMPLES:
            self.examples.append(f"{reason}: {detail[:300]}")


def reply_is_complete(results: Any, *, k: int, batch: int) -> bool:
    """Whether ``results`` holds ``k`` hits (``batch`` 1) or ``batch`` lists of ``k`` hits each."""
    if not isinstance(results, list):
        return False
    if batch == 1:
        return len(results) == k
    return len(results) == batch and all(isinstance(hits, list) and len(hits) == k for hits in results)


async def _one(
    session: aiohttp.ClientSession, *, url: str, body: dict[str, Any], k: int, batch: int, tally: Tally | None
) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            text = await response.text()
            status = response.status
    except (TimeoutError, aiohttp.ClientError) as error:
        if tally is not None:
            tally.fail(type(error).__name__, str(error))
        return
    elapsed = time.perf_counter() - started
    if tally is None:
        return
    if status != 200:
        tally.fail(f"http_{status}", text)
        return
    try:
        results = json.loads(text)["results"]
    except (ValueError, KeyError, TypeError) as error:
        tally.fail("bad_reply", f"{error}: {text}")
        return
    if not reply_is_complete(results, k=k, batch=batch):
        tally.fail("short_reply", text)
        return
    tally.latencies_s.append(elapsed)


async def _phase(
    session: aiohttp.ClientSession,
    *,
    url: str,
    bodies: list[dict[str, Any]],
    k: int,
    batch: int,
    concurrency: int,
    count: int,
    deadline: float,
    tally: Tally | None,
) -> None:
    """Send ``count`` requests from ``concurrency`` closed-loop workers, none started after ``deadline``."""
    next_request = 0

    async def worker() -> None:
        nonlocal next_request
        while next_request < count and time.perf_counter() < deadline:
            position = next_request
            next_request += 1
            if tally is not None:
                tally.sent += 1
            await _one(session, url=url, body=bodies[position % len(bodies)], k=k, batch=batch, tally=tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def percentile_ms(sorted_seconds: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted latencies in seconds, in milliseconds."""
    if not sorted_seconds:
        return float("nan")
    rank = min(len(sorted_seconds) - 1, max(0, round(fraction * (len(sorted_seconds) - 1))))
    return sorted_seconds[rank] * 1000.0


async def run_load(
    *,
    url: str,
    queries: np.ndarray,
    concurrency: int,
    requests: int,
    max_seconds: float,
    warmup: int,
    k: int,
    params: dict[str, Any] | None,
    timeout_s: float,
    batch: int = 1,
) -> dict[str, Any]:
    """Warm up, then run the timed closed-loop phase and summarise it.

    Args:
        url: the full endpoint URL.
        queries: ``float32 [Q, D]``, sent in turn (the warm-up starts at the end of the list).
        concurrency: workers, each with at most one request in flight.
        requests: timed requests at most.
        max_seconds: no timed request starts after this many seconds.
        warmup: untimed requests first.
        k: results per query.
        params: optional per-request search parameters (``{"nprobe": 16}``).
        timeout_s: per-request timeout.
        batch: query vectors per request; above 1 the body is ``{"vectors": [N, D]}``.

    Returns:
        The summary printed by `main`.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    bodies: list[dict[str, Any]] = []
    rows = [[float(value) for value in row] for row in queries]
    for start in range(0, len(rows), batch):
        if batch == 1:
            body: dict[str, Any] = {"vector": rows[start], "k": k}
        else:
            # Wrap around at the end so that every request carries exactly `batch` vectors.
            body = {"vectors": [rows[(start + offset) % len(rows)] for offset in range(batch)], "k": k}
        if params:
            body["params"] = params
        bodies.append(body)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_bodies = bodies[::-1]
        await _phase(
            session,
            url=url,
            bodies=warm_bodies,
            k=k,
            batch=batch,
            concurrency=concurrency,
            count=warmup,
            deadline=time.perf_counter() + max_seconds,
            tally=None,
        )
        tally = Tally()
        started = time.perf_counter()
        await _phase(
            session,
            url=url,
            bodies=bodies,
            k=k,
            batch=batch,
            concurrency=concurrency,
            count=requests,
            deadline=started + max_seconds,
            tally=tally,
        )
        seconds = time.perf_counter() - started
    latencies = sorted(tally.latencies_s)
    requests_per_s = len(latencies) / seconds if seconds > 0 else 0.0
    failed = sum(tally.failures.values())
    return {
        "concurrency": concurrency,
        "batch": batch,
        "requested": requests,
        "completed": tally.sent,
        "ok": len(latencies),
        "failed": failed,
        "failures": dict(tally.failures),
        "failure_examples": tally.examples,
        "seconds": seconds,
        "requests_per_s": requests_per_s,
        "qps": requests_per_s * batch,
        "latency_ms": {
            "p50": percentile_ms(latencies, 0.50),
            "p90": percentile_ms(latencies, 0.90),
            "p99": percentile_ms(latencies, 0.99),
            "mean": float(np.mean(latencies)) * 1000.0 if latencies else float("nan"),
            "max": latencies[-1] * 1000.0 if latencies else float("nan"),
        },
        "stopped_by": "count" if tally.sent >= requests else "time",
    }


def main() -> None:
    args = _arguments()
    queries = np.load(args.queries)
    path = args.path or ("/search/vector" if args.batch == 1 else "/search/vectors")
    summary = asyncio.run(
        run_load(
            url=args.url.rstrip("/") + path,
            queries=queries,
            concurrency=args.concurrency,
            requests=args.requests,
            max_seconds=args.max_seconds,
            warmup=args.warmup,
            k=args.k,
            params=json.loads(args.params) if args.params else None,
            timeout_s=args.timeout_s,
            batch=args.batch,
        )
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
