"""Sweep files: checked against their base job before anything runs; trial resources fit the cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retrieval.config import SweepSpec, load_sweep_spec
from retrieval.errors import ConfigError
from retrieval.methods.registry import METHODS
from retrieval.tracking.registry import RegisteredModel
from retrieval.tune.driver import SweepOutcome, TrialRow, check_trial_resources, tune_distribution
from retrieval.tune.trial import trial_job

ROOT = Path(__file__).resolve().parents[3]
BASE_JOB = ROOT / "jobs" / "digits_deep_metric.yaml"


def _write(tmp_path: Path, **changes: object) -> Path:
    data: dict[str, object] = {
        "name": "unit_sweep",
        "base_job": str(BASE_JOB),
        "space": {"method.ms_alpha": {"loguniform": [0.5, 10.0]}},
        "metric": "recall@1",
    }
    data.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_has_a_valid_space_file(method):
    path = ROOT / "tune_spaces" / f"{method}.yaml"
    assert path.is_file(), f"missing sweep file for method {method!r}: {path}"
    sweep = load_sweep_spec(path)
    assert sweep.base_job.method.name == method
    # Every swept key is a real key of that method's spec or of the job (checked by loading).
    assert sweep.spec.space


def test_valid_file_loads_with_base_job_and_overrides(tmp_path):
    path = _write(tmp_path, overrides={"train.epochs": 3})
    sweep = load_sweep_spec(path)
    assert sweep.base_job.train.epochs == 3
    assert sweep.spec.space["method.ms_alpha"].kind == "loguniform"
    job = trial_job(sweep, {"method.ms_alpha": 4.5}, trial_id="abc_00001")
    assert job.name == "unit_sweep-abc_00001"
    assert job.method.ms_alpha == 4.5  # type: ignore[union-attr]
    assert job.scaling.num_workers == 1 and job.scaling.resources_per_worker == {"CPU": 1.0}
    assert job.train.epochs == 3


def test_a_set_override_of_one_train_key_keeps_the_base_jobs_other_train_keys(tmp_path):
    """`retrieval tune --set overrides.train.epochs=8` replaced the base job's whole train section."""
    path = _write(tmp_path, overrides={"train.epochs": 3})
    sweep = load_sweep_spec(path, ["overrides.train.epochs=8", "overrides.train.seed=4"])
    assert (sweep.base_job.train.epochs, sweep.base_job.train.seed) == (8, 4)
    assert sweep.base_job.train.samples_per_class == 16  # jobs/digits_deep_metric.yaml's, not the default 8
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_sweep_spec(path, ["overrides.train.epoch=8"])


def test_base_job_is_relative_to_the_sweep_file(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "base.yaml").write_text(BASE_JOB.read_text())
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    path = spaces / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "s", "base_job": "../jobs/base.yaml", "space": {"optimizer.lr": {"choice": [1e-3, 1e-4]}}}
        )
    )
    assert load_sweep_spec(path).base_job.name == "digits_deep_metric"


def test_unknown_space_key_is_refused_naming_key_file_and_hint(tmp_path):
    path = _write(tmp_path, space={"method.ms_alpa": {"uniform": [1.0, 2.0]}})
    with pytest.raises(ConfigError) as error:
        load_sweep_spec(path)
    message = str(error.value)
    assert str(path) in message and "'method.ms_alpa'" in message and "ms_alpha" in message


def test_value_outside_the_job_specs_range_is_refused(tmp_path):
    path = _write(tmp_path, space={"method.triplet_margin": {"uniform": [-0.5, 0.5]}})
    with pytest.raises(ConfigError, match=r"'method.triplet_margin' \(uniform, value -0.5\)"):
        load_sweep_spec(path)


def test_choice_of_an_invalid_literal_is_refused(tmp_path):
    path = _write(tmp_path, space={"method.loss": {"choice": ["triplet", "arc_face"]}})
    with pytest.raises(ConfigError, match="arc_face"):
        load_sweep_spec(path)


