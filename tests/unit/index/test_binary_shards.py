"""Binary (Hamming) shards against a brute-force NumPy reference; cross-modal galleries.

Codes are ±1 sign codes of a few bits, so many distances tie: the reference ranks by the
number of differing signs, then by ascending id, in plain Python.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from retrieval.data.base import ArrayImageLoader, ImageDataset
from retrieval.data.cross_modal import CrossModalDataset, CrossModalSplits
from retrieval.errors import ConfigError, IndexIntegrityError
from retrieval.index import gallery as gallery_module
from retrieval.index.gallery import build_cross_modal_index, cross_modal_items
from retrieval.index.manifest import IndexManifest, ModelRef, read_manifest
from retrieval.index.merge import merge_topk
from retrieval.index.shards import build_shards, load_shard
from retrieval.methods import build_method
from retrieval.methods import cross_modal_gallery as cross_modal_gallery_module
from retrieval.methods import gallery as image_gallery_module
from retrieval.methods.base import Gallery
from retrieval.models.codes import pack_codes, unpack_codes

MODEL = ModelRef(name="pairs-hashing", version="4", uri="models:/pairs-hashing/4")


def sign_codes(count: int, bits: int, seed: int) -> np.ndarray:
    """Random ±1 codes ``[count, bits]`` float32."""
    return np.where(np.random.default_rng(seed).random((count, bits)) < 0.5, -1.0, 1.0).astype(np.float32)


def shuffled_ids(count: int, seed: int) -> np.ndarray:
    # Non-contiguous, shuffled: shards must sort them and still answer with global ids.
    return np.random.default_rng(seed).permutation(np.arange(count) * 3 + 11).astype(np.int64)


def build_binary(
    root: Path, codes: np.ndarray, ids: np.ndarray, *, num_shards: int, factory: str = "Flat", **options: Any
) -> Path:
    return build_shards(
        vectors=pack_codes(codes),
        ids=ids,
        items=[{"source": f"synthetic:{item_id}"} for item_id in ids.tolist()],
        out_root=root,
        num_shards=num_shards,
        factory=factory,
        metric="hamming",
        model=MODEL,
        gallery={"dataset": "synthetic"},
        **options,
    )


def sharded_hamming_search(root: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    manifest, version_dir = read_manifest(root)
    per_shard = [
        load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard).search(pack_codes(queries), k)
        for info in manifest.shards
    ]
    return merge_topk(results=per_shard, k=k, metric=manifest.metric)


def brute_force_hamming(codes: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The top-k ``(distance, id)`` pairs: differing signs counted in a loop, ties by ascending id."""
    pairs = []
    for code, item_id in zip(codes.tolist(), ids.tolist(), strict=True):
        distance = sum(1 for mine, theirs in zip(code, query.tolist(), strict=True) if (mine > 0) != (theirs > 0))
        pairs.append((distance, item_id))
    return sorted(pairs)[:k]


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_sharded_hamming_search_equals_brute_force_with_ties(tmp_path: Path, num_shards: int) -> None:
    bits, k = 16, 15
    codes = sign_codes(143, bits, seed=num_shards)
    ids = shuffled_ids(143, seed=num_shards)
    # Real-valued queries: only their signs count, as for relaxed (tanh) codes.
    queries = np.random.default_rng(7).standard_normal((20, bits)).astype(np.float32)
    build_binary(tmp_path / "index", codes, ids, num_shards=num_shards)

    distances, found = sharded_hamming_search(tmp_path / "index", queries, k)

    assert distances.dtype == np.float32 and found.dtype == np.int64
    for row, query in enumerate(queries):
        expected = brute_force_hamming(codes, ids, query, k)
        assert list(zip(distances[row].astype(int).tolist(), found[row].tolist(), strict=True)) == expected


def test_manifest_records_hamming_bits_and_modality(tmp_path: Path) -> None:
    codes = sign_codes(20, 24, seed=0)
    path = build_binary(tmp_path / "index", codes, np.arange(20), num_shards=2, modality="text")
    manifest, _ = read_manifest(path)
    raw = json.loads(path.read_text())
    assert (raw["metric"], raw["dim"], raw["bits"], raw["modality"], raw["factory"]) == (
        "hamming",
        24,
        24,
        "text",
        "Flat",
    )
    assert manifest.is_binary and manifest.bits == 24


