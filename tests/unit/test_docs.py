"""The generated reference pages of docs/ (docs/hooks/reference.py) against the files the repository ships.

Every key written in jobs/*.yaml, tune_spaces/*.yaml and the Serve config's args must be a row of
the right section of the reference, and every `retrieval` subcommand must have its help there.
`make test` also builds the whole site with `mkdocs build --strict`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOK = _hook()


def _sections(markdown: str) -> dict[str, tuple[str, str]]:
    """anchor -> (heading text, the Markdown under it) of every section of a reference."""
    parts = re.split(r"^### (.*?) \{#([^}]+)\}$", markdown, flags=re.MULTILINE)
    return {parts[i + 1]: (parts[i], parts[i + 2]) for i in range(1, len(parts), 3)}


def _titles(markdown: str) -> dict[str, str]:
    """heading text -> the Markdown under it."""
    return dict(_sections(markdown).values())


def _row(body: str, key: str) -> str | None:
    match = re.search(rf"^\| `{re.escape(key)}` \|.*$", body, flags=re.MULTILINE)
    return match.group(0) if match else None


def _check(markdown: str, data: Mapping[str, Any], *, root_title: str, where: str) -> int:
    """Asserts every key of `data` (recursively, following the rows' links to nested sections) has a
    row in its section; returns how many keys were checked."""
    sections = _sections(markdown)
    root = [anchor for anchor, (title, _) in sections.items() if title == root_title]
    assert root, f"{where}: no section {root_title!r}"
    checked = 0
    pending: list[tuple[str, str, Mapping[str, Any]]] = [("", root[0], data)]
    while pending:
        path, anchor, mapping = pending.pop()
        assert anchor in sections, f"{where}: {path!r} links to #{anchor}, which is no section of the reference"
        title, body = sections[anchor]
        for key, value in mapping.items():
            row = _row(body, str(key))
            assert row is not None, f"{where}: key {path + str(key)!r} has no row in section {title!r}"
            checked += 1
            links = dict(re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", row))  # label -> anchor of nested specs
            items = value if isinstance(value, list) else [value]
            for item in items:
                if not links or not isinstance(item, Mapping):
                    continue
                # A union of specs (the methods) is told apart by `name`.
                tagged = links.get(f"name: {item.get('name')}")
                target = tagged or next(iter(links.values()))
                pending.append((f"{path}{key}.", target, item))
    return checked


def _job_files() -> list[Path]:
    return [path for path in sorted((ROOT / "jobs").glob("*.yaml")) if path.name != "runtime_env.yaml"]


@pytest.mark.parametrize("path", _job_files(), ids=lambda path: path.name)
def test_every_key_of_the_shipped_job_specs_is_in_the_reference(path: Path) -> None:
    reference = HOOK.render_marker("job-spec")
    data = yaml.safe_load(path.read_text())
    if isinstance(data.get("dataset"), str):  # the `dataset: digits` shorthand
        data = {**data, "dataset": {"name": data["dataset"]}}
    assert _check(reference, data, root_title="Job spec (top level)", where=path.name) >= 5


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda path: path.name)
def test_every_key_of_the_shipped_sweeps_is_in_the_reference(path: Path) -> None:
    reference = HOOK.render_marker("sweep-spec")
    data = yaml.safe_load(path.read_text())
    # `space` and `overrides` are keyed by job-spec paths, not by fields of the sweep file.
    top = {key: value for key, value in data.items() if key not in {"space", "overrides"}}
    assert _check(reference, top, root_title="Sweep file (top level)", where=path.name) >= 3
    space = _titles(reference)["`space.<key>`"]
    for distribution in data["space"].values():
        for kind in distribution:
            assert _row(space, kind), f"{path.name}: distribution {kind!r} not in the reference"


def test_every_serve_arg_of_the_shipped_config_is_in_the_reference() -> None:
    config = yaml.safe_load((ROOT / "serve" / "digits.yaml").read_text())
    reference = HOOK.render_marker("serving-spec")
    for application in config["applications"]:
        assert _check(reference, application["args"], root_title="Serve args (`ServingSpec`)", where="serve") >= 10


def test_the_reference_has_a_section_for_every_method() -> None:
    from retrieval.config import JobSpec

    titles = _titles(HOOK.render_marker("job-spec"))
    method_union = JobSpec.model_fields["method"].annotation
    names = {member.model_fields["name"].default for member in method_union.__args__}
    assert len(names) >= 12
    for name in names:
        assert f"`method` (name: {name})" in titles


def test_the_cli_reference_covers_every_subcommand() -> None:
    from retrieval import cli

    reference = HOOK.render_marker("cli")
    parser = cli._parser()
    groups = [group.split(",") for group in re.findall(r"\{([a-z,-]+)\}", parser.format_usage())]
    subcommands = next(group for group in groups if "train" in group)
    for name in subcommands:
        assert f"`retrieval {name}`" in reference
    for name in ("run", "swap", "status"):
        assert f"`retrieval serve {name}`" in reference


def test_an_unknown_marker_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown reference marker 'jobs-spec'"):
        HOOK.render_marker("jobs-spec")


def test_a_removed_field_would_be_caught() -> None:
    reference = HOOK.render_marker("job-spec").replace("| `epochs` |", "| `epoch_count` |")
    with pytest.raises(AssertionError, match=r"train\.epochs"):
        _check(reference, {"train": {"epochs": 3}}, root_title="Job spec (top level)", where="x")


def _repository_text_files() -> list[Path]:
    suffixes = {".md", ".yaml", ".yml", ".py", ".toml", ".txt"}
    skipped = {".git", ".venv", "site", "node_modules"}
    return [
        path
        for path in sorted(ROOT.rglob("*"))
        if path.suffix in suffixes and path.is_file() and not skipped & set(path.relative_to(ROOT).parts)
    ]


def test_readme_links_and_mentions_of_docs_pages_resolve() -> None:
    broken = []
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target and not (ROOT / target).exists():
            broken.append(f"README.md links to {target}")
    for path in _repository_text_files():
        for page in re.findall(r"\bdocs/[\w./-]+\.md\b", path.read_text(errors="replace")):
            if not (ROOT / page).exists():
                broken.append(f"{path.relative_to(ROOT)} mentions {page}")
    assert broken == []


# --------------------------------------------------------------------------- the "Adding a method" page

ADDING_A_METHOD = ROOT / "docs" / "methods" / "adding.md"
# `--8<-- "path"` or `--8<-- "path:section"` on a line of its own (pymdownx.snippets, mkdocs.yml).
_SNIPPET = re.compile(r'^\s*--8<-- "([^":]+)(?::([\w-]+))?"\s*$', re.MULTILINE)


def _yaml_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def test_the_job_of_the_adding_a_method_page_trains_a_step() -> None:
    import math

    import torch

    from retrieval.config import JobSpec
    from retrieval.methods import build_method
    from retrieval.methods.training import MethodTrainer

    blocks = _yaml_blocks(ADDING_A_METHOD.read_text())
    assert len(blocks) == 1, f"{ADDING_A_METHOD.name}: expected the one job YAML, found {len(blocks)} YAML blocks"
    spec = JobSpec.from_mapping(yaml.safe_load(blocks[0]), source=ADDING_A_METHOD.name)
    assert spec.method.name == "deep_metric" and spec.dataset.name == "digits"
    torch.set_num_threads(1)
    trainer = MethodTrainer(build_method(spec))
    before = [parameter.detach().clone() for parameter in trainer.players.bare_model.parameters()]
    sums, steps = trainer.train_epoch(0, max_steps=1)
    assert steps == 1 and math.isfinite(sums["loss"]), sums
    after = list(trainer.players.bare_model.parameters())
    assert any(not torch.equal(old, new.detach()) for old, new in zip(before, after, strict=True))


def test_the_adding_a_method_page_shows_the_registry_line_that_is_in_the_registry() -> None:
    page = ADDING_A_METHOD.read_text()
    registry = (ROOT / "platform" / "retrieval" / "methods" / "registry.py").read_text()
    for line in ("from retrieval.methods.deep_metric import DeepMetric", "    DeepMetric.name: DeepMetric,"):
        assert line in page, f"{ADDING_A_METHOD.name} lacks {line!r}"
        assert line in registry, f"{ADDING_A_METHOD.name} shows {line!r}, which methods/registry.py no longer has"


def _snippet_problems(page: str, markdown: str) -> list[str]:
    """What is wrong with each snippet the page `page` includes: a missing file, or a section not marked once."""
    problems = []
    for path, section in _SNIPPET.findall(markdown):
        where = f"{page} includes {path}{':' + section if section else ''}"
        target = ROOT / path
        if not target.is_file():
            problems.append(f"{where}: no such file")
            continue
        if section:
            text = target.read_text()
            for marker in (f"--8<-- [start:{section}]", f"--8<-- [end:{section}]"):
                if text.count(marker) != 1:
                    problems.append(f"{where}: {marker!r} occurs {text.count(marker)} times in {path}")
    return problems


def test_every_snippet_of_the_docs_exists() -> None:
    pages = {str(page.relative_to(ROOT)): page.read_text() for page in sorted((ROOT / "docs").rglob("*.md"))}
    assert len(_SNIPPET.findall(pages["docs/methods/adding.md"])) >= 2
    assert [problem for page, text in pages.items() for problem in _snippet_problems(page, text)] == []


def test_a_moved_snippet_would_be_caught() -> None:
    page = (
        '--8<-- "platform/retrieval/methods/moved.py"\n\n--8<-- "platform/retrieval/config/methods.py:no_such_spec"\n'
    )
    assert _snippet_problems("a fake page", page) == [
        "a fake page includes platform/retrieval/methods/moved.py: no such file",
        "a fake page includes platform/retrieval/config/methods.py:no_such_spec: '--8<-- [start:no_such_spec]' "
        "occurs 0 times in platform/retrieval/config/methods.py",
        "a fake page includes platform/retrieval/config/methods.py:no_such_spec: '--8<-- [end:no_such_spec]' "
        "occurs 0 times in platform/retrieval/config/methods.py",
    ]