@pytest.mark.parametrize(
    ("distribution", "expected"),
    [
        ({"uniform": [1.0]}, "uniform"),
        ({"uniform": [2.0, 1.0]}, "low (2.0) must be smaller than high (1.0)"),
        ({"loguniform": [0.0, 1.0]}, "loguniform: low must be positive"),
        ({"uniform": [0.1, 1.0], "choice": [1, 2]}, "exactly one distribution"),
        ({"normal": [0.0, 1.0]}, "normal"),
        ({"choice": []}, "choice"),
        ({}, "exactly one distribution"),
    ],
)
def test_malformed_distribution_is_refused_naming_the_key(tmp_path, distribution, expected):
    path = _write(tmp_path, space={"method.ms_alpha": distribution})
    with pytest.raises(ConfigError) as error:
        load_sweep_spec(path)
    message = str(error.value)
    assert str(path) in message and "method.ms_alpha" in message and expected in message


def test_grid_with_optuna_is_refused(tmp_path):
    path = _write(tmp_path, space={"method.ms_alpha": {"grid": [1.0, 2.0]}}, search={"algorithm": "optuna"})
    with pytest.raises(ConfigError, match=r"'grid' \(method\.ms_alpha\) works with search 'random' only"):
        load_sweep_spec(path)


def test_metric_the_trials_do_not_report_is_refused(tmp_path):
    path = _write(tmp_path, metric="recall@3")
    with pytest.raises(ConfigError, match=r"metric 'recall@3' is not reported.*recall@1"):
        load_sweep_spec(path)


def test_missing_base_job_is_refused(tmp_path):
    path = _write(tmp_path, base_job="nowhere.yaml")
    with pytest.raises(ConfigError, match=r"base_job 'nowhere\.yaml' not found"):
        load_sweep_spec(path)


def test_unknown_top_level_key_is_refused(tmp_path):
    path = _write(tmp_path, num_sample=3)
    with pytest.raises(ConfigError, match=r"num_sample.*num_samples"):
        load_sweep_spec(path)


def test_trial_resources_must_fit_the_cluster():
    spec = SweepSpec.model_validate(
        {
            "name": "s",
            "base_job": "b.yaml",
            "space": {"optimizer.lr": {"uniform": [0.1, 0.2]}},
            "max_concurrent_trials": 3,
            "resources": {"num_workers": 2, "cpus_per_worker": 1},
        }
    )
    check_trial_resources(spec.model_copy(update={"max_concurrent_trials": 1}), {"CPU": 4.0}, source="s.yaml")
    with pytest.raises(ConfigError, match=r"max_concurrent_trials=3 .* but the cluster has 4; at most 1 trials fit"):
        check_trial_resources(spec, {"CPU": 4.0}, source="s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml: one trial needs 2.01 CPUs \(2 workers\) but the cluster has 1"):
        check_trial_resources(spec, {"CPU": 1.0}, source="s.yaml")
    gpu = spec.model_copy(
        update={"max_concurrent_trials": 1, "resources": spec.resources.model_copy(update={"gpus_per_worker": 1.0})}
    )
    with pytest.raises(ConfigError, match=r"needs 2 GPUs .* the cluster has 0"):
        check_trial_resources(gpu, {"CPU": 8.0}, source="s.yaml")


def test_distributions_map_to_tune_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    sweep = load_sweep_spec(
        _write(
            tmp_path,
            space={
                "method.ms_alpha": {"loguniform": [0.5, 10.0]},
                "method.ms_base": {"uniform": [0.3, 0.7]},
                "train.samples_per_class": {"randint": [4, 9]},
                "method.ms_beta": {"choice": [20.0, 50.0]},
                "optimizer.lr": {"grid": [1e-3, 1e-4]},
            },
        )
    )
    domains = {key: tune_distribution(value) for key, value in sweep.spec.space.items()}
    assert isinstance(domains["method.ms_alpha"], Float) and domains["method.ms_alpha"].lower == 0.5
    assert isinstance(domains["method.ms_base"], Float) and domains["method.ms_base"].upper == 0.7
    assert isinstance(domains["train.samples_per_class"], Integer) and domains["train.samples_per_class"].upper == 9
    assert isinstance(domains["method.ms_beta"], Categorical) and domains["method.ms_beta"].categories == [20.0, 50.0]
    assert domains["optimizer.lr"] == {"grid_search": [1e-3, 1e-4]}


