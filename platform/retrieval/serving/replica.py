"""How every Serve replica follows the application's swap state (the Ray side of `retrieval.serving.swap`).

A Serve handle call reaches ONE replica, so the versions every replica must hold live in a
small named Ray actor per application (`SwapStateActor`, holding a `SwapBook`). Each replica
reads it in its constructor (so a restarted or added replica starts on the right versions,
before it takes traffic) and then polls it from a background asyncio task a few times a
second, reporting what it holds, what failed to load and, for the ingress, which version it
answers with and how many requests are in flight per version.

The state actor is detached (it must outlive the replicas, which come and go) and holds no
index data; `delete_swap_state` removes it after the application is deleted. If it dies, every
replica keeps serving what it holds; the next poll re-creates it from the active version the
replica last saw.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayTaskError

from retrieval.errors import IndexIntegrityError, RetrievalError
from retrieval.serving.swap import Desired, IndexRef, InFlight, ReplicaReport, SwapBook

logger = logging.getLogger(__name__)

SWAP_NAMESPACE = "retrieval-serving"
# How often a replica polls the swap state: the delay before an idle replica starts loading a
# prepared version, and before a second ingress replica follows a flip.
POLL_INTERVAL_S = 0.2
# How long a replica waits for requests in flight on a version it is asked to free.
RELEASE_DRAIN_S = 30.0
# A replica silent for longer is taken as gone; a large shard's load blocks its polls.
STALE_AFTER_S = 30.0
# A swap whose runner renews no lease for this long (its process died) is settled by the state.
SWAP_LEASE_S = 15.0
_STATE_TIMEOUT_S = 60.0


def new_swap_state_name() -> str:
    """A fresh name for an application's swap-state actor (one per `build_app` call)."""
    return f"swap-state-{uuid.uuid4().hex[:12]}"


@ray.remote(num_cpus=0, max_restarts=0)
class SwapStateActor:
    """The shared `SwapBook` of one application, as a named detached Ray actor."""

    def __init__(self, initial: IndexRef) -> None:
        self._book = SwapBook(initial=initial, stale_after_s=STALE_AFTER_S, lease_s=SWAP_LEASE_S)

    def report(self, report: ReplicaReport) -> Desired:
        return self._book.report(report)

    def desired(self) -> Desired:
        return self._book.desired()

    def begin(self, target: IndexRef, owner: str) -> Desired:
        return self._book.begin(target, owner)

    def heartbeat(self, owner: str) -> Desired:
        return self._book.heartbeat(owner)

    def roll_back(self, reason: str) -> Desired:
        return self._book.roll_back(reason)

    def flip(self) -> Desired:
        return self._book.flip()

    def finish(self) -> Desired:
        return self._book.finish()

    def abort(self) -> Desired:
        return self._book.abort()

    def live_reports(self) -> list[ReplicaReport]:
        return self._book.live_reports()

    def status(self) -> dict[str, Any]:
        return self._book.status()