def test_float_manifests_without_the_new_fields_still_load(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    path = build_shards(
        vectors=vectors,
        ids=np.arange(10),
        items=[{}] * 10,
        out_root=tmp_path / "index",
        num_shards=2,
        model=MODEL,
        gallery={},
    )
    raw = json.loads(path.read_text())
    assert raw["bits"] is None and raw["modality"] == "image"
    # A manifest written before `bits` and `modality` existed.
    del raw["bits"], raw["modality"]
    path.write_text(json.dumps(raw))
    manifest, version_dir = read_manifest(path)
    assert (manifest.metric, manifest.bits, manifest.modality, manifest.is_binary) == ("ip", None, "image", False)
    shard = load_shard(manifest=manifest, version_dir=version_dir, shard=0)
    np.testing.assert_array_equal(shard.vector(3), vectors[3])


def test_manifest_refuses_inconsistent_bits(tmp_path: Path) -> None:
    path = build_binary(tmp_path / "index", sign_codes(8, 16, seed=0), np.arange(8), num_shards=1)
    raw = json.loads(path.read_text())
    with pytest.raises(ValueError, match="a hamming index needs bits equal to dim and a multiple of 8"):
        IndexManifest.model_validate({**raw, "bits": 8})
    with pytest.raises(ValueError, match="bits applies to a hamming index only, but metric is 'ip'"):
        IndexManifest.model_validate({**raw, "metric": "ip"})


@pytest.mark.parametrize("factory", ["BFlat", "BHNSW32", "BIVF4"])
def test_binary_factories_build_load_and_find_exact_duplicates(tmp_path: Path, factory: str) -> None:
    # 64 random bits: every code is unique, so each one's exact duplicate is itself alone.
    codes = sign_codes(300, 64, seed=3)
    ids = shuffled_ids(300, seed=3)
    path = build_binary(tmp_path / "index", codes, ids, num_shards=2, factory=factory)
    manifest, _ = read_manifest(path)
    assert manifest.factory == factory

    distances, found = sharded_hamming_search(tmp_path / "index", codes, k=3)

    assert found[:, 0].tolist() == ids.tolist()
    assert distances[:, 0].tolist() == [0.0] * len(ids)
    assert (distances[:, 1] > 0).all()


def test_id_queries_read_back_the_sign_code(tmp_path: Path) -> None:
    codes = sign_codes(30, 32, seed=5)
    ids = shuffled_ids(30, seed=5)
    path = build_binary(tmp_path / "index", codes, ids, num_shards=3, factory="BIVF2")
    manifest, version_dir = read_manifest(path)
    shards = [load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard) for info in manifest.shards]
    for code, item_id in zip(codes, ids.tolist(), strict=True):
        shard = next(shard for shard in shards if item_id in shard.items)
        stored = shard.vector(item_id)
        assert stored.dtype == np.float32 and stored.tolist() == code.tolist()
    with pytest.raises(KeyError):
        shards[0].vector(int(ids.max()) + 1)


def test_unpack_codes_inverts_pack_codes() -> None:
    codes = sign_codes(5, 24, seed=9)
    assert unpack_codes(pack_codes(codes), 24).tolist() == codes.tolist()
    assert unpack_codes(pack_codes(codes)[2], 24).tolist() == codes[2].tolist()


def test_k_beyond_a_binary_shard_pads_with_minus_one(tmp_path: Path) -> None:
    codes = sign_codes(5, 8, seed=1)
    build_binary(tmp_path / "index", codes, np.arange(5), num_shards=2)
    distances, found = sharded_hamming_search(tmp_path / "index", codes[:1], k=8)
    assert found[0, :5].tolist() == [item_id for _, item_id in brute_force_hamming(codes, np.arange(5), codes[0], 5)]
    assert found[0, 5:].tolist() == [-1, -1, -1]
    assert distances[0, 5:].tolist() == [np.finfo(np.float32).max] * 3


