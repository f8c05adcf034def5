"""Feature extraction over Ray tasks on the session cluster: same features as one process, merged in order."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.errors import ModelNotFoundError
from retrieval.index.extraction import PARTS_DIR, extract_features, read_features
from retrieval.methods.gallery import gallery_dataset
from retrieval.methods.package import load_model_package
from retrieval.train.extract import contiguous_ranges, extract_features_distributed


def test_two_workers_extract_what_one_process_does(ray_cluster, model_package: Path, tmp_path: Path) -> None:
    package = load_model_package(model_package)
    gallery = gallery_dataset(package, "test")
    single = extract_features(
        package.embed_tensor, gallery, out_dir=tmp_path / "single", batch_size=64, model="m", source={}
    )
    # A part file from an earlier, different run must not leak into this one.
    stale = tmp_path / "distributed" / PARTS_DIR
    stale.mkdir(parents=True)
    (stale / "part-000000000000-000000000003.json").write_text("{}")

    result = extract_features_distributed(
        package_dir=model_package, out_dir=tmp_path / "distributed", num_workers=2, batch_size=64
    )

    count = len(gallery)
    half = count // 2
    features, manifest = read_features(tmp_path / "distributed")
    assert features.shape == (count, 32)
    # Each worker runs one thread and batches from its own start, so the last bits may differ.
    np.testing.assert_allclose(features, single.load(), rtol=1e-5, atol=1e-5)
    assert [(part.start, part.stop) for part in result.parts] == [(0, half), (half, count)]
    assert all(part.images_per_second > 0 for part in result.parts)
    assert manifest == result.manifest
    assert manifest.model == str(model_package.resolve())
    assert manifest.source["split"] == "test"
    assert manifest.source["count"] == count
    assert manifest.source["dataset"] == package.spec.dataset.model_dump(mode="json")
    assert not (tmp_path / "distributed" / PARTS_DIR).exists()


def test_float16_over_three_workers_with_a_limit(ray_cluster, model_package: Path, tmp_path: Path) -> None:
    package = load_model_package(model_package)
    gallery = gallery_dataset(package, "all")
    expected = package.embed_tensor(torch.stack([gallery[index][0] for index in range(50)]))

    result = extract_features_distributed(
        package_dir=model_package,
        out_dir=tmp_path,
        num_workers=3,
        batch_size=16,
        dtype="float16",
        split="all",
        limit=50,
        model="models:/digits/1",
    )

    features, manifest = read_features(tmp_path)
    assert features.dtype == np.float16
    assert [(part.start, part.stop) for part in manifest.parts] == [(0, 16), (16, 33), (33, 50)]
    assert (manifest.model, manifest.source["split"], manifest.source["limit"]) == ("models:/digits/1", "all", 50)
    np.testing.assert_allclose(features.astype(np.float32), expected, rtol=0, atol=2e-3)
    assert result.path == tmp_path.resolve() / "features.npy"


def test_a_bad_package_fails_before_any_task(ray_cluster, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"missing job\.yaml"):
        extract_features_distributed(package_dir=tmp_path / "nothing", out_dir=tmp_path / "out", num_workers=2)
    assert not (tmp_path / "out").exists()


def test_ranges_are_contiguous_and_balanced() -> None:
    assert contiguous_ranges(10, parts=3) == [(0, 3), (3, 6), (6, 10)]
    assert contiguous_ranges(2, parts=5) == [(0, 1), (1, 2)]
    for count in range(1, 40):
        for parts in range(1, 8):
            ranges = contiguous_ranges(count, parts=parts)
            sizes = [stop - start for start, stop in ranges]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            assert all(left[1] == right[0] for left, right in itertools.pairwise(ranges))
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_extract_command_writes_features_and_reports_per_worker_throughput(
    ray_cluster, model_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retrieval.cli import main

    out = tmp_path / "features"
    arguments = ["extract", "--model", str(model_package), "--out", str(out), "--workers", "2", "--dtype", "float16"]
    assert main(arguments) == 0
    vectors, manifest = read_features(out)
    assert vectors.shape == (896, 32) and vectors.dtype == np.float16  # digits 5-9, the package's test split
    assert manifest.model == str(model_package) and len(manifest.parts) == 2
    assert "images/s per worker" in capsys.readouterr().out
