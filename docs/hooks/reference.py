"""MkDocs hook: the reference pages written from the code, so they cannot fall behind it.

A page holds a marker comment on a line of its own; the hook replaces it when the site is built:

- ``<!-- reference:job-spec -->``: every key of a job spec (`retrieval.config.JobSpec`), one
  table per section, with its type, default, bounds and the field's description;
- ``<!-- reference:serving-spec -->``: the Serve application's args (`ServingSpec`);
- ``<!-- reference:sweep-spec -->``: a sweep file (`SweepSpec`);
- ``<!-- reference:cli -->``: the ``--help`` of every ``retrieval`` command and subcommand;
- ``<!-- reference:job-files -->`` / ``<!-- reference:sweep-files -->``: the job specs of jobs/
  and the sweep files of tune_spaces/, with their method, dataset or base job and description.

`render_marker` is what the hook calls; tests/unit/test_docs.py calls it too.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = re.compile(r"^<!-- reference:([a-z-]+) -->$", re.MULTILINE)

_BOUNDS = (
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("min_length", "min length"),
    ("max_length", "max length"),
)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs event: replaces every reference marker of a page by its generated Markdown."""
    return MARKER.sub(lambda match: render_marker(match.group(1)), markdown)


def render_marker(name: str) -> str:
    """The Markdown of one marker (`job-spec`, `serving-spec`, `sweep-spec` or `cli`)."""
    from retrieval import config

    if name == "job-spec":
        return spec_reference(config.JobSpec, root_title="Job spec (top level)")
    if name == "serving-spec":
        return spec_reference(config.ServingSpec, root_title="Serve args (`ServingSpec`)")
    if name == "sweep-spec":
        return spec_reference(config.SweepSpec, root_title="Sweep file (top level)")
    if name == "cli":
        return cli_reference()
    if name == "job-files":
        return job_files()
    if name == "sweep-files":
        return sweep_files()
    raise ValueError(
        f"unknown reference marker {name!r}: expected job-spec, serving-spec, sweep-spec, cli, job-files or sweep-files"
    )


# --------------------------------------------------------------------------- example files

ROOT = Path(__file__).resolve().parents[2]


def job_files() -> str:
    """A table of jobs/*.yaml (each validated, as `retrieval train` would): method, data and description."""
    from retrieval.config import load_job_spec

    lines = ["| spec | method | data | description |", "|---|---|---|---|"]
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        if "method" not in (yaml.safe_load(path.read_text()) or {}):
            continue  # runtime_env.yaml
        spec = load_job_spec(path)
        data = f"`{spec.dataset.name}`"
        if spec.incremental is not None:
            tasks = [
                f"`{task.dataset.name}`" if task.dataset is not None else f"classes {task.classes}"
                for task in spec.incremental.tasks
            ]
            data = (
                ", then ".join(tasks)
                if all(task.dataset for task in spec.incremental.tasks)
                else (f"{data}: " + ", then ".join(tasks))
            )
        cells = [f"`jobs/{path.name}`", f"`{spec.method.name}`", data, spec.description]
        lines.append("| " + " | ".join(_escape(cell) for cell in cells) + " |")
    return "\n".join(lines)