def test_corrupted_binary_shard_is_refused_by_checksum(tmp_path: Path) -> None:
    path = build_binary(tmp_path / "index", sign_codes(40, 16, seed=2), np.arange(40), num_shards=2)
    manifest, version_dir = read_manifest(path)
    shard_file = version_dir / manifest.shards[1].file
    data = bytearray(shard_file.read_bytes())
    data[-3] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    load_shard(manifest=manifest, version_dir=version_dir, shard=0)
    with pytest.raises(IndexIntegrityError) as raised:
        load_shard(manifest=manifest, version_dir=version_dir, shard=1)
    message = str(raised.value)
    assert "sha256 mismatch" in message and str(shard_file) in message and manifest.shards[1].sha256 in message


def test_binary_inputs_and_queries_are_checked(tmp_path: Path) -> None:
    codes = sign_codes(10, 16, seed=0)
    with pytest.raises(ValueError, match=r"packed 8 bits a byte \(uint8 \[N, bits / 8\], see pack_codes\), got"):
        build_shards(
            vectors=codes, ids=np.arange(10), items=[{}] * 10, out_root=tmp_path / "a", num_shards=1,
            metric="hamming", model=MODEL, gallery={},
        )  # fmt: skip
    with pytest.raises(ValueError, match="faiss cannot build binary factory 'HNSW32' for 16 bits"):
        build_binary(tmp_path / "b", codes, np.arange(10), num_shards=1, factory="HNSW32")
    path = build_binary(tmp_path / "c", codes, np.arange(10), num_shards=1)
    manifest, version_dir = read_manifest(path)
    shard = load_shard(manifest=manifest, version_dir=version_dir, shard=0)
    with pytest.raises(ValueError, match=r"must be packed codes uint8 \[Q, 2\], got float32 \(1, 16\)"):
        shard.search(codes[:1], 3)


# --------------------------------------------------------------------------- cross-modal galleries

LABEL_NAMES = ["zero", "one", "two"]
LABELS = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=np.float32)
CAPTIONS = [["a zero and a two", "two then zero"], ["a one"], ["nothing"], ["zero one", "one zero", "a pair"]]
BITS = 16


def tiny_pairs() -> CrossModalDataset:
    return CrossModalDataset(
        loaders=[lambda position=position: Image.new("RGB", (8, 8), (position, 0, 0)) for position in range(4)],
        captions=CAPTIONS,
        tags=None,
        labels=LABELS,
        label_names=LABEL_NAMES,
        tag_names=[],
        sources=[f"pairs:{position}" for position in range(4)],
    )


