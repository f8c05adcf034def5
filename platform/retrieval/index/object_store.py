"""Index versions in an S3-compatible object store: publish one, fetch one into a local cache.

The layout under ``s3://bucket/prefix`` mirrors the local one (see `retrieval.index.manifest`)::

    s3://bucket/prefix/CURRENT                       names the active version
    s3://bucket/prefix/<version>/manifest.json
    s3://bucket/prefix/<version>/shard-000.faiss ...

`publish_index` uploads a version's shard files first, then its manifest, then the ``CURRENT``
pointer last. A single S3 PUT is atomic, so a reader that follows ``CURRENT`` finds a manifest
whose shards are all complete, and an upload interrupted anywhere before the pointer leaves the
previous version current.

`fetch_index` downloads a version into a local cache: shard files are stored once under their
sha256 (``<cache>/blobs/<sha256>``), verified after download, and linked into a local index root
(``<cache>/roots/<bucket>/<prefix>``) that `read_manifest` and `load_shard` read as usual. A
shard already in the cache with the right checksum is not downloaded again, so a restarted
replica starts from its disk.

Credentials come only from the environment / the standard AWS chain; an ``endpoint_url``
(or ``AWS_ENDPOINT_URL``) points at MinIO or another S3-compatible store.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from retrieval.errors import IndexIntegrityError
from retrieval.index.manifest import (
    CURRENT_FILE,
    MANIFEST_FILE,
    IndexManifest,
    contained_path,
    read_manifest,
    version_name_is_valid,
    write_text_atomically,
)
from retrieval.index.shards import file_sha256

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# S3's smallest multipart part is 5 MiB: shards above 64 MiB go up and down in 16 MiB parts.
MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class S3IndexLocation:
    """Where an index lives in a bucket.

    Attributes:
        bucket: the bucket name.
        prefix: the index root's key prefix, without leading or trailing ``/`` (may be empty).
        version: the pinned version when the URI named ``<version>/manifest.json``, else None
            (follow ``CURRENT``).
    """

    bucket: str
    prefix: str
    version: str | None = None

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under the index root."""
        return "/".join(part for part in (self.prefix, *parts) if part)

    def uri(self, *parts: str) -> str:
        """The ``s3://`` URI of ``parts`` under the index root."""
        return f"{S3_SCHEME}{self.bucket}/{self.key(*parts)}"


def is_s3_uri(value: str | Path) -> bool:
    """Whether an index location is an ``s3://`` URI rather than a local path."""
    return isinstance(value, str) and value.startswith(S3_SCHEME)


