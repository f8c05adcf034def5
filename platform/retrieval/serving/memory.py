"""How much memory a replica may still fill, seen from inside its container, and the shard budget rule.

A Kubernetes pod's limit is its cgroup's, not the node's: ``/proc/meminfo`` inside a pod shows
the whole node, so a check against ``MemAvailable`` alone protects nothing there (the pod is
OOM-killed at its limit while the node still has room). `available_memory_bytes` takes the
smaller of the node's ``MemAvailable`` and the room left under every cgroup limit on the path
from this process's cgroup to the root (cgroup v2 ``memory.max`` / v1
``memory.limit_in_bytes``), the room being the limit minus the cgroup's working set (its usage
less the inactive file cache the kernel reclaims first, as the kubelet counts it).

The rule a replica applies before it loads shards (a swap holds two versions side by side):
the new shards' file sizes plus what it already holds must fit its budget,
`ServingSpec.shard_memory_bytes`, or by default the memory still available plus what it holds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from retrieval.serving.errors import MemoryBudgetError

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a page-aligned number close to 2**63.
_UNLIMITED_V1 = 2**62


@dataclass(frozen=True)
class MemoryView:
    """Where the available memory figure comes from (for messages and logs).

    Attributes:
        available_bytes: what may still be filled: the smallest of the figures below.
        node_available_bytes: the node's ``MemAvailable``.
        cgroup_limit_bytes: the tightest cgroup limit on this process's path (None: none).
        cgroup_room_bytes: that limit minus the cgroup's working set (None: no limit).
    """

    available_bytes: int
    node_available_bytes: int
    cgroup_limit_bytes: int | None = None
    cgroup_room_bytes: int | None = None

    def describe(self) -> str:
        if self.cgroup_room_bytes is None:
            return f"the node's available memory, {self.node_available_bytes} bytes"
        return (
            f"the room left under the container's memory limit of {self.cgroup_limit_bytes} bytes, "
            f"{self.cgroup_room_bytes} bytes (the node has {self.node_available_bytes} bytes available)"
        )


def node_available_bytes(meminfo: Path = MEMINFO) -> int:
    """``MemAvailable`` of ``/proc/meminfo``, else the free physical pages."""
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        logger.debug("cannot read MemAvailable from %s; using sysconf", meminfo)
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED_V1 else value


def _inactive_file(stat_path: Path, key: str) -> int:
    try:
        for line in stat_path.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs(self_cgroup: Path, root: Path) -> list[tuple[Path, int]]:
    """This process's memory cgroup folder and its ancestors up to the mount, innermost first, with the version.

    A cgroup v1 ``memory`` hierarchy wins over the v2 line (hybrid hosts keep the memory
    controller on v1); a v2 line counts only where the unified mount has ``memory.max`` files.
    """
    try:
        lines = self_cgroup.read_text(encoding="ascii").splitlines()
    except OSError:
        return []
    located: dict[int, tuple[Path, Path]] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            located[1] = (root / "memory", Path(path.lstrip("/")))
        elif controllers == "" and (root / "cgroup.controllers").exists():
            located[2] = (root, Path(path.lstrip("/")))
    for version in (1, 2):
        if version not in located:
            continue
        base, relative = located[version]
        if not base.is_dir():
            continue
        folder = base / relative
        # Inside a cgroup namespace our own cgroup is the mount itself and the path may not exist.
        if not folder.is_dir():
            return [(base, version)]
        chain = [folder, *[parent for parent in folder.parents if parent == base or base in parent.parents]]
        return [(path, version) for path in chain]
    return []


def memory_view(
    *, meminfo: Path = MEMINFO, self_cgroup: Path = SELF_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> MemoryView:
    """The memory this process may still fill, cgroup limits included (paths injectable for tests)."""
    node = node_available_bytes(meminfo)
    tightest: tuple[int, int] | None = None  # (room, limit)
    for folder, version in _cgroup_dirs(self_cgroup, cgroup_root):
        if version == 2:
            limit = _read_int(folder / "memory.max")
            usage = _read_int(folder / "memory.current")
            inactive = _inactive_file(folder / "memory.stat", "inactive_file")
        else:
            limit = _read_int(folder / "memory.limit_in_bytes")
            usage = _read_int(folder / "memory.usage_in_bytes")
            inactive = _inactive_file(folder / "memory.stat", "total_inactive_file")
        if limit is None:
            continue
        room = max(0, limit - max(0, (usage or 0) - inactive))
        if tightest is None or room < tightest[0]:
            tightest = (room, limit)
    if tightest is None:
        return MemoryView(available_bytes=node, node_available_bytes=node)
    room, limit = tightest
    return MemoryView(
        available_bytes=min(node, room), node_available_bytes=node, cgroup_limit_bytes=limit, cgroup_room_bytes=room
    )


def available_memory_bytes() -> int:
    """What this process may still fill: the node's ``MemAvailable``, capped by its cgroups' room."""
    return memory_view().available_bytes


def check_shard_memory(
    *,
    shards: str,
    index_version: str,
    new_bytes: int,
    held_bytes: int,
    budget_bytes: int | None,
    view: MemoryView | None = None,
) -> None:
    """Refuse new shards that would not fit in a replica's memory budget.

    Args:
        shards: which shards are being loaded, for the message (``"shard 1"``, ``"shards 0-3"``).
        index_version: the version being loaded (for the message).
        new_bytes: the new shards' file sizes.
        held_bytes: the file sizes of the shards this replica already holds.
        budget_bytes: the replica's budget; None for the memory still available (cgroup-aware)
            plus ``held_bytes`` (what is held is already out of the available figure).
        view: the memory view to use when ``budget_bytes`` is None (default: read it now).

    Raises:
        MemoryBudgetError: ``held_bytes + new_bytes`` is over the budget; the message names
            the shards, the sizes and the budget.
    """
    if budget_bytes is None:
        view = view if view is not None else memory_view()
        budget = view.available_bytes + held_bytes
        source = f"{view.describe()}, plus the bytes already held"
    else:
        budget = budget_bytes
        source = "shard_memory_bytes"
    needed = held_bytes + new_bytes
    if needed > budget:
        raise MemoryBudgetError(
            f"{shards} of index {index_version} does not fit in this replica's memory: it needs {new_bytes} "
            f"bytes and the replica already holds {held_bytes} bytes, {needed} bytes in all "
            f"({needed / 2**20:.1f} MiB), over its budget of {budget} bytes ({budget / 2**20:.1f} MiB, {source}); "
            "a swap holds two copies of each shard, so give each replica room for both or use more shards"
        )
