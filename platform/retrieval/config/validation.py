"""Validation of a spec mapping, with errors that name the key and the file: pydantic's errors become one
`ConfigError` line per problem, with a "did you mean" for an unknown key. Used by every spec's
`from_mapping` and by `retrieval.serving.serve_config` (`validate_declared_keys`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from retrieval.config.base import StrictModel
from retrieval.errors import ConfigError, redact_credentials


def _validate(model: type[StrictModel], data: Mapping[str, Any], *, source: str) -> Any:
    try:
        return model.model_validate(dict(data))
    except ValidationError as error:
        lines = [_describe_error(item, data, model) for item in error.errors()]
        raise ConfigError(f"{source}: invalid spec:\n  " + "\n  ".join(lines)) from None


_Model = TypeVar("_Model", bound=BaseModel)


def validate_declared_keys(model: type[_Model], data: Mapping[str, Any], *, source: str, what: str) -> _Model:
    """Validate ``data`` as ``model``, refusing every key that no model in it declares.

    For models that ignore unknown keys instead of refusing them: Ray Serve's config schemas
    accept any key (so that an older Ray takes a newer Ray's config), and a misspelt
    ``num_replica`` would then do nothing, silently. Free-form mappings (a plain ``dict`` field
    such as Serve's ``args``, ``runtime_env`` or ``user_config``) are not looked into.

    Args:
        model: the pydantic model of the whole document.
        data: the document, as read from YAML.
        source: the file (or other origin) to name in errors.
        what: what the document is, for the error line (e.g. ``invalid Serve config``).

    Raises:
        ConfigError: naming ``source`` and each unknown key (with a "did you mean") or invalid value.
    """
    problems = [_describe_error(item, data, model) for item in _undeclared_keys(model, data, ())]
    try:
        validated = model.model_validate(dict(data))
    except ValidationError as error:
        problems += [_describe_error(item, data, model) for item in error.errors()]
    if problems:
        raise ConfigError(f"{source}: {what}:\n  " + "\n  ".join(problems))
    return validated


def _undeclared_keys(model: type[BaseModel], data: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Pydantic-style ``extra_forbidden`` error items for the keys of ``data`` that ``model`` does not declare."""
    if not isinstance(data, Mapping) or model.model_config.get("extra") == "allow":
        return []
    fields = {**{field.alias: field for field in model.model_fields.values() if field.alias}, **model.model_fields}
    found: list[dict[str, Any]] = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            found.append({"type": "extra_forbidden", "loc": (*loc, key)})
            continue
        # Only a model (or a list of them) directly in the annotation: a dict of models has free keys.
        inner = [nested for nested in _models_in(field.annotation) if not _inside_a_mapping(field.annotation, nested)]
        if len(inner) != 1:
            continue
        if isinstance(value, Mapping):
            found += _undeclared_keys(inner[0], value, (*loc, key))
        elif isinstance(value, list):
            for position, element in enumerate(value):
                found += _undeclared_keys(inner[0], element, (*loc, key, position))
    return found


def _inside_a_mapping(annotation: Any, model: type[BaseModel]) -> bool:
    """Whether ``model`` appears in ``annotation`` only as the value type of a mapping (``dict[str, model]``)."""
    origin = get_origin(annotation)
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return model in _models_in(annotation)
    arguments = [argument for argument in get_args(annotation) if model in _models_in(argument)]
    return bool(arguments) and all(_inside_a_mapping(argument, model) for argument in arguments)


def _describe_error(item: Mapping[str, Any], data: Any, root: type[BaseModel]) -> str:
    key = _key_path(item["loc"], data)
    if item["type"] == "extra_forbidden":
        name = str(item["loc"][-1])
        hint = difflib.get_close_matches(name, sorted(_section_fields(root, item["loc"][:-1])), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: unknown key{suggestion}"
    if item["type"] == "missing":
        return f"{key}: required key is missing"
    message = str(item["msg"]).removeprefix("Value error, ")
    value = item.get("input")
    if isinstance(value, str):
        # Never echo the user:password part of a URL back into logs.
        value = redact_credentials(value)
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{key}: {message}{shown}"


def _key_path(loc: Sequence[Any], data: Any) -> str:
    """Dotted key for an error location, skipping pydantic's union tags and type names."""
    parts: list[str] = []
    node = data
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(node, list) and isinstance(part, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part}]"]
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif last or not isinstance(node, dict):
            parts.append(str(part))
        # else: a discriminator tag or a model-name segment pydantic inserts; not a user key
    return ".".join(parts) or "<top level>"


def _section_fields(root: type[BaseModel], loc: Sequence[Any]) -> set[str]:
    """The keys allowed in the section at `loc`, for "did you mean" hints within that section."""
    candidates = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        owners = [model for model in candidates if part in model.model_fields]
        if owners:
            candidates = [found for model in owners for found in _models_in(model.model_fields[part].annotation)]
        else:
            # A discriminator tag pydantic puts in the location: keep the union member it names.
            candidates = [
                model
                for model in candidates
                if model.model_fields.get("name") and model.model_fields["name"].default == part
            ]
    return {name for model in candidates for name in model.model_fields}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field annotation (through Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_in(argument)]
