"""Every shard of the index, reached through its clients (local or remote), under one deadline and retry policy.

`ShardPool.fan_out` sends one block of queries to every shard and waits at most
``spec.shard_timeout_s``; `ShardPool.lookup` reads one id from the shard that holds its range;
`ShardPool.bounded` runs any call (the embedder's too) under the same deadline and retry.

The policy, the same for both layouts:

- A reply for another index version than the one pinned is never merged: a shard replica
  that does not hold the version (`VersionNotLoadedError`, e.g. during a rolling swap) or
  answers for another one is asked again, up to ``version_attempts`` times, then the request
  fails with 503 `VersionUnavailableError`.
- A call that meets a dead replica (`ShardUnavailableError`) is retried once at once, which
  Serve routes to another live replica.
- A shard past the deadline, or with no live replica, is missing: with ``on_shard_timeout:
  partial`` the answer merges the others and names it; with ``error`` the request fails, 504
  (`ShardTimeoutError`) for a timeout, 503 (`ShardUnavailableError`) for a dead shard. Every
  shard missing is always an error.
- A remote shard found dead is marked down and probed in the background until it answers
  again; meanwhile its calls fail fast instead of queueing for a replica that is not there.
  A local shard lives in the ingress's own process and cannot die alone: it skips all this.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from retrieval.config import ServingSpec
from retrieval.index.manifest import IndexManifest
from retrieval.index.search_params import SearchParams
from retrieval.serving.clients import EmbedderClient, ShardClient
from retrieval.serving.errors import (
    ShardTimeoutError,
    ShardUnavailableError,
    VersionNotLoadedError,
    VersionUnavailableError,
)
from retrieval.serving.metrics import ServingMetrics, ShardOutcome
from retrieval.serving.replies import PartReadiness, ShardHits

logger = logging.getLogger(__name__)

# How long readiness waits for each shard and the embedder to say which versions they hold.
READINESS_TIMEOUT_S = 2.0
# Pause between two probes of a shard found dead, when the probe fails at once.
PROBE_INTERVAL_S = 0.25

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class FanOut:
    """Every answering shard's hits (shard order) and the shards that missed the deadline or were down."""

    replies: list[ShardHits]
    missing_shards: list[int]


class _ShardDown:
    """A shard found without a live replica: why, and the background probe that watches for its return."""

    def __init__(self, reason: str, probe: asyncio.Task[None]) -> None:
        self.reason = reason
        self.probe = probe


