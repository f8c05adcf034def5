"""The ch. 2 evaluation suite: each variant's score equals the one computed by hand, step by step."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.config import JobSpec
from retrieval.data.from_spec import benchmark_from_spec, datasets_from_spec
from retrieval.data.transforms import eval_transform
from retrieval.evaluation.enhancement import PCAWhitening
from retrieval.evaluation.landmarks import landmark_metrics
from retrieval.evaluation.metrics import retrieval_metrics
from retrieval.evaluation.runs import embed_dataset
from retrieval.evaluation.suite import evaluate_suite, format_table
from retrieval.models.backbones import build_backbone


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 6 small images, root/<class>/<image>: close colours under heavy noise.

    Hard enough that the variants score differently (no row is a perfect 1.0), so a row
    computed the wrong way cannot match its hand-computed value by accident.
    """
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for class_id in range(6):
        (root / f"class_{class_id}").mkdir()
        colour = 128 + rng.integers(-30, 30, size=3)
        for index in range(6):
            pixels = np.clip(colour + rng.normal(0, 60, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{class_id}" / f"{index}.png")
    return root


@pytest.fixture
def job(image_folder: Path):
    def make(**evaluation: object) -> JobSpec:
        return JobSpec.model_validate(
            {
                "name": "suite",
                "method": {"name": "deep_metric"},
                "dataset": {
                    "name": "image_folder",
                    "root": str(image_folder),
                    "image_size": 64,
                    "split": {"mode": "class_ranges", "train_classes": "0-2", "test_classes": "3-5"},
                },
                "model": {"backbone": "resnet18", "embedding_dim": None},
                "evaluation": {"recall_ks": [1, 4], **evaluation},
            }
        )

    return make


def _trunk_features(spec: JobSpec, dataset, pool, backbone: str = "resnet18") -> np.ndarray:
    """Off-the-shelf features computed without the platform's network: seeded trunk, pooling, L2."""
    torch.manual_seed(spec.train.seed)
    trunk, _ = build_backbone(name=backbone, weights=None)
    trunk.eval()
    with torch.no_grad():
        return embed_dataset(lambda images: F.normalize(pool(trunk(images)), dim=-1), dataset)


def test_pooling_whitening_and_query_expansion_rows_match_a_hand_computation(job):
    spec = job(poolings=["mac", "spoc"], whitening=True, whitening_dim=8, query_expansion=["average"])
    result = evaluate_suite(spec)
    assert result.protocol == "class" and result.primary_metric == "recall@1"
    assert list(result.rows) == ["mac", "mac+pcaw", "mac+pcaw+aqe", "spoc", "spoc+pcaw", "spoc+pcaw+aqe"]
    assert result.columns == ["recall@1", "recall@4", "map@r"]

    splits = datasets_from_spec(spec.dataset)
    held_out = splits.train.with_transform(eval_transform(image_size=64))
    for name, pool in (("mac", lambda maps: maps.amax(dim=(-2, -1))), ("spoc", lambda maps: maps.mean(dim=(-2, -1)))):
        test = _trunk_features(spec, splits.test, pool)
        labels = splits.test.labels
        expected = retrieval_metrics(embeddings=test, labels=labels, ks=(1, 4))
        assert result.rows[name] == pytest.approx(expected, abs=1e-6)
        # PCA-whitening learnt on the train classes only, applied to the test classes.
        whitening = PCAWhitening.fit(_trunk_features(spec, held_out, pool), dim=8)
        whitened = whitening.transform(test)
        assert result.rows[f"{name}+pcaw"] == pytest.approx(
            retrieval_metrics(embeddings=whitened, labels=labels, ks=(1, 4)), abs=1e-6
        )
        # AQE by hand: each query + its 2 nearest *other* test images, searched in the whitened set.
        similarities = whitened @ whitened.T
        np.fill_diagonal(similarities, -np.inf)
        neighbours = np.argsort(-similarities, axis=1, kind="stable")[:, :2]
        expanded = (whitened + whitened[neighbours].sum(axis=1)) / 3
        expanded /= np.linalg.norm(expanded, axis=1, keepdims=True)
        hits_at_1 = []
        for index in range(len(labels)):
            scores = whitened @ expanded[index]
            scores[index] = -np.inf
            hits_at_1.append(labels[int(np.argmax(scores))] == labels[index])
        assert result.rows[f"{name}+pcaw+aqe"]["recall@1"] == pytest.approx(np.mean(hits_at_1), abs=1e-6)


def test_every_pooling_gets_a_row_with_valid_scores(job):
    result = evaluate_suite(job(poolings=["mac", "spoc", "gem", "rmac", "crow"]))
    assert list(result.rows) == ["mac", "spoc", "gem", "rmac", "crow"]
    for scores in result.rows.values():
        assert set(scores) == {"recall@1", "recall@4", "map@r"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())


def test_late_fusion_row_concatenates_the_two_backbones(job):
    spec = job(poolings=["gem"], late_fusion_backbones=["vgg11"])
    result = evaluate_suite(spec)
    assert list(result.rows) == ["gem", "fusion(resnet18+vgg11)"]
    assert result.rows["fusion(resnet18+vgg11)"]["map@r"] != pytest.approx(result.rows["gem"]["map@r"])

    def gem(maps: torch.Tensor) -> torch.Tensor:
        return maps.clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3)

    test = datasets_from_spec(spec.dataset).test
    # Each backbone's unit-norm feature, concatenated: the norm is sqrt(2), normalised back to 1.
    fused = np.concatenate(
        [_trunk_features(spec, test, gem), _trunk_features(spec, test, gem, backbone="vgg11")], axis=1
    ) / np.sqrt(2.0)
    expected = retrieval_metrics(embeddings=fused, labels=test.labels, ks=(1, 4))
    assert result.rows["fusion(resnet18+vgg11)"] == pytest.approx(expected, abs=1e-6)


def _write_revisited(root: Path) -> Path:
    folder = root / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"img_{index}" for index in range(8)]
    for index, name in enumerate(names):
        base = np.full((40, 56, 3), 30 * (index % 4), dtype=np.uint8)
        noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
        Image.fromarray(base + noise).save(folder / "jpg" / f"{name}.jpg")
    queries = ["img_0", "img_1"]
    gnd = [
        {"bbx": [2.0, 2.0, 50.0, 36.0], "easy": [4], "hard": [0], "junk": [2]},
        {"bbx": None, "easy": [5, 1], "hard": [], "junk": []},
    ]
    with (folder / "gnd_roxford5k.pkl").open("wb") as stream:
        pickle.dump({"imlist": names, "qimlist": queries, "gnd": gnd}, stream)
    return folder


