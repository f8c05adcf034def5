"""One gallery builder for every method: the index of a real image model and of real image-text models.

Each index must hold what the family-specific builders wrote before the builder asked the method
for its gallery: the same `gallery` record (keys, values and order), the same item metadata and,
for every item, the vector of that item embedded alone by the package (a plain loop, no batching),
packed to bits for a hashing model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from retrieval.config import JobSpec
from retrieval.data.cross_modal import CrossModalDataset, cross_modal_datasets_from_spec
from retrieval.data.from_spec import datasets_from_spec
from retrieval.errors import ConfigError
from retrieval.index.gallery import build_gallery_index
from retrieval.index.manifest import ModelRef, read_manifest
from retrieval.index.shards import load_shard
from retrieval.methods import build_method, load_model_package, save_model_package
from retrieval.methods.base import Gallery
from retrieval.methods.cross_modal import method_for
from retrieval.methods.package import TEXT_CONTEXT_FILE, ModelPackage

MODEL = ModelRef(name="gallery-model", version="2", uri="models:/gallery-model/2")

HASHING = {"name": "cross_modal_hashing", "bits": 16, "feature_dim": 32, "text": {"kind": "bow", "hidden_dim": 32}}
ADVERSARIAL = {
    "name": "adversarial_cross_modal",
    "embedding_dim": 32,
    "text": {"kind": "gru", "word_dim": 16, "hidden_dim": 32, "max_words": 12},
}


def stored_items_and_vectors(path: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, np.ndarray]]:
    """The manifest as JSON, and every shard's items (without the `id` the store adds) and stored vectors by id."""
    manifest, version_dir = read_manifest(path)
    items: dict[int, dict[str, Any]] = {}
    vectors: dict[int, np.ndarray] = {}
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        for item_id in shard.items:
            stored = shard.items[item_id]
            assert stored.pop("id") == item_id
            items[item_id] = stored
            vectors[item_id] = shard.vector(item_id)
    return json.loads(path.read_text()), items, vectors


# --------------------------------------------------------------------------- an image model


@pytest.fixture(scope="module")
def image_package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    spec = JobSpec.from_mapping(
        {
            "name": "digits-gallery",
            "method": {"name": "deep_metric", "loss": "multi_similarity"},
            "dataset": {
                "name": "digits",
                "image_size": 16,
                "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "8-9"},
            },
            "model": {"backbone": "resnet18", "weights": None, "embedding_dim": 8},
        },
        source="test",
    )
    torch.manual_seed(0)
    model = build_method(spec).build_model()
    folder = save_model_package(tmp_path_factory.mktemp("image") / "package", spec=spec, state_dict=model.state_dict())
    return load_model_package(folder, source=MODEL.uri)


def test_image_index_holds_the_test_split_embedded_item_by_item(image_package: ModelPackage, tmp_path: Path) -> None:
    spec = image_package.spec
    path = build_gallery_index(
        image_package,
        model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=2, factory="Flat", metric="ip",
        batch_size=7, thumbnail_px=8,
    )  # fmt: skip

    raw, items, vectors = stored_items_and_vectors(path)
    test = datasets_from_spec(spec.dataset).test
    count = len(test)
    assert count > 300  # two digit classes
    assert raw["gallery"] == {
        "dataset": spec.dataset.model_dump(mode="json"),
        "split": "test",
        "count": count,
        "job": "digits-gallery",
    }
    assert list(raw["gallery"]) == ["dataset", "split", "count", "job"]
    assert (raw["metric"], raw["bits"], raw["modality"], raw["dim"], raw["num_items"], raw["thumbnails"]) == (
        "ip",
        None,
        "image",
        8,
        count,
        True,
    )
    assert sorted(items) == list(range(count))
    names = test.class_names
    for position in range(count):
        image, label, _ = test[position]
        assert items[position] == {"label": names[int(label)], "source": test.source(position)}
        np.testing.assert_allclose(vectors[position], image_package.embed_tensor(image[None])[0], rtol=1e-5, atol=1e-6)


def test_text_gallery_of_a_real_image_model_is_refused_before_anything_is_written(
    image_package: ModelPackage, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"needs a model that embeds texts, but models:/gallery-model/2"):
        build_gallery_index(
            image_package,
            model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=1, factory="Flat", metric="ip",
            modality="text",
        )  # fmt: skip
    assert not (tmp_path / "index").exists()


# --------------------------------------------------------------------------- image-text models


def pairs_spec(method: dict[str, Any]) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "name": "pairs-gallery",
            "method": method,
            "dataset": {
                "name": "digit_pairs",
                "image_size": 16,
                "augment": False,
                "cross_modal": {"size": 60, "query_size": 10, "train_size": 30, "seed": 3},
            },
            "model": {"backbone": "resnet18", "weights": None, "pooling": "gem"},
        },
        source="test",
    )


