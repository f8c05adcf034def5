"""Streaming feature extraction: same numbers as `embed_dataset`, verified files, exact part merges, bounded memory."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from retrieval.config import JobSpec
from retrieval.data.base import ImageDataset
from retrieval.data.digits import load_digits_dataset
from retrieval.data.transforms import eval_transform
from retrieval.errors import IndexIntegrityError
from retrieval.evaluation.runs import embed_dataset
from retrieval.index.extraction import (
    FEATURES_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    extract_features,
    merge_parts,
    read_features,
)
from retrieval.methods.registry import build_method

SOURCE = {"dataset": "digits", "split": "first 70"}


def _digits(count: int = 70) -> ImageDataset:
    return load_digits_dataset(transform=eval_transform(image_size=32)).subset(np.arange(count))


def _pooled(images: torch.Tensor) -> torch.Tensor:
    """A per-image embedding `[B, 12]` (2x2 average pooling): each row depends on its own image only,
    so the result cannot depend on how the images were batched."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)


@pytest.fixture
def resnet_embed(make_job_spec: Callable[..., JobSpec]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An untrained resnet18 with a 16-d head, in eval mode."""
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16})
    torch.manual_seed(0)
    method = build_method(spec)
    model = method.build_model().eval()
    return lambda images: method.embed(model, images)


class _Tensors(Dataset[tuple[torch.Tensor, int, int]]):
    """Synthetic images `[3, 4, 4]` (item i filled with i) that count how many are alive at once."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.live = 0
        self.max_live = 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = torch.full((3, 4, 4), float(index))
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        weakref.finalize(image, self._release)
        return image, 0, index

    def _release(self) -> None:
        self.live -= 1


def test_float32_features_equal_embed_dataset_and_the_manifest_records_them(resnet_embed, tmp_path: Path) -> None:
    dataset = _digits()
    expected = embed_dataset(resnet_embed, dataset, batch_size=16)

    written = extract_features(
        resnet_embed, dataset, out_dir=tmp_path, batch_size=16, model="models:/digits@champion", source=SOURCE
    )

    features, manifest = read_features(tmp_path)
    np.testing.assert_array_equal(features, expected)
    assert features.dtype == np.float32
    assert isinstance(features, np.memmap)
    # Nothing else in the folder: no temporary file left behind, no part for a whole extraction.
    assert {path.name for path in tmp_path.iterdir()} == {FEATURES_FILE, MANIFEST_FILE}
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert raw["file"] == FEATURES_FILE
    assert (raw["count"], raw["dim"], raw["dtype"]) == (70, 16, "float32")
    assert (raw["start"], raw["stop"], raw["total"]) == (0, 70, 70)
    assert raw["model"] == "models:/digits@champion"
    assert raw["source"] == SOURCE
    assert raw["sha256"] == hashlib.sha256((tmp_path / FEATURES_FILE).read_bytes()).hexdigest()
    assert [(part["start"], part["stop"]) for part in raw["parts"]] == [(0, 70)]
    assert raw["parts"][0]["sha256"] == raw["sha256"]
    assert manifest == written.manifest
    assert written.parts[0].images_per_second > 0


def test_float16_features_are_embed_dataset_rounded_to_half_precision(resnet_embed, tmp_path: Path) -> None:
    dataset = _digits()
    expected = embed_dataset(resnet_embed, dataset, batch_size=16)

    extract_features(resnet_embed, dataset, out_dir=tmp_path, batch_size=16, dtype="float16", model="m", source=SOURCE)

    features, manifest = read_features(tmp_path)
    assert features.dtype == np.float16
    assert manifest.dtype == "float16"
    assert (tmp_path / FEATURES_FILE).stat().st_size < 70 * 16 * 2 + 256  # two bytes a value plus the header
    np.testing.assert_array_equal(features, expected.astype(np.float16))
    # Unit-norm embeddings: float16's 11-bit mantissa keeps every value within 2**-11 of float32's.
    np.testing.assert_allclose(features.astype(np.float32), expected, rtol=0, atol=2**-11)


def test_a_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    extract_features(_pooled, _digits(), out_dir=tmp_path, batch_size=16, model="m", source=SOURCE)
    path = tmp_path / FEATURES_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(IndexIntegrityError, match="sha256 mismatch") as caught:
        read_features(tmp_path)
    assert str(path) in str(caught.value)
    features, _ = read_features(tmp_path, verify=False)
    assert features.shape == (70, 12)


def test_a_missing_manifest_is_named_and_points_to_the_parts(tmp_path: Path) -> None:
    with pytest.raises(IndexIntegrityError, match=r"no features manifest$"):
        read_features(tmp_path)
    extract_features(_pooled, _digits(), out_dir=tmp_path, batch_size=16, start=0, stop=30, model="m", source=SOURCE)
    with pytest.raises(IndexIntegrityError, match="run merge_parts first"):
        read_features(tmp_path)


def test_parts_written_in_any_order_merge_into_the_one_shot_file(tmp_path: Path) -> None:
    dataset = _digits()
    reference = np.stack([_pooled(dataset[index][0][None])[0].numpy() for index in range(len(dataset))])
    one_shot = extract_features(_pooled, dataset, out_dir=tmp_path / "one", batch_size=16, model="m", source=SOURCE)

    ranges = [(20, 70), (0, 7), (7, 20)]
    for start, stop in ranges:
        extract_features(
            _pooled,
            dataset,
            out_dir=tmp_path / "parts",
            batch_size=16,
            start=start,
            stop=stop,
            model="m",
            source=SOURCE,
        )
    assert len(list((tmp_path / "parts" / PARTS_DIR).glob("*.npy"))) == 3
    merged = merge_parts(tmp_path / "parts")

    features, manifest = read_features(tmp_path / "parts")
    np.testing.assert_array_equal(features, reference)
    assert (tmp_path / "parts" / FEATURES_FILE).read_bytes() == one_shot.path.read_bytes()
    assert [(part.start, part.stop) for part in manifest.parts] == [(0, 7), (7, 20), (20, 70)]
    assert (manifest.count, manifest.total, manifest.model, manifest.source) == (70, 70, "m", SOURCE)
    assert merged.manifest == manifest
    assert not (tmp_path / "parts" / PARTS_DIR).exists()


def test_merge_can_keep_its_parts(tmp_path: Path) -> None:
    dataset = _digits(20)
    for start, stop in [(0, 10), (10, 20)]:
        extract_features(_pooled, dataset, out_dir=tmp_path, batch_size=4, start=start, stop=stop, model="m", source={})
    merge_parts(tmp_path, keep_parts=True)
    assert sorted(path.name for path in (tmp_path / PARTS_DIR).iterdir()) == [
        "part-000000000000-000000000010.json",
        "part-000000000000-000000000010.npy",
        "part-000000000010-000000000020.json",
        "part-000000000010-000000000020.npy",
    ]


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([(0, 7), (10, 30)], r"rows \[7, 10\) are in no part \(gap after part-000000000000-000000000007.json"),
        ([(0, 10), (7, 30)], r"rows \[7, 10\) are in two parts \(part-000000000000-000000000010.json and "),
        ([(0, 7), (7, 20)], r"rows \[20, 30\) of the 30-item gallery are in no part"),
        ([(5, 30)], r"rows \[0, 5\) are in no part"),
    ],
)
def test_gaps_and_overlaps_between_parts_are_refused(
    tmp_path: Path, ranges: list[tuple[int, int]], message: str
) -> None:
    dataset = _digits(30)
    for start, stop in ranges:
        extract_features(_pooled, dataset, out_dir=tmp_path, batch_size=8, start=start, stop=stop, model="m", source={})
    with pytest.raises(IndexIntegrityError, match=message):
        merge_parts(tmp_path)
    assert not (tmp_path / FEATURES_FILE).exists()


