"""A sharded index from a registered model version: the registry-to-index step of `retrieval index` and the demo."""

from __future__ import annotations

import tempfile
from pathlib import Path

from retrieval.index.gallery import build_gallery_index
from retrieval.index.manifest import ModelRef
from retrieval.index.object_store import is_s3_uri, publish_index
from retrieval.tracking.catalog import record_index_version
from retrieval.tracking.registry import load_embedder, resolve_model_version


def build_index_from_model(
    model_uri: str,
    *,
    tracking_uri: str,
    out: str | None = None,
    shards: int | None = None,
    factory: str | None = None,
    gallery: str | None = None,
    modality: str | None = None,
) -> Path | str:
    """Embed a gallery with a registered model (or a local package folder) and write its sharded index.

    Settings default to the model's own job spec (`retrieval index` and the demo call this).

    An ``s3://bucket/prefix`` out is built in a temporary local folder, then published there
    (shards, manifest, ``CURRENT`` last) to the spec's ``index.endpoint_url`` or, without one,
    ``AWS_ENDPOINT_URL`` / AWS, and the manifest's ``s3://`` URI is returned. A registered
    model version gets the tag ``retrieval.index.<index version>`` = the manifest's location.
    """
    package = load_embedder(model_uri, tracking_uri=tracking_uri)
    if model_uri.startswith("models:/"):
        name, version = resolve_model_version(model_uri, tracking_uri=tracking_uri)
        reference = ModelRef(name=name, version=version, uri=f"models:/{name}/{version}")
    else:
        folder = str(Path(model_uri).resolve())
        reference = ModelRef(name=package.spec.registered_model_name, version="local", uri=folder)
    spec = package.spec
    out_root = out or spec.index_root

    def build(root: str | Path) -> Path:
        return build_gallery_index(
            package,
            model=reference,
            out_root=root,
            gallery=gallery or spec.index.gallery,  # type: ignore[arg-type]
            num_shards=shards or spec.index.num_shards,
            factory=factory or spec.index.factory,
            metric=spec.index.metric,
            batch_size=spec.train.embed_batch_size,
            modality="text" if (modality or spec.index.modality) == "text" else "image",
            train_sample=spec.index.train_sample,
            add_batch_size=spec.index.add_batch_size,
            search_defaults={
                name: value
                for name, value in (("nprobe", spec.index.nprobe), ("ef_search", spec.index.ef_search))
                if value is not None
            },
            thumbnail_px=spec.index.thumbnail_px,
        )

    if not is_s3_uri(out_root):
        manifest_path: Path | str = build(out_root)
        index_version = Path(manifest_path).parent.name
    else:
        with tempfile.TemporaryDirectory(prefix="retrieval-index-") as staging:
            build(staging)
            index_version = publish_index(staging, out_root, endpoint_url=spec.index.endpoint_url)
        manifest_path = f"{out_root.rstrip('/')}/{index_version}/manifest.json"
    if model_uri.startswith("models:/"):
        # `retrieval models list` shows it; the manifest already names the model the other way round.
        record_index_version(
            tracking_uri=tracking_uri,
            name=reference.name,
            version=reference.version,
            index_version=index_version,
            location=str(manifest_path),
        )
    return manifest_path
