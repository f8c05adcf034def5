"""One local Ray cluster for the whole test session, and the services the integration tests share.

The head runs as `ray start --head --block` in a child process group, with every port
picked free on 127.0.0.1, so parallel test sessions never collide and teardown stops only
this cluster (never a machine-wide `ray stop`).

The fixtures named in `FIXTURE_MARKS` (tests/conftest.py) mark the tests that use them. A test
or fixture that starts a Ray Train or Tune run asks for `ray_train` (or `two_nodes_training`)
rather than the bare cluster: that marks it `train_run`, which `make test-fast` leaves out.
Every test's Train runs and Tune trials are counted from the clusters' own actor tables, so a
test that starts one without that marker fails, and the session's totals end the report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests


@dataclass(frozen=True)
class RayCluster:
    address: str
    dashboard_url: str
    serve_port: int
    temp_dir: Path
    metrics_port: int  # the head node's metrics agent: GET http://127.0.0.1:<port>/metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: object, *, timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll `condition()` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except Exception as error:
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


# Dummy credentials for the test session's S3 endpoint (moto). Set before the head starts, so
# every Ray worker sees them the way a real node sees its own from the environment; the secret
# is distinctive so tests can check it is never logged.
TEST_S3_SECRET = "retrieval-test-secret-do-not-log"
for _name, _value in (
    ("AWS_ACCESS_KEY_ID", "retrieval-test-key"),
    ("AWS_SECRET_ACCESS_KEY", TEST_S3_SECRET),
    ("AWS_DEFAULT_REGION", "us-east-1"),
):
    os.environ.setdefault(_name, _value)


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A real S3 HTTP API on 127.0.0.1 (moto server) with one bucket, for the whole session."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="retrieval-test")
    try:
        yield S3Endpoint(url=url, bucket="retrieval-test")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite database with every migration applied, made once per session."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(tmp_path: Path, mlflow_template_db: Path) -> str:
    """`sqlite:///<tmp_path>/mlflow.db`, a fresh empty tracking database (a copy of the template).

    Creating an MLflow database runs its schema migrations (~5 s on a 2-core machine); a copy
    of one made earlier in the session is the same empty database and opens in milliseconds.
    """
    path = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    import ray

    temp_dir = Path("/tmp") / f"rtest-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", "8", "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(metrics_port),
        "--runtime-env-agent-port", str(free_port()),
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with log.open("w") as log_file:
        head = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_until(
            lambda: requests.get(f"{dashboard_url}/api/version", timeout=2).ok,
            timeout=120,
            what=f"the Ray head's dashboard (log: {log})",
        )
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False, _node_ip_address="127.0.0.1")
        RUNS.watch(dashboard_url)
        yield RayCluster(
            address=address,
            dashboard_url=dashboard_url,
            serve_port=free_port(),
            temp_dir=temp_dir,
            metrics_port=metrics_port,
        )
    finally:
        RUNS.forget(dashboard_url)
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        _stop_group(head)


@pytest.fixture(scope="session")
def ray_train(ray_cluster: RayCluster) -> RayCluster:
    """The session cluster, for a test or fixture that starts Ray Train or Tune runs on it.

    Asking for it (directly or through a run fixture) marks a test `train_run`; see `FIXTURE_MARKS`.
    """
    return ray_cluster


@pytest.fixture(scope="session")
def serve_instance(ray_cluster: RayCluster) -> str:
    """Ray Serve on the session cluster, its proxy on 127.0.0.1:`serve_port`; yields the proxy's URL."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": ray_cluster.serve_port})
    return f"http://127.0.0.1:{ray_cluster.serve_port}"


