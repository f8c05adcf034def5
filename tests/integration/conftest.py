"""One local Ray cluster for the whole test session.

The head runs as `ray start --head --block` in a child process group, with every port
picked free on 127.0.0.1, so parallel test sessions never collide and teardown stops only
this cluster (never a machine-wide `ray stop`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests


@dataclass(frozen=True)
class RayCluster:
    address: str
    dashboard_url: str
    serve_port: int
    temp_dir: Path


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
    port, dashboard_port = free_port(), free_port()
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
        "--metrics-export-port", str(free_port()),
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
        yield RayCluster(address=address, dashboard_url=dashboard_url, serve_port=free_port(), temp_dir=temp_dir)
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        _stop_group(head)


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
