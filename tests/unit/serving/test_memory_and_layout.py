"""The memory a replica may fill (cgroup-aware) and the layout choice that depends on it.

The cgroup trees are built in temporary folders in the real layouts (v1's ``memory`` hierarchy,
v2's unified one), with a ``/proc/self/cgroup`` file naming this process's cgroup in each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.config import ServingSpec
from retrieval.serving.errors import MemoryBudgetError
from retrieval.serving.layout import choose_layout
from retrieval.serving.memory import MemoryView, check_shard_memory, memory_view

GIB = 1 << 30


def meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {4 * available_kib} kB\nMemAvailable:   {available_kib} kB\n", encoding="ascii")
    return path


def cgroup_v2(tmp_path: Path, *, limit: str, current: int, inactive_file: int) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    pod = root / "kubepods" / "pod-1"
    pod.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n", encoding="ascii")
    (pod / "memory.max").write_text(f"{limit}\n", encoding="ascii")
    (pod / "memory.current").write_text(f"{current}\n", encoding="ascii")
    (pod / "memory.stat").write_text(f"anon 1\ninactive_file {inactive_file}\nactive_file 5\n", encoding="ascii")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/kubepods/pod-1\n", encoding="ascii")
    return root, self_cgroup


def test_a_container_limit_caps_the_node_s_available_memory_v2(tmp_path: Path) -> None:
    # The node has 16 GiB available; the pod's limit is 8 GiB with 5 GiB in use, 1 GiB of it reclaimable cache.
    root, self_cgroup = cgroup_v2(tmp_path, limit=str(8 * GIB), current=5 * GIB, inactive_file=1 * GIB)
    view = memory_view(meminfo=meminfo(tmp_path, 16 * GIB // 1024), self_cgroup=self_cgroup, cgroup_root=root)
    assert view == MemoryView(
        available_bytes=4 * GIB, node_available_bytes=16 * GIB, cgroup_limit_bytes=8 * GIB, cgroup_room_bytes=4 * GIB
    )
    assert "container's memory limit of 8589934592 bytes" in view.describe()


def test_no_limit_leaves_the_node_figure_v2(tmp_path: Path) -> None:
    root, self_cgroup = cgroup_v2(tmp_path, limit="max", current=5 * GIB, inactive_file=0)
    view = memory_view(meminfo=meminfo(tmp_path, 3 * GIB // 1024), self_cgroup=self_cgroup, cgroup_root=root)
    assert (view.available_bytes, view.cgroup_limit_bytes) == (3 * GIB, None)


def test_the_tightest_limit_on_the_path_counts_v1(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    parent = root / "memory" / "docker"
    child = parent / "c1"
    child.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n", encoding="ascii")  # no limit
    for folder, limit, usage in ((parent, 6 * GIB, 2 * GIB), (child, 10 * GIB, 1 * GIB)):
        (folder / "memory.limit_in_bytes").write_text(f"{limit}\n", encoding="ascii")
        (folder / "memory.usage_in_bytes").write_text(f"{usage}\n", encoding="ascii")
        (folder / "memory.stat").write_text("total_inactive_file 0\n", encoding="ascii")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("4:memory:/docker/c1\n3:cpu:/docker/c1\n0::/\n", encoding="ascii")
    view = memory_view(meminfo=meminfo(tmp_path, 32 * GIB // 1024), self_cgroup=self_cgroup, cgroup_root=root)
    # The parent's 6 GiB limit with 2 GiB used is tighter than the child's 10 GiB with 1 GiB used.
    assert (view.available_bytes, view.cgroup_limit_bytes) == (4 * GIB, 6 * GIB)


def test_the_shard_check_refuses_what_the_container_cannot_hold(tmp_path: Path) -> None:
    """Issue 16, item 8: judged by /proc/meminfo alone this shard would fit (the node has 16 GiB)."""
    root, self_cgroup = cgroup_v2(tmp_path, limit=str(8 * GIB), current=7 * GIB, inactive_file=0)
    view = memory_view(meminfo=meminfo(tmp_path, 16 * GIB // 1024), self_cgroup=self_cgroup, cgroup_root=root)
    with pytest.raises(MemoryBudgetError, match="container's memory limit"):
        check_shard_memory(
            shards="shard 0", index_version="v2", new_bytes=2 * GIB, held_bytes=GIB, budget_bytes=None, view=view
        )
    check_shard_memory(
        shards="shard 0", index_version="v2", new_bytes=GIB // 2, held_bytes=GIB, budget_bytes=None, view=view
    )


def test_auto_layout_is_local_when_two_copies_fit_and_an_explicit_layout_is_kept() -> None:
    spec = ServingSpec(index="unused", shard_memory_bytes=10 * GIB)
    assert choose_layout(spec, index_bytes=5 * GIB).layout == "local"
    over = choose_layout(spec, index_bytes=5 * GIB + 1)
    assert over.layout == "distributed" and "exceed an ingress replica's budget" in over.reason
    view = MemoryView(available_bytes=3 * GIB, node_available_bytes=64 * GIB, cgroup_limit_bytes=4 * GIB,
                      cgroup_room_bytes=3 * GIB)  # fmt: skip
    from_memory = choose_layout(ServingSpec(index="unused"), index_bytes=2 * GIB, view=view)
    assert from_memory.layout == "distributed" and "container's memory limit" in from_memory.reason
    for layout in ("local", "distributed"):
        kept = choose_layout(ServingSpec(index="unused", layout=layout), index_bytes=1 << 50)
        assert kept.layout == layout


def test_placement_settings_reach_every_deployment(tmp_path: Path) -> None:
    """`max_replicas_per_node` and the custom resources become the deployments' own options."""
    import numpy as np

    from retrieval.index import ModelRef, build_shards
    from retrieval.serving.app import build_app

    vectors = np.eye(4, dtype=np.float32)
    index = build_shards(
        vectors=vectors, ids=np.arange(4), items=[{} for _ in range(4)], out_root=tmp_path, num_shards=2,
        factory="Flat", model=ModelRef(name="m", version="1", uri="models:/m/1"), gallery={"dataset": "synthetic"},
    )  # fmt: skip
    app = build_app({
        "index": str(index), "layout": "distributed", "shard_replicas": 2, "max_replicas_per_node": 1,
        "ingress_resources": {"front": 1}, "shard_resources": {"memory_node": 0.5},
    })  # fmt: skip
    ingress = app._bound_deployment
    shards = [bound._bound_deployment for bound in ingress.init_kwargs["shards"]]
    assert ingress._replica_config.max_replicas_per_node == 1
    assert ingress.ray_actor_options["resources"] == {"front": 1}
    assert len(shards) == 2
    for shard in shards:
        assert shard.num_replicas == 2
        assert shard._replica_config.max_replicas_per_node == 1
        assert shard.ray_actor_options == {"num_cpus": 0.5, "resources": {"memory_node": 0.5}}
    with pytest.raises(Exception, match="max_replicas_per_node"):
        ServingSpec(index="unused", max_replicas_per_node=0)