class FakeCrossModalPackage:
    """Honours the `ModelPackage` contract: an image's code is a fixed ±1 row, and so is every
    caption of it, so a caption's nearest image is its own at Hamming distance 0.

    Its method's `gallery` is the real one of the cross-modal methods (`cross_modal_gallery`).
    """

    def __init__(self, *, code_bits: int | None) -> None:
        self.code_bits = code_bits
        self.source = MODEL.uri
        self.codes = sign_codes(4, BITS, seed=11)
        self.method = SimpleNamespace(name="cross_modal_hashing", gallery=self.gallery)
        self.spec = SimpleNamespace(
            name="pairs-job",
            dataset=SimpleNamespace(name="digit_pairs", model_dump=lambda mode: {"name": "digit_pairs"}),
        )

    def embed_images(self, images: list[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        return self.codes[[image.getpixel((0, 0))[0] for image in images]]

    def embed_texts(self, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
        owner = {text: position for position, captions in enumerate(CAPTIONS) for text in captions}
        return self.codes[[owner[text] for text in texts]]

    def gallery(self, package: Any, gallery: Any, *, modality: Any, batch_size: int) -> Gallery:
        return cross_modal_gallery_module.cross_modal_gallery(
            self.method, package, gallery, modality=modality, batch_size=batch_size
        )


@pytest.fixture
def pairs_gallery(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = tiny_pairs()
    monkeypatch.setattr(
        cross_modal_gallery_module,
        "cross_modal_datasets_from_spec",
        lambda spec: CrossModalSplits(train=dataset, query=dataset, retrieval=dataset),
    )


def test_cross_modal_items_per_image_and_per_caption() -> None:
    items, texts = cross_modal_items(tiny_pairs(), modality="image")
    assert texts == []
    assert items[0] == {"source": "pairs:0", "captions": CAPTIONS[0], "labels": ["zero", "two"]}
    assert items[2]["labels"] == []
    items, texts = cross_modal_items(tiny_pairs(), modality="text")
    assert texts == [text for captions in CAPTIONS for text in captions]
    assert items[2] == {"caption": "a one", "owner": 1, "source": "pairs:1", "labels": ["one"]}
    assert items[6] == {"caption": "a pair", "owner": 3, "source": "pairs:3", "labels": ["zero", "one"]}


@pytest.mark.usefixtures("pairs_gallery")
def test_hashing_gallery_of_texts_is_a_binary_index_its_images_find(tmp_path: Path) -> None:
    package = FakeCrossModalPackage(code_bits=BITS)
    path = build_cross_modal_index(
        package,  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=2, factory="Flat", metric="ip",
        modality="text",
    )  # fmt: skip
    manifest, version_dir = read_manifest(path)
    assert (manifest.metric, manifest.bits, manifest.modality, manifest.num_items) == ("hamming", BITS, "text", 7)
    assert manifest.gallery["split"] == "retrieval" and manifest.gallery["code_bits"] == BITS

    # Image 3's code finds its three captions (ids 4, 5, 6) at distance 0.
    distances, found = sharded_hamming_search(tmp_path / "index", package.codes[3:4], k=3)
    assert found[0].tolist() == [4, 5, 6] and distances[0].tolist() == [0.0, 0.0, 0.0]
    shard = load_shard(manifest=manifest, version_dir=version_dir, shard=1)
    assert shard.items[5]["caption"] == "one zero" and shard.items[5]["owner"] == 3


@pytest.mark.usefixtures("pairs_gallery")
def test_real_valued_gallery_of_images_is_a_float_index(tmp_path: Path) -> None:
    package = FakeCrossModalPackage(code_bits=None)
    path = build_cross_modal_index(
        package,  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=1, factory="Flat", metric="ip",
        batch_size=3,
    )  # fmt: skip
    manifest, version_dir = read_manifest(path)
    assert (manifest.metric, manifest.bits, manifest.modality, manifest.dim) == ("ip", None, "image", BITS)
    shard = load_shard(manifest=manifest, version_dir=version_dir, shard=0)
    np.testing.assert_array_equal(shard.vector(2), package.codes[2])
    assert shard.items[0]["labels"] == ["zero", "two"]
    with pytest.raises(ConfigError, match="gallery 'all' is not available for the cross-modal dataset"):
        build_cross_modal_index(
            package,  # type: ignore[arg-type]
            model=MODEL, out_root=tmp_path / "other", gallery="all", num_shards=1, factory="Flat", metric="ip",
        )  # fmt: skip


def test_text_gallery_of_an_image_only_model_is_refused(tmp_path: Path, make_job_spec: Any) -> None:
    package = image_package(make_job_spec)
    with pytest.raises(
        ConfigError,
        match=r"index modality 'text' needs a model that embeds texts, but models:/pairs-hashing/4 "
        r"\(method 'deep_metric'\) embeds images only",
    ):
        gallery_module.build_gallery_index(
            package,  # type: ignore[arg-type]
            model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=1, factory="Flat", metric="ip",
            modality="text",
        )  # fmt: skip
    assert not (tmp_path / "index").exists()


# --------------------------------------------------------------------------- thumbnails of image galleries


def raw_digit(position: int) -> np.ndarray:
    """A distinct 8 x 6 grayscale image: rows count up, offset by the item's position."""
    return ((np.arange(48).reshape(8, 6) * 5 + position * 7) % 256).astype(np.uint8)


@pytest.fixture
def digits_gallery(monkeypatch: pytest.MonkeyPatch) -> ImageDataset:
    dataset = ImageDataset(
        loaders=[ArrayImageLoader(pixels=raw_digit(position)) for position in range(5)],
        labels=np.array([0, 1, 0, 1, 1]),
        class_names=["zero", "one"],
        sources=[f"digits:{position}" for position in range(5)],
        # The model's transform must not reach the thumbnails: it would turn every image black.
        transform=lambda image: Image.new("L", (4, 4)),  # type: ignore[arg-type,return-value]
    )
    monkeypatch.setattr(image_gallery_module, "gallery_dataset", lambda package, gallery: dataset)
    monkeypatch.setattr(
        image_gallery_module,
        "embed_dataset",
        lambda embed, data, *, batch_size, device: np.eye(len(data), 4, dtype=np.float32),
    )
    return dataset


def image_package(make_job_spec: Any) -> SimpleNamespace:
    """A package of a real image method (its default `gallery`); the gallery's data and embedding are patched."""
    return SimpleNamespace(
        method=build_method(make_job_spec()),
        model=None,
        device="cpu",
        source=MODEL.uri,
        code_bits=None,
        spec=SimpleNamespace(name="digits-job", dataset=SimpleNamespace(model_dump=lambda mode: {"name": "digits"})),
    )


def thumbnails_of(path: Path) -> dict[int, bytes | None]:
    manifest, version_dir = read_manifest(path)
    found: dict[int, bytes | None] = {}
    for info in manifest.shards:
        shard = load_shard(manifest=manifest, version_dir=version_dir, shard=info.shard)
        found.update({item_id: shard.items.thumbnail(item_id) for item_id in shard.items})
    return found


@pytest.mark.usefixtures("digits_gallery")
def test_image_gallery_stores_thumbnails_of_the_raw_images(tmp_path: Path, make_job_spec: Any) -> None:
    path = gallery_module.build_gallery_index(
        image_package(make_job_spec),  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=2, factory="Flat", metric="ip",
        thumbnail_px=32,
    )  # fmt: skip
    manifest, _ = read_manifest(path)
    assert manifest.thumbnails is True
    thumbnails = thumbnails_of(path)
    assert sorted(thumbnails) == [0, 1, 2, 3, 4]
    for position, png in thumbnails.items():
        assert png is not None and png.startswith(b"\x89PNG")
        with Image.open(io.BytesIO(png)) as image:
            # 8 x 6 (rows x columns) enlarged 4 times: the longer side is 32; each pixel a 4 x 4 block.
            assert image.size == (24, 32)
            np.testing.assert_array_equal(np.asarray(image), np.kron(raw_digit(position), np.ones((4, 4), np.uint8)))


@pytest.mark.usefixtures("digits_gallery")
def test_thumbnail_px_zero_stores_none(tmp_path: Path, make_job_spec: Any) -> None:
    path = gallery_module.build_gallery_index(
        image_package(make_job_spec),  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "index", gallery="test", num_shards=1, factory="Flat", metric="ip",
        thumbnail_px=0,
    )  # fmt: skip
    manifest, version_dir = read_manifest(path)
    assert manifest.thumbnails is False
    assert not load_shard(manifest=manifest, version_dir=version_dir, shard=0).items.has_thumbnails


def test_large_images_shrink_to_the_thumbnail_size() -> None:
    image = Image.new("RGB", (300, 120), (200, 10, 10))
    with Image.open(io.BytesIO(gallery_module.thumbnail_png(image, size_px=64))) as thumbnail:
        assert thumbnail.size == (64, 26) and thumbnail.getpixel((30, 10)) == (200, 10, 10)


@pytest.mark.usefixtures("pairs_gallery")
def test_cross_modal_image_gallery_has_thumbnails_and_text_gallery_none(tmp_path: Path) -> None:
    package = FakeCrossModalPackage(code_bits=BITS)
    images = build_cross_modal_index(
        package,  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "images", gallery="test", num_shards=1, factory="Flat", metric="ip",
        thumbnail_px=16,
    )  # fmt: skip
    assert read_manifest(images)[0].thumbnails is True
    for position, png in thumbnails_of(images).items():
        assert png is not None
        with Image.open(io.BytesIO(png)) as thumbnail:
            assert thumbnail.size == (16, 16) and thumbnail.convert("RGB").getpixel((3, 3)) == (position, 0, 0)
    texts = build_cross_modal_index(
        package,  # type: ignore[arg-type]
        model=MODEL, out_root=tmp_path / "texts", gallery="test", num_shards=1, factory="Flat", metric="ip",
        modality="text",
    )  # fmt: skip
    assert read_manifest(texts)[0].thumbnails is False
    assert set(thumbnails_of(texts).values()) == {None}
