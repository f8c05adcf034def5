"""Index roots listed, shown and pruned: local folders and a real S3 endpoint (moto on 127.0.0.1).

Every version is written by the project's own writers (`build_shards`, `publish_index`); the
listing is checked against the files on disk / in the bucket, the retention rule against its
statement, and crash safety by failing a prune half-way.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from retrieval.errors import IndexIntegrityError, RetrievalError
from retrieval.index.inventory import (
    LocalIndexStore,
    list_index,
    open_index_reference,
    open_index_store,
    plan_prune,
    prune_index,
    read_version_manifest,
)
from retrieval.index.manifest import ModelRef, read_manifest, set_current_version
from retrieval.index.object_store import fetch_index, parse_s3_index_uri, publish_index
from retrieval.index.shards import build_shards, load_shard

BUCKET = "inventory-test"
HOUR = 3600


def build_version(root: Path, name: str, *, count: int = 12, num_shards: int = 2, model_version: str = "1") -> Path:
    """One index version under ``root`` by `build_shards` (it becomes CURRENT)."""
    rng = np.random.default_rng(sum(name.encode()))
    vectors = rng.standard_normal((count, 4)).astype(np.float32)
    return build_shards(
        vectors=vectors,
        ids=np.arange(count),
        items=[{"label": str(item % 3)} for item in range(count)],
        out_root=root,
        num_shards=num_shards,
        model=ModelRef(name="digits", version=model_version, uri=f"models:/digits/{model_version}"),
        gallery={"dataset": "random"},
        index_version=name,
    )


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def age(folder: Path, seconds: float) -> None:
    """Make every file in ``folder`` (and the folder) look last written ``seconds`` ago."""
    stamp = datetime.now(UTC).timestamp() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (stamp, stamp))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """v1..v4 built in order (v1 with 3 shards, model version 1..4), CURRENT rolled back to v2,
    an abandoned upload, an upload in progress, and a build's staging folder."""
    root = tmp_path / "indices"
    for number in range(1, 5):
        build_version(root, f"v{number}", count=10 + number, num_shards=3 if number == 1 else 2,
                      model_version=str(number))  # fmt: skip
    set_current_version(root, "v2")
    abandoned = root / "v0-abandoned"
    abandoned.mkdir()
    shutil.copy(root / "v1" / "shard-000.faiss", abandoned / "shard-000.faiss")
    age(abandoned, 3 * HOUR)
    uploading = root / "v5-uploading"
    uploading.mkdir()
    (uploading / "shard-000.faiss").write_bytes(b"half a shard")
    staging = root / ".building-v6-abcd1234"
    staging.mkdir()
    (staging / "shard-000.faiss").write_bytes(b"building")
    return root


def test_list_reports_every_version_with_its_state_size_and_manifest(root: Path) -> None:
    listing = list_index(LocalIndexStore(root))
    assert listing.current == "v2"
    by_name = {(version.name, version.staging): version for version in listing.versions}
    assert set(by_name) == {(f"v{n}", False) for n in range(1, 5)} | {
        ("v0-abandoned", False),
        ("v5-uploading", False),
        ("v6", True),
    }
    for number in range(1, 5):
        version = by_name[(f"v{number}", False)]
        manifest, folder = read_manifest(root / f"v{number}")
        assert version.state == "complete" and version.problem is None
        assert version.size_bytes == folder_bytes(folder)
        assert version.files == len(list(folder.iterdir()))
        assert version.manifest == manifest
        assert (version.manifest.num_items, len(version.manifest.shards)) == (10 + number, 3 if number == 1 else 2)
        assert version.manifest.model.version == str(number)
    assert by_name[("v0-abandoned", False)].state == "incomplete"
    assert "no manifest.json" in (by_name[("v0-abandoned", False)].problem or "")
    assert by_name[("v5-uploading", False)].state == "building"
    assert by_name[("v6", True)].state == "building"
    # Newest first: the complete versions in the order they were built.
    complete = [version.name for version in listing.versions if version.state == "complete"]
    assert complete == ["v4", "v3", "v2", "v1"]


