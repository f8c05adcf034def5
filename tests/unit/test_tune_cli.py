"""`retrieval tune --system-metrics` turns system metrics on for every trial, keeping the sweep file's overrides."""

from __future__ import annotations

from pathlib import Path

from retrieval.cli import _parser, sweep_overrides
from retrieval.config import load_sweep_spec

SPACE = str(Path(__file__).resolve().parents[2] / "tune_spaces" / "adversarial_cross_modal.yaml")


def test_system_metrics_reach_every_trial_and_the_files_overrides_stay() -> None:
    assert _parser().parse_args(["tune", SPACE, "--system-metrics"]).system_metrics is True
    user = ["num_samples=2"]
    assert sweep_overrides(SPACE, user, system_metrics=False) == user
    sweep = load_sweep_spec(SPACE, sweep_overrides(SPACE, user, system_metrics=True))
    assert sweep.spec.num_samples == 2
    assert sweep.base_job.tracking.system_metrics is True
    # The file's own overrides and the user's --set survive, and the rest of the tracking section too.
    assert sweep.base_job.train.epochs == 4
    assert sweep.base_job.tracking.registered_model == "digit-pairs-adversarial-sweep"
    assert sweep.trial_job({"method.entropy_weight": 0.1}, name="t").tracking.system_metrics is True
    plain = load_sweep_spec(SPACE, sweep_overrides(SPACE, user, system_metrics=False))
    assert plain.base_job.tracking.system_metrics is False