@pytest.fixture(scope="session")
def mlflow_server(
    s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path
) -> Iterator[str]:
    """`mlflow server` with a sqlite backend and `--artifacts-destination s3://...`, proxying artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    # An empty database with its migrations applied: the server does not spend ~5 s creating one.
    shutil.copyfile(mlflow_template_db, folder / "mlflow.db")
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{s3_endpoint.bucket}/mlflow",
        "--host", "127.0.0.1", "--port", str(port := free_port()), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint.url}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"mlflow server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    # `ray start --block` does not exit on SIGTERM while its children shut down (a 30 s grace was
    # always used up in full); the session's cluster holds nothing worth a graceful stop.
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def poll() -> object:
    """`wait_until(condition, timeout=..., what=...)`: poll with a deadline, never a bare sleep."""
    return wait_until


def get_until_ok(url: str, deadline_s: float) -> requests.Response:
    """GET `url` until it answers 200 (Serve's proxy learns new routes asynchronously)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {deadline_s} s")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def http_ready() -> object:
    """`get_until_ok(url, deadline_s)`: the first 200 reply of a route that is coming up."""
    return get_until_ok


# --------------------------------------------------------------------------- the fault tier
# A real two-node Ray cluster on this machine, whose worker node the fault tests kill.
#
# Both nodes are `ray start ... --block` processes, each in its own process group: the head
# (``--resources '{"head_node": ...}'``) and a worker node (``{"worker_node": ...}``). Killing
# the worker node's group with SIGKILL is what a lost machine looks like to Ray: its raylet,
# object store and every worker on it vanish at once, with no goodbye to the GCS. The worker
# node can then be started again, as a replaced machine would be.
#
# Drivers (``retrieval train``, a Serve deploy) run as subprocesses connected to this cluster, so
# the test process stays connected to the session's own cluster (``ray_cluster``) if it has one.
# Serve's proxy runs on the head only (two proxies cannot share one port on one machine).

BIN = Path(sys.executable).parent
HEAD_CPUS = 4
WORKER_CPUS = 2


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Serve's proxy sends requests to replicas on its own node first: with the proxy on the
        # head, the worker node's ingress replica would never get one.
        "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@dataclass
class TwoNodeCluster:
    address: str
    dashboard_url: str
    serve_port: int
    logs: Path
    head: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    # ------------------------------------------------------------------ nodes

    def start_worker(self) -> None:
        """Start (or restart) the worker node and wait until the GCS counts it alive.

        `ray start` picks fresh ports each time; one still held by the killed node's processes makes it
        exit at once, so an exited start is retried (twice) instead of waited on until the deadline.
        """
        assert self.worker is None, "the worker node is already running"
        for _ in range(3):
            self.starts += 1
            command = [
                str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                "--address", self.address, "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(WORKER_CPUS), "--resources", json.dumps({"worker_node": 100}),
                "--metrics-export-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
            ]  # fmt: skip
            log_path = self.logs / f"worker-{self.starts}.log"
            with log_path.open("w") as log:
                worker = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
                )
            self.worker = worker
            # A loaded 2-core machine can take minutes to bring a node back: a wait, not a speed check.
            wait_until(
                lambda worker=worker: self.worker_node_id() is not None or worker.poll() is not None,
                timeout=300,
                what="the worker node to join",
            )
            if self.worker_node_id() is not None:
                return
            self.worker = None
        raise RuntimeError(f"the worker node exited at start three times; last log: {log_path.read_text()[-2000:]}")

    def kill_worker(self) -> None:
        """SIGKILL the worker node's whole process group: a machine lost without warning."""
        assert self.worker is not None, "no worker node to kill"
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)
        self.worker = None
        wait_until(lambda: self.worker_node_id() is None, timeout=120, what="the GCS to mark the worker node dead")

    def nodes(self) -> list[dict[str, Any]]:
        reply = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100, "detail": "true"}, timeout=10)
        reply.raise_for_status()
        return list(reply.json()["data"]["result"]["result"])

    def worker_node_id(self) -> str | None:
        """The live worker node's id (the node with the ``worker_node`` resource), or None."""
        for node in self.nodes():
            if node["state"] == "ALIVE" and "worker_node" in (node.get("resources_total") or {}):
                return str(node["node_id"])
        return None

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Live actors of one class, each with its ``node_id``."""
        reply = requests.get(
            f"{self.dashboard_url}/api/v0/actors",
            params={"limit": 1000, "detail": "true", "filter_keys": "state", "filter_predicates": "=",
                    "filter_values": "ALIVE"},
            timeout=10,
        )  # fmt: skip
        reply.raise_for_status()
        return [actor for actor in reply.json()["data"]["result"]["result"] if actor["class_name"] == class_name]

    # ------------------------------------------------------------------ serve

    def serve_replicas(self, app: str, deployment: str) -> list[dict[str, Any]]:
        """The replicas of one deployment (state, node_id, actor_name), from Serve's REST API."""
        reply = requests.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10)
        reply.raise_for_status()
        application = reply.json()["applications"].get(app)
        if application is None:
            return []
        return list(application["deployments"].get(deployment, {}).get("replicas", []))

    def running_on(self, app: str, deployment: str) -> list[str]:
        """The node ids of the RUNNING replicas of a deployment."""
        return sorted(
            replica["node_id"] for replica in self.serve_replicas(app, deployment) if replica["state"] == "RUNNING"
        )

    def run_driver(self, code: str, *, timeout: float = 300) -> str:
        """Run a Python driver connected to this cluster; its stdout, or an error with its output."""
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**_env(), "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"driver failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        return done.stdout


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    logs = tmp_path_factory.mktemp("two-nodes")
    port, dashboard_port = free_port(), free_port()
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", str(HEAD_CPUS), "--resources", json.dumps({"head_node": 100}),
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--temp-dir", str(Path("/tmp") / f"rfault-{os.getpid()}"),
    ]  # fmt: skip
    with (logs / "head.log").open("w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    cluster = TwoNodeCluster(
        address=f"127.0.0.1:{port}", dashboard_url=dashboard_url, serve_port=free_port(), logs=logs, head=head
    )
    try:
        wait_until(
            lambda: requests.get(f"{dashboard_url}/api/version", timeout=2).ok,
            timeout=120,
            what=f"the fault cluster's head (log: {logs / 'head.log'})",
        )
        cluster.start_worker()
        RUNS.watch(dashboard_url)
        yield cluster
    finally:
        RUNS.forget(dashboard_url)
        if cluster.worker is not None:
            _stop_group(cluster.worker)
        _stop_group(head)