def test_a_version_missing_a_shard_or_with_a_foreign_manifest_is_damaged(root: Path) -> None:
    (root / "v3" / "shard-001.faiss").unlink()
    shutil.copytree(root / "v1", root / "v1-copy")
    listing = list_index(LocalIndexStore(root))
    v3 = listing.version("v3")
    copy = listing.version("v1-copy")
    assert v3 is not None and v3.state == "damaged" and v3.problem == "missing shard files: shard-001.faiss"
    assert copy is not None and copy.state == "damaged" and copy.problem == "its manifest names version 'v1'"


def test_plan_keeps_current_served_newest_and_building_and_deletes_the_rest(root: Path) -> None:
    listing = list_index(LocalIndexStore(root))
    decisions = plan_prune(listing, keep=1, protected={"v1"}, protected_reason="held by the app")
    plan = {(decision.version, decision.state): decision for decision in decisions}
    deleted = sorted(version for (version, _), decision in plan.items() if decision.delete)
    assert deleted == ["v0-abandoned", "v3"]
    assert plan[("v4", "complete")].reason == "one of the 1 newest complete versions"
    assert plan[("v2", "complete")].reason == "named by CURRENT"
    assert plan[("v1", "complete")].reason == "held by the app"
    assert plan[("v5-uploading", "building")].reason.startswith("being written")
    assert "never pruned" in plan[("v6", "building")].reason

    # --older-than spares everything built within the window, whatever --keep says.
    later = datetime.now(UTC) + timedelta(days=2)
    spared = plan_prune(listing, keep=0, older_than=timedelta(days=3), now=later)
    assert [decision.version for decision in spared if decision.delete] == []
    aged = plan_prune(listing, keep=0, older_than=timedelta(days=1), now=later)
    assert sorted(decision.version for decision in aged if decision.delete) == ["v0-abandoned", "v1", "v3", "v4"]


def test_plan_refuses_a_root_whose_current_is_missing_or_not_complete(root: Path) -> None:
    (root / "CURRENT").unlink()
    with pytest.raises(RetrievalError, match="no CURRENT file, so which version is live is unknown"):
        plan_prune(list_index(LocalIndexStore(root)), keep=1)
    set_current_version(root, "v3")
    (root / "v3" / "manifest.json").unlink()
    age(root / "v3", 2 * HOUR)
    with pytest.raises(RetrievalError, match=r"CURRENT names v3, which is incomplete"):
        plan_prune(list_index(LocalIndexStore(root)), keep=1)
    with pytest.raises(RetrievalError, match="--keep must be 0 or more"):
        plan_prune(list_index(LocalIndexStore(root)), keep=-1)


def test_prune_deletes_the_plan_and_what_is_left_still_loads(root: Path) -> None:
    store = LocalIndexStore(root)
    decisions = plan_prune(list_index(store), keep=1, protected={"v1"})
    outcome = prune_index(store, decisions)
    assert sorted(outcome.deleted) == ["v0-abandoned", "v3"]
    assert outcome.freed_bytes == sum(decision.size_bytes for decision in decisions if decision.delete)
    assert sorted(path.name for path in root.iterdir()) == [
        ".building-v6-abcd1234",
        "CURRENT",
        "v1",
        "v2",
        "v4",
        "v5-uploading",
    ]
    manifest, folder = read_manifest(root)
    assert manifest.index_version == "v2"
    for shard in manifest.shards:
        assert load_shard(manifest=manifest, version_dir=folder, shard=shard.shard).index.ntotal == shard.count


def test_prune_spares_a_version_that_became_current_or_served_after_the_plan(root: Path) -> None:
    store = LocalIndexStore(root)
    decisions = plan_prune(list_index(store), keep=1)
    assert sorted(decision.version for decision in decisions if decision.delete) == ["v0-abandoned", "v1", "v3"]
    set_current_version(root, "v3")  # a rollback between the plan and the deletion
    outcome = prune_index(store, decisions, still_protected=lambda: {"v1"}, protected_reason="held by the app")
    assert outcome.deleted == ["v0-abandoned"]
    assert outcome.spared == {"v3": "CURRENT names it now", "v1": "held by the app now"}
    assert read_manifest(root)[0].index_version == "v3"


