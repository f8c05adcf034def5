"""What an index root holds, and retention: list its versions, show one, prune old ones.

An index root (local folder or ``s3://bucket/prefix``, laid out as `retrieval.index.manifest`
describes) accumulates one version per build. `list_index` reads every version's state from a
listing of the files (sizes and times) and each manifest, without reading a shard:

- ``complete``: a valid manifest whose every shard and items file is present;
- ``building``: no manifest yet and a file written within ``building_grace`` (an S3 upload
  puts the manifest after the shards, a fetch writes it last too); a local build stages in a
  hidden ``.building-<version>-*`` folder, listed as ``building`` while it is fresh;
- ``incomplete``: no manifest, nothing written for longer than the grace (a crashed upload,
  or a prune interrupted after it removed the manifest);
- ``damaged``: a manifest that does not validate, names another version, or names files
  that are missing.

`plan_prune` is the retention rule, a pure function; `prune_index` carries it out. A deletion
never leaves something that looks valid: locally a version folder is first renamed to a hidden
``.deleting-<version>-*`` name (one atomic step; the version is gone) and then removed; in S3
its ``manifest.json`` goes first (the version is then ``incomplete``, never loadable) and the
shard objects after. ``CURRENT`` is re-read, and the protected versions asked for again, just
before each deletion, so a version that became current or served meanwhile stays.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from retrieval.errors import IndexIntegrityError, RetrievalError
from retrieval.index.manifest import (
    CURRENT_FILE,
    MANIFEST_FILE,
    IndexManifest,
    version_name_is_valid,
)
from retrieval.index.object_store import S3IndexLocation, is_s3_uri, parse_s3_index_uri, s3_client

logger = logging.getLogger(__name__)

VersionState = Literal["complete", "building", "incomplete", "damaged"]
DEFAULT_BUILDING_GRACE = timedelta(minutes=60)
# Hidden folder names of a local root: a build's staging folder and a prune's folder being removed.
BUILDING_PREFIX = ".building-"
DELETING_PREFIX = ".deleting-"
_S3_DELETE_BATCH = 1000


@dataclass(frozen=True)
class StoredFile:
    """One file of a version folder: its name relative to the folder, size and last write."""

    name: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class VersionFolder:
    """The raw listing of one version folder (``staging``: a local build's hidden staging folder)."""

    name: str
    files: tuple[StoredFile, ...]
    modified: datetime
    staging: bool = False


@dataclass(frozen=True)
class IndexVersion:
    """One version of an index root, as `list_index` found it.

    Attributes:
        name: the version name (for a staging folder, the version it will become).
        state: ``complete``, ``building``, ``incomplete`` or ``damaged`` (see the module docstring).
        size_bytes: the bytes of every file in the version folder.
        files: how many files it holds.
        modified: its newest file's last write (UTC).
        manifest: the validated manifest, None when there is none or it is invalid.
        problem: why it is not complete (None when it is).
        location: where it lives (a local folder or an ``s3://`` prefix).
        staging: a local build's hidden staging folder (never pruned).
    """

    name: str
    state: VersionState
    size_bytes: int
    files: int
    modified: datetime
    manifest: IndexManifest | None
    problem: str | None
    location: str
    staging: bool = False

    @property
    def created(self) -> datetime:
        """When it was built: the manifest's ``created_at``, else its newest file's time."""
        if self.manifest is not None:
            try:
                created = datetime.fromisoformat(self.manifest.created_at)
            except ValueError:
                return self.modified
            return created if created.tzinfo else created.replace(tzinfo=UTC)
        return self.modified

    def summary(self) -> dict[str, Any]:
        """The JSON-ready row of ``retrieval index list --json``."""
        manifest = self.manifest
        return {
            "version": self.name,
            "state": self.state,
            "problem": self.problem,
            "size_bytes": self.size_bytes,
            "files": self.files,
            "num_vectors": None if manifest is None else manifest.num_items,
            "num_shards": None if manifest is None else len(manifest.shards),
            "model": None if manifest is None else manifest.model.model_dump(),
            "created_at": self.created.isoformat(),
            "modified_at": self.modified.isoformat(),
            "location": self.location,
            "staging": self.staging,
        }


@dataclass(frozen=True)
class IndexListing:
    """Every version under a root, newest first, what ``CURRENT`` names, and leftovers of interrupted prunes."""

    location: str
    current: str | None
    versions: tuple[IndexVersion, ...]
    leftovers: tuple[str, ...] = ()

    def version(self, name: str) -> IndexVersion | None:
        """The version folder named ``name`` (not a build's staging folder), None when there is none."""
        return next((version for version in self.versions if version.name == name and not version.staging), None)


class IndexStore(Protocol):
    """Where an index root lives: the few operations listing and pruning need."""

    location: str

    def current(self) -> str | None:
        """The version ``CURRENT`` names, None when there is no ``CURRENT``."""
        ...

    def folders(self) -> list[VersionFolder]:
        """Every version folder (valid version names), and local build staging folders."""
        ...

    def leftovers(self) -> list[str]:
        """Folders a prune was removing when it stopped (local roots only)."""
        ...

    def read_text(self, version: str, name: str) -> str:
        """A file of a version folder as text."""
        ...

    def version_location(self, version: str) -> str:
        """Where a version folder lives, for messages."""
        ...

    def delete_version(self, version: str) -> None:
        """Delete a version so that no moment of it looks valid (see the module docstring)."""
        ...

    def remove_leftover(self, name: str) -> None:
        """Finish removing a leftover of an interrupted prune."""
        ...


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class LocalIndexStore:
    """An index root on a local (or mounted) filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise IndexIntegrityError(f"{self.root}: no such index root folder")
        self.location = str(self.root)

    def current(self) -> str | None:
        path = self.root / CURRENT_FILE
        if not path.is_file():
            return None
        version = path.read_text(encoding="utf-8").strip()
        if not version_name_is_valid(version):
            raise IndexIntegrityError(f"{path}: does not name a version (read {version!r})")
        return version

    def folders(self) -> list[VersionFolder]:
        found = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            staging = entry.name.startswith(BUILDING_PREFIX)
            if not staging and not version_name_is_valid(entry.name):
                continue
            files = tuple(
                StoredFile(name=str(path.relative_to(entry)), size=stat.st_size, modified=_utc(stat.st_mtime))
                for path in sorted(entry.rglob("*"))
                if path.is_file()
                for stat in (path.stat(),)
            )
            newest = max([_utc(entry.stat().st_mtime), *(file.modified for file in files)])
            # `.building-<version>-<8 random characters>` (tempfile.mkdtemp in `build_shards`).
            name = entry.name.removeprefix(BUILDING_PREFIX).rsplit("-", 1)[0] if staging else entry.name
            found.append(VersionFolder(name=name, files=files, modified=newest, staging=staging))
        return found

    def leftovers(self) -> list[str]:
        return sorted(
            entry.name for entry in self.root.iterdir() if entry.is_dir() and entry.name.startswith(DELETING_PREFIX)
        )

    def read_text(self, version: str, name: str) -> str:
        return (self.root / version / name).read_text(encoding="utf-8")

    def version_location(self, version: str) -> str:
        return str(self.root / version)

    def delete_version(self, version: str) -> None:
        if not version_name_is_valid(version):
            raise IndexIntegrityError(f"{version!r}: not a version name")
        folder = self.root / version
        # One rename takes the whole version away at once; what is left to remove is hidden.
        doomed = self.root / f"{DELETING_PREFIX}{version}-{secrets.token_hex(4)}"
        os.rename(folder, doomed)
        shutil.rmtree(doomed)

    def remove_leftover(self, name: str) -> None:
        if not name.startswith(DELETING_PREFIX) or "/" in name or os.sep in name:
            raise IndexIntegrityError(f"{name!r}: not a leftover of a prune")
        shutil.rmtree(self.root / name)


class S3IndexStore:
    """An index root in an S3-compatible bucket (credentials from the environment / AWS chain)."""

    def __init__(self, location: S3IndexLocation, *, client: Any) -> None:
        self._where = location
        self._client = client
        self.location = location.uri()

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import ClientError

        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self._where.bucket, Prefix=prefix):
                yield from page.get("Contents", [])
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            raise IndexIntegrityError(f"{self.location}: cannot list the bucket ({code}: {error})") from None

    def _root_prefix(self) -> str:
        return f"{self._where.prefix}/" if self._where.prefix else ""

    def current(self) -> str | None:
        try:
            text = self._get(self._where.key(CURRENT_FILE))
        except FileNotFoundError:
            return None
        version = text.strip()
        if not version_name_is_valid(version):
            raise IndexIntegrityError(f"{self._where.uri(CURRENT_FILE)}: does not name a version (read {version!r})")
        return version

    def folders(self) -> list[VersionFolder]:
        root = self._root_prefix()
        grouped: dict[str, list[StoredFile]] = {}
        for item in self._objects(root):
            relative = item["Key"][len(root) :]
            version, slash, name = relative.partition("/")
            if not slash or not name or not version_name_is_valid(version):
                continue
            modified = item["LastModified"]
            grouped.setdefault(version, []).append(
                StoredFile(name=name, size=int(item["Size"]), modified=modified.astimezone(UTC))
            )
        return [
            VersionFolder(name=version, files=tuple(files), modified=max(file.modified for file in files))
            for version, files in sorted(grouped.items())
        ]

    def leftovers(self) -> list[str]:
        return []

    def _get(self, key: str) -> str:
        from botocore.exceptions import ClientError

        try:
            body: bytes = self._client.get_object(Bucket=self._where.bucket, Key=key)["Body"].read()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            if code == "NoSuchBucket":
                raise IndexIntegrityError(f"{self.location}: no such bucket {self._where.bucket!r}") from None
            raise
        return body.decode("utf-8")

    def read_text(self, version: str, name: str) -> str:
        return self._get(self._where.key(version, name))

    def version_location(self, version: str) -> str:
        return self._where.uri(version)

    def delete_version(self, version: str) -> None:
        if not version_name_is_valid(version):
            raise IndexIntegrityError(f"{version!r}: not a version name")
        # The manifest first: from then on no reader can load the version, whatever is left.
        self._client.delete_object(Bucket=self._where.bucket, Key=self._where.key(version, MANIFEST_FILE))
        keys = [item["Key"] for item in self._objects(self._where.key(version) + "/")]
        for start in range(0, len(keys), _S3_DELETE_BATCH):
            batch = keys[start : start + _S3_DELETE_BATCH]
            reply = self._client.delete_objects(
                Bucket=self._where.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
            )
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise IndexIntegrityError(
                    f"{self._where.uri(version)}: {len(errors)} objects were not deleted "
                    f"(first: {first.get('Key')}: {first.get('Code')} {first.get('Message')}); the version has no "
                    "manifest any more, so it is listed as incomplete and the next prune removes the rest"
                )

    def remove_leftover(self, name: str) -> None:
        raise IndexIntegrityError(f"{name!r}: an S3 root has no leftover folders")


def split_index_reference(reference: str) -> tuple[str, str | None]:
    """``ROOT`` or ``ROOT/VERSION`` (or ``.../VERSION/manifest.json``) -> ``(root, version or None)``.

    A local path is a version when it is a folder holding a ``manifest.json`` and no ``CURRENT``
    file; an ``s3://`` one when ``<reference>/manifest.json`` exists (checked by the caller with
    `S3IndexStore`, see `open_index_reference`).
    """
    if is_s3_uri(reference):
        location = parse_s3_index_uri(reference)
        if location.version is not None:
            return S3IndexLocation(location.bucket, location.prefix).uri(), location.version
        return reference.rstrip("/"), None
    path = Path(reference)
    if path.name == MANIFEST_FILE and path.is_file():
        return str(path.parent.parent), path.parent.name
    if path.is_dir() and (path / MANIFEST_FILE).is_file() and not (path / CURRENT_FILE).exists():
        return str(path.parent), path.name
    return reference, None


def open_index_store(root: str, *, endpoint_url: str | None = None, client: Any = None) -> IndexStore:
    """The store of an index root: a local folder, or ``s3://bucket/prefix``.

    Raises:
        IndexIntegrityError: a local root that is not a folder, or an ``s3://`` URI naming a manifest.
    """
    if not is_s3_uri(root):
        return LocalIndexStore(root)
    location = parse_s3_index_uri(root)
    if location.version is not None:
        raise IndexIntegrityError(f"{root}: give the index root s3://bucket/prefix, not a manifest")
    return S3IndexStore(location, client=client if client is not None else s3_client(endpoint_url=endpoint_url))


def open_index_reference(
    reference: str, *, endpoint_url: str | None = None, client: Any = None
) -> tuple[IndexStore, str | None]:
    """The store of ``ROOT[/VERSION]`` and the version it names (None: the root itself).

    An ``s3://bucket/prefix/name`` is a version when ``name/manifest.json`` exists under
    ``s3://bucket/prefix``, else it is a root.
    """
    root, version = split_index_reference(reference)
    if version is None and is_s3_uri(reference):
        location = parse_s3_index_uri(root)
        parent, _, last = location.prefix.rpartition("/")
        if last and version_name_is_valid(last):
            candidate = S3IndexStore(
                S3IndexLocation(location.bucket, parent),
                client=client if client is not None else s3_client(endpoint_url=endpoint_url),
            )
            try:
                candidate.read_text(last, MANIFEST_FILE)
            except FileNotFoundError:
                pass
            else:
                return candidate, last
    return open_index_store(root, endpoint_url=endpoint_url, client=client), version


def _describe(folder: VersionFolder, *, store: IndexStore, now: datetime, building_grace: timedelta) -> IndexVersion:
    names = {file.name for file in folder.files}
    fresh = now - folder.modified < building_grace
    age = _age(now - folder.modified)

    def found(state: VersionState, problem: str | None, manifest: IndexManifest | None = None) -> IndexVersion:
        location = (
            str(Path(store.location) / f"{BUILDING_PREFIX}{folder.name}-*")
            if folder.staging
            else store.version_location(folder.name)
        )
        return IndexVersion(
            name=folder.name,
            state=state,
            size_bytes=sum(file.size for file in folder.files),
            files=len(folder.files),
            modified=folder.modified,
            manifest=manifest,
            problem=problem,
            location=location,
            staging=folder.staging,
        )

    if folder.staging:
        return found("building" if fresh else "incomplete", f"a build's staging folder, last written {age} ago")
    if MANIFEST_FILE not in names:
        if fresh:
            return found("building", f"no {MANIFEST_FILE} yet, last written {age} ago")
        return found("incomplete", f"no {MANIFEST_FILE}, nothing written for {age} (an interrupted upload or prune)")
    try:
        manifest = IndexManifest.model_validate_json(store.read_text(folder.name, MANIFEST_FILE))
    except FileNotFoundError:
        # Deleted between the listing and this read (a prune running beside us).
        return found("incomplete", f"{MANIFEST_FILE} vanished while listing")
    except (ValidationError, ValueError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return found("damaged", f"invalid {MANIFEST_FILE}: {first}")
    if manifest.index_version != folder.name:
        return found("damaged", f"its manifest names version {manifest.index_version!r}", manifest)
    missing = [name for info in manifest.shards for name in (info.file, info.items_file) if name not in names]
    if missing:
        return found("damaged", f"missing shard files: {', '.join(missing)}", manifest)
    return found("complete", None, manifest)


def _age(delta: timedelta) -> str:
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def list_index(
    store: IndexStore, *, now: datetime | None = None, building_grace: timedelta = DEFAULT_BUILDING_GRACE
) -> IndexListing:
    """Every version under the store's root, newest first (see the module docstring for the states)."""
    now = now or datetime.now(UTC)
    versions = [_describe(folder, store=store, now=now, building_grace=building_grace) for folder in store.folders()]
    versions.sort(key=lambda version: (version.created, version.name), reverse=True)
    return IndexListing(
        location=store.location, current=store.current(), versions=tuple(versions), leftovers=tuple(store.leftovers())
    )


