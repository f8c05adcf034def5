"""Index versions published to and fetched from a real S3 HTTP endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from retrieval.config import IndexSpec, ServingSpec
from retrieval.errors import ConfigError, IndexIntegrityError
from retrieval.index.manifest import contained_path, read_manifest
from retrieval.index.object_store import (
    default_cache_dir,
    fetch_index,
    local_index_path,
    parse_s3_index_uri,
    pin_index_version,
    publish_index,
    transfer_config,
)
from retrieval.index.shards import ModelRef, build_shards, file_sha256, load_shard

BUCKET = "index-store-test"
SECRET = "object-store-test-secret-never-logged"
MODEL = ModelRef(name="m", version="1", uri="models:/m/1")
MIB = 1024 * 1024
# S3's smallest multipart part: the large shard below spans two of them.
SMALL_PARTS = {"multipart_threshold": 5 * MIB, "multipart_chunksize": 5 * MIB}


@pytest.fixture(scope="module")
def endpoint(moto_s3: Any) -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port with one bucket; dummy credentials in the environment."""
    with moto_s3(BUCKET, key="object-store-test-key", secret=SECRET) as url:
        yield url


@pytest.fixture
def prefix_uri() -> str:
    """A fresh index root in the shared bucket, so tests never see each other's objects."""
    return f"s3://{BUCKET}/indices/{uuid.uuid4().hex[:12]}"


def local_index(root: Path, *, version: str, count: int = 60, dim: int = 8, num_shards: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    ids = np.arange(count, dtype=np.int64) + 10
    items = [{"label": str(item_id % 3)} for item_id in ids.tolist()]
    build_shards(
        vectors=vectors,
        ids=ids,
        items=items,
        out_root=root,
        num_shards=num_shards,
        model=MODEL,
        gallery={"dataset": "random"},
        index_version=version,
    )
    return root


@pytest.fixture(scope="module")
def large_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard of about 5.8 MiB: above `SMALL_PARTS`' threshold, so it goes up in two parts."""
    root = local_index(
        tmp_path_factory.mktemp("large") / "index", version="large", count=45_000, dim=32, num_shards=1, seed=5
    )
    manifest, version_dir = read_manifest(root)
    assert (version_dir / manifest.shards[0].file).stat().st_size > SMALL_PARTS["multipart_threshold"]
    return root


def version_files(root: Path) -> dict[str, bytes]:
    """The bytes of every file the manifest names, plus the manifest itself."""
    manifest, version_dir = read_manifest(root)
    names = ["manifest.json"] + [name for info in manifest.shards for name in (info.file, info.items_file)]
    return {name: (version_dir / name).read_bytes() for name in names}


def recording_client(endpoint: str, operation: str, keys: list[str]) -> Any:
    """A client that appends the key of every `operation` request to ``keys``, in order."""
    client = boto3.client("s3", endpoint_url=endpoint)

    def record(params: dict[str, Any], **_: Any) -> None:
        keys.append(params["Key"])

    client.meta.events.register(f"before-parameter-build.s3.{operation}", record)
    return client


def current_object(endpoint: str, uri: str) -> str:
    location = parse_s3_index_uri(uri)
    body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=location.bucket, Key=location.key("CURRENT"))
    return str(body["Body"].read().decode().strip())


def test_publish_then_fetch_gives_back_the_same_files(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    local = local_index(tmp_path / "local", version="v1")
    assert publish_index(local, prefix_uri, endpoint_url=endpoint) == "v1"

    location = parse_s3_index_uri(prefix_uri)
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=location.prefix + "/")
    keys = sorted(item["Key"].removeprefix(location.prefix + "/") for item in listing["Contents"])
    assert keys == sorted(["CURRENT", *(f"v1/{name}" for name in version_files(local))])
    assert current_object(endpoint, prefix_uri) == "v1"

    fetched = fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint)
    assert (fetched / "CURRENT").read_text().strip() == "v1"
    assert version_files(fetched) == version_files(local)
    manifest, version_dir = read_manifest(fetched)
    assert manifest == read_manifest(local)[0]
    # The fetched root is an ordinary index: shards load with their checksums verified.
    shard = load_shard(manifest=manifest, version_dir=version_dir, shard=1)
    assert sorted(shard.items) == list(range(40, 70))


