"""A trained model as a self-describing folder: weights + the job spec that built them.

This is what is stored in MLflow (as the artifacts of a pyfunc model) and what serving
loads: from the spec alone the method rebuilds the architecture and the exact image
preprocessing used in training, so an embedder can never drift from its index.

Layout::

    <folder>/job.yaml       the validated JobSpec
    <folder>/model.pt       the model's state_dict
    <folder>/package.json   format version, method, embedding dim, sha256 of model.pt
    <folder>/<more files>   what the method took from its training data (`RetrievalMethod.package_files`;
                            an image-text model's `text_context.json`: the vocabulary / tag names its text
                            encoder reads)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from retrieval.config import JobSpec
from retrieval.errors import BadRequestError, ModelNotFoundError
from retrieval.methods.base import RetrievalMethod
from retrieval.methods.cross_modal import TEXT_CONTEXT_FILE
from retrieval.methods.registry import build_method

__all__ = ["TEXT_CONTEXT_FILE", "ModelPackage", "load_model_package", "package_digest", "save_model_package"]

PACKAGE_FORMAT = 1


@dataclass
class ModelPackage:
    """A loaded, ready-to-embed model."""

    spec: JobSpec
    method: RetrievalMethod
    model: nn.Module
    dim: int
    device: torch.device
    source: str

    @property
    def model_uri(self) -> str:
        return self.source

    @property
    def embeds_texts(self) -> bool:
        """Embeds texts as well as images, into one space."""
        return self.method.embeds_texts

    @property
    def code_bits(self) -> int | None:
        """K for a hashing model, whose every embedding is a sign code of ±1.0; None for float embeddings."""
        return self.method.code_bits

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Embeddings `[N, D]` float32 of texts (±1 codes for a hashing model).

        Raises:
            BadRequestError: the model embeds images only.
        """
        if not self.method.embeds_texts:
            raise BadRequestError(
                f"model {self.source} ({self.spec.method.name}) embeds images only; text queries need a "
                "cross-modal model (cross_modal_hashing or adversarial_cross_modal)"
            )
        self.model.eval()
        chunks = [
            self.method.embed_texts(self.model, list(texts[start : start + batch_size])).float().cpu().numpy()
            for start in range(0, len(texts), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def preprocess(self) -> Any:
        """The evaluation transform the model was trained with (PIL image -> `[3, H, W]`)."""
        from retrieval.data.transforms import eval_transform

        dataset = self.spec.dataset
        return eval_transform(image_size=dataset.image_size, mean=dataset.mean, std=dataset.std)

    @torch.no_grad()
    def embed_tensor(self, images: torch.Tensor) -> np.ndarray:
        """Embeddings `[B, D]` float32 of preprocessed images `[B, 3, H, W]`."""
        self.model.eval()
        vectors = self.method.embed(self.model, images.to(self.device))
        return vectors.float().cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        """Embeddings `[N, D]` float32, L2-normalised, of PIL images."""
        transform = self.preprocess()
        chunks = [
            self.embed_tensor(torch.stack([transform(image) for image in images[start : start + batch_size]]))
            for start in range(0, len(images), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


def save_model_package(
    directory: str | Path,
    *,
    spec: JobSpec,
    state_dict: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a model package; returns the folder.

    Args:
        directory: created if missing; existing package files are overwritten.
        spec: the job spec the weights were trained with.
        state_dict: the bare model's weights (not DDP-wrapped).
        extra_files: more text files of the package by name (`RetrievalMethod.package_files`: a
            cross-modal model's `text_context.json`).

    Raises:
        ValueError: a file the method needs to load again (`required_package_files`) is missing.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, weights)
    (folder / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    method = build_method(spec)
    missing = [name for name in method.required_package_files if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"a {spec.method.name} model package needs {', '.join(missing)} (what its architecture took from "
            "the training data: RetrievalMethod.package_files)"
        )
    info = {
        "format": PACKAGE_FORMAT,
        "method": spec.method.name,
        "embedding_dim": method.embedding_dim,
        "model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (folder / "package.json").write_text(json.dumps(info, indent=2))
    return folder


def package_digest(directory: str | Path) -> str:
    """One sha256 over every file of a model package (names and contents), for the registry.

    ``package.json`` records the weights' checksum beside them, which guards against a broken
    copy but not against someone who can rewrite the folder; the registry keeps this digest
    as a tag of the model version (a different store), and loading from the registry checks it.
    """
    folder = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(item for item in folder.rglob("*") if item.is_file()):
        name = path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def load_model_package(directory: str | Path, *, device: str = "cpu", source: str | None = None) -> ModelPackage:
    """Load a model package written by `save_model_package`.

    Raises:
        ModelNotFoundError: the folder or one of its files is missing, or the weights do not
            match their recorded checksum or the spec's architecture.
    """
    folder = Path(directory)
    for required in ("job.yaml", "model.pt", "package.json"):
        if not (folder / required).is_file():
            raise ModelNotFoundError(f"{folder}: not a model package (missing {required})")
    info = json.loads((folder / "package.json").read_text())
    weights = folder / "model.pt"
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    if actual != info.get("model_sha256"):
        raise ModelNotFoundError(
            f"{weights}: checksum mismatch (expected {info.get('model_sha256')}, got {actual}); refusing to load"
        )
    spec = JobSpec.from_mapping(
        _stored_spec(yaml.safe_load((folder / "job.yaml").read_text())), source=str(folder / "job.yaml")
    )
    method = build_method(spec)
    method.load_package_files(folder)
    model = method.build_model()
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as error:
        raise ModelNotFoundError(f"{weights}: weights do not fit the spec's architecture: {error}") from error
    torch_device = torch.device(device)
    model.to(torch_device).eval()
    dim = info.get("embedding_dim")
    if dim is None:
        # No projection head (off-the-shelf features): the dimension is the backbone's channels.
        with torch.no_grad():
            probe = torch.zeros(1, 3, spec.dataset.image_size, spec.dataset.image_size, device=torch_device)
            dim = method.embed(model, probe).shape[-1]
    return ModelPackage(
        spec=spec,
        method=method,
        model=model,
        dim=int(dim),
        device=torch_device,
        source=source or str(folder),
    )


def _stored_spec(data: Any) -> Any:
    """A stored `job.yaml` as the current spec reads it.

    Packages written before `model.stem` existed were all built with the backbone's ImageNet
    stem: say so, so that their spec never takes a later default (e.g. `auto`, which is `small`
    for small images) that the stored weights would not fit.
    """
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and "stem" not in data["model"]:
        data["model"]["stem"] = "imagenet"
    elif isinstance(data, dict) and "model" not in data:
        data["model"] = {"stem": "imagenet"}
    return data
