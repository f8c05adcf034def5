"""A Ray Serve config file (``serve/*.yaml``), read and applied the way Ray Serve's own CLI does.

``retrieval serve run CONFIG`` is ``serve run CONFIG`` and ``retrieval serve deploy CONFIG`` is
``serve deploy CONFIG`` (Ray 2.60, ``ray/serve/scripts.py``), with stricter checks before anything
starts:

- our own first: the ``args`` of every application built by `retrieval.serving.app.build_app`
  must be a valid `ServingSpec`;
- the file must be a valid `ServeDeploySchema`, and every key in it a key that schema declares.
  Serve's schemas ignore keys they do not know (so that an older Ray accepts a newer Ray's
  config): there a misspelt ``num_replica`` does nothing, silently; here it is refused by name;
- the cluster-wide options (``http_options``, ``grpc_options``, ``proxy_location``,
  ``controller_options``) that a Serve instance already running on the cluster would ignore
  (Serve only logs a warning) are refused by name.

Then the config goes to Serve as it is: `run_config` starts Serve with the file's cluster-wide
options and hands the whole config to the controller's ``deploy_apps`` (what ``serve run`` does);
`submit_config` PUTs it to the dashboard's REST API (what ``serve deploy`` and KubeRay do). So
``import_path``, ``args``, ``deployments`` overrides, ``runtime_env``, ``route_prefix``, ``name``,
``logging_config``, ``target_capacity``... mean exactly what Serve says they mean. The one addition
to ``serve run``: a top-level ``logging_config`` also configures the controller and the proxies,
as it does on a cluster deployed through the REST API (``serve run`` applies it to the
applications only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ray.serve.schema import HTTPOptionsSchema, ServeDeploySchema, gRPCOptionsSchema

from retrieval.config import ServingSpec, read_yaml_mapping, validate_declared_keys
from retrieval.errors import ConfigError, RetrievalError, first_and_last_line

# The import path of the search application; Serve also accepts the dotted form.
SEARCH_APP_BUILDER = "retrieval.serving.app:build_app"
# What the Serve configs we ship set (serve/digits.yaml, the RayService's serveConfigV2): no
# access-log line per request (it costs CPU on the request path, and in the distributed layout
# every shard call would log one), our application's own INFO lines kept.
QUIET_LOGGING_CONFIG: dict[str, Any] = {"enable_access_log": False, "log_level": "INFO"}
WAIT_INTERVAL_S = 0.5


def read_serve_config(path: str | Path) -> ServeDeploySchema:
    """Read and check a Serve config file before anything is started.

    Raises:
        ConfigError: the file is missing or not YAML; an application of ours has args that are not
            a `ServingSpec`; a key is unknown to Serve's schema or a value invalid (each named by its path).
    """
    return check_serve_config(read_yaml_mapping(path), source=str(path))


def check_serve_config(data: Mapping[str, Any], *, source: str) -> ServeDeploySchema:
    """`read_serve_config`'s checks of a config already read (``source`` names it in errors)."""
    applications = data.get("applications")
    if isinstance(applications, list):
        for position, application in enumerate(applications):
            if isinstance(application, Mapping) and builds_search_app(application.get("import_path")):
                ServingSpec.from_mapping(
                    application.get("args") or {}, source=f"{source} applications[{position}].args"
                )
    return validate_declared_keys(ServeDeploySchema, data, source=source, what="invalid Serve config")


def builds_search_app(import_path: object) -> bool:
    """Whether a Serve ``import_path`` names `retrieval.serving.app.build_app` (``module:attr`` or ``module.attr``)."""
    return isinstance(import_path, str) and import_path.replace(":", ".") == SEARCH_APP_BUILDER.replace(":", ".")


def serve_start_options(config: ServeDeploySchema) -> dict[str, Any]:
    """The keyword arguments of Serve's ``serve_start`` for this config (as Serve's REST handler passes them)."""
    return {
        "http_options": config.http_options.model_dump(),
        "grpc_options": config.grpc_options.model_dump(),
        "proxy_location": config.proxy_location,
        "global_logging_config": config.logging_config,
        "controller_options": config.controller_options,
    }