def test_parts_of_different_extractions_are_refused(tmp_path: Path) -> None:
    dataset = _digits(20)
    extract_features(_pooled, dataset, out_dir=tmp_path, batch_size=8, start=0, stop=10, model="m", source={})
    extract_features(
        _pooled, dataset, out_dir=tmp_path, batch_size=8, start=10, stop=20, dtype="float16", model="m", source={}
    )
    with pytest.raises(IndexIntegrityError, match=r"dtype is 'float16' but .*part-000000000000-000000000010\.json has"):
        merge_parts(tmp_path)


def test_a_corrupted_part_is_refused_by_merge(tmp_path: Path) -> None:
    dataset = _digits(20)
    for start, stop in [(0, 10), (10, 20)]:
        extract_features(_pooled, dataset, out_dir=tmp_path, batch_size=8, start=start, stop=stop, model="m", source={})
    part = tmp_path / PARTS_DIR / "part-000000000010-000000000020.npy"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=f"{part}: sha256 mismatch"):
        merge_parts(tmp_path)


def test_the_writer_holds_one_batch_of_images_at_a_time(tmp_path: Path) -> None:
    dataset = _Tensors(200)
    live_batches: list[int] = []
    batches: list[weakref.ref[torch.Tensor]] = []

    def embed(images: torch.Tensor) -> torch.Tensor:
        batches.append(weakref.ref(images))
        live_batches.append(sum(ref() is not None for ref in batches))
        return images.flatten(1)[:, :4]

    extract_features(embed, dataset, out_dir=tmp_path, batch_size=8, model="m", source={})

    # Items are created batch by batch and let go once collated; earlier batches are freed.
    assert dataset.max_live == 8
    assert max(live_batches) == 1
    features, _ = read_features(tmp_path)
    np.testing.assert_array_equal(features[:, 0], np.arange(200, dtype=np.float32))


