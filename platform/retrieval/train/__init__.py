"""Ray Train driver: TorchTrainer, per-epoch checkpoints, resume, evaluation and registration."""

from retrieval.train.driver import TrainingOutcome, run_training

__all__ = ["TrainingOutcome", "run_training"]
