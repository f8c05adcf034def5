"""The suite's own machinery (tests/conftest.py): unit tests first, markers read off fixtures.

Each check runs pytest on a small project of its own (pytester) whose conftest is the real
tests/conftest.py, with stand-ins for the integration fixtures under their real names.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _load_conftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("suite_conftest_under_test", TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFTEST = _load_conftest()
FIXTURE_MARKS: dict[str, frozenset[str]] = dict(CONFTEST.FIXTURE_MARKS)
REGISTERED = {
    line.split(":")[0].strip()
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
}

# Stand-ins for the integration fixtures, under their real names and with their real dependencies.
STAND_INS = """
import pytest

@pytest.fixture(scope="session")
def ray_cluster(): return "cluster"

@pytest.fixture(scope="session")
def ray_train(ray_cluster): return ray_cluster

@pytest.fixture(scope="session")
def serve_instance(ray_cluster): return "http://127.0.0.1:1"

@pytest.fixture(scope="session")
def s3_endpoint(): return "s3"

@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint): return "http://127.0.0.1:2"

@pytest.fixture(scope="session")
def two_node_cluster(): return "two nodes"

@pytest.fixture
def two_nodes(two_node_cluster): return two_node_cluster

@pytest.fixture
def two_nodes_training(two_nodes): return two_nodes

@pytest.fixture(scope="module")
def browser(): return "chromium"

@pytest.fixture(scope="module")
def shared_run(ray_train): return "one run, many tests"
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project laid out like tests/: the real root conftest, unit/ and integration/ folders."""
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n"
        + "".join(f"    {name}: registered as in pyproject.toml\n" for name in sorted(REGISTERED))
    )
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    (pytester.path / "integration").mkdir()
    (pytester.path / "integration" / "conftest.py").write_text(STAND_INS)
    (pytester.path / "unit").mkdir()
    return pytester


def _marks(item: pytest.Item) -> set[str]:
    return {mark.name for mark in item.iter_markers()} & REGISTERED


def test_every_mapped_fixture_is_defined_under_tests_integration_and_every_marker_registered() -> None:
    # A renamed fixture would otherwise silently stop marking its tests.
    fixtures = {
        node.name
        for path in (TESTS / "integration").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
        and any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
    }
    assert set(FIXTURE_MARKS) - fixtures == set()
    assert set().union(*FIXTURE_MARKS.values()) - REGISTERED == set()


@pytest.mark.parametrize("fixture", sorted(FIXTURE_MARKS))
def test_a_test_using_a_mapped_fixture_gets_its_markers(suite: pytest.Pytester, fixture: str) -> None:
    (suite.path / "integration" / "test_uses.py").write_text(
        f"def test_uses_it({fixture}):\n    pass\n\ndef test_uses_nothing():\n    pass\n"
    )
    items, _ = suite.inline_genitems("--import-mode=importlib")
    by_name = {item.name: item for item in items}
    # Its own markers and those of the fixtures it builds on (ray_train -> ray_cluster, ...).
    expected = set(FIXTURE_MARKS[fixture])
    for other in by_name["test_uses_it"].fixturenames:  # type: ignore[attr-defined]
        expected |= FIXTURE_MARKS.get(other, frozenset())
    assert _marks(by_name["test_uses_it"]) == expected
    assert expected
    assert _marks(by_name["test_uses_nothing"]) == set()


def test_a_fixture_built_on_ray_train_marks_every_test_that_uses_it_train_run(suite: pytest.Pytester) -> None:
    (suite.path / "integration" / "test_shared.py").write_text(
        "def test_first(shared_run):\n    pass\n\ndef test_second(shared_run, tmp_path):\n    pass\n\n"
        "def test_cluster_only(ray_cluster):\n    pass\n"
    )
    items, _ = suite.inline_genitems("--import-mode=importlib")
    marks = {item.name: _marks(item) for item in items}
    assert marks == {
        "test_first": {"integration", "slow", "train_run"},
        "test_second": {"integration", "slow", "train_run"},
        "test_cluster_only": {"integration"},
    }


def test_not_train_run_selects_exactly_the_tests_that_start_no_run(suite: pytest.Pytester) -> None:
    (suite.path / "integration" / "test_runs.py").write_text(
        "def test_train(ray_train):\n    pass\n\ndef test_shared(shared_run):\n    pass\n\n"
        "def test_fault_training(two_nodes_training):\n    pass\n\ndef test_serve(serve_instance):\n    pass\n"
    )
    (suite.path / "unit" / "test_plain.py").write_text("def test_plain():\n    pass\n")
    result = suite.runpytest("--import-mode=importlib", "-m", "not train_run", "-v")
    result.assert_outcomes(passed=2, deselected=3)
    result.stdout.fnmatch_lines(["*test_plain.py::test_plain PASSED*", "*test_runs.py::test_serve PASSED*"])


def test_unit_tests_run_before_integration_tests_in_their_own_order(suite: pytest.Pytester) -> None:
    # "integration" sorts before "unit": pytest alone would run the integration tests first.
    (suite.path / "integration" / "test_a.py").write_text(
        "def test_a2(ray_cluster):\n    pass\n\ndef test_a1():\n    pass\n"
    )
    (suite.path / "integration" / "test_b.py").write_text("def test_b():\n    pass\n")
    (suite.path / "unit" / "test_z.py").write_text("def test_z2():\n    pass\n\ndef test_z1():\n    pass\n")
    (suite.path / "unit" / "test_y.py").write_text("def test_y():\n    pass\n")
    (suite.path / "test_elsewhere.py").write_text("def test_elsewhere():\n    pass\n")
    result = suite.runpytest("--import-mode=importlib", "--collect-only", "-q")
    collected = [line.split("::")[-1] for line in result.outlines if "::" in line]
    assert collected == ["test_y", "test_z2", "test_z1", "test_a2", "test_a1", "test_b", "test_elsewhere"]


def test_a_unit_failure_stops_x_before_any_integration_test(suite: pytest.Pytester) -> None:
    (suite.path / "integration" / "test_a.py").write_text("def test_integration(ray_cluster):\n    pass\n")
    (suite.path / "unit" / "test_broken.py").write_text("def test_broken():\n    assert False\n")
    result = suite.runpytest("--import-mode=importlib", "-x")
    result.assert_outcomes(failed=1)


def test_no_test_module_applies_a_derived_marker_by_hand() -> None:
    # `slow` may still be set by hand on a unit test that computes for long; nowhere else.
    derived = sorted(set().union(*FIXTURE_MARKS.values()) - {"slow"})
    anywhere = re.compile(r"pytest\.mark\.(" + "|".join(derived) + r")\b")
    in_integration = re.compile(r"pytest\.mark\.slow\b")
    by_hand = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("test_*.py"))
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if anywhere.search(line) or ("integration" in path.parts and in_integration.search(line))
    ]
    assert by_hand == []


# A stand-in for the session cluster whose dashboard lists the actors a test "started": the real
# integration conftest counts them before and after each test, as it does on a live cluster.
FAKE_CLUSTER = """
import http.server, json, threading
import pytest