def swap_state_actor(name: str, *, initial: IndexRef) -> Any:
    """The application's swap-state actor, created with ``initial`` active if it does not exist yet."""
    return SwapStateActor.options(  # type: ignore[attr-defined]
        name=name, namespace=SWAP_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(initial)


def delete_swap_state(name: str) -> bool:
    """Kill an application's swap-state actor (after `serve.delete`); False if there is none."""
    try:
        actor = ray.get_actor(name, namespace=SWAP_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor)
    return True


def platform_error(error: RayTaskError) -> BaseException:
    """The platform error a remote call raised, or the Ray error itself."""
    return error.cause if isinstance(error.cause, RetrievalError) else error


async def actor_call(method: Any, *args: Any) -> Any:
    """Await an actor method, re-raising the platform's own errors as themselves."""
    try:
        return await method.remote(*args)
    except RayTaskError as error:
        raise platform_error(error) from None


class ActorSwapState:
    """`retrieval.serving.swap.SwapState` over a `SwapStateActor` handle."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    async def begin(self, target: IndexRef, owner: str) -> Desired:
        result: Desired = await actor_call(self._actor.begin, target, owner)
        return result

    async def heartbeat(self, owner: str) -> Desired:
        result: Desired = await actor_call(self._actor.heartbeat, owner)
        return result

    async def flip(self) -> Desired:
        result: Desired = await actor_call(self._actor.flip)
        return result

    async def finish(self) -> Desired:
        result: Desired = await actor_call(self._actor.finish)
        return result

    async def abort(self) -> Desired:
        result: Desired = await actor_call(self._actor.abort)
        return result

    async def live_reports(self) -> list[ReplicaReport]:
        result: list[ReplicaReport] = await actor_call(self._actor.live_reports)
        return result


def _get_off_loop(ref: Any) -> Any:
    """``ray.get`` from a helper thread: on the event loop's own thread it warns (and blocks it)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(ray.get, ref, timeout=_STATE_TIMEOUT_S).result()


def describe(error: BaseException) -> str:
    return str(error) if isinstance(error, RetrievalError) else f"{type(error).__name__}: {error}"


class VersionedReplica:
    """What every replica shares: the versions it holds follow the application's swap state.

    Subclasses implement `_held_versions`, `_load_version` (blocking; raise a clear error when
    the version cannot be served) and `_drop_version`, and may override `_follow` and `_active`.
    """

    _in_flight: InFlight

    def _held_versions(self) -> list[str]:
        raise NotImplementedError

    def _load_version(self, ref: IndexRef) -> None:
        raise NotImplementedError

    def _drop_version(self, version: str) -> None:
        raise NotImplementedError

    def _follow(self, desired: Desired) -> None:
        """Act on the desired active version (the ingress switches to it; others keep it for defaults)."""
        self._desired_active = desired.active.index_version

    def _active(self) -> str | None:
        """The version this replica answers with by itself (ingress only)."""
        return None

    def _init_versions(self, *, initial: IndexRef, state_name: str | None) -> None:
        """Load the versions to serve, then (inside Serve) follow the swap state in the background.

        Called from a constructor: in Serve it runs on the replica's event loop before the
        replica takes traffic, so blocking here delays only this replica's start.
        """
        self._errors: dict[str, str] = {}
        self._epoch = -1
        self._desired_active = initial.index_version
        self._state: Any = None
        self._state_name = state_name
        if state_name is None:
            self._load_version(initial)
            return
        context = serve.get_replica_context()
        self._replica = context.replica_id.unique_id
        self._deployment = context.deployment
        self._last_desired = Desired(epoch=-1, active=initial)
        self._state = swap_state_actor(state_name, initial=initial)
        desired: Desired = _get_off_loop(self._state.report.remote(self._report()))
        for version, ref in desired.wanted().items():
            try:
                self._load_version(ref)
            except Exception as error:
                self._errors[version] = describe(error)
                logger.error("%s: cannot load index %s: %s", self._deployment, version, self._errors[version])
        if desired.active.index_version not in self._held_versions():
            raise IndexIntegrityError(
                f"{self._deployment}: cannot serve the active index {desired.active.index_version}: "
                f"{self._errors.get(desired.active.index_version)}"
            )
        self._follow(desired)
        self._epoch = desired.epoch
        self._last_desired = desired
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    def _report(self) -> ReplicaReport:
        return ReplicaReport(
            replica=self._replica,
            deployment=self._deployment,
            holds=tuple(sorted(self._held_versions())),
            errors=dict(self._errors),
            active=self._active(),
            in_flight=self._in_flight.snapshot(),
            epoch=self._epoch,
        )

    async def _sync_forever(self) -> None:
        while True:
            try:
                desired = await self._state.report.remote(self._report())
                changed = await self._apply(desired)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The state actor may be gone: keep serving what is held, and re-create it
                # from the last desired state this replica saw.
                logger.warning("%s: swap state unreachable (%s); serving what is held", self._deployment, error)
                try:
                    self._state = swap_state_actor(self._state_name or "", initial=self._last_desired.active)
                except Exception as reconnect_error:
                    logger.warning("%s: cannot re-create the swap state: %s", self._deployment, reconnect_error)
                changed = False
            if not changed:
                await asyncio.sleep(POLL_INTERVAL_S)

    async def _apply(self, desired: Desired) -> bool:
        """Load what ``desired`` adds, free what it drops; True if anything changed."""
        wanted = desired.wanted()
        changed = False
        for version in [version for version in self._errors if version not in wanted]:
            del self._errors[version]
        for version, ref in wanted.items():
            if version in self._held_versions() or version in self._errors:
                continue
            try:
                await asyncio.to_thread(self._load_version, ref)
                logger.info("%s: loaded index %s", self._deployment, version)
            except Exception as error:
                self._errors[version] = describe(error)
                logger.error("%s: cannot load index %s: %s", self._deployment, version, self._errors[version])
            changed = True
        self._follow(desired)
        for version in [version for version in self._held_versions() if version not in wanted]:
            if not await self._in_flight.drained(version, timeout_s=RELEASE_DRAIN_S):
                logger.warning("%s: freeing index %s with requests still in flight", self._deployment, version)
            self._drop_version(version)
            logger.info("%s: freed index %s", self._deployment, version)
            changed = True
        changed = changed or desired.epoch != self._epoch
        self._epoch = desired.epoch
        self._last_desired = desired
        return changed

    async def release(self, version: str, timeout_s: float = RELEASE_DRAIN_S) -> bool:
        """Free ``version`` once its requests in flight have drained (at most ``timeout_s``).

        Returns:
            Whether it drained in time (it is freed either way).
        """
        drained = await self._in_flight.drained(version, timeout_s=timeout_s)
        if version in self._held_versions():
            self._drop_version(version)
        return drained