def test_landmark_protocol_scores_the_benchmark_queries_against_its_database(tmp_path):
    root = _write_revisited(tmp_path)
    spec = JobSpec.model_validate(
        {
            "name": "landmarks",
            "method": {"name": "deep_metric"},
            "dataset": {"name": "roxford5k", "root": str(root), "image_size": 48},
            "model": {"backbone": "resnet18", "embedding_dim": None},
            "evaluation": {"poolings": ["gem"], "query_expansion": ["alpha"], "qe_top_n": 1},
        }
    )
    result = evaluate_suite(spec)
    assert result.protocol == "revisited" and result.primary_metric == "mAP_medium"
    assert list(result.rows) == ["gem", "gem+alpha_qe"]
    benchmark = benchmark_from_spec(spec.dataset)

    def gem(maps: torch.Tensor) -> torch.Tensor:
        return maps.clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3)

    torch.manual_seed(0)
    trunk, _ = build_backbone(name="resnet18", weights=None)
    trunk.eval()
    with torch.no_grad():
        database = embed_dataset(lambda x: F.normalize(gem(trunk(x)), dim=-1), benchmark.database, batch_size=1)
        queries = embed_dataset(lambda x: F.normalize(gem(trunk(x)), dim=-1), benchmark.queries, batch_size=1)
    expected = landmark_metrics(
        queries=queries, database=database, ground_truth=benchmark.ground_truth, protocol="revisited"
    )
    assert set(result.rows["gem"]) >= {"mAP_easy", "mAP_medium", "mAP_hard"}
    for key in ("mAP_easy", "mAP_medium", "mAP_hard"):
        assert result.rows["gem"][key] == pytest.approx(expected[key], abs=1e-6, nan_ok=True)


def test_landmark_whitening_without_a_held_out_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"needs evaluation\.whitening_dataset"):
        JobSpec.model_validate(
            {
                "name": "x",
                "method": {"name": "deep_metric"},
                "dataset": {"name": "roxford5k", "root": str(tmp_path)},
                "evaluation": {"whitening": True},
            }
        )


def test_format_table_plain_and_markdown():
    rows = {"gem": {"recall@1": 0.5, "map@r": 0.25}, "mac": {"recall@1": 0.75}}
    plain = format_table(rows, ["recall@1", "map@r"]).splitlines()
    assert plain[0].split() == ["variant", "recall@1", "map@r"]
    assert plain[1].split() == ["gem", "0.5000", "0.2500"] and plain[2].split() == ["mac", "0.7500", "nan"]
    markdown = format_table(rows, ["recall@1"], markdown=True).splitlines()
    assert markdown[:2] == ["| variant | recall@1 |", "|---|---|"] and markdown[2] == "| gem | 0.5000 |"
