"""Reading a job spec from YAML: `load_job_spec`, `--set dotted.key=value` overrides (`parse_override`,
`apply_override`, `set_dotted`) and `read_yaml_mapping`. The CLI (`retrieval.cli`) calls these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from retrieval.config.datasets import dataset_shorthand
from retrieval.config.job import JobSpec
from retrieval.errors import ConfigError


def load_job_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a job spec from YAML, apply `a.b=value` overrides, validate.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: naming the file (or the override) and the offending key.
    """
    data = read_yaml_mapping(path)
    for override in overrides:
        apply_override(data, override)
    source = str(path) + (f" (with --set {', '.join(overrides)})" if overrides else "")
    return JobSpec.from_mapping(data, source=source)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `dotted.key=value` in a raw spec mapping, creating intermediate mappings.

    >>> spec = {"train": {"epochs": 3}}
    >>> apply_override(spec, "train.epochs=5"); spec
    {'train': {'epochs': 5}}
    """
    key, value = parse_override(override)
    set_dotted(data, key, value, source=f"--set {override!r}")


def parse_override(override: str) -> tuple[str, Any]:
    """`dotted.key=value` -> `(dotted.key, the value parsed as YAML)`."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected 'dotted.key=value'")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override!r}: value is not valid YAML: {error}") from error
    return key.strip(), value


_DATASET_SECTIONS = frozenset({"dataset", "whitening_dataset"})


def set_dotted(data: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    """Set `a.b.c` in a raw spec mapping to `value`, creating intermediate mappings.

    Raises:
        ConfigError: a part of the path is a value, not a section (named with `source`).
    """
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{source}: {key!r} is not a dotted key like 'method.ms_alpha'")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if isinstance(child, str) and part in _DATASET_SECTIONS:
            # `dataset=digits` then `dataset.image_size=64`: expand the shorthand into its section.
            child = node[part] = dataset_shorthand(child)
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key!r}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value
