"""Micro-batching of concurrent requests at the router, free of Ray so it is testable in-process.

Each request to a sharded index costs one call per shard, and on a small machine those hops
cost more than the search itself. `MicroBatcher` gathers the requests that arrive together and
share a key (the ingress uses the index version and the search parameters, which must be equal
for queries to share one Faiss call) and hands them to one ``run_batch`` call::

    submit(key, request, size)   joins the open batch of ``key`` (or opens one); the batch goes
                                 out when it holds ``max_batch_size`` queries or when
                                 ``wait_timeout_s`` has passed since it opened, whichever first
    run_batch(key, requests)     one call for the whole batch, one result per request, in order

With ``max_concurrent_batches``, at most that many batches run at once; a batch that is due
while they run waits for one to finish, and keeps taking requests meanwhile (up to
``max_batch_size``). So the batches grow with the load instead of queueing up small: when the
work is done in this process (the local layout searches its shards on this replica's cores),
a search of 8 queries costs little more than a search of one, and 8 small searches in a queue
would cost 8 times as much.

An error of ``run_batch`` is given to every request of the batch. A request whose caller went
away (its task was cancelled) is dropped from its batch, or its result discarded, without
disturbing the others.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

KeyT = TypeVar("KeyT", bound=Hashable)
RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


@dataclass
class _Waiting(Generic[RequestT, ResultT]):
    request: RequestT
    size: int
    future: asyncio.Future[ResultT]


@dataclass
class _OpenBatch(Generic[RequestT, ResultT]):
    waiting: list[_Waiting[RequestT, ResultT]] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None
    # Due (its wait is over or it is full) and waiting for a free run slot.
    queued: bool = False


class MicroBatcher(Generic[KeyT, RequestT, ResultT]):
    """Gathers concurrent requests with equal keys into one ``run_batch`` call.

    Args:
        run_batch: ``(key, requests) -> results``, one result per request in the same order.
        max_batch_size: the most queries in one batch (a request counts its ``size``; a single
            request larger than this goes out alone).
        wait_timeout_s: how long an open batch waits for more requests before it goes out
            (0: only the requests that arrive in the same event-loop turn are gathered).
        max_concurrent_batches: the most batches running at once (None: no limit).
    """

    def __init__(
        self,
        *,
        run_batch: Callable[[KeyT, list[RequestT]], Awaitable[list[ResultT]]],
        max_batch_size: int,
        wait_timeout_s: float,
        max_concurrent_batches: int | None = None,
    ) -> None:
        if max_concurrent_batches is not None and max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1 or None, got {max_concurrent_batches}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if wait_timeout_s < 0:
            raise ValueError(f"wait_timeout_s must be >= 0, got {wait_timeout_s}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._wait_timeout_s = wait_timeout_s
        self._max_concurrent = max_concurrent_batches
        self._open: dict[KeyT, _OpenBatch[RequestT, ResultT]] = {}
        # Due batches waiting for a run slot, oldest first.
        self._queue: collections.deque[tuple[KeyT, _OpenBatch[RequestT, ResultT]]] = collections.deque()
        # Running batches, referenced so the event loop does not drop them half-way.
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, key: KeyT, request: RequestT, *, size: int = 1) -> ResultT:
        """Add ``request`` (``size`` queries) to the open batch of ``key`` and wait for its result.

        Raises:
            Exception: whatever ``run_batch`` raised for the batch this request went out in.
        """
        if size < 1:
            raise ValueError(f"a request holds at least one query, got size {size}")
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is not None and batch.size + size > self._max_batch_size:
            self._close(key)
            batch = None
        if batch is None:
            batch = _OpenBatch()
            self._open[key] = batch
            batch.timer = loop.call_later(self._wait_timeout_s, self._due, key)
        future: asyncio.Future[ResultT] = loop.create_future()
        batch.waiting.append(_Waiting(request=request, size=size, future=future))
        batch.size += size
        if batch.size >= self._max_batch_size:
            self._close(key)
        # Cancelling the caller cancels `future`; the batch then skips or discards it.
        return await future

    def _slot_free(self) -> bool:
        return self._max_concurrent is None or len(self._running) < self._max_concurrent

    def _due(self, key: KeyT) -> None:
        """The open batch of ``key`` has waited long enough: run it, or queue it (still open to more requests)."""
        batch = self._open.get(key)
        if batch is None:
            return
        batch.timer = None
        if self._slot_free():
            del self._open[key]
            self._start(key, batch)
        elif not batch.queued:
            batch.queued = True
            self._queue.append((key, batch))

    def _close(self, key: KeyT) -> None:
        """The open batch of ``key`` takes no more requests (it is full): run it, or queue it."""
        batch = self._open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if batch.queued:
            return  # already in the queue; it runs in its turn
        if self._slot_free():
            self._start(key, batch)
        else:
            batch.queued = True
            self._queue.append((key, batch))

    def _start(self, key: KeyT, batch: _OpenBatch[RequestT, ResultT]) -> None:
        waiting = [entry for entry in batch.waiting if not entry.future.done()]
        if not waiting:
            return
        task = asyncio.get_running_loop().create_task(self._run(key, waiting))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        while self._queue and self._slot_free():
            key, batch = self._queue.popleft()
            if self._open.get(key) is batch:
                del self._open[key]
            self._start(key, batch)

    async def _run(self, key: KeyT, waiting: list[_Waiting[RequestT, ResultT]]) -> None:
        try:
            results = await self._run_batch(key, [entry.request for entry in waiting])
            if len(results) != len(waiting):
                raise RuntimeError(f"a batch of {len(waiting)} requests got {len(results)} results")
        except asyncio.CancelledError:
            for entry in waiting:
                entry.future.cancel()
            raise
        except Exception as error:
            for entry in waiting:
                if not entry.future.done():
                    entry.future.set_exception(error)
            return
        for entry, result in zip(waiting, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)

    def pending(self) -> dict[Any, int]:
        """Queries waiting in batches not yet running, per key (for logs and tests)."""
        pending: dict[Any, int] = {}
        seen: set[int] = set()
        for key, batch in [*self._open.items(), *self._queue]:
            if id(batch) not in seen:
                seen.add(id(batch))
                pending[key] = pending.get(key, 0) + batch.size
        return pending