def test_publish_uploads_shards_then_manifest_then_current_last(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    local = local_index(tmp_path / "local", version="v1", num_shards=3)
    keys: list[str] = []
    publish_index(local, prefix_uri, client=recording_client(endpoint, "PutObject", keys))

    prefix = parse_s3_index_uri(prefix_uri).prefix
    shard_keys = {f"{prefix}/v1/{name}" for name in version_files(local) if name != "manifest.json"}
    assert len(keys) == len(shard_keys) + 2
    assert set(keys[:-2]) == shard_keys
    assert keys[-2:] == [f"{prefix}/v1/manifest.json", f"{prefix}/CURRENT"]


class UploadInterrupted(Exception):
    """Raised by a request hook to stand for a crash between two uploads."""


@pytest.mark.parametrize("failing", ["manifest.json", "CURRENT"])
def test_upload_interrupted_before_the_pointer_leaves_the_previous_version(
    endpoint: str, prefix_uri: str, tmp_path: Path, failing: str
) -> None:
    old = local_index(tmp_path / "old", version="v1", seed=1)
    new = local_index(tmp_path / "new", version="v2", seed=2)
    publish_index(old, prefix_uri, endpoint_url=endpoint)

    client = boto3.client("s3", endpoint_url=endpoint)

    def fail_on(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].endswith(failing):
            raise UploadInterrupted(params["Key"])

    client.meta.events.register("before-parameter-build.s3.PutObject", fail_on)
    with pytest.raises(UploadInterrupted):
        publish_index(new, prefix_uri, client=client)

    assert current_object(endpoint, prefix_uri) == "v1"
    fetched = fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint)
    assert read_manifest(fetched)[0].index_version == "v1"
    assert version_files(fetched) == version_files(old)


KILLED_UPLOADER = """
import sys

import boto3

from retrieval.index.object_store import publish_index, transfer_config

local_root, uri, endpoint = sys.argv[1:4]
client = boto3.client("s3", endpoint_url=endpoint)


def hold_after_first_part(**_):
    print("part uploaded", flush=True)
    sys.stdin.readline()  # never answered: the test kills this process here


client.meta.events.register("after-call.s3.UploadPart", hold_after_first_part)
parts = transfer_config(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
publish_index(local_root, uri, client=client, config=parts)
"""


def test_upload_killed_midway_through_a_large_shard_leaves_the_previous_version(
    endpoint: str, prefix_uri: str, tmp_path: Path, large_index: Path
) -> None:
    old = local_index(tmp_path / "old", version="v1")
    publish_index(old, prefix_uri, endpoint_url=endpoint)

    uploader = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPLOADER, str(large_index), prefix_uri, endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=os.environ.copy(),
        start_new_session=True,
    )
    try:
        assert uploader.stdout is not None
        assert uploader.stdout.readline().strip() == b"part uploaded"
    finally:
        os.killpg(uploader.pid, signal.SIGKILL)
        uploader.wait(timeout=30)
    assert uploader.returncode == -signal.SIGKILL

    prefix = parse_s3_index_uri(prefix_uri).prefix
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/large/")
    assert listing.get("Contents", []) == []  # the half-sent shard is no object at all
    assert current_object(endpoint, prefix_uri) == "v1"
    fetched = fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint)
    assert version_files(fetched) == version_files(old)


def test_large_shard_goes_up_and_down_in_parts(
    endpoint: str, prefix_uri: str, tmp_path: Path, large_index: Path
) -> None:
    parts: list[str] = []
    config = transfer_config(**SMALL_PARTS)
    publish_index(large_index, prefix_uri, client=recording_client(endpoint, "UploadPart", parts), config=config)
    shard_key = f"{parse_s3_index_uri(prefix_uri).prefix}/large/shard-000.faiss"
    assert parts == [shard_key, shard_key]

    fetched = fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint, config=config)
    assert version_files(fetched) == version_files(large_index)