def options_serve_would_ignore(config: ServeDeploySchema, details: Mapping[str, Any]) -> list[str]:
    """The cluster-wide options of ``config`` that differ from those of the Serve instance ``details`` describes.

    Serve applies ``http_options``, ``grpc_options``, ``proxy_location`` and ``controller_options``
    only when it starts; on a cluster where it already runs, it keeps its own and logs a warning.

    Args:
        config: the config to apply.
        details: Serve's instance details (``get_serve_details()`` of the controller client or of
            the dashboard's REST API); without ``controller_info`` Serve is not running.

    Returns:
        One ``key: running X, config Y`` line per option Serve would ignore; empty if none.
    """
    if not details.get("controller_info"):
        return []
    ignored: list[str] = []
    for section, schema in (("http_options", HTTPOptionsSchema), ("grpc_options", gRPCOptionsSchema)):
        if details.get(section) is None:
            continue
        running = schema.model_validate(details[section]).model_dump()
        wanted = getattr(config, section).model_dump()
        ignored += [
            f"{section}.{key}: running {running[key]!r}, config {value!r}"
            for key, value in wanted.items()
            if running.get(key) != value
        ]
    running_location = _plain(details.get("proxy_location"))
    if running_location is not None and running_location != config.proxy_location.value:
        ignored.append(f"proxy_location: running {running_location!r}, config {config.proxy_location.value!r}")
    if config.controller_options is not None:
        ignored.append("controller_options: they apply only when Serve's controller starts")
    return ignored


def refuse_ignored_options(config: ServeDeploySchema, details: Mapping[str, Any], *, source: str) -> None:
    """Raise `ConfigError` naming every cluster-wide option the running Serve would ignore."""
    ignored = options_serve_would_ignore(config, details)
    if ignored:
        raise ConfigError(
            f"{source}: Serve already runs on this cluster and keeps its own {'; '.join(ignored)} "
            "(shut it down with `serve shutdown` first, or set the running values in the config)"
        )


class ServeClient(Protocol):
    """What `run_config` uses of Serve's controller client (``ray.serve._private.client.ServeControllerClient``)."""

    def get_serve_details(self) -> dict[str, Any]: ...

    def update_global_logging_config(self, logging_config: Any) -> None: ...

    def deploy_apps(self, config: ServeDeploySchema) -> None: ...