ACTORS = []

class Dashboard(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": {"result": {"result": ACTORS}}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

@pytest.fixture(scope="session")
def ray_cluster(request):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    runs = next(plugin.RUNS for plugin in request.config.pluginmanager.get_plugins() if hasattr(plugin, "RUNS"))
    runs.watch(url)
    yield ACTORS
    runs.forget(url)
    server.shutdown()

@pytest.fixture(scope="session")
def ray_train(ray_cluster):
    return ray_cluster

@pytest.fixture(scope="module")
def shared_run(ray_train):
    ray_train.append({"class_name": "TrainController"})

def test_a_train_run(ray_train):
    ray_train.append({"class_name": "TrainController"})
    ray_train.append({"class_name": "ServeReplica:app:Ingress"})

def test_reads_the_shared_run(shared_run):
    pass

def test_reads_it_too(shared_run):
    pass

def test_a_sweep_without_the_marker(ray_cluster):
    ray_cluster.extend([{"class_name": "TrainController"}, {"class_name": "ImplicitFunc"}])

def test_no_run(ray_cluster):
    pass
"""


def test_a_test_that_starts_a_run_without_the_train_run_marker_errors_and_every_run_is_counted(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The integration conftest sets dummy AWS credentials with setdefault: keep them out of this process.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, "unit-test")
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n"
        + "".join(f"    {name}: registered as in pyproject.toml\n" for name in sorted(REGISTERED))
    )
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    (pytester.path / "integration").mkdir()
    (pytester.path / "integration" / "conftest.py").write_text((TESTS / "integration" / "conftest.py").read_text())
    (pytester.path / "integration" / "test_runs.py").write_text(FAKE_CLUSTER)
    result = pytester.runpytest("--import-mode=importlib")
    result.assert_outcomes(passed=5, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_sweep_without_the_marker*",
            "*test_a_sweep_without_the_marker started 1 Ray Train runs, 1 Tune trials but is not marked `train_run`*",
            "*Ray Train runs and Tune trials started*",
            "1 Ray Train runs: integration/test_runs.py::test_a_train_run",
            "1 Ray Train runs: integration/test_runs.py::test_reads_the_shared_run",
            "1 Ray Train runs, 1 Tune trials: integration/test_runs.py::test_a_sweep_without_the_marker",
            "total: 3 Ray Train runs, 1 Tune trials",
        ]
    )
