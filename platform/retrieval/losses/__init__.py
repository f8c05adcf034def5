"""Loss functions, one module per family. Pure torch: no Ray, no MLflow.

Every loss returns its terms by name (a dict of scalar tensors), so a method can log
each term and weight them from its spec.
"""

from retrieval.losses.metric import MetricLoss

__all__ = ["MetricLoss"]