def test_extraction_memory_is_bounded_by_a_batch_not_the_gallery(tmp_path: Path) -> None:
    count, dim, batch = 4000, 1024, 50
    dataset = _Tensors(count)

    def embed(images: torch.Tensor) -> np.ndarray:
        # A fresh numpy array per batch: tracemalloc sees numpy's allocations (not torch's), so
        # a writer that kept the outputs would show their full size, 16 MB, in its peak.
        return np.repeat(images[:, 0, 0, :1].numpy(), dim, axis=1)

    tracemalloc.start()
    try:
        extract_features(embed, dataset, out_dir=tmp_path, batch_size=batch, model="m", source={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    batch_bytes = batch * dim * 4
    # A few batches, plus the checksum's reads (1 MiB chunks, two alive at a time); the gallery's
    # features are 80 batches.
    assert peak < 4 * batch_bytes + (2 << 20), f"peak {peak} bytes"
    features, _ = read_features(tmp_path)
    assert features.shape == (count, dim)
    np.testing.assert_array_equal(features[:, dim - 1], np.arange(count, dtype=np.float32))


def test_merge_memory_is_bounded_by_a_slice_not_a_part(tmp_path: Path) -> None:
    count, dim = 4000, 2048
    dataset = _Tensors(count)

    def embed(images: torch.Tensor) -> np.ndarray:
        return np.repeat(images[:, 0, 0, :1].numpy(), dim, axis=1)

    for start in range(0, count, 1000):
        extract_features(
            embed, dataset, out_dir=tmp_path, batch_size=200, start=start, stop=start + 1000, model="m", source={}
        )
    part_bytes = 1000 * dim * 4

    tracemalloc.start()
    try:
        merge_parts(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Loading an 8 MB part, or the 32 MB result, would show here; the checksum's reads hold 2 MiB.
    assert peak < 3 << 20 < part_bytes, f"peak {peak} bytes"
    features, _ = read_features(tmp_path)
    np.testing.assert_array_equal(features[:, 0], np.arange(count, dtype=np.float32))


def test_rerunning_replaces_the_features(tmp_path: Path) -> None:
    dataset = _digits(20)
    extract_features(_pooled, dataset, out_dir=tmp_path, batch_size=8, model="first", source={})
    extract_features(
        lambda images: 2 * _pooled(images), dataset, out_dir=tmp_path, batch_size=8, model="second", source={}
    )
    features, manifest = read_features(tmp_path)
    assert manifest.model == "second"
    np.testing.assert_array_equal(features, 2 * embed_dataset(_pooled, dataset, batch_size=8))
    assert {path.name for path in tmp_path.iterdir()} == {FEATURES_FILE, MANIFEST_FILE}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 10, "stop": 10}, r"range \[10, 10\) is empty or outside the dataset of 20 items"),
        ({"start": 0, "stop": 21}, r"range \[0, 21\) is empty or outside"),
        ({"dtype": "float64"}, r"dtype must be one of \['float32', 'float16'\], got 'float64'"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"source": {"root": Path("/data")}}, "source must be JSON-serialisable: Object of type PosixPath"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"out_dir": tmp_path, "batch_size": 8, "model": "m", "source": {}, **kwargs}
    with pytest.raises(ValueError, match=message):
        extract_features(_pooled, _digits(20), **arguments)  # type: ignore[arg-type]
    assert not any(tmp_path.rglob("*.npy*")), "a refused extraction must leave no file"


def test_bad_embedding_outputs_are_refused_and_leave_no_file(tmp_path: Path) -> None:
    dataset = _digits(20)
    with pytest.raises(ValueError, match=r"embed must return \[B, D\] = \[8, D\] for a batch of 8 images, got \(8,\)"):
        extract_features(
            lambda images: images.sum(dim=(1, 2, 3)), dataset, out_dir=tmp_path, batch_size=8, model="m", source={}
        )
    with pytest.raises(ValueError, match="beyond float16's range"):
        extract_features(
            lambda images: 1e6 * _pooled(images),
            dataset,
            out_dir=tmp_path,
            batch_size=8,
            dtype="float16",
            model="m",
            source={},
        )
    sizes = iter([12, 12, 5])
    with pytest.raises(ValueError, match="embed returned dimension 5 at row 16, 12 before"):
        extract_features(
            lambda images: _pooled(images)[:, : next(sizes)],
            dataset,
            out_dir=tmp_path,
            batch_size=8,
            model="m",
            source={},
        )
    assert list(tmp_path.iterdir()) == []
