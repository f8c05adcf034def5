"""The rolling swap of the live index: its protocol, its shared state, and the memory rule.

Free of Ray and HTTP, so every step is testable in-process; `retrieval.serving.deployments`
runs it inside Serve (the shared state in a small named Ray actor, one per application).

The protocol (ARCHITECTURE invariants 1 and 2)::

    desired state  {epoch, active, prepared, retiring}    one `SwapBook`, shared by all replicas
    every replica  polls it (`report` -> desired) a few times a second, and reads it in its
                   constructor, so a restarted or added replica starts on the right version(s);
                   it holds exactly the versions named in the desired state: it loads a new one
                   beside the others, and frees one that is no longer named once the requests
                   in flight on that version have drained (bounded wait)

    swap v -> w    1. begin: prepared = w (only one swap at a time: a second one is refused)
                   2. every live replica of every deployment (each shard, the embedder, the
                      ingress) loads w beside v and acknowledges; a replica whose load fails
                      (corrupt shard, checksum mismatch, unknown model, dimension mismatch, no
                      room in memory) reports why, and the swap aborts: prepared = None, every
                      replica frees w, v never stopped serving; so does a timeout
                   3. flip: active = w, retiring = v. The ingress replica running the swap
                      switches its active version in one assignment; the other ingress replicas
                      switch on their next poll. Each request pins the active version once, at
                      its start, and passes it to the embedder and to every shard call, so it
                      is answered by one version end to end whichever side of the flip it is on
                   4. drain: wait until every ingress replica serves w and has no request in
                      flight on v (bounded), then finish: retiring = None, every replica frees v

Whatever happens to its caller, a swap completes or rolls back (issue: a swap whose client
disconnected after the flip used to leave every later swap refused and two versions in memory):

- the ingress runs it as a task of its own, which a disconnecting client does not cancel;
- the replica running it renews a lease on the shared state (`SwapBook.heartbeat`) every poll;
  if it goes silent for ``lease_s`` (its process died), the state settles the swap itself on the
  next report of any replica: before the flip it aborts (the old version keeps serving), after
  the flip it finishes (the new one does), and ``last_outcome`` says what happened and why;
- an operator can abort a swap (``POST /admin/swap/abort``): before the flip it is cancelled,
  after it the old version, still held everywhere until the swap finishes, is made active again
  and the new one freed. The runner sees either and fails with `SwapFailedError`.

Memory: during a swap every replica that holds shards holds TWO versions of them, so the cluster
needs room for two copies of the whole index (per ingress replica in the local layout, spread
over the shard replicas in the distributed one). A replica refuses, before loading anything, new
shards whose file sizes plus the bytes it already holds exceed its budget
(`retrieval.serving.memory.check_shard_memory`), and the swap aborts with a message naming the
shards, the sizes and the budget.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from retrieval.index.manifest import CURRENT_FILE, MANIFEST_FILE, IndexManifest, version_name_is_valid
from retrieval.index.object_store import is_s3_uri
from retrieval.serving.errors import (
    BadIndexReferenceError,
    SwapFailedError,
    SwapInProgressError,
)
from retrieval.serving.metrics import ServingMetrics, SwapOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexRef:
    """One index version as the swap protocol names it.

    Attributes:
        index_version: the version name (the manifest's ``index_version``).
        manifest: where every replica reads it: a local ``.../manifest.json`` path or an
            ``s3://.../<version>/manifest.json`` URI.
        model: the manifest's model reference ``{"name", "version", "uri"}``.
    """

    index_version: str
    manifest: str
    model: dict[str, str]

    @classmethod
    def of(cls, manifest: IndexManifest, location: str) -> IndexRef:
        """The reference of ``manifest``, read from ``location``."""
        return cls(
            index_version=manifest.index_version,
            manifest=location,
            model=manifest.model.model_dump(include={"name", "version", "uri"}),
        )


@dataclass(frozen=True)
class Desired:
    """The versions every replica must hold; ``epoch`` grows with every change."""

    epoch: int
    active: IndexRef
    prepared: IndexRef | None = None
    retiring: IndexRef | None = None

    def wanted(self) -> dict[str, IndexRef]:
        """Every version a replica must hold now, by name."""
        refs = [self.active, self.prepared, self.retiring]
        return {ref.index_version: ref for ref in refs if ref is not None}


@dataclass(frozen=True)
class ReplicaReport:
    """What one replica holds, sent with every poll.

    Attributes:
        replica: the Serve replica id.
        deployment: the deployment name (``Shard0``, ``Embedder``, ``SearchIngress``).
        holds: the versions loaded and serving.
        errors: version -> why loading it failed.
        active: for an ingress replica, the version it answers with; None for the others.
        in_flight: version -> requests running on it now.
        epoch: the desired-state epoch the replica had applied when it sent the report.
        seen_at: when the state received it (the state's clock), set by `SwapBook.report`.
    """

    replica: str
    deployment: str
    holds: tuple[str, ...]
    errors: dict[str, str] = field(default_factory=dict)
    active: str | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    epoch: int = -1
    seen_at: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The JSON-ready view of the report (for ``/admin/status`` and swap replies)."""
        return {
            "deployment": self.deployment,
            "holds": list(self.holds),
            "active": self.active,
            "in_flight": dict(self.in_flight),
            "errors": dict(self.errors),
        }


class SwapBook:
    """The shared swap state: the desired versions and the last report of every replica.

    Args:
        initial: the version served when the application starts.
        stale_after_s: a replica silent for longer is taken as gone (e.g. replaced by Serve).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        initial: IndexRef,
        stale_after_s: float = 10.0,
        lease_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._desired = Desired(epoch=0, active=initial)
        self._reports: dict[str, ReplicaReport] = {}
        self._stale_after_s = stale_after_s
        self._lease_s = lease_s
        self._clock = clock
        # The swap in progress: who runs it and when it last renewed its lease.
        self._owner: str | None = None
        self._owner_seen = 0.0
        self.last_outcome: dict[str, Any] | None = None

    def desired(self) -> Desired:
        """The current desired state."""
        return self._desired

    def report(self, report: ReplicaReport) -> Desired:
        """Record a replica's report; answer with the desired state (one round trip per poll).

        Every replica reports a few times a second, so this is also where a swap whose runner
        went silent is settled (`settle_abandoned`).
        """
        self._reports[report.replica] = replace(report, seen_at=self._clock())
        self.settle_abandoned()
        return self._desired

    @property
    def in_progress(self) -> bool:
        return self._desired.prepared is not None or self._desired.retiring is not None

    def heartbeat(self, owner: str) -> Desired:
        """Renew ``owner``'s lease on the swap in progress; answer with the desired state."""
        if self._owner == owner:
            self._owner_seen = self._clock()
        return self._desired

    def settle_abandoned(self) -> None:
        """Abort (before the flip) or finish (after it) a swap whose runner has not renewed its lease in time."""
        if not self.in_progress or self._clock() - self._owner_seen <= self._lease_s:
            return
        current = self._desired
        silent = f"the replica running it ({self._owner}) was silent for over {self._lease_s:.0f} s"
        if current.prepared is not None:
            self._settle("rolled back", f"{silent}; it had not flipped", target=current.prepared)
            self.abort()
        else:
            assert current.retiring is not None
            self._settle("completed", f"{silent}; it had flipped", target=current.active)
            self.finish()

    def _settle(self, outcome: str, reason: str, *, target: IndexRef) -> None:
        self.last_outcome = {"to": target.index_version, "outcome": outcome, "reason": reason}
        logger.warning("swap to %s %s: %s", target.index_version, outcome, reason)

    def live_reports(self) -> list[ReplicaReport]:
        """The last report of every replica heard from recently."""
        now = self._clock()
        return [report for report in self._reports.values() if now - report.seen_at <= self._stale_after_s]

    def begin(self, target: IndexRef, owner: str = "") -> Desired:
        """Start a swap to ``target``: every replica is asked to load it beside the active one.

        Args:
            target: the version to swap to.
            owner: who runs the swap; it renews its lease with `heartbeat`.

        Raises:
            SwapInProgressError: a swap is already running (or still draining its old version).
            SwapFailedError: ``target`` is already the active version.
        """
        self.settle_abandoned()
        current = self._desired
        if current.prepared is not None or current.retiring is not None:
            running = current.prepared or current.active
            raise SwapInProgressError(
                f"a swap is already in progress (to index {running.index_version}); try again when it has finished"
            )
        if target.index_version == current.active.index_version:
            raise SwapFailedError(f"index {target.index_version} is already the active version")
        self._desired = replace(current, epoch=current.epoch + 1, prepared=target)
        self._owner, self._owner_seen = owner, self._clock()
        self.last_outcome = None
        return self._desired

    def flip(self) -> Desired:
        """Make the prepared version active; the old one retires until the swap finishes."""
        current = self._desired
        if current.prepared is None:
            raise SwapFailedError("no prepared version to flip to")
        self._desired = Desired(
            epoch=current.epoch + 1, active=current.prepared, prepared=None, retiring=current.active
        )
        return self._desired

    def finish(self) -> Desired:
        """End a swap after the flip: every replica frees the retired version."""
        current = self._desired
        self._desired = replace(current, epoch=current.epoch + 1, retiring=None)
        self._owner = None
        return self._desired

    def abort(self) -> Desired:
        """Cancel a swap before the flip: every replica frees the prepared version."""
        current = self._desired
        self._desired = replace(current, epoch=current.epoch + 1, prepared=None)
        self._owner = None
        return self._desired

    def roll_back(self, reason: str) -> Desired:
        """An operator's abort: cancel a swap before its flip, or after it make the old version active again.

        After the flip both versions are still held by every replica (the old one retires only
        when the swap finishes), so the old one becomes active in one step, as the flip did, and
        the new one is freed once the requests on it drain.

        Raises:
            SwapFailedError: no swap is in progress.
        """
        current = self._desired
        if current.prepared is not None:
            self._settle("rolled back", reason, target=current.prepared)
            return self.abort()
        if current.retiring is not None:
            self._settle("rolled back", f"{reason}; {current.retiring.index_version} is active again",
                         target=current.active)  # fmt: skip
            self._desired = Desired(epoch=current.epoch + 1, active=current.retiring)
            self._owner = None
            return self._desired
        raise SwapFailedError(f"no swap is in progress (index {current.active.index_version} is active)")

    def status(self) -> dict[str, Any]:
        """The desired versions and every live replica's state, JSON-ready."""
        desired = self._desired
        return {
            "epoch": desired.epoch,
            "active": desired.active.index_version,
            "model": desired.active.model,
            "prepared": None if desired.prepared is None else desired.prepared.index_version,
            "retiring": None if desired.retiring is None else desired.retiring.index_version,
            "swap_owner": self._owner if self.in_progress else None,
            "last_outcome": self.last_outcome,
            "replicas": {report.replica: report.describe() for report in self.live_reports()},
        }


class InFlight:
    """Requests in flight per version, counted from any thread (Serve runs sync methods in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    @contextmanager
    def hold(self, version: str) -> Iterator[None]:
        """Count one request on ``version`` for the duration of the block."""
        with self._lock:
            self._counts[version] = self._counts.get(version, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[version] -= 1
                if not self._counts[version]:
                    del self._counts[version]

    def count(self, version: str) -> int:
        """Requests running on ``version`` now."""
        with self._lock:
            return self._counts.get(version, 0)

    def snapshot(self) -> dict[str, int]:
        """Version -> requests running on it now."""
        with self._lock:
            return dict(self._counts)

    async def drained(self, version: str, *, timeout_s: float, poll_s: float = 0.01) -> bool:
        """Wait until no request runs on ``version``; False if some still do after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.count(version):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll_s)
        return True


# --------------------------------------------------------------------------- references


def served_root(served_manifest: str) -> str:
    """The index root holding the served version: the parent of ``<root>/<version>/manifest.json``."""
    if is_s3_uri(served_manifest):
        return "s3://" + str(PurePosixPath(served_manifest.removeprefix("s3://")).parent.parent)
    return str(Path(served_manifest).parent.parent)


def resolve_index_reference(reference: str, *, served_manifest: str) -> str:
    """Where the manifest of the version a swap request names lives.

    Args:
        reference: a version directory name under the served index root, or the path or
            ``s3://`` URI of a ``manifest.json`` (a local version directory, or an index root
            whose ``CURRENT`` names a version, is accepted too).
        served_manifest: the manifest the application was started with
            (``<root>/<version>/manifest.json``); version names resolve under its root.

    Returns:
        A local ``manifest.json`` path or an ``s3://.../manifest.json`` URI.

    Raises:
        BadIndexReferenceError: an empty reference, or a local path that holds no manifest.
    """
    reference = reference.strip()
    if not reference:
        raise BadIndexReferenceError("the swap request names no index (give a version name or a manifest path)")
    if is_s3_uri(reference):
        if not reference.rstrip("/").endswith(MANIFEST_FILE):
            raise BadIndexReferenceError(
                f"{reference}: an s3:// reference must name a version's manifest (.../<version>/{MANIFEST_FILE})"
            )
        return reference
    if version_name_is_valid(reference):
        root = served_root(served_manifest)
        return f"{root}/{reference}/{MANIFEST_FILE}" if is_s3_uri(root) else str(Path(root) / reference / MANIFEST_FILE)
    path = Path(reference)
    if path.is_file():
        return str(path.resolve())
    if (path / MANIFEST_FILE).is_file():
        return str((path / MANIFEST_FILE).resolve())
    current = path / CURRENT_FILE
    if current.is_file():
        version = current.read_text(encoding="utf-8").strip()
        if version_name_is_valid(version) and (path / version / MANIFEST_FILE).is_file():
            return str((path / version / MANIFEST_FILE).resolve())
    raise BadIndexReferenceError(
        f"{reference!r} is neither an index version under {served_root(served_manifest)} nor a manifest.json, "
        "a version directory or an index root"
    )


# --------------------------------------------------------------------------- the swap itself


class SwapState(Protocol):
    """The shared state as the swap runner sees it (a `SwapBook`, possibly behind an actor)."""

    async def begin(self, target: IndexRef, owner: str) -> Desired:
        """`SwapBook.begin`."""
        ...

    async def heartbeat(self, owner: str) -> Desired:
        """`SwapBook.heartbeat`."""
        ...

    async def flip(self) -> Desired:
        """`SwapBook.flip`."""
        ...

    async def finish(self) -> Desired:
        """`SwapBook.finish`."""
        ...

    async def abort(self) -> Desired:
        """`SwapBook.abort`."""
        ...

    async def live_reports(self) -> list[ReplicaReport]:
        """`SwapBook.live_reports`."""
        ...


class SwapAdmin(Protocol):
    """What the admin HTTP routes call (implemented by the ingress)."""

    async def swap(self, index: str) -> dict[str, Any]:
        """Run a rolling swap to the version ``index`` names; its summary."""
        ...

    async def abort(self) -> dict[str, Any]:
        """Abort the swap in progress (before its flip) or roll it back (after); the state afterwards."""
        ...

    async def status(self) -> dict[str, Any]:
        """The active and prepared versions and every replica's state."""
        ...


def _not_ready(
    reports: list[ReplicaReport], expected: dict[str, int], version: str, epoch: int
) -> tuple[list[str], list[ReplicaReport]]:
    """(deployments still short of replicas holding ``version``, replicas that failed to load it).

    Only failures reported after the swap began (``epoch``) count: an error left from an
    earlier attempt at the same version must not abort a retry.
    """
    failed = [report for report in reports if version in report.errors and report.epoch >= epoch]
    waiting = []
    for deployment, count in sorted(expected.items()):
        mine = [report for report in reports if report.deployment == deployment]
        ready = [report for report in mine if version in report.holds]
        if len(ready) < max(count, 1) or len(ready) < len(mine):
            waiting.append(f"{deployment} {len(ready)}/{max(count, len(mine), 1)}")
    return waiting, failed


async def run_swap(
    *,
    state: SwapState,
    target: IndexRef,
    expected_replicas: Callable[[], Awaitable[dict[str, int]]],
    activate: Callable[[IndexRef], None],
    timeout_s: float,
    metrics: ServingMetrics,
    owner: str = "swap-runner",
    drain_timeout_s: float = 30.0,
    poll_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Run one rolling swap to ``target`` (see the module docstring for the steps), counted in ``metrics``.

    Every call is counted once in ``retrieval_swaps{outcome}``: ``completed``, ``refused``
    (another swap runs) or ``failed`` (anything else: a load failed, a timeout, an abort).
    """
    started = clock()
    outcome: SwapOutcome = "failed"
    try:
        reply = await _run_swap(
            state=state,
            target=target,
            expected_replicas=expected_replicas,
            activate=activate,
            timeout_s=timeout_s,
            owner=owner,
            drain_timeout_s=drain_timeout_s,
            poll_s=poll_s,
            clock=clock,
        )
        outcome = "completed"
        return reply
    except SwapInProgressError:
        outcome = "refused"
        raise
    finally:
        metrics.observe_swap(outcome=outcome, seconds=max(0.0, clock() - started))


async def _run_swap(
    *,
    state: SwapState,
    target: IndexRef,
    expected_replicas: Callable[[], Awaitable[dict[str, int]]],
    activate: Callable[[IndexRef], None],
    timeout_s: float,
    owner: str,
    drain_timeout_s: float,
    poll_s: float,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """The steps of `run_swap`.

    Args:
        state: the shared swap state.
        target: the version to serve.
        expected_replicas: deployment name -> how many replicas run now (Serve's status).
        activate: switches this ingress replica's active version (one assignment).
        timeout_s: how long every replica has to load ``target`` before the swap aborts.
        owner: who runs it (this replica): it renews its lease on the state every poll.
        drain_timeout_s: how long to wait for requests in flight on the old version, and
            for the replicas to free it.
        poll_s: how often the replicas' reports are read.
        clock: monotonic seconds.

    Returns:
        ``{"from", "to", "model", "duration_s", "replicas"}``; ``replicas`` maps each replica
        id to its state at the end.

    Raises:
        SwapInProgressError: another swap runs.
        SwapFailedError: a replica could not load ``target`` (the message says which and why),
            not every replica was ready within ``timeout_s``, or an operator aborted the swap;
            the old version keeps (or is again) serving.
    """
    started = clock()
    desired = await state.begin(target, owner)
    old = desired.active
    flipped = False
    try:
        while True:
            current = await state.heartbeat(owner)
            if current.prepared != target:
                raise SwapFailedError(
                    f"the swap to index {target.index_version} was aborted before its flip; "
                    f"index {current.active.index_version} keeps serving"
                )
            reports = await state.live_reports()
            waiting, failed = _not_ready(reports, await expected_replicas(), target.index_version, desired.epoch)
            if failed:
                reasons = "; ".join(
                    f"{report.deployment} replica {report.replica}: {report.errors[target.index_version]}"
                    for report in failed
                )
                raise SwapFailedError(
                    f"index {target.index_version} failed to load, index {old.index_version} keeps serving: {reasons}"
                )
            if not waiting:
                break
            if clock() - started > timeout_s:
                raise SwapFailedError(
                    f"index {target.index_version} was not loaded on every replica within {timeout_s:.0f} s "
                    f"(ready: {', '.join(waiting)}); index {old.index_version} keeps serving"
                )
            await asyncio.sleep(poll_s)
        await state.flip()
        activate(target)
        flipped = True
    finally:
        if not flipped:
            current = await state.heartbeat(owner)
            if current.prepared == target:
                await state.abort()
    logger.info("swap %s -> %s: flipped after %.2f s", old.index_version, target.index_version, clock() - started)

    drain_deadline = clock() + drain_timeout_s
    while clock() < drain_deadline:
        current = await state.heartbeat(owner)
        if current.active != target or current.retiring != old:
            raise SwapFailedError(
                f"the swap to index {target.index_version} was rolled back after its flip; "
                f"index {current.active.index_version} is active"
            )
        routers = [report for report in await state.live_reports() if report.active is not None]
        if all(
            report.active == target.index_version and not report.in_flight.get(old.index_version) for report in routers
        ):
            break
        await asyncio.sleep(poll_s)
    else:
        logger.warning(
            "swap to %s: requests on %s did not drain in %.0f s",
            target.index_version,
            old.index_version,
            drain_timeout_s,
        )
    current = await state.heartbeat(owner)
    if current.active == target and current.retiring == old:
        await state.finish()
    reports = await state.live_reports()
    release_deadline = clock() + drain_timeout_s
    while any(old.index_version in report.holds for report in reports) and clock() < release_deadline:
        await asyncio.sleep(poll_s)
        reports = await state.live_reports()
    return {
        "from": old.index_version,
        "to": target.index_version,
        "model": target.model,
        "duration_s": round(clock() - started, 3),
        "replicas": {report.replica: report.describe() for report in reports},
    }