def test_second_fetch_downloads_no_shard_from_the_cache(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    local = local_index(tmp_path / "local", version="v1")
    publish_index(local, prefix_uri, endpoint_url=endpoint)
    prefix = parse_s3_index_uri(prefix_uri).prefix
    control = {f"{prefix}/CURRENT", f"{prefix}/v1/manifest.json"}
    shard_keys = {f"{prefix}/v1/{name}" for name in version_files(local) if name != "manifest.json"}

    first: list[str] = []
    fetch_index(prefix_uri, cache_dir=tmp_path / "cache", client=recording_client(endpoint, "GetObject", first))
    assert set(first) == control | shard_keys

    # A restarted replica: a new client (and process state), the same cache folder.
    second: list[str] = []
    root = fetch_index(prefix_uri, cache_dir=tmp_path / "cache", client=recording_client(endpoint, "GetObject", second))
    assert sorted(second) == sorted(control)
    assert version_files(root) == version_files(local)


def test_cached_shard_with_a_wrong_checksum_is_downloaded_again(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    local = local_index(tmp_path / "local", version="v1")
    publish_index(local, prefix_uri, endpoint_url=endpoint)
    cache = tmp_path / "cache"
    fetch_index(prefix_uri, cache_dir=cache, endpoint_url=endpoint)
    manifest, _ = read_manifest(local)
    blob = cache / "blobs" / manifest.shards[0].sha256
    blob.write_bytes(b"bit rot")

    keys: list[str] = []
    root = fetch_index(prefix_uri, cache_dir=cache, client=recording_client(endpoint, "GetObject", keys))
    prefix = parse_s3_index_uri(prefix_uri).prefix
    assert f"{prefix}/v1/{manifest.shards[0].file}" in keys
    assert f"{prefix}/v1/{manifest.shards[1].file}" not in keys
    assert file_sha256(blob) == manifest.shards[0].sha256
    assert version_files(root) == version_files(local)


def test_corrupted_object_is_refused_and_not_kept(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    local = local_index(tmp_path / "local", version="v1")
    publish_index(local, prefix_uri, endpoint_url=endpoint)
    manifest, _ = read_manifest(local)
    location = parse_s3_index_uri(prefix_uri)
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket=BUCKET, Key=location.key("v1", "shard-001.faiss"), Body=b"not the shard the manifest describes"
    )

    cache = tmp_path / "cache"
    with pytest.raises(IndexIntegrityError, match=r"v1/shard-001\.faiss: sha256 mismatch after download") as error:
        fetch_index(prefix_uri, cache_dir=cache, endpoint_url=endpoint)
    assert manifest.shards[1].sha256 in str(error.value)
    blobs = {path.name for path in (cache / "blobs").iterdir()}
    assert manifest.shards[1].sha256 not in blobs
    assert not [name for name in blobs if name.endswith(".part")]
    assert not (cache / "roots" / BUCKET / location.prefix / "CURRENT").exists()


def test_fetch_only_the_requested_shards(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    local = local_index(tmp_path / "local", version="v1", num_shards=3)
    publish_index(local, prefix_uri, endpoint_url=endpoint)
    manifest, _ = read_manifest(local)

    root = fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint, shards=[2])
    held = sorted(path.name for path in (root / "v1").iterdir())
    assert held == sorted(["manifest.json", manifest.shards[2].file, manifest.shards[2].items_file])

    only_manifest = fetch_index(prefix_uri, cache_dir=tmp_path / "other", endpoint_url=endpoint, shards=())
    assert [path.name for path in (only_manifest / "v1").iterdir()] == ["manifest.json"]
    with pytest.raises(IndexIntegrityError, match=r"has shards \[0, 1, 2\], not \[7\]"):
        fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint, shards=[7])


def test_pinned_version_stays_put_when_current_moves(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    publish_index(local_index(tmp_path / "a", version="v1", seed=1), prefix_uri, endpoint_url=endpoint)
    pinned = pin_index_version(prefix_uri, endpoint_url=endpoint)
    assert pinned == f"{prefix_uri}/v1/manifest.json"
    publish_index(local_index(tmp_path / "b", version="v2", seed=2), prefix_uri, endpoint_url=endpoint)

    cache = tmp_path / "cache"
    assert read_manifest(local_index_path(prefix_uri, endpoint_url=endpoint, cache_dir=cache))[0].index_version == "v2"
    # The same cache now holds v2 as CURRENT, yet the pinned path still reads v1.
    assert read_manifest(local_index_path(pinned, endpoint_url=endpoint, cache_dir=cache))[0].index_version == "v1"
    assert local_index_path("indices/local", endpoint_url=None) == Path("indices/local")


def test_missing_index_names_the_object(endpoint: str, prefix_uri: str, tmp_path: Path) -> None:
    with pytest.raises(IndexIntegrityError, match=r"/CURRENT: does not exist \(NoSuchKey\)"):
        fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint)


def test_uris_are_checked() -> None:
    assert parse_s3_index_uri("s3://bucket/a/b/") == parse_s3_index_uri("s3://bucket/a/b")
    pinned = parse_s3_index_uri("s3://bucket/a/v7/manifest.json")
    assert (pinned.bucket, pinned.prefix, pinned.version) == ("bucket", "a", "v7")
    with pytest.raises(IndexIntegrityError, match="not an s3://bucket/prefix URI"):
        parse_s3_index_uri("indices/local")
    with pytest.raises(IndexIntegrityError, match=r"'\.' and '\.\.' are not allowed"):
        parse_s3_index_uri("s3://bucket/a/../../etc")
    with pytest.raises(IndexIntegrityError, match="names no bucket"):
        parse_s3_index_uri("s3:///a")


def test_default_cache_dir_follows_retrieval_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "indices"
    monkeypatch.delenv("RETRIEVAL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "retrieval" / "indices"


def test_no_credential_is_logged(
    endpoint: str, prefix_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="retrieval")
    publish_index(local_index(tmp_path / "local", version="v1"), prefix_uri, endpoint_url=endpoint)
    fetch_index(prefix_uri, cache_dir=tmp_path / "cache", endpoint_url=endpoint)
    assert "published" in caplog.text
    assert SECRET not in caplog.text
    assert os.environ["AWS_ACCESS_KEY_ID"] not in caplog.text


def test_spec_endpoints_take_no_credentials() -> None:
    spec = ServingSpec.from_mapping(
        {"index": "s3://bucket/indices/x", "endpoint_url": "http://127.0.0.1:9000/"}, source="test"
    )
    assert spec.endpoint_url == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError) as error:
        ServingSpec.from_mapping({"index": "s3://b/x", "endpoint_url": "http://user:hunter2@minio:9000"}, source="t")
    assert "no user or password" in str(error.value)
    assert "hunter2" not in str(error.value)
    with pytest.raises(ConfigError, match="endpoint_url applies to an s3:// index"):
        ServingSpec.from_mapping({"index": "indices/x", "endpoint_url": "http://minio:9000"}, source="t")
    assert IndexSpec(out="s3://b/x", endpoint_url="http://minio:9000").endpoint_url == "http://minio:9000"
    with pytest.raises(ValueError, match="endpoint_url applies to an s3:// out"):
        IndexSpec(out="indices/x", endpoint_url="http://minio:9000")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("file", "../../../../tmp/planted.faiss"),
        ("file", "/etc/passwd"),
        ("items_file", "sub/dir.parquet"),
        ("file", ".hidden"),
        ("items_file", "manifest.json"),
        ("sha256", "../../victim"),
        ("items_sha256", "ABC"),
    ],
)
def test_a_crafted_manifest_cannot_name_a_path_outside_the_cache(
    endpoint: str, prefix_uri: str, tmp_path: Path, field: str, value: str
) -> None:
    """Issue 16, item 3: shard file fields are bare names and checksums 64 hex digits, or the fetch stops."""
    local = local_index(tmp_path / "local", version="v1")
    publish_index(local, prefix_uri, endpoint_url=endpoint)
    location = parse_s3_index_uri(prefix_uri)
    client = boto3.client("s3", endpoint_url=endpoint)
    manifest_key = location.key("v1", "manifest.json")
    crafted = json.loads(client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    crafted["shards"][0][field] = value
    client.put_object(Bucket=BUCKET, Key=manifest_key, Body=json.dumps(crafted).encode())
    victim = tmp_path / "victim"
    victim.write_text("kept")

    cache = tmp_path / "cache"
    with pytest.raises(IndexIntegrityError, match=rf"invalid manifest(.|\n)*{field}"):
        fetch_index(prefix_uri, cache_dir=cache, endpoint_url=endpoint)
    assert victim.read_text() == "kept"
    assert not Path("/tmp/planted.faiss").exists()
    # Nothing was downloaded or linked for the refused version.
    assert not (cache / "roots").exists() or not list((cache / "roots").rglob("*.faiss"))


def test_two_shards_cannot_share_a_file_name(tmp_path: Path) -> None:
    root = local_index(tmp_path / "local", version="v1")
    _, version_dir = read_manifest(root)
    raw = json.loads((version_dir / "manifest.json").read_text())
    raw["shards"][1]["file"] = raw["shards"][0]["file"]
    (version_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(IndexIntegrityError, match="more than once"):
        read_manifest(root)


def test_a_symlink_cannot_redirect_a_shard_path_outside_its_folder(tmp_path: Path) -> None:
    """Defence in depth: a planted link in the version folder is refused, not followed."""
    root = local_index(tmp_path / "local", version="v1")
    manifest, version_dir = read_manifest(root)
    outside = tmp_path / "outside.faiss"
    outside.write_bytes((version_dir / manifest.shards[0].file).read_bytes())
    (version_dir / manifest.shards[0].file).unlink()
    (version_dir / manifest.shards[0].file).symlink_to(outside)
    with pytest.raises(IndexIntegrityError, match="outside"):
        load_shard(manifest=manifest, version_dir=version_dir, shard=0)
    assert contained_path(version_dir, manifest.shards[1].file) == version_dir / manifest.shards[1].file