def test_a_local_prune_that_dies_mid_delete_leaves_no_valid_looking_version(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalIndexStore(root)
    decisions = plan_prune(list_index(store), keep=1, protected={"v1"})
    real_rmtree = shutil.rmtree

    def dies_half_way_through_v3(path: Any, *args: Any, **kwargs: Any) -> None:
        if not Path(path).name.startswith(".deleting-v3-"):
            return real_rmtree(path, *args, **kwargs)
        # Removes one file of v3, then the process "dies".
        next(Path(path).glob("*.faiss")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies_half_way_through_v3)
    with pytest.raises(KeyboardInterrupt):
        prune_index(store, decisions)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)

    listing = list_index(store)
    assert listing.version("v3") is None  # gone at once: renamed away before anything was removed
    assert len(listing.leftovers) == 1 and listing.leftovers[0].startswith(".deleting-v3-")
    assert read_manifest(root)[0].index_version == "v2"
    # The next prune finishes the job.
    outcome = prune_index(store, plan_prune(listing, keep=1, protected={"v1"}))
    assert outcome.leftovers_removed == [listing.leftovers[0]]
    assert not list(root.glob(".deleting-*"))


def test_show_reads_a_version_or_the_current_one(root: Path) -> None:
    store, version = open_index_reference(str(root / "v3"))
    assert version == "v3" and store.location == str(root)
    assert read_version_manifest(store, version) == ("v3", (root / "v3" / "manifest.json").read_text())
    store, version = open_index_reference(str(root / "v3" / "manifest.json"))
    assert version == "v3"
    store, version = open_index_reference(str(root))
    assert version is None and read_version_manifest(store, None)[0] == "v2"
    with pytest.raises(IndexIntegrityError, match=r"v9: no manifest.json \(versions here: .*v1, v2, v3, v4"):
        read_version_manifest(store, "v9")
    with pytest.raises(IndexIntegrityError, match="no such index root folder"):
        open_index_store(str(root / "nowhere"))


# --------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def endpoint(moto_s3: Any) -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port with one bucket; dummy credentials in the environment."""
    with moto_s3(BUCKET, key="inventory-test-key", secret="inventory-test-secret") as url:
        yield url


@pytest.fixture
def s3_root(endpoint: str, tmp_path: Path) -> str:
    """v1, v2, v3 built locally and published in order (CURRENT -> v3) under a fresh prefix."""
    uri = f"s3://{BUCKET}/indices/{uuid.uuid4().hex[:12]}"
    for number in range(1, 4):
        local = tmp_path / f"local-{number}"
        build_version(local, f"v{number}", count=10 + number, model_version=str(number))
        publish_index(local, uri, endpoint_url=endpoint)
    return uri


def keys_under(endpoint: str, uri: str) -> list[str]:
    location = parse_s3_index_uri(uri)
    reply = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=location.bucket, Prefix=location.prefix)
    return sorted(item["Key"][len(location.prefix) + 1 :] for item in reply.get("Contents", []))


def test_s3_listing_matches_the_published_files(endpoint: str, s3_root: str, tmp_path: Path) -> None:
    listing = list_index(open_index_store(s3_root, endpoint_url=endpoint))
    assert listing.current == "v3" and listing.location == s3_root
    assert [version.name for version in listing.versions] == ["v3", "v2", "v1"]
    for version in listing.versions:
        assert version.state == "complete"
        local = tmp_path / f"local-{version.name[1:]}" / version.name
        assert version.size_bytes == folder_bytes(local)
        assert version.manifest is not None and version.manifest.num_items == 10 + int(version.name[1:])
        assert version.location == f"{s3_root}/{version.name}"
    store, named = open_index_reference(f"{s3_root}/v2", endpoint_url=endpoint)
    assert (
        named == "v2" and read_version_manifest(store, named)[1] == (tmp_path / "local-2/v2/manifest.json").read_text()
    )
    store, named = open_index_reference(s3_root, endpoint_url=endpoint)
    assert named is None and read_version_manifest(store, None)[0] == "v3"