def parse_s3_index_uri(uri: str) -> S3IndexLocation:
    """Split ``s3://bucket/prefix`` (an index root) or ``s3://bucket/prefix/<version>/manifest.json``.

    Raises:
        IndexIntegrityError: not an ``s3://`` URI, no bucket, or a prefix with ``.``/``..``
            segments (they would escape the local cache root).
    """
    if not is_s3_uri(uri):
        raise IndexIntegrityError(f"{uri!r}: not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise IndexIntegrityError(f"{uri!r}: the URI names no bucket")
    parts = [part for part in prefix.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise IndexIntegrityError(f"{uri!r}: '.' and '..' are not allowed in an index prefix")
    version = None
    if parts and parts[-1] == MANIFEST_FILE:
        if len(parts) < 2 or not version_name_is_valid(parts[-2]):
            raise IndexIntegrityError(f"{uri!r}: a manifest URI must be s3://bucket/prefix/<version>/{MANIFEST_FILE}")
        version = parts[-2]
        parts = parts[:-2]
    return S3IndexLocation(bucket=bucket, prefix="/".join(parts), version=version)


def s3_client(*, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; credentials from the environment / AWS chain, never from arguments.

    Args:
        endpoint_url: an S3-compatible endpoint (MinIO, ...); None uses ``AWS_ENDPOINT_URL`` or AWS.
    """
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def transfer_config(
    *, multipart_threshold: int = MULTIPART_THRESHOLD_BYTES, multipart_chunksize: int = MULTIPART_CHUNK_BYTES
) -> Any:
    """The boto3 `TransferConfig` for shard uploads and downloads (multipart above the threshold)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize)


def default_cache_dir() -> Path:
    """``$RETRIEVAL_CACHE/indices``, default ``~/.cache/retrieval/indices`` (the model cache's sibling)."""
    return Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval")) / "indices"


def publish_index(
    local_root: str | Path,
    s3_uri: str,
    *,
    endpoint_url: str | None = None,
    client: Any = None,
    config: Any = None,
) -> str:
    """Upload one local index version and make it the current version under ``s3_uri``.

    Order: every shard file (multipart when large), then ``<version>/manifest.json``, then
    ``CURRENT`` last, so readers never see a version whose files are incomplete and a failed
    upload leaves the previous ``CURRENT`` in place.

    Args:
        local_root: a local index root (its ``CURRENT`` version is published), a version
            directory or a ``manifest.json``.
        s3_uri: the remote index root, ``s3://bucket/prefix``.
        endpoint_url: an S3-compatible endpoint; ignored when ``client`` is given.
        client: a boto3 S3 client to use (default: one made from ``endpoint_url``).
        config: a boto3 `TransferConfig` (default `transfer_config()`).

    Returns:
        The published version name.

    Raises:
        IndexIntegrityError: the local index is malformed, a local shard file does not match its
            manifest checksum, or ``s3_uri`` names a manifest instead of a root.
    """
    location = parse_s3_index_uri(s3_uri)
    if location.version is not None:
        raise IndexIntegrityError(f"{s3_uri}: publish to an index root s3://bucket/prefix, not to a manifest")
    manifest, version_dir = read_manifest(local_root)
    client = client if client is not None else s3_client(endpoint_url=endpoint_url)
    config = config if config is not None else transfer_config()
    version = manifest.index_version
    for name, expected in _shard_files(manifest, shards=None):
        path = contained_path(version_dir, name)
        # A shard corrupted on the local disk must not become the remote truth.
        actual = file_sha256(path) if path.is_file() else "missing"
        if actual != expected:
            raise IndexIntegrityError(f"{path}: manifest expects sha256 {expected}, the local file has {actual}")
        client.upload_file(str(path), location.bucket, location.key(version, name), Config=config)
        logger.info("index %s: uploaded %s", version, location.uri(version, name))
    client.upload_file(
        str(version_dir / MANIFEST_FILE), location.bucket, location.key(version, MANIFEST_FILE), Config=config
    )
    client.put_object(Bucket=location.bucket, Key=location.key(CURRENT_FILE), Body=(version + "\n").encode("utf-8"))
    logger.info("index %s published: %s -> %s", version, location.uri(CURRENT_FILE), version)
    return version


def fetch_index(
    s3_uri: str,
    *,
    cache_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    shards: Collection[int] | None = None,
    client: Any = None,
    config: Any = None,
) -> Path:
    """Download an index version from S3 into the local cache and return a local index root.

    Args:
        s3_uri: ``s3://bucket/prefix`` (the version ``CURRENT`` names) or
            ``s3://bucket/prefix/<version>/manifest.json`` (that version).
        cache_dir: the cache folder (default `default_cache_dir()`).
        endpoint_url: an S3-compatible endpoint; ignored when ``client`` is given.
        shards: only these shard numbers' files (e.g. ``[2]`` for a shard replica, ``[]`` for
            the manifest alone); None downloads every shard.
        client: a boto3 S3 client to use (default: one made from ``endpoint_url``).
        config: a boto3 `TransferConfig` (default `transfer_config()`).

    Returns:
        The local index root; its ``CURRENT`` names the fetched version. For a pinned version
        read ``<root>/<version>/manifest.json`` (see `local_index_path`) when other versions
        of the same index may be fetched into the same cache concurrently.

    Raises:
        IndexIntegrityError: ``CURRENT`` or the manifest is missing or malformed, a requested
            shard is not in the manifest, or a downloaded file's sha256 differs from the
            manifest (the message names the file; the bad download is removed).
    """
    location = parse_s3_index_uri(s3_uri)
    client = client if client is not None else s3_client(endpoint_url=endpoint_url)
    config = config if config is not None else transfer_config()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = location.version or _read_current(client, location)
    manifest_bytes = _get_object(client, location, location.key(version, MANIFEST_FILE))
    try:
        manifest = IndexManifest.model_validate_json(manifest_bytes)
    except ValidationError as error:
        raise IndexIntegrityError(f"{location.uri(version, MANIFEST_FILE)}: invalid manifest: {error}") from error
    if manifest.index_version != version:
        raise IndexIntegrityError(
            f"{location.uri(version, MANIFEST_FILE)}: lives under version {version!r} but the manifest says "
            f"{manifest.index_version!r}"
        )

    blobs = cache / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    local_root = cache / "roots" / location.bucket / PurePosixPath(location.prefix)
    version_dir = local_root / version
    version_dir.mkdir(parents=True, exist_ok=True)
    for name, sha256 in _shard_files(manifest, shards=shards):
        blob = _cached_blob(client, location, version, name, sha256, blobs=blobs, config=config)
        _link_into(blob, contained_path(version_dir, name))
    write_text_atomically(version_dir / MANIFEST_FILE, manifest_bytes.decode("utf-8"))
    write_text_atomically(local_root / CURRENT_FILE, version + "\n")
    logger.info("index %s fetched from %s into %s", version, location.uri(), local_root)
    return local_root


def pin_index_version(s3_uri: str, *, endpoint_url: str | None = None, client: Any = None) -> str:
    """The ``s3://.../<version>/manifest.json`` URI of the version ``s3_uri`` names right now.

    Serving pins this URI so that every replica loads one version even if ``CURRENT`` moves
    while they start. A URI that already names a manifest is returned as it is.
    """
    location = parse_s3_index_uri(s3_uri)
    if location.version is not None:
        return s3_uri
    client = client if client is not None else s3_client(endpoint_url=endpoint_url)
    return location.uri(_read_current(client, location), MANIFEST_FILE)


def local_index_path(
    index: str,
    *,
    endpoint_url: str | None = None,
    cache_dir: str | Path | None = None,
    shards: Collection[int] | None = None,
) -> Path:
    """A local path `read_manifest` accepts for a local path or an ``s3://`` index.

    A local path is returned as it is. An ``s3://`` index is fetched with `fetch_index`; for a
    pinned ``.../<version>/manifest.json`` URI the result is that version's local manifest, not
    the root, so a concurrent fetch of another version into the same cache cannot switch it.

    Args:
        index: a local index root / manifest, or an ``s3://`` URI.
        endpoint_url: the S3-compatible endpoint, for ``s3://`` URIs.
        cache_dir: the cache folder (default `default_cache_dir()`).
        shards: the shard files to download (None: all, ``[]``: the manifest alone).
    """
    if not is_s3_uri(index):
        return Path(index)
    root = fetch_index(index, cache_dir=cache_dir, endpoint_url=endpoint_url, shards=shards)
    version = parse_s3_index_uri(index).version
    return root if version is None else root / version / MANIFEST_FILE


def _shard_files(manifest: IndexManifest, *, shards: Collection[int] | None) -> list[tuple[str, str]]:
    known = {info.shard for info in manifest.shards}
    wanted = known if shards is None else set(shards)
    unknown = sorted(wanted - known)
    if unknown:
        raise IndexIntegrityError(f"index {manifest.index_version} has shards {sorted(known)}, not {unknown}")
    return [
        pair
        for info in manifest.shards
        if info.shard in wanted
        for pair in ((info.file, info.sha256), (info.items_file, info.items_sha256))
    ]


def _get_object(client: Any, location: S3IndexLocation, key: str) -> bytes:
    from botocore.exceptions import ClientError

    try:
        body: bytes = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise IndexIntegrityError(f"{S3_SCHEME}{location.bucket}/{key}: does not exist ({code})") from None
        raise
    return body


def _read_current(client: Any, location: S3IndexLocation) -> str:
    raw = _get_object(client, location, location.key(CURRENT_FILE))
    version = raw.decode("utf-8", errors="replace").strip()
    if not version_name_is_valid(version):
        raise IndexIntegrityError(f"{location.uri(CURRENT_FILE)}: does not name a version (read {version!r})")
    return version


def _cached_blob(
    client: Any, location: S3IndexLocation, version: str, name: str, sha256: str, *, blobs: Path, config: Any
) -> Path:
    blob = contained_path(blobs, sha256)
    if blob.is_file():
        if file_sha256(blob) == sha256:
            logger.info("index %s: %s found in the cache", version, name)
            return blob
        logger.warning("index %s: cached %s does not match sha256 %s; downloading it again", version, blob, sha256)
        blob.unlink(missing_ok=True)
    # Downloaded beside the blob under a temporary name and renamed once verified, so that
    # replicas sharing the cache never read a partial or unverified file.
    handle, temp_name = tempfile.mkstemp(prefix=f".{sha256[:16]}.", suffix=".part", dir=blobs)
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        client.download_file(location.bucket, location.key(version, name), temp_name, Config=config)
        actual = file_sha256(temp_path)
        if actual != sha256:
            raise IndexIntegrityError(
                f"{location.uri(version, name)}: sha256 mismatch after download, manifest expects {sha256} "
                f"but the object has {actual}"
            )
        os.replace(temp_path, blob)
    finally:
        temp_path.unlink(missing_ok=True)
    logger.info("index %s: downloaded %s", version, location.uri(version, name))
    return blob


def _link_into(blob: Path, target: Path) -> None:
    if target.is_file() and os.path.samefile(blob, target):
        return
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.link")
    try:
        try:
            os.link(blob, temp)
        except OSError:
            # Filesystems without hard links get a copy; the blob stays the cache's record.
            shutil.copyfile(blob, temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