def run_config(
    config: ServeDeploySchema,
    *,
    source: str,
    deadline: float,
    start: Callable[..., ServeClient] | None = None,
    running: Callable[[], ServeClient | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Apply ``config`` on the connected Ray cluster as ``serve run CONFIG`` does, and wait until it runs.

    Serve is started with the file's cluster-wide options (``serve_start``, as ``serve run``);
    if it already runs with other ones, nothing is applied and the options are named. The whole
    config then goes to the controller (``deploy_apps``), which builds each application from its
    ``import_path`` and ``args`` in a task with its ``runtime_env`` and applies its ``deployments``
    overrides and ``logging_config``.

    Args:
        config: from `read_serve_config`.
        source: the file, for errors.
        deadline: ``clock()`` time by which every application must be RUNNING.
        start: Serve's ``serve_start`` (a stand-in in tests).
        running: the client of the Serve already running on the cluster, or None (a stand-in in tests).

    Raises:
        ConfigError: Serve already runs with other cluster-wide options.
        RetrievalError: an application failed to deploy, or is not running by ``deadline``.
    """
    if start is None:
        from ray.serve._private.api import serve_start

        start = serve_start
    if running is None:
        from ray.serve.context import _get_global_client

        def running() -> ServeClient | None:
            return _get_global_client(raise_if_no_controller_running=False)

    already = running()
    if already is not None:
        refuse_ignored_options(config, already.get_serve_details(), source=source)
    client = start(**serve_start_options(config))
    if config.logging_config is not None:
        # A Serve that was already running keeps its controller's and proxies' logging otherwise.
        client.update_global_logging_config(config.logging_config)
    client.deploy_apps(config)
    wait_until_running(config, client.get_serve_details, deadline=deadline, clock=clock, sleep=sleep)


class SubmissionClient(Protocol):
    """What `submit_config` uses of Serve's REST client (``ray.dashboard.modules.serve.sdk.ServeSubmissionClient``)."""

    def get_serve_details(self) -> dict[str, Any]: ...

    def deploy_applications(self, config: dict[str, Any]) -> None: ...


def submit_config(
    config: ServeDeploySchema,
    *,
    address: str,
    source: str,
    connect: Callable[[str], SubmissionClient] | None = None,
) -> SubmissionClient:
    """Submit ``config`` to a running cluster's dashboard as ``serve deploy CONFIG`` does.

    Args:
        config: from `read_serve_config`.
        address: the dashboard's HTTP address, e.g. ``http://127.0.0.1:8265``.
        source: the file, for errors.
        connect: makes the REST client for ``address`` (Serve's ``ServeSubmissionClient``; a stand-in in tests).

    Returns:
        The REST client, to wait with (`wait_until_running`).

    Raises:
        ConfigError: Serve already runs there with other cluster-wide options.
        RetrievalError: the dashboard cannot be reached or refuses the config.
    """
    if connect is None:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        connect = ServeSubmissionClient
    try:
        client = connect(address)
        details = client.get_serve_details()
    except (ValueError, ConnectionError, RuntimeError) as error:
        raise RetrievalError(
            f"cannot reach the Ray dashboard at {address}: {first_and_last_line(str(error))}"
        ) from None
    refuse_ignored_options(config, details, source=source)
    try:
        client.deploy_applications(config.model_dump(exclude_unset=True))
    except (ConnectionError, RuntimeError) as error:
        raise RetrievalError(
            f"the Ray dashboard at {address} refused {source}: {first_and_last_line(str(error))}"
        ) from None
    return client


@dataclass(frozen=True)
class ApplicationState:
    """One application's status in Serve's instance details (``RUNNING``, ``DEPLOYING``, ``DEPLOY_FAILED``...)."""

    status: str
    message: str


def application_states(details: Mapping[str, Any]) -> dict[str, ApplicationState]:
    """Each application's status and message, from Serve's instance details."""
    return {
        name: ApplicationState(
            status=str(_plain(application.get("status", ""))), message=str(application.get("message", ""))
        )
        for name, application in (details.get("applications") or {}).items()
    }


def _plain(value: Any) -> Any:
    """An enum's value, anything else as it is: the controller client's details hold Serve's enums
    (``ApplicationStatus.RUNNING``, ``ProxyLocation.EveryNode``) where the REST API's JSON holds strings."""
    return getattr(value, "value", value)


def wait_until_running(
    config: ServeDeploySchema,
    read_details: Callable[[], Mapping[str, Any]],
    *,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll Serve until every application of ``config`` is RUNNING.

    ``deploy_apps`` marks an application DEPLOYING before it returns, so a RUNNING read after it
    is the new config's, not the previous one's.

    Raises:
        RetrievalError: an application's deploy failed (its error, in one line), or one is not
            running by ``deadline`` (its status and message).
    """
    names = [application.name for application in config.applications]
    while True:
        states = application_states(read_details())
        failed = {name: states[name] for name in names if name in states and states[name].status == "DEPLOY_FAILED"}
        if failed:
            raise RetrievalError(
                "; ".join(
                    f"Serve could not deploy application {name!r}: {first_and_last_line(state.message)}"
                    for name, state in failed.items()
                )
            )
        pending = [name for name in names if name not in states or states[name].status != "RUNNING"]
        if not pending:
            return
        if clock() + WAIT_INTERVAL_S > deadline:
            raise RetrievalError(
                "not running in time (raise the time-out on a loaded machine): "
                + "; ".join(_describe_pending(name, states.get(name)) for name in pending)
            )
        sleep(WAIT_INTERVAL_S)


def _describe_pending(name: str, state: ApplicationState | None) -> str:
    if state is None:
        return f"application {name!r} not known to Serve yet"
    detail = first_and_last_line(state.message)
    return f"application {name!r} {state.status}" + (f" ({detail})" if detail else "")


def application_urls(config: ServeDeploySchema) -> list[str]:
    """``name: URL`` of each application reachable over HTTP, for the person who started them."""
    host = config.http_options.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{config.http_options.port}{config.http_options.root_path}"
    return [
        f"{application.name}: {base}{application.route_prefix}"
        for application in config.applications
        if application.route_prefix is not None
    ]
