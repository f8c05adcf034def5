"""`retrieval serve run|deploy CONFIG` hand Ray Serve the whole config, after stricter checks (issue 18).

No Ray here: Serve's start-up function, its controller client and its REST client are stand-ins
that record what they were given. What Serve does with it is Serve's (and the integration test's).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import pytest
import ray
import yaml
from ray.serve.config import ProxyLocation
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from retrieval.cli import main
from retrieval.errors import ConfigError, RetrievalError
from retrieval.serving.serve_config import (
    read_serve_config,
    run_config,
    submit_config,
    wait_until_running,
)

REPO = Path(__file__).resolve().parents[3]

# Everything `serve run CONFIG` passes on: an application of ours and one of someone else's.
CONFIG: dict[str, Any] = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 30, "keep_alive_timeout_s": 5},
    "grpc_options": {"port": 9123},
    "logging_config": {"enable_access_log": False, "log_level": "INFO"},
    "target_capacity": 50,
    "applications": [
        {
            "name": "search",
            "route_prefix": "/search",
            "import_path": "retrieval.serving.app:build_app",
            "args": {"index": "/data/indices/digits", "tracking_uri": None, "ingress_replicas": 1},
            "runtime_env": {"env_vars": {"RETRIEVAL_ADMIN_TOKEN": "a-long-token"}},
            "logging_config": {"enable_access_log": True, "log_level": "DEBUG"},
            "deployments": [
                {"name": "SearchIngress", "num_replicas": 2, "max_ongoing_requests": 7,
                 "ray_actor_options": {"num_cpus": 0.25}},
            ],
        },
        {"name": "other", "route_prefix": "/other", "import_path": "someone.elses:app", "args": {"model": "x"}},
    ],
}  # fmt: skip


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def running_details(
    config: ServeDeploySchema, *, status: str = "RUNNING", message: str = "", enums: bool = False
) -> dict[str, Any]:
    """Serve's instance details with every application of ``config`` in ``status``.

    ``enums``: as the controller client returns them (Serve's enums); else as the REST API's JSON (strings).
    """
    return {
        "controller_info": {"node_id": "n1"},
        "proxy_location": config.proxy_location if enums else config.proxy_location.value,
        "http_options": config.http_options.model_dump(),
        "grpc_options": config.grpc_options.model_dump(),
        "applications": {
            app.name: {"status": ApplicationStatus(status) if enums else status, "message": message}
            for app in config.applications
        },
    }


class FakeController:
    """Serve's controller client: records the config; its details say what `details` returns."""

    def __init__(self, details: Any) -> None:
        self.details = details
        self.deployed: list[ServeDeploySchema] = []
        self.logging: list[Any] = []

    def get_serve_details(self) -> dict[str, Any]:
        return self.details(self) if callable(self.details) else self.details

    def update_global_logging_config(self, logging_config: Any) -> None:
        self.logging.append(logging_config)

    def deploy_apps(self, config: ServeDeploySchema) -> None:
        self.deployed.append(config)


def serve_started_fresh(controller: FakeController) -> Any:
    """Details as Serve reports them: not running before the start, the deployed apps RUNNING after."""

    def details(client: FakeController) -> dict[str, Any]:
        if not client.deployed:
            return {"controller_info": {}, "applications": {}}
        return running_details(client.deployed[-1], enums=True)

    controller.details = details
    return controller


# --------------------------------------------------------------------------- run


def test_serve_run_hands_serve_the_whole_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray.serve._private.api as serve_api
    import ray.serve.context as serve_context
    from ray import serve

    from retrieval import cli

    controller = serve_started_fresh(FakeController(None))
    started: list[dict[str, Any]] = []
    shutdowns: list[int] = []

    def serve_start(**options: Any) -> FakeController:
        started.append(options)
        return controller

    def stop_serving(_: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C while serving

    monkeypatch.setattr(serve_api, "serve_start", serve_start)
    monkeypatch.setattr(serve_context, "_get_global_client", lambda **_: None)  # no Serve before this one
    monkeypatch.setattr(serve, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(cli, "_init_ray", lambda address: None)
    monkeypatch.setattr(cli.time, "sleep", stop_serving)
    path = write(tmp_path, CONFIG)

    assert main(["serve", "run", str(path)]) == 130
    # Serve was started with the file's cluster-wide options...
    (options,) = started
    assert options["http_options"] == {
        "host": "127.0.0.1", "port": 8123, "root_path": "", "request_timeout_s": 30.0, "keep_alive_timeout_s": 5,
        "ssl_keyfile": None, "ssl_certfile": None, "ssl_keyfile_password": None, "ssl_ca_certs": None,
    }  # fmt: skip
    assert options["proxy_location"] == ProxyLocation.HeadOnly
    assert options["grpc_options"]["port"] == 9123
    assert options["global_logging_config"].enable_access_log is False
    assert [config.log_level for config in controller.logging] == ["INFO"]
    # ...and the controller got every application as written: nothing rebuilt, nothing dropped.
    (deployed,) = controller.deployed
    assert deployed.model_dump(exclude_unset=True) == ServeDeploySchema.model_validate(CONFIG).model_dump(
        exclude_unset=True
    )
    search, other = deployed.applications
    assert (search.name, search.route_prefix, search.import_path) == (
        "search",
        "/search",
        "retrieval.serving.app:build_app",
    )
    (override,) = search.deployments
    assert (override.name, override.num_replicas, override.max_ongoing_requests) == ("SearchIngress", 2, 7)
    assert override.ray_actor_options.num_cpus == 0.25
    assert search.runtime_env == {"env_vars": {"RETRIEVAL_ADMIN_TOKEN": "a-long-token"}}
    assert search.logging_config is not None
    assert (search.logging_config.enable_access_log, search.logging_config.log_level) == (True, "DEBUG")
    assert (other.import_path, other.args) == ("someone.elses:app", {"model": "x"})
    assert deployed.target_capacity == 50
    out = capsys.readouterr().out
    assert "serving search: http://127.0.0.1:8123/search" in out and "serving other: http://127.0.0.1:8123/other" in out
    assert shutdowns == [1]  # Ctrl-C shuts Serve down, as `serve run` does


def test_serve_run_refuses_options_a_running_serve_would_ignore() -> None:
    config = ServeDeploySchema.model_validate(CONFIG)
    details = running_details(config)
    details["http_options"] = {**details["http_options"], "port": 8000}
    details["proxy_location"] = "EveryNode"
    controller = FakeController(details)
    with pytest.raises(ConfigError) as raised:
        run_config(config, source="serve.yaml", deadline=60, start=lambda **_: controller, running=lambda: controller)
    message = str(raised.value)
    assert message.startswith("serve.yaml: Serve already runs on this cluster and keeps its own ")
    assert "http_options.port: running 8000, config 8123" in message
    assert "proxy_location: running 'EveryNode', config 'HeadOnly'" in message
    assert "\n" not in message and "request_timeout_s" not in message
    assert controller.deployed == []


def test_serve_run_applies_over_a_running_serve_with_the_same_options() -> None:
    config = ServeDeploySchema.model_validate(CONFIG)
    controller = FakeController(running_details(config, enums=True))
    run_config(config, source="serve.yaml", deadline=60, start=lambda **_: controller, running=lambda: controller)
    assert controller.deployed == [config]


def test_serve_run_starting_serve_with_controller_options_applies_them() -> None:
    """Only a Serve that ran before the start keeps its own options: a fresh one takes the file's."""
    config = ServeDeploySchema.model_validate(
        {**CONFIG, "controller_options": {"runtime_env": {"env_vars": {"SERVE_FLAG": "1"}}}}
    )
    controller = serve_started_fresh(FakeController(None))
    started: list[dict[str, Any]] = []

    def start(**options: Any) -> FakeController:
        started.append(options)
        return controller

    run_config(config, source="serve.yaml", deadline=60, start=start, running=lambda: None)
    assert started[0]["controller_options"] == config.controller_options
    assert controller.deployed == [config]
    with pytest.raises(ConfigError, match="controller_options: they apply only when Serve's controller starts"):
        run_config(config, source="serve.yaml", deadline=60, start=start, running=lambda: controller)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_failed_deploy_is_one_line_with_serves_reason() -> None:
    config = ServeDeploySchema.model_validate(CONFIG)
    reads = iter(
        [
            running_details(config, status="DEPLOYING"),
            running_details(
                config,
                status="DEPLOY_FAILED",
                message="Deploying app 'search' failed:\nTraceback (most recent call last):\n  File \"x.py\"\n"
                "retrieval.errors.IndexIntegrityError: /data/indices/digits: neither an index root nor a manifest",
            ),
        ]
    )
    clock = _Clock()
    with pytest.raises(RetrievalError) as raised:
        wait_until_running(config, lambda: next(reads), deadline=60, clock=clock, sleep=clock.sleep)
    assert str(raised.value).startswith("Serve could not deploy application 'search': Deploying app 'search' failed:")
    assert str(raised.value).endswith("IndexIntegrityError: /data/indices/digits: neither an index root nor a manifest")
    assert "\n" not in str(raised.value)


def test_an_application_still_deploying_at_the_deadline_is_named() -> None:
    config = ServeDeploySchema.model_validate(CONFIG)
    details = running_details(config)
    details["applications"]["search"] = {"status": "DEPLOYING", "message": "Deployment 'SearchIngress' is starting"}
    clock = _Clock()
    with pytest.raises(RetrievalError, match=r"application 'search' DEPLOYING \(Deployment 'SearchIngress'"):
        wait_until_running(config, lambda: details, deadline=10, clock=clock, sleep=clock.sleep)
    assert 9 <= clock.now <= 10


# --------------------------------------------------------------------------- deploy


class FakeDashboard:
    """Serve's REST client: records what it would PUT to /api/serve/applications/."""

    instances: ClassVar[list[FakeDashboard]] = []

    def __init__(self, address: str) -> None:
        self.address = address
        self.submitted: list[dict[str, Any]] = []
        self.reads = 0
        FakeDashboard.instances.append(self)

    def get_serve_details(self) -> dict[str, Any]:
        self.reads += 1
        if not self.submitted:
            return {"controller_info": {}, "proxies": {}, "applications": {}, "target_capacity": None}
        # The first read after the PUT still finds the applications deploying.
        status = "DEPLOYING" if self.reads == 2 else "RUNNING"
        return running_details(ServeDeploySchema.model_validate(self.submitted[-1]), status=status)

    def deploy_applications(self, config: dict[str, Any]) -> None:
        self.submitted.append(config)


def test_serve_deploy_puts_what_serve_deploy_puts_and_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray.dashboard.modules.serve.sdk as sdk

    FakeDashboard.instances.clear()
    monkeypatch.setattr(sdk, "ServeSubmissionClient", FakeDashboard)
    path = write(tmp_path, CONFIG)
    assert main(["serve", "deploy", str(path), "--address", "http://127.0.0.1:8265", "--wait"]) == 0
    (dashboard,) = FakeDashboard.instances
    assert dashboard.address == "http://127.0.0.1:8265"
    # Ray's `serve deploy` sends ServeDeploySchema.model_validate(file).model_dump(exclude_unset=True).
    (payload,) = dashboard.submitted
    assert payload == ServeDeploySchema.model_validate(CONFIG).model_dump(exclude_unset=True)
    search = payload["applications"][0]
    assert search["deployments"] == [
        {"name": "SearchIngress", "num_replicas": 2, "max_ongoing_requests": 7, "ray_actor_options": {"num_cpus": 0.25}}
    ]
    assert search["runtime_env"] == {"env_vars": {"RETRIEVAL_ADMIN_TOKEN": "a-long-token"}}
    assert payload["logging_config"] == {"enable_access_log": False, "log_level": "INFO"}
    assert payload["http_options"]["port"] == 8123
    out = capsys.readouterr().out
    assert f"submitted {path} (search, other) to http://127.0.0.1:8265" in out and "running: search, other" in out
    assert dashboard.reads >= 3  # it waited through DEPLOYING


def test_serve_deploy_names_an_unreachable_dashboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = read_serve_config(write(tmp_path, CONFIG))

    def connect(address: str) -> Any:
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    with pytest.raises(RetrievalError, match=r"cannot reach the Ray dashboard at http://127.0.0.1:1: Failed"):
        submit_config(config, address="http://127.0.0.1:1", source="serve.yaml", connect=connect)


# --------------------------------------------------------------------------- refused before anything starts


def _with(change: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(CONFIG)
    *parents, last = change.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
    return config


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (_with("http_option", {"port": 1}), "http_option: unknown key (did you mean 'http_options'?)"),
        (_with("http_options.prot", 1), "http_options.prot: unknown key (did you mean 'port'?)"),
        (
            _with("applications.0.deployments.0.num_replica", 3),
            "applications[0].deployments[0].num_replica: unknown key (did you mean 'num_replicas'?)",
        ),
        (
            _with("applications.0.deployments.0.ray_actor_options.num_cpu", 1),
            "applications[0].deployments[0].ray_actor_options.num_cpu: unknown key (did you mean 'num_cpus'?)",
        ),
        (_with("applications.1.runtime_envs", {}), "applications[1].runtime_envs: unknown key"),
        (
            _with("logging_config.enable_access_logs", False),
            "logging_config.enable_access_logs: unknown key (did you mean 'enable_access_log'?)",
        ),
        (_with("proxy_location", "Somewhere"), "proxy_location: Input should be 'Disabled', 'HeadOnly' or 'EveryNode'"),
        (
            _with("applications.0.deployments.0.max_ongoing_requests", 0),
            "applications[0].deployments[0].max_ongoing_requests: Input should be greater than 0",
        ),
        (_with("applications.1.import_path", "no_colon_or_dot"), "applications[1].import_path"),
        # Ours first: a bad ServingSpec is reported even when Serve's schema would also object.
        (
            _with("applications.0.args", {"index": "x", "shard_replica": 2, "prot": 1}),
            "applications[0].args: invalid spec:\n  shard_replica: unknown key (did you mean 'shard_replicas'?)",
        ),
    ],
    ids=["top", "http", "deployment", "actor-options", "application", "logging", "proxy", "value", "import", "args"],
)
@pytest.mark.parametrize("command", ["run", "deploy"])
def test_a_bad_config_is_refused_by_key_before_anything_starts(
    command: str,
    config: dict[str, Any],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray.dashboard.modules.serve.sdk as sdk

    from retrieval import cli

    def must_not_start(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("started before the config was checked")

    monkeypatch.setattr(cli, "_init_ray", must_not_start)
    monkeypatch.setattr(sdk, "ServeSubmissionClient", must_not_start)
    path = write(tmp_path, config)
    assert main(["serve", command, str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {path}")
    assert expected in error
    assert not ray.is_initialized()


def test_the_shipped_config_passes_the_strict_checks() -> None:
    config = read_serve_config(REPO / "serve" / "digits.yaml")
    assert config.logging_config is not None
    assert (config.logging_config.enable_access_log, config.logging_config.log_level) == (False, "INFO")
    (application,) = config.applications
    assert application.logging_config is None  # so the global block applies to it


def test_serve_can_call_the_search_app_builder_a_config_names(tmp_path: Path) -> None:
    """Serve calls the builder of ``import_path`` with the args alone and refuses a builder with more parameters.

    `retrieval serve` used to call the builder itself, which hid that Serve (``serve run``, ``serve
    deploy``, a RayService) refused it for its keyword-only options.
    """
    import numpy as np
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from retrieval.index import ModelRef, build_shards
    from retrieval.serving.serve_config import SEARCH_APP_BUILDER

    index = build_shards(
        vectors=np.eye(4, dtype=np.float32), ids=np.arange(4), items=[{} for _ in range(4)], out_root=tmp_path,
        num_shards=2, factory="Flat", model=ModelRef(name="m", version="1", uri="models:/m/1"),
        gallery={"dataset": "synthetic"},
    )  # fmt: skip
    app = call_user_app_builder_with_args_if_necessary(
        import_attr(SEARCH_APP_BUILDER), {"index": str(index), "layout": "local", "ingress_replicas": 3}
    )
    assert app._bound_deployment.name == "SearchIngress"
    assert app._bound_deployment.num_replicas == 3