def test_s3_prune_deletes_the_manifest_first_and_a_crash_leaves_an_unloadable_version(
    endpoint: str, s3_root: str, tmp_path: Path
) -> None:
    deleted: list[str] = []
    client = boto3.client("s3", endpoint_url=endpoint)
    client.meta.events.register(
        "before-parameter-build.s3.DeleteObject", lambda params, **_: deleted.append(params["Key"])
    )

    def crash(params: dict[str, Any], **_: Any) -> None:
        raise ConnectionError("the pruning process lost its network")

    client.meta.events.register("before-parameter-build.s3.DeleteObjects", crash)
    store = open_index_store(s3_root, client=client)
    decisions = plan_prune(list_index(store), keep=2)
    assert [decision.version for decision in decisions if decision.delete] == ["v1"]
    with pytest.raises(ConnectionError):
        prune_index(store, decisions)
    assert deleted == [parse_s3_index_uri(s3_root).key("v1", "manifest.json")]

    # What the crash left: shards without a manifest, never loadable, listed as incomplete.
    after = list_index(open_index_store(s3_root, endpoint_url=endpoint), building_grace=timedelta(seconds=0))
    v1 = after.version("v1")
    assert v1 is not None and v1.state == "incomplete" and v1.manifest is None
    with pytest.raises(IndexIntegrityError, match="does not exist"):
        fetch_index(f"{s3_root}/v1/manifest.json", endpoint_url=endpoint, cache_dir=tmp_path / "cache")
    # A fresh upload-in-progress look-alike is spared while within the grace; the default grace (60 min)
    # treats the leftover, last written seconds ago, as being written.
    fresh = plan_prune(list_index(open_index_store(s3_root, endpoint_url=endpoint)), keep=2)
    assert [decision.version for decision in fresh if decision.delete] == []

    outcome = prune_index(open_index_store(s3_root, endpoint_url=endpoint), plan_prune(after, keep=2))
    assert outcome.deleted == ["v1"]
    assert keys_under(endpoint, s3_root) == sorted(
        ["CURRENT"] + [f"{version}/{name}" for version in ("v2", "v3") for name in _version_files(tmp_path, version)]
    )
    assert (
        read_manifest(fetch_index(s3_root, endpoint_url=endpoint, cache_dir=tmp_path / "cache"))[0].index_version
        == "v3"
    )


def _version_files(tmp_path: Path, version: str) -> list[str]:
    return sorted(path.name for path in (tmp_path / f"local-{version[1:]}" / version).iterdir())


def test_s3_root_without_current_is_listed_but_not_pruned(endpoint: str, s3_root: str) -> None:
    location = parse_s3_index_uri(s3_root)
    boto3.client("s3", endpoint_url=endpoint).delete_object(Bucket=location.bucket, Key=location.key("CURRENT"))
    listing = list_index(open_index_store(s3_root, endpoint_url=endpoint))
    assert listing.current is None and len(listing.versions) == 3
    with pytest.raises(RetrievalError, match="refusing to prune"):
        plan_prune(listing, keep=1)
    assert json.loads(json.dumps([version.summary() for version in listing.versions]))[0]["version"] == "v3"


def test_the_cli_lists_shows_and_prunes_an_s3_root(
    endpoint: str, s3_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retrieval.cli import main

    assert main(["index", "list", s3_root, "--endpoint-url", endpoint, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert (listing["root"], listing["current"]) == (s3_root, "v3")
    assert [(row["version"], row["state"], row["size_bytes"]) for row in listing["versions"]] == [
        (f"v{number}", "complete", folder_bytes(tmp_path / f"local-{number}" / f"v{number}")) for number in (3, 2, 1)
    ]
    assert main(["index", "show", f"{s3_root}/v1", "--endpoint-url", endpoint]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "local-1/v1/manifest.json").read_text())
    assert main(["index", "prune", s3_root, "--keep", "2", "--endpoint-url", endpoint]) == 0
    assert "deleted 1 versions" in capsys.readouterr().out
    assert sorted({key.split("/")[0] for key in keys_under(endpoint, s3_root)}) == ["CURRENT", "v2", "v3"]
