"""The query models one replica holds, version by version: load (checked against the index), embed, free.

Free of Ray, like `retrieval.serving.shard_host`: it runs inside an `EmbedderDeployment`
replica, inside the ingress when the embedder is local (``embedder_layout: local``), and in
plain test processes. One model per index version (one object when two versions share a
model URI); a call for a version not held raises `VersionNotLoadedError`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from retrieval.config import ServingSpec
from retrieval.errors import IndexIntegrityError
from retrieval.index.manifest import read_manifest
from retrieval.index.object_store import local_index_path
from retrieval.serving.errors import VersionNotLoadedError
from retrieval.serving.images import decode_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedCall:
    """One call of the embedder: an encoded image or a text, for one version (None: the default one)."""

    kind: Literal["image", "text"]
    data: bytes | str
    index_version: str | None


class EmbedderHost:
    """The models that embed queries, one per index version held.

    Args:
        spec: the serving spec (where the models are registered, the S3 endpoint and cache).
    """

    def __init__(self, *, spec: ServingSpec) -> None:
        self._spec = spec
        self._models: dict[str, tuple[str, Any]] = {}
        self._transforms: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.default_version: str | None = None

    def prepare(self, manifest_ref: str) -> str:
        """Load the model of the version ``manifest_ref`` names, beside the ones held.

        Returns:
            The index version.

        Raises:
            ModelNotFoundError: the manifest's model cannot be loaded.
            IndexIntegrityError: the model's dimension differs from the index's, or a binary
                index's model is not a hashing one (or its code length differs).
        """
        # Imported here, not at module level: it pulls in torch and MLflow, which shard and
        # ingress replicas that never embed must not pay for in memory and start-up time.
        from retrieval.tracking.registry import load_embedder

        manifest, _ = read_manifest(
            local_index_path(
                manifest_ref, endpoint_url=self._spec.endpoint_url, cache_dir=self._spec.cache_dir, shards=()
            )
        )
        version, uri = manifest.index_version, manifest.model.uri
        if version in self._models:
            return version
        shared = next((embedder for held_uri, embedder in self._models.values() if held_uri == uri), None)
        embedder = shared if shared is not None else load_embedder(uri, tracking_uri=self._spec.tracking_uri)
        if manifest.is_binary and embedder.code_bits != manifest.bits:
            raise IndexIntegrityError(
                f"index {version} holds {manifest.bits}-bit hash codes but model {uri} gives "
                f"{'real-valued embeddings' if embedder.code_bits is None else f'{embedder.code_bits}-bit codes'}"
            )
        if not manifest.is_binary and embedder.dim != manifest.dim:
            raise IndexIntegrityError(
                f"model {uri} embeds into {embedder.dim} dimensions but index {version} holds "
                f"{manifest.dim}-dimensional vectors"
            )
        with self._lock:
            self._models[version] = (uri, embedder)
        logger.info("embedder for index %s loaded %s", version, uri)
        return version

    def drop(self, version: str) -> None:
        """Free the model of ``version`` (nothing if it is not held)."""
        with self._lock:
            self._models.pop(version, None)
            self._transforms.pop(version, None)

    def versions(self) -> list[str]:
        """The index versions a model is held for, sorted."""
        return sorted(self._models)

    def version_of(self, call: EmbedCall) -> str:
        """The version a call is for (its own, else the host's default)."""
        if call.index_version is not None:
            return call.index_version
        if self.default_version is None:
            raise VersionNotLoadedError("the call names no index version and the embedder has no default")
        return self.default_version

    def embed_calls(self, calls: Sequence[EmbedCall]) -> list[np.ndarray | Exception]:
        """Embed several calls with one model call per (kind, version).

        Images are decoded one at a time and each turned into the model's input tensor at once,
        so a batch never holds more than one decoded image (`decode_image` refuses one over the
        spec's pixel budget, or in a format not accepted, from its header).

        Returns:
            One embedding ``[D]`` float32 per call, in order; an error in place of a call's
            embedding (an unreadable or oversize image fails alone, a version not held or a model
            without a text encoder fails its whole group).
        """
        results: list[np.ndarray | Exception] = [RuntimeError("unanswered")] * len(calls)
        groups: dict[tuple[str, str], list[int]] = {}
        for position, call in enumerate(calls):
            try:
                groups.setdefault((call.kind, self.version_of(call)), []).append(position)
            except VersionNotLoadedError as error:
                results[position] = error
        for (kind, version), positions in groups.items():
            held = self._models.get(version)
            if held is None:
                missing = VersionNotLoadedError(f"the embedder holds index versions {self.versions()}, not {version}")
                for position in positions:
                    results[position] = missing
                continue
            model = held[1]
            inputs: list[Any] = []
            ready: list[int] = []
            prepare = self._preparation(version, model) if kind == "image" else None
            for position in positions:
                data = calls[position].data
                try:
                    # An image call carries bytes, a text call a str (`EmbedCall`).
                    if isinstance(data, bytes):
                        image = decode_image(
                            data, max_pixels=self._spec.max_image_pixels, formats=self._spec.image_formats
                        )
                        inputs.append(prepare(image) if prepare is not None else image)
                        del image
                    else:
                        inputs.append(data)
                    ready.append(position)
                except Exception as error:
                    results[position] = error
            if not inputs:
                continue
            try:
                if kind == "text":
                    embedded = model.embed_texts(inputs)
                elif prepare is not None:
                    import torch

                    embedded = model.embed_tensor(torch.stack(inputs))
                else:
                    embedded = model.embed_images(inputs)
            except Exception as error:
                for position in ready:
                    results[position] = error
                continue
            for position, row in zip(ready, np.asarray(embedded, dtype=np.float32), strict=True):
                results[position] = row
        return results

    def _preparation(self, version: str, model: Any) -> Any | None:
        """The model's image -> input tensor transform (None: the model takes PIL images whole), kept per version."""
        if not (hasattr(model, "preprocess") and hasattr(model, "embed_tensor")):
            return None
        transform = self._transforms.get(version)
        if transform is None:
            transform = self._transforms[version] = model.preprocess()
        return transform

    def embed(self, call: EmbedCall) -> np.ndarray:
        """One call's embedding ``[D]`` float32.

        Raises:
            NotAnImageError, BadRequestError, VersionNotLoadedError: see `embed_calls`.
        """
        result = self.embed_calls([call])[0]
        if isinstance(result, Exception):
            raise result
        return result