def test_results_table_lists_trials_best_first_and_marks_the_best():
    rows = [
        TrialRow(trial_id="t1", values={"method.ms_alpha": 2.0}, metric=0.81, epochs=1, status="stopped early"),
        TrialRow(trial_id="t2", values={"method.ms_alpha": 5.0}, metric=0.93, epochs=3, status="finished"),
        TrialRow(trial_id="t3", values={"method.ms_alpha": 1.0}, metric=float("nan"), epochs=0, status="error"),
    ]
    outcome = SweepOutcome(
        name="s", metric="recall@1", mode="max", rows=rows, best_trial_id="t2", best_metrics={"recall@1": 0.93},
        model=RegisteredModel(name="m", version="3", aliases=("candidate",)), parent_run_id="p", resumed=False,
        experiment_path="/x",
    )  # fmt: skip
    lines = outcome.table().splitlines()
    assert lines[0].split() == ["trial", "method.ms_alpha", "recall@1", "epochs", "status"]
    assert lines[1].startswith("t2 *") and "0.9300" in lines[1]
    assert lines[2].startswith("t1") and "stopped early" in lines[2]
    assert lines[3].startswith("t3") and "error" in lines[3]
    assert outcome.summary()["trials"][0] == {
        "trial_id": "t1", "method.ms_alpha": 2.0, "metric": 0.81, "epochs": 1, "status": "stopped early",
    }  # fmt: skip


def test_an_incremental_sweep_reports_once_per_task_on_the_means_over_seen_tasks():
    from retrieval.tune.driver import build_scheduler, trial_steps

    sweep = load_sweep_spec(ROOT / "tune_spaces" / "incremental_kd_mmd.yaml")
    assert sweep.base_job.incremental is not None
    assert sweep.spec.metric == "seen_mean/recall@1"
    # Two tasks: ASHA counts reports, one per task.
    assert trial_steps(sweep) == 2
    assert build_scheduler(sweep)._max_t == 2
    job = trial_job(sweep, {"method.kd_weight": 3.0, "method.mmd_weight": 0.5}, trial_id="t_00000")
    assert job.incremental is not None and len(job.incremental.tasks) == 2
    assert job.method.kd_weight == 3.0  # type: ignore[union-attr]
    assert job.incremental.index is False


def test_a_plain_metric_is_refused_for_an_incremental_sweep(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "base_job": str(ROOT / "jobs" / "digits_incremental_kd_mmd.yaml"),
                "space": {"method.kd_weight": {"uniform": [0.5, 2.0]}},
                "metric": "recall@1",
            }
        )
    )
    with pytest.raises(ConfigError, match="seen_mean/recall@1"):
        load_sweep_spec(path)


@pytest.mark.parametrize("job_file", ["digit_pairs_hashing.yaml", "digit_pairs_adversarial.yaml"])
def test_cross_modal_trials_report_the_held_out_modality_accuracy(tmp_path, job_file):
    """The classifier's held-out balanced accuracy is a column of the sweep table (and a valid metric)."""
    from retrieval.config import sweep_metric_names

    path = _write(
        tmp_path,
        base_job=str(ROOT / "jobs" / job_file),
        space={"method.entropy_weight": {"grid": [0.0, 0.1]}},
        metric="disc/feature_accuracy",
        mode="min",
    )
    sweep = load_sweep_spec(path)
    names = sweep_metric_names(sweep.base_job)
    assert "disc/feature_accuracy" in names
    assert ("disc/code_accuracy" in names) == (job_file == "digit_pairs_hashing.yaml")