def describe_error(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _retrieve_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class ShardPool:
    """The shards of the index behind one deadline and retry policy (see the module docstring).

    Args:
        spec: the serving spec (``shard_timeout_s``, ``on_shard_timeout``).
        shards: one client per shard, in manifest order.
        metrics: where shard calls and timeouts are counted.
        version_attempts: how many times a shard call is tried when a replica does not hold
            the pinned version, before the request fails with 503.
    """

    def __init__(
        self,
        *,
        spec: ServingSpec,
        shards: Sequence[ShardClient],
        metrics: ServingMetrics,
        version_attempts: int = 3,
    ) -> None:
        if version_attempts < 1:
            raise ValueError(f"version_attempts must be >= 1, got {version_attempts}")
        self._spec = spec
        self._shards = list(shards)
        self._metrics = metrics
        self._version_attempts = version_attempts
        self._down: dict[int, _ShardDown] = {}
        self._down_signals: dict[int, asyncio.Future[None]] = {}
        # Per shard: calls awaiting an answer, and when one last finished (or the first started).
        self._pending_calls = [0] * len(self._shards)
        self._last_progress = [time.monotonic()] * len(self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    @property
    def is_local(self) -> bool:
        """Whether every shard is held in this process."""
        return not any(shard.remote for shard in self._shards)

    # ------------------------------------------------------------------ searching

    async def fan_out(self, queries: np.ndarray, k: int, version: str, params: SearchParams) -> FanOut:
        """Every shard's top-k of ``queries [Q, D]`` in ``version``, waiting at most the deadline.

        Raises:
            ShardTimeoutError / ShardUnavailableError: every shard is missing, or one is and the
                spec asks for an error.
            VersionUnavailableError, BadRequestError, ...: a shard's own error (not a missing shard).
        """
        started = time.monotonic()
        # Shards whose call hit a dead replica in this fan-out (their retry may still be queued).
        hit_dead: dict[int, str] = {}
        tasks = {
            asyncio.ensure_future(self._search(index, queries, k, version, params, hit_dead)): index
            for index in range(len(self._shards))
        }
        try:
            done, pending = await asyncio.wait(list(tasks), timeout=self._spec.shard_timeout_s)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    # A straggler may still end in an error after its cancellation; nobody awaits it.
                    task.add_done_callback(_retrieve_outcome)
        timed_out: list[int] = []
        unavailable: dict[int, str] = {}
        for index in sorted(tasks[task] for task in pending):
            # Past the deadline after its replica died, or while it is known down: Serve is queueing
            # the call for a replica that is not there, which is a dead shard, not a slow one.
            reason = hit_dead.get(index) or (self._down[index].reason if index in self._down else None)
            waited = time.monotonic() - started
            if reason is None:
                timed_out.append(index)
                self._metrics.observe_shard(shard=index, outcome="timeout", seconds=waited)
            else:
                unavailable[index] = (
                    f"shard {index} has no live replica ({reason}); none answered within {self._spec.shard_timeout_s} s"
                )
                self._metrics.observe_shard(shard=index, outcome="unavailable", seconds=waited)
                self._mark_down(index, reason)
        replies: dict[int, ShardHits] = {}
        failures: list[tuple[int, BaseException]] = []
        for task in done:
            index = tasks[task]
            error = task.exception()
            if error is None:
                replies[index] = task.result()
            elif isinstance(error, ShardUnavailableError):
                unavailable[index] = str(error)
            else:
                failures.append((index, error))
        if failures:
            raise min(failures, key=lambda failure: failure[0])[1]
        missing = sorted([*timed_out, *unavailable])
        if missing:
            self._missing(version, timed_out=timed_out, unavailable=unavailable, complete_failure=not replies)
        return FanOut(replies=[replies[index] for index in sorted(replies)], missing_shards=missing)

    def _missing(
        self, version: str, *, timed_out: list[int], unavailable: dict[int, str], complete_failure: bool
    ) -> None:
        """Raise for missing shards as the spec says, or log a partial reply (the service counts each reply)."""
        timeout_text = (
            f"shard{'s' if len(timed_out) > 1 else ''} {', '.join(map(str, timed_out))} did not answer within "
            f"{self._spec.shard_timeout_s} s (index {version})"
        )
        dead_text = "; ".join(reason for _, reason in sorted(unavailable.items()))
        if complete_failure or self._spec.on_shard_timeout == "error":
            if unavailable:
                raise ShardUnavailableError(f"{dead_text}; retry later" + (f"; {timeout_text}" if timed_out else ""))
            raise ShardTimeoutError(timeout_text)
        logger.warning(
            "partial reply: %s", "; ".join(text for text in (timeout_text if timed_out else "", dead_text) if text)
        )

    async def _search(
        self, index: int, queries: np.ndarray, k: int, version: str, params: SearchParams, hit_dead: dict[int, str]
    ) -> ShardHits:
        """One shard's reply, retrying a replica without the version and, once, a dead replica.

        Raises:
            ShardUnavailableError: the shard is down, goes down while the call waits, or its
                replica is dead twice (the message names the shard).
        """
        started = time.monotonic()
        outcome: ShardOutcome | None = "unavailable"
        try:
            if self._shards[index].remote:
                self._raise_if_down(index)
                with self._tracked(index):
                    reply = await self._unless_down(index, self._attempts(index, queries, k, version, params, hit_dead))
            else:
                reply = await self._attempts(index, queries, k, version, params, hit_dead)
            outcome = "ok"
            return reply
        except ShardUnavailableError:
            raise
        except asyncio.CancelledError:
            # Past the deadline (the fan-out counts it) or the caller went away.
            outcome = None
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            if outcome is not None:
                self._metrics.observe_shard(shard=index, outcome=outcome, seconds=time.monotonic() - started)

    async def _attempts(
        self, index: int, queries: np.ndarray, k: int, version: str, params: SearchParams, hit_dead: dict[int, str]
    ) -> ShardHits:
        shard = self._shards[index]
        dead_retries = 1
        for attempt in range(1, self._version_attempts + 1):
            reply: ShardHits | None = None
            while True:
                try:
                    reply = await shard.search(queries, k, version, params)
                    break
                except ShardUnavailableError as error:
                    if dead_retries == 0:
                        raise
                    dead_retries -= 1
                    hit_dead[index] = str(error)
                    logger.warning("shard %d: no live replica (%s); retrying once", index, error)
                except VersionNotLoadedError as error:
                    logger.warning("shard %d, attempt %d/%d: %s", index, attempt, self._version_attempts, error)
                    break
            if reply is None:
                continue
            if reply.index_version != version:
                # A reply for another version must never be merged: its scores live in another space.
                logger.error("shard %d answered for %s instead of %s; retrying", index, reply.index_version, version)
                continue
            return reply
        raise VersionUnavailableError(
            f"no replica of shard {index} answered for index version {version} after {self._version_attempts} attempts"
        )

    # ------------------------------------------------------------------ lookups and bounded calls

    @staticmethod
    def shard_of(manifest: IndexManifest, item_id: int) -> int | None:
        """The shard whose id range holds ``item_id`` (shards hold contiguous ranges), or None."""
        for index, info in enumerate(manifest.shards):
            if info.id_min <= item_id <= info.id_max:
                return index
        return None

    async def lookup(
        self,
        manifest: IndexManifest,
        item_id: int,
        method: Callable[[ShardClient], Callable[[int, str], Awaitable[ResultT | None]]],
    ) -> ResultT | None:
        """Read one id's vector, item or thumbnail from the shard holding its range (None: no such id)."""
        index = self.shard_of(manifest, item_id)
        if index is None:
            return None
        shard = self._shards[index]
        if not shard.remote:
            return await method(shard)(item_id, manifest.index_version)
        self._raise_if_down(index)
        with self._tracked(index):
            return await self.bounded(
                f"shard {index}", lambda: method(shard)(item_id, manifest.index_version), shard=index
            )

    async def bounded(self, what: str, call: Callable[[], Awaitable[ResultT]], *, shard: int | None = None) -> ResultT:
        """``call()`` within the deadline, retried once at once when no replica could take it.

        Args:
            what: who answers, for messages (``"shard 1"``, ``"the embedder"``).
            call: the call to make (made again for the retry).
            shard: the shard ``call`` goes to, marked down when it has no live replica.

        Raises:
            ShardTimeoutError: no answer within ``spec.shard_timeout_s``.
            ShardUnavailableError: no live replica, twice.
        """

        async def retried_once() -> ResultT:
            try:
                return await call()
            except ShardUnavailableError as error:
                logger.warning("%s: no live replica (%s); retrying once", what, error)
            try:
                return await call()
            except ShardUnavailableError as error:
                if shard is not None:
                    self._mark_down(shard, str(error))
                raise ShardUnavailableError(f"{what} has no live replica ({error}); retry later") from None

        try:
            return await asyncio.wait_for(retried_once(), timeout=self._spec.shard_timeout_s)
        except TimeoutError:
            raise ShardTimeoutError(f"{what} did not answer within {self._spec.shard_timeout_s} s") from None

    # ------------------------------------------------------------------ readiness

    async def readiness(self, version: str, embedder: EmbedderClient) -> tuple[list[PartReadiness], PartReadiness]:
        """Whether every shard and the embedder answer (within `READINESS_TIMEOUT_S`) holding ``version``."""

        async def held(client: ShardClient | EmbedderClient, down: _ShardDown | None) -> list[str]:
            if down is not None:
                raise ShardUnavailableError(f"no live replica ({down.reason})")
            return list(await asyncio.wait_for(client.loaded_versions(), timeout=READINESS_TIMEOUT_S))

        answers = await asyncio.gather(
            *(held(client, self._down.get(index)) for index, client in enumerate(self._shards)),
            held(embedder, None),
            return_exceptions=True,
        )

        def state(answer: list[str] | BaseException, shard: int | None) -> PartReadiness:
            # /readyz is open to anyone: its errors say what kind of failure, never a remote
            # error's own text (addresses, pids, paths); the log has that, under an id.
            if isinstance(answer, asyncio.TimeoutError):
                return PartReadiness(ready=False, error=f"no answer within {READINESS_TIMEOUT_S} s", shard=shard)
            if isinstance(answer, ShardUnavailableError):
                return PartReadiness(ready=False, error="no live replica", shard=shard)
            if isinstance(answer, BaseException):
                error_id = uuid.uuid4().hex[:12]
                what = "the embedder" if shard is None else f"shard {shard}"
                logger.warning("readiness error %s of %s: %s", error_id, what, describe_error(answer))
                return PartReadiness(ready=False, error=f"error {error_id} (see the ingress's log)", shard=shard)
            return PartReadiness(ready=version in answer, versions=sorted(answer), shard=shard)

        shards = [state(answer, index) for index, answer in enumerate(answers[:-1])]
        return shards, state(answers[-1], None)

    # ------------------------------------------------------------------ dead shards

    async def _unless_down(self, index: int, call: Awaitable[ShardHits]) -> ShardHits:
        """Await ``call`` to shard ``index``, giving up as soon as the shard is marked down.

        Serve queues a call to a deployment left without replicas, so a call made just before
        the shard was found dead would otherwise wait out the whole deadline.
        """
        task = asyncio.ensure_future(call)
        went_down = self._down_signal(index)
        try:
            waiting: set[asyncio.Future[object]] = {task, went_down}  # type: ignore[arg-type]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve_outcome)
        if not task.done() or task.cancelled():
            self._raise_if_down(index)
            raise ShardUnavailableError(f"shard {index} went down while answering")
        try:
            return task.result()
        except ShardUnavailableError as error:
            self._mark_down(index, str(error))
            raise ShardUnavailableError(f"shard {index} has no live replica ({error})") from None

    def _down_signal(self, index: int) -> asyncio.Future[None]:
        """A future that completes when shard ``index`` is next marked down (one shared by all its calls)."""
        loop = asyncio.get_running_loop()
        signal = self._down_signals.get(index)
        if signal is None or signal.done() or signal.get_loop() is not loop:
            signal = loop.create_future()
            self._down_signals[index] = signal
        return signal

    @contextmanager
    def _tracked(self, index: int) -> Iterator[None]:
        """Count one call to shard ``index`` in flight, for `stalled_shards`."""
        if self._pending_calls[index] == 0:
            self._last_progress[index] = time.monotonic()
        self._pending_calls[index] += 1
        try:
            yield
        finally:
            self._pending_calls[index] -= 1
            self._last_progress[index] = time.monotonic()

    def stalled_shards(self, *, after_s: float) -> list[int]:
        """Shards (manifest order) with calls in flight of which none has finished for ``after_s`` seconds.

        A shard whose replicas died looks like this (Serve queues its calls); a watcher asks
        Serve about these shards only, instead of polling Serve's status on every tick.
        """
        now = time.monotonic()
        return [
            index
            for index, pending in enumerate(self._pending_calls)
            if pending and now - self._last_progress[index] >= after_s
        ]

    def _raise_if_down(self, index: int) -> None:
        down = self._down.get(index)
        if down is not None and down.probe.done():
            # Its probe ended without seeing the shard back (its event loop closed): probe afresh.
            self._down.pop(index, None)
            return
        if down is not None:
            raise ShardUnavailableError(f"shard {index} has no live replica ({down.reason}); Serve is replacing it")

    def mark_shard_down(self, index: int, reason: str) -> None:
        """Count shard ``index`` (manifest order) as down until it answers a probe: its requests fail fast meanwhile.

        For a watcher that learns from Serve that a shard has no running replica, before any
        request meets the dead one (Serve queues calls to a deployment without replicas).
        Must be called on the service's event loop.
        """
        if not 0 <= index < len(self._shards):
            raise ValueError(f"shard {index} does not exist; this service has {len(self._shards)} shards")
        self._mark_down(index, reason)

    def _mark_down(self, index: int, reason: str) -> None:
        """Count shard ``index`` as down until a background probe gets an answer from it."""
        if index in self._down:
            return
        logger.error("shard %d is down (%s); probing it until it answers again", index, reason)
        probe = asyncio.get_running_loop().create_task(self._probe(index))
        self._down[index] = _ShardDown(reason=reason, probe=probe)
        signal = self._down_signals.pop(index, None)
        if signal is not None and not signal.done():
            signal.set_result(None)

    async def _probe(self, index: int) -> None:
        shard = self._shards[index]
        while True:
            try:
                # With no live replica Serve queues the call until one starts: the wait is the probe.
                await asyncio.wait_for(shard.loaded_versions(), timeout=self._spec.shard_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.debug("shard %d still down: %s", index, describe_error(error))
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            self._down.pop(index, None)
            logger.info("shard %d answers again", index)
            return
