"""The distribution's declarations against what the code imports and what constraints.txt pins.

- every third-party module platform/ imports is a declared dependency (an import under
  `except ImportError` is optional and left out), and every one that tests/, benchmarks/, docs/
  or tools/ imports is declared in the dependencies or an extra;
- constraints.txt pins every declared requirement, inside its specifier, torch and torchvision
  exactly; what is installed here is what it pins;
- requires-python, ruff's target-version and mypy's python_version name the same floor;
- the Dockerfile installs the dependencies before it copies the code.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXACT_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _requirements(*, extras: bool) -> list[Requirement]:
    listed = list(PROJECT["dependencies"])
    if extras:
        listed += [line for group in PROJECT["optional-dependencies"].values() for line in group]
    return [Requirement(line) for line in listed]


def _declared(*, extras: bool) -> set[str]:
    return {canonicalize_name(requirement.name) for requirement in _requirements(extras=extras)}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact `name==version` pin"
            pins[canonicalize_name(name)] = version
    return pins


class _Imports(ast.NodeVisitor):
    """Top-level modules imported unconditionally (an import under `except ImportError` is optional)."""

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self._guarded = 0

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(handler) for handler in node.handlers)
        self._guarded += guarded
        for statement in node.body:
            self.visit(statement)
        self._guarded -= guarded
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def visit_Import(self, node: ast.Import) -> None:
        if not self._guarded:
            self.modules.update(alias.name.split(".")[0] for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not self._guarded and node.level == 0 and node.module:
            self.modules.add(node.module.split(".")[0])

    def visit_Call(self, node: ast.Call) -> None:
        # pytest.importorskip("x") / importlib.import_module("x") with a literal name
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        argument = node.args[0] if node.args else None
        if name in {"importorskip", "import_module"} and isinstance(argument, ast.Constant) and not self._guarded:
            self.modules.add(str(argument.value).split(".")[0])
        self.generic_visit(node)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in _IMPORT_ERRORS for name in names)


def _python_files(*trees: str) -> Iterator[Path]:
    for tree in trees:
        yield from sorted((ROOT / tree).rglob("*.py"))


def _third_party_imports(*trees: str) -> dict[str, set[str]]:
    """module -> files importing it, leaving out the standard library and the trees' own modules."""
    files = list(_python_files(*trees))
    own = {"retrieval"} | {path.stem for path in files} | {path.parent.name for path in files}
    found: dict[str, set[str]] = {}
    for path in files:
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for module in visitor.modules - own - set(sys.stdlib_module_names):
            found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


def _undeclared(imports: dict[str, set[str]], declared: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(imports.items()):
        distributions = {canonicalize_name(name) for name in providers.get(module, [])}
        if not distributions:
            problems.append(f"{module} (imported by {sorted(files)[0]}): no installed distribution provides it")
        elif not distributions & declared:
            problems.append(f"{module} (imported by {sorted(files)[0]}): {sorted(distributions)} is not declared")
    return problems


def test_the_library_imports_only_its_declared_dependencies() -> None:
    # The `text` extra's package is imported under `except ImportError`, so it is not required here.
    assert _undeclared(_third_party_imports("platform"), _declared(extras=False)) == []


def test_tests_benchmarks_and_tools_import_only_declared_packages() -> None:
    imports = _third_party_imports("tests", "benchmarks", "docs", "tools")
    assert {"hypothesis", "jsonschema", "uvicorn"} <= imports.keys()  # the scan sees the test-only imports
    assert _undeclared(imports, _declared(extras=True)) == []


def test_the_scan_catches_an_undeclared_import() -> None:
    visitor = _Imports()
    visitor.visit(
        ast.parse(
            "import yaml\nfrom hypothesis import strategies\ntry:\n    import h5py\nexcept ImportError:\n    pass\n"
        )
    )
    assert visitor.modules == {"yaml", "hypothesis"}
    declared_without_hypothesis = _declared(extras=True) - {"hypothesis"}
    assert _undeclared({"hypothesis": {"x.py"}}, declared_without_hypothesis) == [
        "hypothesis (imported by x.py): ['hypothesis'] is not declared"
    ]


def test_constraints_pin_every_requirement_inside_its_specifier() -> None:
    pins = _constraints()
    for requirement in _requirements(extras=True):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {name}: run `make constraints`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_torch_and_torchvision_are_pinned_exactly_everywhere() -> None:
    pins = _constraints()
    declared = {canonicalize_name(requirement.name): requirement for requirement in _requirements(extras=False)}
    for name, version in EXACT_PINS.items():
        assert pins[name] == version
        assert str(declared[name].specifier) == f"=={version}"


def test_what_is_installed_here_is_what_constraints_pin() -> None:
    pins = _constraints()
    stale = []
    for name in sorted(_declared(extras=True)):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: the pin is checked by the tests above
        if Version(installed) != Version(pins[name]) and Version(installed).public != pins[name]:
            stale.append(f"{name}: installed {installed}, constraints.txt {pins[name]}")
    assert stale == [], "run `make constraints` after changing the venv on purpose"


def test_requires_python_ruff_and_mypy_name_the_same_floor() -> None:
    floor = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"])
    assert floor, f"requires-python should be a plain floor, got {PROJECT['requires-python']!r}"
    minor = int(floor.group(1))
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{minor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{minor}"
    assert sys.version_info[:2] >= (3, minor)
    assert SpecifierSet(PROJECT["requires-python"]).contains(f"3.{minor}.0")


def test_every_pinned_version_installs_on_the_oldest_python_allowed() -> None:
    # A pin whose Requires-Python is above requires-python's floor (pymdown-extensions 13 needs
    # 3.11.5) resolves in a 3.11.7 venv and fails in a fresh one on Debian's 3.11.2.
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", PROJECT["requires-python"])
    assert floor
    oldest = f"{floor.group(1)}.0"
    too_new = []
    for name, version in sorted(_constraints().items()):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here
        requires_python = distribution.metadata.get("Requires-Python") or ""
        same_release = Version(distribution.version) == Version(version)
        if same_release and requires_python and not SpecifierSet(requires_python).contains(oldest):
            too_new.append(f"{name}=={version} requires Python {requires_python}")
    assert too_new == [], f"pins that Python {oldest} cannot install"


def test_the_docker_dependency_layer_comes_before_the_code() -> None:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # one line per instruction
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    installs = [i for i, line in enumerate(instructions) if line.startswith("RUN") and "pip install" in line]
    assert len(installs) == 2, installs
    dependencies, project = installs
    copied_first = {
        word
        for line in instructions[:dependencies]
        if line.startswith("COPY")
        for word in line.split()[1:-1]
        if not word.startswith("--")
    }
    assert copied_first == {"pyproject.toml", "constraints.txt"}
    assert "-c constraints.txt" in instructions[dependencies]
    code_copy = next(i for i, line in enumerate(instructions) if line.startswith("COPY") and " platform " in line)
    assert dependencies < code_copy < project
    assert "--no-deps" in instructions[project]


def test_the_makefile_installs_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", makefile, re.MULTILINE), "reinstall when the pins change"