@pytest.fixture
def two_nodes(two_node_cluster: TwoNodeCluster) -> TwoNodeCluster:
    """The two-node cluster with both nodes up (a test that killed the worker node may not restart it)."""
    if two_node_cluster.worker is None:
        two_node_cluster.start_worker()
    return two_node_cluster


@pytest.fixture
def two_nodes_training(two_nodes: TwoNodeCluster) -> TwoNodeCluster:
    """`two_nodes`, for a test that starts a Ray Train run on them (marks it `train_run`)."""
    return two_nodes


# --------------------------------------------------------------------------- counting runs
# Ray Train V2 starts one `TrainController` actor per run (a resumed job is a new run), and Tune
# one trainable actor per trial (`ImplicitFunc` for a function trainable, a Train job's too).
# Dead actors stay in the GCS's table, so counting them before and after a test tells what it
# started, whether in this process or in a driver it spawned (`ray job submit`, `retrieval tune`).
RUN_ACTORS = {"TrainController": "Ray Train runs", "ImplicitFunc": "Tune trials"}


class RunCounter:
    def __init__(self) -> None:
        self.live: dict[str, Counter[str]] = {}  # dashboard URL -> its counts when last read
        self.gone: Counter[str] = Counter()  # the final counts of clusters already stopped
        self.by_test: dict[str, Counter[str]] = {}
        self.unreadable = False

    def watch(self, dashboard_url: str) -> None:
        self.live[dashboard_url] = Counter()

    def forget(self, dashboard_url: str) -> None:
        """Keep a cluster's final counts before it stops."""
        if dashboard_url not in self.live:
            return
        final = self._read(dashboard_url)
        last = self.live.pop(dashboard_url)
        self.gone += last if final is None else final

    def known(self) -> Counter[str]:
        """The counts as last read (nothing starts a run between two tests)."""
        return sum(self.live.values(), Counter(self.gone))

    def read(self) -> Counter[str]:
        for url in self.live:
            counts = self._read(url)
            if counts is not None:
                self.live[url] = counts
        return self.known()

    def _read(self, dashboard_url: str) -> Counter[str] | None:
        try:
            reply = requests.get(f"{dashboard_url}/api/v0/actors", params={"limit": 10000}, timeout=30)
            reply.raise_for_status()
            actors = reply.json()["data"]["result"]["result"]
        except (requests.RequestException, KeyError, ValueError):
            self.unreadable = True
            return None
        return Counter(actor["class_name"] for actor in actors if actor.get("class_name") in RUN_ACTORS)


RUNS = RunCounter()
_CLUSTER_FIXTURES = ("ray_cluster", "two_node_cluster")
_BEFORE = pytest.StashKey[Counter[str]]()


def _on_a_cluster(item: pytest.Item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in _CLUSTER_FIXTURES)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    # Before the test's fixtures: a module-scoped run fixture starts its runs in the first test's setup.
    if _on_a_cluster(item):
        item.stash[_BEFORE] = RUNS.known()
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    yield
    if _BEFORE not in item.stash:
        return
    started = RUNS.read() - item.stash[_BEFORE]
    if not started:
        return
    RUNS.by_test[item.nodeid] = started
    if item.get_closest_marker("train_run") is None:
        raise pytest.fail.Exception(
            f"{item.nodeid} started {_describe(started)} but is not marked `train_run`: ask for the "
            "`ray_train` fixture (or a run fixture built on it) instead of `ray_cluster`, so that "
            "`make test-fast` leaves it out (tests/conftest.py: FIXTURE_MARKS)"
        )


def _describe(counts: Counter[str]) -> str:
    return ", ".join(f"{counts[name]} {label}" for name, label in RUN_ACTORS.items() if counts[name]) or "nothing"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RUNS.by_test:
        return
    terminalreporter.section("Ray Train runs and Tune trials started")
    for nodeid, counts in RUNS.by_test.items():
        terminalreporter.write_line(f"{_describe(counts)}: {nodeid}")
    totals = sum(RUNS.by_test.values(), Counter())
    unread = " (the actor table could not always be read: counts may be short)" if RUNS.unreadable else ""
    terminalreporter.write_line(f"total: {_describe(totals)}{unread}")
