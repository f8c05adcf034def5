"""Optuna's TPE (the `optuna` search of a sweep file) samples every key of a real space file."""

from __future__ import annotations

from pathlib import Path

import ray.tune

from retrieval.config import load_sweep_spec
from retrieval.tune.driver import build_search, tune_distribution

SPACES = Path(__file__).resolve().parents[3] / "tune_spaces"


def test_optuna_search_samples_the_space_of_a_sweep_file(ray_train, tmp_path):
    sweep = load_sweep_spec(SPACES / "unsupervised_metric.yaml")
    assert sweep.spec.search.algorithm == "optuna"
    space = sweep.spec.space

    def objective(config):
        # A stand-in for the trial's Train job: a score from the sampled values.
        ray.tune.report({"recall@1": 1.0 / (1.0 + abs(config["method.ms_alpha"] - 2.0))})

    tuner = ray.tune.Tuner(
        objective,
        param_space={key: tune_distribution(value) for key, value in space.items()},
        tune_config=ray.tune.TuneConfig(
            metric="recall@1", mode="max", num_samples=4, search_alg=build_search(sweep.spec), max_concurrent_trials=2
        ),
        run_config=ray.tune.RunConfig(name="optuna_check", storage_path=str(tmp_path)),
    )
    results = tuner.fit()
    assert len(results) == 4 and results.num_errors == 0
    for index in range(len(results)):
        config = results[index].config
        assert set(config) == set(space)
        assert 2 <= config["method.knn_k"] < 8
        assert config["method.negative_rank"] in (20, 50, 100)
        assert 0.5 <= config["method.ms_alpha"] <= 10.0
        assert config["method.ms_beta"] in (20.0, 50.0, 80.0)
        # Every sampled configuration is a valid trial job.
        sweep.trial_job(config, name=f"check-{index}")
