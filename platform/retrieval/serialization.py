"""Loading training state that others may have written, without running their code.

Checkpoints, task carries and model weights live on shared storage (S3, a cluster volume)
that more people and processes can write than the one reading them. ``torch.load`` with
``weights_only=False`` unpickles arbitrary objects, so a crafted ``state.pt`` would run code on
every worker that resumes from it. Everything here loads with ``weights_only=True`` (tensors,
numbers, strings, lists, tuples, dicts) and says which file held something else.

Objects richer than that (the incremental methods' `TaskCarry` dataclasses, their numpy
arrays) are saved as plain containers by `to_plain` and rebuilt by `from_plain`, which only
ever constructs dataclasses defined in this package, by their fields: nothing else is called.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import IntegrityError

_PACKAGE = "retrieval."
_DATACLASS = "__dataclass__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"


def load_state(source: str | Path | bytes, *, map_location: Any = "cpu", what: str | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain values only.

    Args:
        source: a file path or the bytes of a ``torch.save`` file.
        map_location: as ``torch.load``.
        what: how to name the source in an error (default: the path).

    Raises:
        IntegrityError: the file holds anything else (it may have been tampered with), or it
            is not a torch file at all; the message names the file.
    """
    name = what or (str(source) if not isinstance(source, bytes) else "the state")
    stream: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(str(error))
        if "Unsupported global" in detail:
            raise IntegrityError(
                f"{name}: refused to load: it holds objects other than tensors and plain values, which "
                f"could run code when unpickled (was it written by this platform?): {detail}"
            ) from error
        raise IntegrityError(f"{name}: not a readable torch state file: {detail}") from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise IntegrityError(f"{name}: not a readable torch state file: {error}") from error


def _unpickler_detail(message: str) -> str:
    """The line of torch's long weights-only message that says what was wrong."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". Please use")[0] or "malformed"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("Please file an issue") and index + 1 < len(lines):
            return lines[index + 1]
    return lines[0] if lines else "unreadable"


def to_plain(value: Any) -> Any:
    """``value`` as tensors and plain containers that `load_state` accepts (see `from_plain`).

    Raises:
        TypeError: ``value`` holds an object that is neither plain, a tensor, a numpy array nor a
            dataclass of this package.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        if not kind.__module__.startswith(_PACKAGE):
            raise TypeError(f"cannot save a {kind.__module__}.{kind.__qualname__}: only this package's dataclasses")
        fields = {field.name: to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
        return {_DATACLASS: f"{kind.__module__}:{kind.__qualname__}", "fields": fields}
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [to_plain(item) for item in value]}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) for key in value):
            raise TypeError(f"cannot save a dict whose keys are not str or int: {sorted(map(repr, value))[:3]}")
        return {key: to_plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    raise TypeError(f"cannot save a {type(value).__module__}.{type(value).__qualname__} as plain state")


def from_plain(value: Any) -> Any:
    """Rebuild what `to_plain` saved; only dataclasses of this package are constructed.

    Raises:
        IntegrityError: the state names a type outside this package, or not a dataclass.
    """
    if isinstance(value, dict):
        if _DATACLASS in value:
            kind = _dataclass_type(str(value[_DATACLASS]))
            return kind(**{key: from_plain(item) for key, item in value["fields"].items()})
        if _NDARRAY in value:
            return value[_NDARRAY].numpy()
        if _TUPLE in value:
            return tuple(from_plain(item) for item in value[_TUPLE])
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_plain(item) for item in value]
    return value


def _dataclass_type(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    if not module_name.startswith(_PACKAGE) or not qualname or "." in qualname:
        raise IntegrityError(f"saved state names type {name!r}, which is not a dataclass of this package")
    kind = getattr(importlib.import_module(module_name), qualname, None)
    if not isinstance(kind, type) or not dataclasses.is_dataclass(kind):
        raise IntegrityError(f"saved state names type {name!r}, which is not a dataclass of this package")
    return kind
