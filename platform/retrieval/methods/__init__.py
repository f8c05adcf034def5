"""Thesis methods, one module each, registered by name."""

from retrieval.methods.base import RetrievalMethod
from retrieval.methods.package import ModelPackage, load_model_package, save_model_package
from retrieval.methods.registry import METHODS, build_method

__all__ = [
    "METHODS",
    "ModelPackage",
    "RetrievalMethod",
    "build_method",
    "load_model_package",
    "save_model_package",
]