@pytest.fixture(scope="module", params=[HASHING, ADVERSARIAL], ids=["hashing", "adversarial"])
def pairs_package(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    spec = pairs_spec(request.param)
    train = cross_modal_datasets_from_spec(spec.dataset).train
    method = method_for(spec, train)
    torch.manual_seed(0)
    model = method.build_model()
    folder = save_model_package(
        tmp_path_factory.mktemp("pairs") / "package",
        spec=spec,
        state_dict=model.state_dict(),
        extra_files={TEXT_CONTEXT_FILE: method.context.to_json()},
    )
    return load_model_package(folder, source=MODEL.uri)


def label_names(dataset: CrossModalDataset, position: int) -> list[str]:
    assert dataset.labels is not None
    return [
        name for name, value in zip(dataset.label_names, dataset.labels[position].tolist(), strict=True) if value > 0
    ]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_cross_modal_index_holds_the_retrieval_split_embedded_item_by_item(
    pairs_package: ModelPackage, modality: Any, tmp_path: Path
) -> None:
    spec = pairs_package.spec
    bits = pairs_package.code_bits
    path = build_gallery_index(
        pairs_package,
        model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=3, factory="Flat", metric="ip",
        batch_size=7, modality=modality, thumbnail_px=8,
    )  # fmt: skip

    raw, items, vectors = stored_items_and_vectors(path)
    retrieval = cross_modal_datasets_from_spec(spec.dataset).retrieval
    expected: list[dict[str, Any]] = []
    alone: list[np.ndarray] = []
    for position in range(len(retrieval)):
        captions = retrieval.captions_of(position)
        if modality == "image":
            expected.append(
                {"source": retrieval.source(position), "captions": captions, "labels": label_names(retrieval, position)}
            )
            alone.append(pairs_package.embed_images([retrieval.load_image(position)])[0])
            continue
        for caption in captions:
            expected.append(
                {
                    "caption": caption,
                    "owner": position,
                    "source": retrieval.source(position),
                    "labels": label_names(retrieval, position),
                }
            )
            alone.append(pairs_package.embed_texts([caption])[0])
    count = len(expected)
    assert len(retrieval) == 50 and count == (50 if modality == "image" else sum(map(len, retrieval.captions)))

    assert raw["gallery"] == {
        "dataset": spec.dataset.model_dump(mode="json"),
        "split": "retrieval",
        "modality": modality,
        "count": count,
        "images": 50,
        "code_bits": bits,
        "job": "pairs-gallery",
    }
    assert list(raw["gallery"]) == ["dataset", "split", "modality", "count", "images", "code_bits", "job"]
    metric, dim = ("hamming", 16) if bits is not None else ("ip", 32)
    assert (raw["metric"], raw["bits"], raw["modality"], raw["dim"], raw["num_items"], raw["thumbnails"]) == (
        metric,
        bits,
        modality,
        dim,
        count,
        modality == "image",
    )
    assert [items[item_id] for item_id in range(count)] == expected
    for item_id in range(count):
        if bits is not None:
            # The index stores packed bits; reading an item back gives its ±1 code.
            assert set(alone[item_id].tolist()) <= {-1.0, 1.0}
            assert vectors[item_id].tolist() == alone[item_id].tolist()
        else:
            np.testing.assert_allclose(vectors[item_id], alone[item_id], rtol=1e-5, atol=1e-6)


def test_cross_modal_gallery_all_is_refused_before_anything_is_written(
    pairs_package: ModelPackage, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="gallery 'all' is not available for the cross-modal dataset 'digit_pairs'"):
        build_gallery_index(
            pairs_package,
            model=MODEL, out_root=tmp_path / "index", gallery="all", num_shards=1, factory="Flat", metric="ip",
        )  # fmt: skip
    assert not (tmp_path / "index").exists()


# --------------------------------------------------------------------------- the builder checks what a method gives


class OwnGalleryMethod:
    """Any method with its own `gallery` (here three texts and their ±1 codes): the builder asks no family."""

    name = "own_gallery"

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = codes
        self.asked: list[tuple[Any, ...]] = []

    def gallery(self, package: Any, gallery: Any, *, modality: Any, batch_size: int) -> Gallery:
        self.asked.append((package, gallery, modality, batch_size))
        return Gallery(
            vectors=self.codes,
            items=[{"caption": f"text {position}"} for position in range(len(self.codes))],
            thumbnails_from=None,
            description={"dataset": "own", "split": gallery, "count": len(self.codes)},
            modality="text",
        )


def own_package(codes: np.ndarray, *, code_bits: int | None) -> SimpleNamespace:
    return SimpleNamespace(
        method=OwnGalleryMethod(codes), code_bits=code_bits, spec=SimpleNamespace(name="own-job"), source=MODEL.uri
    )


def test_the_builder_writes_what_the_method_gives_packing_codes(tmp_path: Path) -> None:
    codes = np.array([[1, -1, 1, 1, -1, -1, 1, -1], [-1] * 8, [1] * 8], dtype=np.float32)
    package = own_package(codes, code_bits=8)
    path = build_gallery_index(
        package,  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "index", gallery="train", num_shards=1, factory="Flat", metric="l2",
        batch_size=5, modality="text",
    )  # fmt: skip
    assert package.method.asked == [(package, "train", "text", 5)]
    raw, items, vectors = stored_items_and_vectors(path)
    assert raw["gallery"] == {"dataset": "own", "split": "train", "count": 3, "job": "own-job"}
    assert (raw["metric"], raw["bits"], raw["modality"], raw["thumbnails"]) == ("hamming", 8, "text", False)
    assert items == {position: {"caption": f"text {position}"} for position in range(3)}
    assert [vectors[position].tolist() for position in range(3)] == codes.tolist()


def test_codes_of_another_width_than_the_model_declares_are_refused(tmp_path: Path) -> None:
    package = own_package(np.ones((3, 8), dtype=np.float32), code_bits=16)
    with pytest.raises(ValueError, match="the model gave 8-dim codes, it declares 16 bits"):
        build_gallery_index(
            package,  # type: ignore[arg-type]
            model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=1, factory="Flat", metric="ip",
        )  # fmt: skip
    assert not (tmp_path / "index").exists()