def read_version_manifest(store: IndexStore, version: str | None) -> tuple[str, str]:
    """``(version, manifest text)`` of ``version``, or of the one ``CURRENT`` names when None.

    Raises:
        IndexIntegrityError: no ``CURRENT``, no such version, or its manifest does not validate.
    """
    if version is None:
        version = store.current()
        if version is None:
            raise IndexIntegrityError(f"{store.location}: no {CURRENT_FILE} file: name a version, ROOT/VERSION")
    try:
        text = store.read_text(version, MANIFEST_FILE)
    except (FileNotFoundError, NotADirectoryError):
        known = [folder.name for folder in store.folders() if not folder.staging]
        raise IndexIntegrityError(
            f"{store.version_location(version)}: no {MANIFEST_FILE} (versions here: {', '.join(known) or 'none'})"
        ) from None
    try:
        manifest = IndexManifest.model_validate_json(text)
    except ValidationError as error:
        where = f"{store.version_location(version)}/{MANIFEST_FILE}"
        raise IndexIntegrityError(f"{where}: invalid manifest: {error}") from None
    if manifest.index_version != version:
        raise IndexIntegrityError(
            f"{store.version_location(version)}/{MANIFEST_FILE}: names version {manifest.index_version!r}"
        )
    return version, text


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class PruneDecision:
    """What `plan_prune` decided for one version, and why."""

    version: str
    delete: bool
    reason: str
    state: VersionState
    size_bytes: int


