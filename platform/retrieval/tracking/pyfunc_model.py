"""MLflow models-from-code entry: the pyfunc flavour of a registered retrieval model.

MLflow executes this file when it logs and when it loads a model, instead of unpickling
an object (see `registry.register_model_package`).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import numpy as np
from mlflow.pyfunc import PythonModel

PACKAGE_ARTIFACT = "package"


class EmbedderPyfunc(PythonModel):  # type: ignore[misc]
    """`predict(images [B, 3, H, W] float32, preprocessed)` -> embeddings `[B, D]` float32."""

    def load_context(self, context: Any) -> None:
        from retrieval.methods.package import load_model_package

        self.package = load_model_package(context.artifacts[PACKAGE_ARTIFACT])

    # np.ndarray is a hint MLflow infers no schema from: the signature given at logging stays the schema.
    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        import torch

        return self.package.embed_tensor(torch.as_tensor(np.asarray(model_input, dtype=np.float32)))


mlflow.models.set_model(EmbedderPyfunc())
