"""Ray Tune sweeps of a method's loss weights, temperatures and margins (tune_spaces/)."""

from __future__ import annotations

from retrieval.tune.driver import SweepOutcome, TrialRow, check_trial_resources, run_sweep

__all__ = ["SweepOutcome", "TrialRow", "check_trial_resources", "run_sweep"]