def sweep_files() -> str:
    """A table of tune_spaces/*.yaml: file, base job, swept keys and description."""
    lines = ["| sweep | base job | swept keys | description |", "|---|---|---|---|"]
    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        keys = ", ".join(f"`{key}`" for key in data.get("space", {}))
        base = f"`jobs/{Path(data['base_job']).name}`"
        cells = [f"`tune_spaces/{path.name}`", base, keys, data.get("description", "")]
        lines.append("| " + " | ".join(_escape(str(cell)) for cell in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- specs


def spec_reference(root: type[BaseModel], *, root_title: str) -> str:
    """One section per model reachable from `root`, each with a table of all its fields."""
    sections: list[str] = []
    anchors: dict[type[BaseModel], tuple[str, str]] = {}  # model -> (anchor, key path of its section)
    queue: list[tuple[type[BaseModel], str]] = [(root, "")]
    # First pass: every model's path and anchor (the first path it is reached by), in reading order.
    order: list[tuple[type[BaseModel], str]] = []
    while queue:
        model, path = queue.pop(0)
        if model in anchors:
            continue
        anchors[model] = (_anchor(root, model), path)
        order.append((model, path))
        for name, field in model.model_fields.items():
            for nested in _models_in(field.annotation):
                if nested not in anchors:
                    queue.append((nested, _child_path(path, name, field.annotation, nested)))
    for model, path in order:
        sections.append(_model_section(model, path, anchors, root_title=root_title if not path else None))
    return "\n\n".join(sections)


def _model_section(
    model: type[BaseModel], path: str, anchors: dict[type[BaseModel], tuple[str, str]], *, root_title: str | None
) -> str:
    title = root_title or f"`{path}`" + (f" ({_tag(model)})" if _tag(model) else "")
    lines = [f"### {title} {{#{anchors[model][0]}}}", ""]
    doc = inspect.getdoc(model)
    if doc and model.__doc__ and "__doc__" in model.__dict__:
        lines += [doc, ""]
    lines += [f"`{model.__name__}`. Unknown keys are an error.", ""]
    lines += ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        cells = [
            f"`{name}`",
            _type_text(field.annotation, anchors),
            _default_text(field),
            _bounds_text(field),
            _escape(field.description or ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tag(model: type[BaseModel]) -> str:
    """`name: deep_metric` for a member of a union told apart by its `name` (the methods)."""
    field = model.model_fields.get("name")
    if field is not None and get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
        return f"name: {get_args(field.annotation)[0]}"
    return ""


def _anchor(root: type[BaseModel], model: type[BaseModel]) -> str:
    return f"{root.__name__}-{model.__name__}".lower()


def _child_path(path: str, name: str, annotation: Any, nested: type[BaseModel]) -> str:
    return (f"{path}.{name}" if path else name) + (_suffix(annotation, nested) or "")


def _suffix(annotation: Any, nested: type[BaseModel]) -> str | None:
    """How `nested` sits inside `annotation`: "" directly, "[]" in a list, ".<key>" in a map; None: not there."""
    if annotation is nested:
        return ""
    origin = get_origin(annotation)
    for argument in get_args(annotation):
        inner = _suffix(argument, nested)
        if inner is not None:
            if origin in (list, tuple, set, frozenset):
                return "[]" + inner
            if origin is dict:
                return ".<key>" + inner
            return inner
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_in(argument)]


def _type_text(annotation: Any, anchors: dict[type[BaseModel], tuple[str, str]]) -> str:
    return _escape(_type_name(annotation, anchors))


def _type_name(annotation: Any, anchors: dict[type[BaseModel], tuple[str, str]]) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        anchor, path = anchors[annotation]
        label = _tag(annotation) or f"section `{path}`"
        return f"[{label}](#{anchor})"
    origin = get_origin(annotation)
    arguments = get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(arguments[0], anchors)
    if origin is Literal:
        return " | ".join(f"`{value}`" if isinstance(value, str) else f"`{value!r}`" for value in arguments)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(argument, anchors) for argument in arguments)
    if origin in (list, tuple, set, frozenset):
        inner = ", ".join("..." if argument is Ellipsis else _type_name(argument, anchors) for argument in arguments)
        return f"list of {inner}" if origin is list else f"{origin.__name__}[{inner}]"
    if origin is dict:
        key, value = arguments
        return f"map {_type_name(key, anchors)} → {_type_name(value, anchors)}"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        factory: Any = field.default_factory
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return "its defaults"
        try:
            value = factory()
        except TypeError:
            return "computed"
        return _escape(f"`{_yaml_value(value)}`")
    if field.is_required():
        return "**required**"
    return _escape(f"`{_yaml_value(field.default)}`")


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return str(value.model_dump(mode="json"))
    if isinstance(value, str) and not value:
        return '""'
    if isinstance(value, tuple):
        value = list(value)
    return repr(value) if isinstance(value, (list, dict)) else str(value)


def _bounds_text(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attribute, symbol in _BOUNDS:
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            parts.append(f"matches `{pattern}`")
    return _escape(", ".join(parts))


def _escape(text: str) -> str:
    """A table cell: one line, pipes escaped (also inside code spans, which Markdown tables need)."""
    return " ".join(text.split()).replace("|", "\\|")


# --------------------------------------------------------------------------- CLI


def cli_reference() -> str:
    """The help of `retrieval` and of each of its (sub)commands, as the terminal prints it."""
    from retrieval import cli

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at $COLUMNS: the page does not depend on the terminal
    try:
        parser = cli._parser()
        sections = []
        for path, command in _commands(parser, "retrieval"):
            level = "###" if path.count(" ") <= 1 else "####"
            sections.append(f"{level} `{path}`\n\n```text\n{command.format_help().rstrip()}\n```")
        return "\n\n".join(sections)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _commands(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _commands(subparser, f"{path} {name}")