@dataclass
class PruneOutcome:
    """What `prune_index` did: deleted versions, versions spared at the last check, leftovers removed."""

    deleted: list[str] = field(default_factory=list)
    spared: dict[str, str] = field(default_factory=dict)
    leftovers_removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def plan_prune(
    listing: IndexListing,
    *,
    keep: int,
    older_than: timedelta | None = None,
    protected: Collection[str] = (),
    protected_reason: str = "served",
    now: datetime | None = None,
) -> list[PruneDecision]:
    """The retention rule: which versions a prune deletes, each with its reason (newest first).

    Kept, whatever else holds: a version being built, the one ``CURRENT`` names, every version
    in ``protected`` (e.g. those a running app holds), the ``keep`` newest complete versions,
    and, with ``older_than``, every version built more recently than that. Everything else is
    deleted: older complete versions, and incomplete or damaged ones (no reader can load them).

    Raises:
        RetrievalError: ``keep`` below 0, ``older_than`` not positive, no ``CURRENT``, or a
            ``CURRENT`` that names no complete version (the root needs a look before any deletion).
    """
    if keep < 0:
        raise RetrievalError(f"--keep must be 0 or more, got {keep}")
    if older_than is not None and older_than <= timedelta(0):
        raise RetrievalError(f"--older-than must be more than 0 days, got {older_than.total_seconds() / 86400:g}")
    if listing.current is None:
        raise RetrievalError(
            f"{listing.location}: no {CURRENT_FILE} file, so which version is live is unknown; refusing to prune "
            "(is this an index root?)"
        )
    current = listing.version(listing.current)
    if current is None or current.state != "complete":
        problem = "does not exist" if current is None else f"is {current.state}: {current.problem}"
        raise RetrievalError(
            f"{listing.location}: {CURRENT_FILE} names {listing.current}, which {problem}; refusing to prune until "
            "the root is repaired"
        )
    now = now or datetime.now(UTC)
    protected = set(protected)
    decisions = []
    complete_seen = 0
    for version in listing.versions:
        if version.state == "complete":
            complete_seen += 1
        age = now - version.created
        reason: str | None = None
        if version.staging:
            reason = f"{version.problem} (never pruned: remove it by hand once its build is known dead)"
        elif version.state == "building":
            reason = f"being written ({version.problem})"
        elif version.name == listing.current:
            reason = f"named by {CURRENT_FILE}"
        elif version.name in protected:
            reason = protected_reason
        elif version.state == "complete" and complete_seen <= keep:
            reason = f"one of the {keep} newest complete versions"
        elif older_than is not None and age < older_than:
            reason = f"built {_age(age)} ago, within --older-than {older_than.total_seconds() / 86400:g} days"
        if reason is not None:
            decisions.append(
                PruneDecision(version.name, False, reason, state=version.state, size_bytes=version.size_bytes)
            )
            continue
        if version.state == "complete":
            why = f"complete, older than the {keep} newest complete versions, built {_age(age)} ago"
        else:
            why = f"{version.state}: {version.problem}"
        decisions.append(PruneDecision(version.name, True, why, state=version.state, size_bytes=version.size_bytes))
    return decisions


