"""retrieval-platform: deep image retrieval methods trained with Ray, tracked in MLflow, served with Faiss."""

__version__ = "0.1.0"
