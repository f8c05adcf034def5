"""benchmarks/incremental_digits.py: the cross-domain image folder, the seeds and the per-run numbers."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from retrieval.data.image_folder import load_image_folder
from retrieval.data.tasks import build_task_sequence

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "incremental_digits.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("incremental_digits_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_pair_image_shows_the_two_digits_its_class_names(bench: ModuleType, tmp_path: Path) -> None:
    root = bench.write_digit_pair_folder(tmp_path / "pairs", digits=(0, 1, 2), images_per_class=4, size=600, seed=3)
    digits = load_digits()
    glyphs = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    dataset = load_image_folder(root=root)
    assert dataset.class_names == ["pair-0-1", "pair-0-2", "pair-1-2"]
    assert len(dataset) == 12
    from retrieval.data.digit_pairs import load_digit_pairs

    items = load_digit_pairs(size=600, seed=3)
    for path in sorted(root.glob("*/*.png")):
        index = int(path.stem)
        rows = [int(row) for row in items.source(index).split(":")[2].split("-")]
        assert len(rows) == 2
        # The class is the unordered pair of the glyphs' true digits (from scikit-learn's targets).
        low, high = sorted(int(digits.target[row]) for row in rows)
        assert path.parent.name == f"pair-{low}-{high}"
        # The image is the two glyphs side by side, centred on a 24 x 24 black square.
        expected = np.zeros((24, 24), dtype=np.uint8)
        expected[8:16, 4:12], expected[8:16, 12:20] = glyphs[rows[0]], glyphs[rows[1]]
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_the_pair_folder_is_reused_for_the_same_recipe_and_rewritten_for_another(
    bench: ModuleType, tmp_path: Path
) -> None:
    root = bench.write_digit_pair_folder(tmp_path / "pairs", digits=(0, 1, 2), images_per_class=3, size=400, seed=0)
    # Too few classes is refused, naming the fix.
    with pytest.raises(ValueError, match="raise size"):
        bench.write_digit_pair_folder(tmp_path / "few", digits=(0, 1), images_per_class=3, size=400, seed=0)
    first = sorted(root.glob("*/*.png"))
    stamp = first[0].stat().st_mtime_ns
    bench.write_digit_pair_folder(root, digits=(0, 1, 2), images_per_class=3, size=400, seed=0)
    assert first[0].stat().st_mtime_ns == stamp
    bench.write_digit_pair_folder(root, digits=(0, 1, 2, 3), images_per_class=3, size=400, seed=0)
    assert sorted({path.parent.name for path in root.glob("*/*.png")})[-1] == "pair-2-3"


def test_a_seed_fixes_the_splits_of_every_method_and_another_seed_changes_them(bench: ModuleType) -> None:
    tasks = bench.scenario_tasks("two_tasks", pair_root=None)

    def test_sources(method: str, seed: int) -> list[str]:
        spec = bench.job(method, tasks, epochs=1, synthesis_iterations=1, seed=seed)
        assert spec.train.seed == seed and spec.incremental.seed == seed
        sequence = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
        return [task.test.source(position) for task in sequence for position in range(len(task.test))]

    assert test_sources("incremental_finetune", 1) == test_sources("dual_distillation", 1)
    assert test_sources("incremental_finetune", 1) != test_sources("incremental_finetune", 2)


def test_ewc_lambda_reaches_the_method(bench: ModuleType) -> None:
    tasks = bench.scenario_tasks("five_tasks", pair_root=None)
    assert (
        bench.job("ewc", tasks, epochs=1, synthesis_iterations=1, seed=0, ewc_weight=1000.0).method.ewc_weight == 1000.0
    )


def test_run_metrics_match_a_hand_computation(bench: ModuleType) -> None:
    nan = float("nan")
    matrix = np.array([[0.9, nan, nan], [0.7, 0.8, nan], [0.6, 0.5, 1.0]])
    metrics = bench.run_metrics(matrix, [None, 0.85, 0.9])
    assert metrics["new_task"] == pytest.approx((0.8 + 1.0) / 2)
    assert metrics["last_new_task"] == pytest.approx(1.0)
    assert metrics["final_mean"] == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert metrics["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert metrics["specialist"] == pytest.approx((0.85 + 0.9) / 2)
    assert metrics["student_minus_specialist"] == pytest.approx(((0.8 - 0.85) + (1.0 - 0.9)) / 2)
    assert "specialist" not in bench.run_metrics(matrix, [None, None, None])


def test_mean_std_is_the_sample_standard_deviation(bench: ModuleType) -> None:
    values = [0.91, 0.95, 0.88]
    stats = bench.mean_std(values)
    assert stats["mean"] == pytest.approx(statistics.mean(values))
    assert stats["std"] == pytest.approx(statistics.stdev(values))
    assert stats["n"] == 3
    assert bench.mean_std([0.5])["std"] == 0.0


@pytest.mark.slow
def test_ch7_runs_report_the_specialist_on_each_new_task_and_others_none(bench: ModuleType) -> None:
    tasks = [{"name": "a", "classes": "0-1"}, {"name": "b", "classes": "2-3"}]
    matrix, specialists = bench.run_sequence(
        bench.job("dual_distillation", tasks, epochs=1, synthesis_iterations=1, seed=0)
    )
    assert matrix.shape == (2, 2) and np.isnan(matrix[0, 1])
    assert not np.isnan(matrix[[0, 1, 1], [0, 0, 1]]).any()
    assert specialists[0] is None and 0.0 <= specialists[1] <= 1.0
    _, baseline = bench.run_sequence(bench.job("incremental_finetune", tasks, epochs=1, synthesis_iterations=1, seed=0))
    assert baseline == [None, None]


def test_the_long_cross_domain_scenario_trains_the_pair_task_longer(bench: ModuleType, tmp_path: Path) -> None:
    tasks = bench.scenario_tasks("cross_domain_long", pair_root=tmp_path, epochs=2)
    spec = bench.job("lwf", tasks, epochs=2, synthesis_iterations=1, seed=0)
    assert [task.epochs for task in spec.incremental.tasks] == [None, 2 * bench.LONG_PAIR_EPOCH_FACTOR]
    assert spec.incremental.tasks[1].dataset.name == "image_folder"
    assert bench.scenario_tasks("cross_domain", pair_root=tmp_path, epochs=2)[1].get("epochs") is None


def test_differences_to_fine_tuning_are_paired_by_seed(bench: ModuleType) -> None:
    def run(first: float, second: float, kept: float) -> dict[str, object]:
        return {"matrix": [[first, None], [kept, second]], "specialist": [None, None], "seconds": 1.0}

    runs = {
        "incremental_finetune": {"0": run(0.9, 0.8, 0.7), "1": run(0.9, 0.6, 0.5)},
        "lwf": {"0": run(0.9, 0.7, 0.8), "1": run(0.9, 0.6, 0.8), "2": run(0.9, 0.9, 0.9)},
    }
    deltas = bench.paired_differences(runs, "lwf")
    # Seed 2 has no fine-tuning run to pair with; seeds 0 and 1 differ by -0.1 and 0.0 in new-task recall.
    assert deltas["new_task"]["n"] == 2
    assert deltas["new_task"]["mean"] == pytest.approx(-0.05)
    assert deltas["new_task"]["std"] == pytest.approx(statistics.stdev([-0.1, 0.0]))
    assert deltas["forgetting"]["mean"] == pytest.approx(((0.1 - 0.2) + (0.1 - 0.4)) / 2)


def test_the_stem_option_reaches_the_model_spec(bench: ModuleType) -> None:
    tasks = bench.scenario_tasks("two_tasks", pair_root=None)
    assert bench.job("incremental_finetune", tasks, epochs=1, synthesis_iterations=1, seed=0).model.stem == "imagenet"
    small = bench.job("incremental_finetune", tasks, epochs=1, synthesis_iterations=1, seed=0, stem="small")
    assert small.model.stem == "small"