def prune_index(
    store: IndexStore,
    decisions: Sequence[PruneDecision],
    *,
    still_protected: Callable[[], Collection[str]] = frozenset,
    protected_reason: str = "served",
) -> PruneOutcome:
    """Delete the versions ``decisions`` marks, oldest first, re-checking each just before.

    Before each deletion ``CURRENT`` is read again and ``still_protected()`` is asked again (a
    swap or a rollback may have started): a version either names is spared. A failure of
    ``still_protected`` (the app became unreachable) stops the prune there. Leftovers of an
    earlier, interrupted prune are removed at the end.
    """
    outcome = PruneOutcome()
    doomed = [decision for decision in decisions if decision.delete]
    for decision in reversed(doomed):
        current = store.current()
        if decision.version == current:
            outcome.spared[decision.version] = f"{CURRENT_FILE} names it now"
            logger.warning("index %s: %s names it now; not deleted", decision.version, CURRENT_FILE)
            continue
        if decision.version in set(still_protected()):
            outcome.spared[decision.version] = f"{protected_reason} now"
            logger.warning("index %s: %s now; not deleted", decision.version, protected_reason)
            continue
        store.delete_version(decision.version)
        outcome.deleted.append(decision.version)
        outcome.freed_bytes += decision.size_bytes
        logger.info("index %s deleted from %s (%s)", decision.version, store.location, decision.reason)
    for leftover in store.leftovers():
        store.remove_leftover(leftover)
        outcome.leftovers_removed.append(leftover)
    return outcome


def listing_json(listing: IndexListing, *, served: Collection[str] = ()) -> dict[str, Any]:
    """``retrieval index list --json``: the root, ``CURRENT``, the served versions, every version."""
    return {
        "root": listing.location,
        "current": listing.current,
        "served": sorted(served),
        "versions": [
            {**version.summary(), "current": version.name == listing.current, "served": version.name in served}
            for version in listing.versions
        ],
        "leftovers": list(listing.leftovers),
    }


def manifest_json(text: str) -> str:
    """A stored manifest, re-indented for people (the stored one may be compact)."""
    return json.dumps(json.loads(text), indent=2)
