"""The kustomize tree in k8s/: renders, validates strictly against the KubeRay CRDs and the
Kubernetes schemas, and agrees with the rest of the repository (job specs, Serve config, routes).

Offline and Ray-free: `kubectl kustomize` renders, jsonschema checks the CRDs' openAPIV3Schema
(unknown fields rejected), kubernetes-validate checks the built-in kinds in strict mode.
The CRDs are read from ../shared/k8s-schemas/kuberay (or $RETRIEVAL_K8S_SCHEMAS), never copied here.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from retrieval.config import load_job_spec
from retrieval.errors import ConfigError
from retrieval.serving.metrics import METRICS, RAY_EXPORT_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[3]
K8S = REPO_ROOT / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/gpu", "overlays/monitoring")
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
# Kinds of the Prometheus operator (k8s/components/monitoring): no CRD offline, see MONITORING_SCHEMAS.
MONITORING_KINDS = ("PodMonitor", "PrometheusRule")
# The Kubernetes version the built-in objects are checked against (kubectl 1.32 renders them).
KUBERNETES_VERSION = "1.32.0"


def _schemas_dir() -> Path:
    configured = os.environ.get("RETRIEVAL_K8S_SCHEMAS")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "k8s-schemas" / "kuberay"


requires_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
requires_crds = pytest.mark.skipif(
    not (_schemas_dir() / "ray.io_rayclusters.yaml").is_file(),
    reason=f"KubeRay CRDs not found in {_schemas_dir()} (set RETRIEVAL_K8S_SCHEMAS)",
)


@cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed:\n{result.stderr}")
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def _of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]


def _strict(node: Any) -> Any:
    """A copy of an openAPIV3 schema in which unknown fields are errors and int-or-string is explicit."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: _strict(value) for key, value in node.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return schema


@cache
def _crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    # The CRDs are 1-1.4 MB each: libyaml's loader reads them ~10x faster than the pure-Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((_schemas_dir() / f"ray.io_{KUBERAY_KINDS[kind]}.yaml").read_text(), Loader=loader)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema = _strict(served["schema"]["openAPIV3Schema"])
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"the {kind} CRD has no version {version}")


def _crd_errors(item: dict[str, Any]) -> list[str]:
    version = item["apiVersion"].split("/", 1)[1]
    validator = _crd_validator(item["kind"], version)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(item)
    ]


def _worker_groups(item: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = {"RayCluster": lambda: item["spec"], "RayJob": lambda: item["spec"]["rayClusterSpec"]}.get(
        item["kind"], lambda: item["spec"]["rayClusterConfig"]
    )()
    return list(cluster["workerGroupSpecs"])


def _containers(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in _worker_groups(item):
        yield from group["template"]["spec"]["containers"]


@cache
def _render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_serve_config", K8S / "render_serve_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- rendering


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_full_deployment(overlay: str) -> None:
    objects = _render(overlay)
    kinds = sorted(item["kind"] for item in objects)
    assert kinds.count("RayCluster") == 1
    assert kinds.count("RayService") == 1
    assert sorted(item["metadata"]["name"] for item in _of_kind(objects, "RayJob")) == [
        "train-classification",
        "train-deep-metric",
        "train-unsupervised",
    ]
    assert {item["metadata"]["name"] for item in _of_kind(objects, "Deployment")} == {"mlflow"}
    assert {item["metadata"]["name"] for item in _of_kind(objects, "Service")} == {"mlflow", "retrieval-dashboard"}
    monitored = overlay == "overlays/monitoring"
    monitoring = {"ray-dashboard-monitoring", "retrieval-grafana-dashboards"} if monitored else set()
    assert {item["metadata"]["name"] for item in _of_kind(objects, "ConfigMap")} == {"retrieval-config", *monitoring}
    # Monitoring only where asked for: a cluster without the Prometheus operator's CRDs applies the rest.
    assert {item["kind"] for item in objects} & set(MONITORING_KINDS) == (
        set(MONITORING_KINDS) if overlay == "overlays/monitoring" else set()
    )


# --------------------------------------------------------------------------- schema validation


@requires_kubectl
@requires_crds
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_objects_validate_strictly_against_their_crds(overlay: str) -> None:
    checked = 0
    for item in _render(overlay):
        if item["kind"] in KUBERAY_KINDS:
            assert _crd_errors(item) == [], f"{overlay} {item['kind']}/{item['metadata']['name']}"
            checked += 1
    assert checked == 5


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_with_kubernetes_validate_strict(overlay: str) -> None:
    builtins = [item for item in _render(overlay) if item["kind"] not in (*KUBERAY_KINDS, *MONITORING_KINDS)]
    assert builtins
    for item in builtins:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


@requires_kubectl
@requires_crds
@pytest.mark.parametrize(
    ("path", "misspelt"),
    [
        (("spec",), "enableInTreeAutoScaling"),
        (("spec", "workerGroupSpecs", 0), "minReplica"),
        (("spec", "headGroupSpec", "template", "spec", "containers", 0), "imagePullPolicyy"),
        (("spec", "authOptions"), "secret_name"),
    ],
)
def test_a_misspelt_field_fails_crd_validation(path: tuple[str | int, ...], misspelt: str) -> None:
    cluster = copy.deepcopy(_of_kind(_render("base"), "RayCluster")[0])
    target: Any = cluster
    for part in path:
        target = target[part]
    target[misspelt] = True
    errors = _crd_errors(cluster)
    assert len(errors) == 1
    assert f"'{misspelt}' was unexpected" in errors[0]


@requires_kubectl
@requires_crds
def test_a_wrong_type_and_a_bad_enum_fail_crd_validation() -> None:
    service = copy.deepcopy(_of_kind(_render("base"), "RayService")[0])
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    service["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
    errors = _crd_errors(service)
    assert len(errors) == 2
    assert any("'four' is not of type 'integer'" in error for error in errors)
    assert any("'password' is not one of" in error for error in errors)


@requires_kubectl
def test_a_misspelt_field_fails_builtin_validation() -> None:
    deployment = copy.deepcopy(_of_kind(_render("base"), "Deployment")[0])
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="'replica' was unexpected"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_int_or_string_accepts_both_and_nothing_else() -> None:
    validator = jsonschema.Draft7Validator(
        _strict({"type": "object", "properties": {"port": {"x-kubernetes-int-or-string": True}}})
    )
    assert validator.is_valid({"port": 8000})
    assert validator.is_valid({"port": "serve"})
    assert not validator.is_valid({"port": [8000]})
    assert not validator.is_valid({"prot": 8000})


# --------------------------------------------------------------------------- agreement with the repository


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serve_config_is_the_generated_one(overlay: str) -> None:
    script = _render_script()
    expected = script.render(serve_config=REPO_ROOT / "serve" / "digits.yaml", **script.CLUSTER_OVERRIDES)
    assert script.committed(rayservice=K8S / "base" / "rayservice.yaml") == expected
    # Rendered, the placeholder is the ConfigMap's bucket (k8s/components/bucket), and nothing else changed.
    bucket = _bucket(_render(overlay))
    rendered = _of_kind(_render(overlay), "RayService")[0]["spec"]["serveConfigV2"]
    assert rendered == expected.replace(f"s3://{script.BUCKET_PLACEHOLDER}/", f"s3://{bucket}/")


def test_generated_serve_config_keeps_serve_and_overrides_only_cluster_values() -> None:
    script = _render_script()
    local = yaml.safe_load((REPO_ROOT / "serve" / "digits.yaml").read_text())
    cluster = yaml.safe_load(
        script.render(
            serve_config=REPO_ROOT / "serve" / "digits.yaml",
            host="0.0.0.0",
            index="s3://other/indices/digits",
            tracking_uri="http://mlflow.tracking:5000",
        )
    )
    assert cluster["http_options"] == {**local["http_options"], "host": "0.0.0.0"}
    assert cluster["applications"][0]["args"] == {
        **local["applications"][0]["args"],
        "index": "s3://other/indices/digits",
        "tracking_uri": "http://mlflow.tracking:5000",
    }
    assert {key: value for key, value in cluster["applications"][0].items() if key != "args"} == {
        key: value for key, value in local["applications"][0].items() if key != "args"
    }


def test_render_refuses_args_that_are_not_a_serving_spec(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO_ROOT / "serve" / "digits.yaml").read_text())
    config["applications"][0]["args"]["shard_replica"] = 2
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="shard_replica"):
        _render_script().render(serve_config=path, host="0.0.0.0", index="s3://b/i", tracking_uri="http://m:5000")


def test_render_gives_any_config_quiet_serve_logging_and_keeps_explicit_choices(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO_ROOT / "serve" / "digits.yaml").read_text())
    del config["logging_config"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    script = _render_script()
    rendered = yaml.safe_load(
        script.render(serve_config=path, host="0.0.0.0", index="s3://b/i", tracking_uri="http://m:5000")
    )
    assert rendered["logging_config"] == {"enable_access_log": False, "log_level": "INFO"}
    config["logging_config"] = {"log_level": "DEBUG"}
    path.write_text(yaml.safe_dump(config))
    rendered = yaml.safe_load(
        script.render(serve_config=path, host="0.0.0.0", index="s3://b/i", tracking_uri="http://m:5000")
    )
    assert rendered["logging_config"] == {"enable_access_log": False, "log_level": "DEBUG"}


def test_render_refuses_a_key_ray_serve_would_ignore(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO_ROOT / "serve" / "digits.yaml").read_text())
    config["applications"][0]["deployments"] = [{"name": "SearchIngress", "num_replica": 2}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"applications\[0\]\.deployments\[0\]\.num_replica: unknown key"):
        _render_script().render(serve_config=path, host="0.0.0.0", index="s3://b/i", tracking_uri="http://m:5000")


def test_write_replaces_only_the_serve_config_block(tmp_path: Path) -> None:
    script = _render_script()
    target = tmp_path / "rayservice.yaml"
    target.write_text((K8S / "base" / "rayservice.yaml").read_text())
    script.write(rayservice=target, text="applications: []\n")
    assert script.committed(rayservice=target) == "applications: []\n"
    original = (K8S / "base" / "rayservice.yaml").read_text().splitlines()
    rewritten = target.read_text().splitlines()
    assert rewritten[0] == original[0]
    assert rewritten[-1] == original[-1]
    assert script.main(["--check", "--rayservice", str(target)]) == 1
    assert script.main(["--check"]) == 0


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjobs_run_a_job_spec_of_the_repository_and_clean_up(overlay: str) -> None:
    for job in _of_kind(_render(overlay), "RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1
        words = shlex.split(spec["entrypoint"])
        assert words[:2] == ["retrieval", "train"]
        assert words[2].startswith("jobs/")
        overrides = [words[position + 1] for position, word in enumerate(words) if word == "--set"]
        assert len(words) == 3 + 2 * len(overrides), spec["entrypoint"]
        loaded = load_job_spec(REPO_ROOT / words[2], overrides)
        assert loaded.tracking.tracking_uri == "http://mlflow:5000"
        assert str(loaded.storage.path).startswith("s3://")
        assert loaded.scaling.use_gpu is (overlay == "overlays/gpu")


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readiness_probe_is_a_route_of_the_serving_app(overlay: str) -> None:
    service = _of_kind(_render(overlay), "RayService")[0]
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    probes = [container["readinessProbe"]["httpGet"] for container in _containers(service)]
    assert probes == [{"path": "/healthz", "port": 8000}]
    # The probe's route exists and is open (a kubelet's probe carries no token).
    from fastapi import FastAPI

    from retrieval.serving.http.auth import Access, route_access
    from retrieval.serving.http.routes import operations_router

    router = operations_router(service=None, api=FastAPI())  # type: ignore[arg-type]  # closures not called here
    (healthz,) = [route for route in router.routes if getattr(route, "path", None) == "/healthz"]
    assert route_access(healthz) is Access.OPEN


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster_autoscales_within_bounds_with_token_auth(overlay: str) -> None:
    cluster = _of_kind(_render(overlay), "RayCluster")[0]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
    for group in _worker_groups(cluster):
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    dashboard = next(
        item for item in _of_kind(_render(overlay), "Service") if item["metadata"]["name"].endswith("-dashboard")
    )
    assert dashboard["spec"]["selector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert dashboard["spec"]["ports"][0]["port"] == 8265


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_the_rendered_output(overlay: str) -> None:
    objects = _render(overlay)
    assert _of_kind(objects, "Secret") == []
    text = yaml.safe_dump_all(objects)
    for variable in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"):
        assert variable not in text


@requires_kubectl
def test_gpu_overlay_requests_gpus_and_dev_overlay_none() -> None:
    gpu = _render("overlays/gpu")
    for item in [*_of_kind(gpu, "RayCluster"), *_of_kind(gpu, "RayJob")]:
        for container in _containers(item):
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
            assert {variable["name"] for variable in container["env"]} >= {"NCCL_SOCKET_IFNAME", "NCCL_DEBUG"}
            assert container["image"].endswith("-gpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(_render("overlays/dev"))


# --------------------------------------------------------------------------- least privilege (issue 16, item 12)

# The image's user: Dockerfile builds FROM rayproject/ray, whose `ray` user is uid 1000, group `users` (100).
RAY_UID = 1000
RAY_GID = 100
S3_SECRETS = {"train": "retrieval-s3-train", "serve": "retrieval-s3-serve", "mlflow": "retrieval-s3-mlflow"}


def _ray_cluster_spec(item: dict[str, Any]) -> dict[str, Any]:
    return {  # type: ignore[no-any-return]
        "RayCluster": lambda: item["spec"],
        "RayJob": lambda: item["spec"]["rayClusterSpec"],
        "RayService": lambda: item["spec"]["rayClusterConfig"],
    }[item["kind"]]()


def _ray_cluster_spec_or_none(item: dict[str, Any], key: str) -> Any:
    return _ray_cluster_spec(item).get(key) if item["kind"] in KUBERAY_KINDS else None


def _pod_templates(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod template the manifests define, named ``Kind/name:group``: Ray heads and worker groups
    (RayCluster, RayJob, RayService), RayJob submitter pods, and the Deployments."""
    templates: list[tuple[str, dict[str, Any]]] = []
    for item in objects:
        name = f"{item['kind']}/{item['metadata']['name']}"
        if item["kind"] in KUBERAY_KINDS:
            cluster = _ray_cluster_spec(item)
            templates.append((f"{name}:head", cluster["headGroupSpec"]["template"]))
            templates += [(f"{name}:{group['groupName']}", group["template"]) for group in cluster["workerGroupSpecs"]]
            if item["kind"] == "RayJob" and "submitterPodTemplate" in item["spec"]:
                templates.append((f"{name}:submitter", item["spec"]["submitterPodTemplate"]))
        elif item["kind"] == "Deployment":
            templates.append((name, item["spec"]["template"]))
    return templates


def _role(where: str) -> str:
    """``serve`` for the RayService's pods, ``mlflow`` for MLflow's, ``train`` for every other Ray pod."""
    if where.startswith("RayService/"):
        return "serve"
    if where == "Deployment/mlflow":
        return "mlflow"
    assert where.startswith(("RayCluster/", "RayJob/")), where
    return "train"


def _referenced_secrets(pod: dict[str, Any]) -> set[str]:
    spec = pod["spec"]
    names = {volume["secret"]["secretName"] for volume in spec.get("volumes", []) if "secret" in volume}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        names |= {source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source}
        names |= {
            variable["valueFrom"]["secretKeyRef"]["name"]
            for variable in container.get("env", [])
            if "secretKeyRef" in variable.get("valueFrom", {})
        }
    return names


def _assert_container_locked_down(where: str, context: dict[str, Any] | None) -> None:
    assert context is not None, f"{where}: no securityContext"
    assert context.get("allowPrivilegeEscalation") is False, where
    assert context.get("capabilities", {}).get("drop") == ["ALL"], where
    assert not context.get("capabilities", {}).get("add"), where
    assert not context.get("privileged", False), where
    assert context.get("readOnlyRootFilesystem") is True, where
    assert context.get("runAsUser", RAY_UID) != 0 and context.get("runAsNonRoot", True) is True, where


def _writable_mounts(pod_spec: dict[str, Any], mounts: list[dict[str, Any]]) -> dict[str, str]:
    """mountPath -> kind of volume ("emptyDir", "persistentVolumeClaim", ...) for the writable mounts."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    writable = {}
    for mount in mounts:
        assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
        if not mount.get("readOnly"):
            writable[mount["mountPath"]] = next(key for key in volumes[mount["name"]] if key != "name")
    return writable


def test_the_image_user_is_the_uid_the_manifests_run_as() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:" in dockerfile  # its `ray` user: uid 1000, primary group users (100)
    assert "--chown=ray:users" in dockerfile


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_without_privileges_on_a_read_only_root(overlay: str) -> None:
    templates = _pod_templates(_render(overlay))
    assert len(templates) == 2 + 3 * 2 + 2 + 1  # RayCluster, 3 RayJobs, RayService (head + workers), MLflow
    for where, template in templates:
        pod = template["spec"]
        context = pod.get("securityContext") or {}
        assert context.get("runAsNonRoot") is True, where
        assert context.get("runAsUser") == RAY_UID, where
        assert context.get("runAsGroup") == RAY_GID, where
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            _assert_container_locked_down(f"{where}/{container['name']}", container.get("securityContext"))
            writable = _writable_mounts(pod, container.get("volumeMounts", []))
            # Where a read-only root leaves the process room to write: Ray's /tmp/ray and Python's
            # tempfile (and MLflow's staging) in /tmp, model weights and index shards in ~/.cache.
            assert writable.get("/tmp") == "emptyDir", f"{where}/{container['name']}: {writable}"
            if not where.startswith("Deployment/"):
                assert writable.get("/home/ray/.cache") == "emptyDir", f"{where}/{container['name']}: {writable}"


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_sidecars_are_locked_down_too(overlay: str) -> None:
    autoscaling = [item for item in _render(overlay) if _ray_cluster_spec_or_none(item, "enableInTreeAutoscaling")]
    assert {item["kind"] for item in autoscaling} == {"RayCluster", "RayService"}
    for item in autoscaling:
        cluster = _ray_cluster_spec(item)
        options = cluster.get("autoscalerOptions") or {}
        where = f"{item['kind']}/{item['metadata']['name']}:autoscaler"
        _assert_container_locked_down(where, options.get("securityContext"))
        # Its mounts join the head pod: /tmp must be one of the head's emptyDirs.
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert _writable_mounts(head, options.get("volumeMounts", [])).get("/tmp") == "emptyDir", where


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjobs_start_no_unhardened_submitter_pod(overlay: str) -> None:
    # K8sJobMode (the default) makes KubeRay start a submitter pod from its own template, without
    # any securityContext; HTTPMode submits from the operator; a submitterPodTemplate of our own is
    # checked with the other pods above.
    for job in _of_kind(_render(overlay), "RayJob"):
        assert job["spec"].get("submissionMode") == "HTTPMode" or "submitterPodTemplate" in job["spec"], job[
            "metadata"
        ]["name"]


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_pods_that_call_the_kubernetes_api_get_a_token(overlay: str) -> None:
    objects = _render(overlay)
    autoscaled = {
        f"{item['kind']}/{item['metadata']['name']}:head"
        for item in objects
        if item["kind"] in KUBERAY_KINDS and _ray_cluster_spec(item).get("enableInTreeAutoscaling")
    }
    for where, template in _pod_templates(objects):
        if where in autoscaled:  # KubeRay's autoscaler sidecar scales the cluster through the API
            continue
        assert template["spec"].get("automountServiceAccountToken") is False, where


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_volume_is_writable_by_its_non_root_user(overlay: str) -> None:
    (deployment,) = _of_kind(_render(overlay), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # fsGroup makes the kubelet give the volume to the pod's group (and set the setgid bit), so the
    # non-root server can create and write the sqlite file and its journal.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"] == RAY_GID
    assert pod["securityContext"].get("fsGroupChangePolicy") == "OnRootMismatch"  # no recursive chown per start
    (store,) = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith("--backend-store-uri=")]
    database = Path(store.removeprefix("sqlite:///"))
    writable = _writable_mounts(pod, container["volumeMounts"])
    assert writable.get(str(database.parent)) == "persistentVolumeClaim", (database, writable)


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_telemetry_is_off(overlay: str) -> None:
    # It would write ~/.config/mlflow (read-only here) and call out of the cluster.
    objects = _render(overlay)
    (config,) = [item for item in _of_kind(objects, "ConfigMap") if item["metadata"]["name"] == "retrieval-config"]
    assert config["data"]["MLFLOW_DISABLE_TELEMETRY"] == "true"


# --------------------------------------------------------------------------- S3 credentials, one per role


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_references_only_its_own_s3_credential(overlay: str) -> None:
    objects = _render(overlay)
    seen: dict[str, set[str]] = {}
    for where, template in _pod_templates(objects):
        seen.setdefault(_role(where), set()).update(_referenced_secrets(template))
    for item in objects:  # the autoscaler sidecars' environment
        if item["kind"] in KUBERAY_KINDS:
            options = _ray_cluster_spec(item).get("autoscalerOptions") or {}
            assert not [source for source in options.get("envFrom", []) if "secretRef" in source]
    # The serving pods get the read-only credential and nothing else; training pods never get it
    # (nor MLflow's), MLflow gets its own.
    assert seen == {role: {S3_SECRETS[role]} for role in ("train", "serve", "mlflow")}
    assert len(set(S3_SECRETS.values())) == 3


def _policy(role: str) -> list[dict[str, Any]]:
    file = {"train": "train-readwrite.json", "serve": "serve-readonly.json", "mlflow": "mlflow-artifacts.json"}[role]
    document = json.loads((K8S / "iam" / file).read_text())
    assert document["Version"] == "2012-10-17"
    assert all(statement["Effect"] == "Allow" for statement in document["Statement"])
    return list(document["Statement"])


def _allows(role: str, action: str, resource: str, *, prefix: str | None = None) -> bool:
    """Whether the role's policy allows ``action`` on ``resource`` (``*`` wildcards, s3:prefix conditions)."""
    for statement in _policy(role):
        if action not in statement["Action"]:
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in statement["Resource"]):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition is None:
            return True
        if prefix is not None and any(fnmatch.fnmatchcase(prefix, pattern) for pattern in condition):
            return True
    return False


def _s3_prefix(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


@requires_kubectl
def test_bucket_policies_match_what_each_role_reads_and_writes() -> None:
    objects = _render("base")
    (config,) = _of_kind(objects, "ConfigMap")
    bucket = config["data"]["RETRIEVAL_BUCKET"]
    arn = f"arn:aws:s3:::{bucket}"
    # Serving: the index the RayService loads (its serveConfigV2) and its versions, read only.
    (service,) = _of_kind(objects, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    index_bucket, index = _s3_prefix(serve_config["applications"][0]["args"]["index"])
    assert index_bucket == bucket
    for key in (f"{index}/CURRENT", f"{index}/v0001/manifest.json", f"{index}/v0001/shard-0.faiss"):
        assert _allows("serve", "s3:GetObject", f"{arn}/{key}"), key
    assert _allows("serve", "s3:ListBucket", arn, prefix=f"{index}/v0001/")
    actions = {action for statement in _policy("serve") for action in statement["Action"]}
    assert actions <= {"s3:GetObject", "s3:ListBucket"}, actions
    assert not _allows("serve", "s3:GetObject", f"{arn}/ray_results/x/checkpoint.pt")
    assert not _allows("serve", "s3:GetObject", f"{arn}/mlflow-artifacts/1/run/model.pt")
    assert not _allows("serve", "s3:ListBucket", arn, prefix="")
    # Training: checkpoints (storage.path) and indices (index.out) of every RayJob, read and write.
    written = set()
    for job in _of_kind(objects, "RayJob"):
        words = shlex.split(job["spec"]["entrypoint"])
        overrides = dict(words[position + 1].split("=", 1) for position, word in enumerate(words) if word == "--set")
        written |= {_s3_prefix(overrides[key]) for key in ("storage.path", "index.out") if key in overrides}
    assert {prefix for _, prefix in written} == {"ray_results", index}
    for written_bucket, prefix in written:
        assert written_bucket == bucket
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
            assert _allows("train", action, f"{arn}/{prefix}/some/object"), (action, prefix)
    assert not _allows("train", "s3:PutObject", f"{arn}/mlflow-artifacts/1/run/model.pt")
    # MLflow: its --artifacts-destination, read and write, and nothing else.
    (deployment,) = _of_kind(objects, "Deployment")
    (destination,) = [
        arg.split("=", 1)[1]
        for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        if arg.startswith("--artifacts-destination=")
    ]
    artifacts_bucket, artifacts = _s3_prefix(destination.replace("$(RETRIEVAL_BUCKET)", bucket))
    assert artifacts_bucket == bucket
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert _allows("mlflow", action, f"{arn}/{artifacts}/1/abc/artifacts/model.pt"), action
    assert _allows("mlflow", "s3:ListBucket", arn, prefix=f"{artifacts}/1/abc/artifacts/")
    assert not _allows("mlflow", "s3:GetObject", f"{arn}/{index}/CURRENT")
    assert not _allows("mlflow", "s3:PutObject", f"{arn}/ray_results/x")


def test_policy_matcher_honours_wildcards_and_prefix_conditions() -> None:
    arn = "arn:aws:s3:::retrieval"
    assert _allows("serve", "s3:GetObject", f"{arn}/indices/digits/CURRENT")
    assert not _allows("serve", "s3:PutObject", f"{arn}/indices/digits/CURRENT")
    assert not _allows("serve", "s3:GetObject", "arn:aws:s3:::other/indices/digits/CURRENT")
    assert _allows("serve", "s3:ListBucket", arn, prefix="indices/digits/")
    assert not _allows("serve", "s3:ListBucket", arn, prefix="ray_results/")
    assert not _allows("serve", "s3:ListBucket", arn)


# --------------------------------------------------------------------------- network policies

NAMESPACE = {"kubernetes.io/metadata.name": "retrieval"}  # where the manifests are applied
OTHER_NAMESPACE = {"kubernetes.io/metadata.name": "elsewhere"}
OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "kuberay-system"}


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector selects everything)."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present, value = key in labels, labels.get(key)
        matched = {
            "In": present and value in values,
            "NotIn": not (present and value in values),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not matched:
            return False
    return True


def _peer_admits(peer: dict[str, Any], source: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not addressed by CIDR here
    namespace_ok = (
        _selects(peer["namespaceSelector"], source["namespace"])
        if "namespaceSelector" in peer
        else source["namespace"] == NAMESPACE
    )
    pod_ok = _selects(peer["podSelector"], source["labels"]) if "podSelector" in peer else True
    return namespace_ok and pod_ok


def _ingress_allowed(policies: list[dict[str, Any]], target: dict[str, str], source: dict[str, Any], port: int) -> bool:
    """NetworkPolicy semantics for a TCP connection to a pod of this namespace: allowed when no policy
    selects the pod for Ingress, or when a rule of one of those that do admits source and port."""
    selecting = [
        policy
        for policy in policies
        if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        and _selects(policy["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(
                item.get("protocol", "TCP") == "TCP" and item["port"] <= port <= item.get("endPort", item["port"])
                for item in ports
            ):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_admits(peer, source) for peer in peers):
                return True
    return False


def _ray_pods(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    """``Kind/name:head|worker`` -> the labels its pods carry once KubeRay has created them: the
    template's own plus KubeRay's (ray.io/cluster is a generated name for RayJobs and RayServices)."""
    pods = {}
    for item in objects:
        if item["kind"] not in KUBERAY_KINDS:
            continue
        cluster = _ray_cluster_spec(item)
        generated = item["metadata"]["name"] + ("" if item["kind"] == "RayCluster" else "-x7k2p")
        for node_type, template in [
            ("head", cluster["headGroupSpec"]["template"]),
            *[("worker", group["template"]) for group in cluster["workerGroupSpecs"]],
        ]:
            labels = dict(template.get("metadata", {}).get("labels", {}))
            labels |= {"ray.io/cluster": generated, "ray.io/node-type": node_type, "ray.io/is-ray-node": "yes"}
            pods[f"{item['kind']}/{item['metadata']['name']}:{node_type}"] = labels
    return pods


def _source(labels: dict[str, str], namespace: dict[str, str] = NAMESPACE) -> dict[str, Any]:
    return {"labels": labels, "namespace": namespace}


RAY_PORTS = (6379, 8265, 10001, 52365, 12345)  # GCS, dashboard, client, dashboard agent, a worker port


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_is_denied_by_default(overlay: str) -> None:
    policies = _of_kind(_render(overlay), "NetworkPolicy")
    default_deny = [
        policy
        for policy in policies
        if policy["spec"]["podSelector"] == {}
        and policy["spec"]["policyTypes"] == ["Ingress"]
        and not policy["spec"].get("ingress")
    ]
    assert len(default_deny) == 1
    # Every other policy opens something specific: a selected set of pods, never every pod.
    assert all(policy["spec"]["podSelector"] for policy in policies if policy not in default_deny)
    # A pod the manifests do not define is reachable from nobody.
    stranger = {"app": "something-else"}
    assert not _ingress_allowed(policies, stranger, _source({"app": "client"}), 8080)


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_nodes_reach_each_other_only_within_their_cluster(overlay: str) -> None:
    objects = _render(overlay)
    policies = _of_kind(objects, "NetworkPolicy")
    pods = _ray_pods(objects)
    assert len(pods) == 10
    clusters = {where.split(":")[0] for where in pods}
    for cluster in clusters:
        head, worker = pods[f"{cluster}:head"], pods[f"{cluster}:worker"]
        for port in RAY_PORTS:
            assert _ingress_allowed(policies, head, _source(worker), port), (cluster, port)
            assert _ingress_allowed(policies, worker, _source(head), port), (cluster, port)
            assert _ingress_allowed(policies, worker, _source(worker), port), (cluster, port)
        for other in clusters - {cluster}:
            for port in (6379, 10001, 52365, 12345):
                assert not _ingress_allowed(policies, head, _source(pods[f"{other}:worker"]), port), (cluster, other)
                assert not _ingress_allowed(policies, worker, _source(pods[f"{other}:head"]), port), (cluster, other)
    # Nothing else in the namespace reaches a Ray node's internal ports.
    for labels in pods.values():
        for port in (6379, 10001, 12345):
            assert not _ingress_allowed(policies, labels, _source({"app": "client"}), port)


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_search_port_is_open_to_the_chosen_clients_and_nothing_else_is(overlay: str) -> None:
    objects = _render(overlay)
    policies = _of_kind(objects, "NetworkPolicy")
    pods = _ray_pods(objects)
    outside = _source({"app.kubernetes.io/name": "ingress-nginx"}, OTHER_NAMESPACE)
    serve_worker = pods["RayService/retrieval-search:worker"]
    # The default of the patchable policy ray-serve-http: any pod of any namespace.
    assert _ingress_allowed(policies, serve_worker, outside, 8000)
    assert _ingress_allowed(policies, serve_worker, _source({"app": "client"}), 8000)
    for port in (6379, 8265, 10001, 52365):
        assert not _ingress_allowed(policies, serve_worker, outside, port)
    # The training clusters' Serve/HTTP ports stay closed.
    for where, labels in pods.items():
        if not where.startswith("RayService/"):
            assert not _ingress_allowed(policies, labels, outside, 8000), where
    # Narrowed by the patch k8s/README.md shows, other namespaces are out.
    narrowed = copy.deepcopy(policies)
    (serve_policy,) = [policy for policy in narrowed if policy["metadata"]["name"] == "ray-serve-http"]
    serve_policy["spec"]["ingress"][0]["from"] = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    assert not _ingress_allowed(narrowed, serve_worker, outside, 8000)
    ingress_controller = _source({}, {"kubernetes.io/metadata.name": "ingress-nginx"})
    assert _ingress_allowed(narrowed, serve_worker, ingress_controller, 8000)


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_port_is_open_to_the_namespace_and_the_operator_only(overlay: str) -> None:
    objects = _render(overlay)
    policies = _of_kind(objects, "NetworkPolicy")
    pods = _ray_pods(objects)
    operator = _source({"app.kubernetes.io/name": "kuberay-operator"}, OPERATOR_NAMESPACE)
    heads = {where: labels for where, labels in pods.items() if where.endswith(":head")}
    assert len(heads) == 5
    for where, head in heads.items():
        assert _ingress_allowed(policies, head, _source({"app": "ray-job-submit"}), 8265), where
        assert _ingress_allowed(policies, head, operator, 8265), where
        assert not _ingress_allowed(policies, head, _source({"app": "ray-job-submit"}, OTHER_NAMESPACE), 8265), where
        assert not _ingress_allowed(policies, head, operator, 6379), where  # the operator needs only the API


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_is_reachable_from_training_and_serving_pods_only(overlay: str) -> None:
    objects = _render(overlay)
    policies = _of_kind(objects, "NetworkPolicy")
    (deployment,) = _of_kind(objects, "Deployment")
    mlflow = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = [item for item in _of_kind(objects, "Service") if item["metadata"]["name"] == "mlflow"]
    assert _selects({"matchLabels": service["spec"]["selector"]}, mlflow)
    for where, labels in _ray_pods(objects).items():
        assert _ingress_allowed(policies, mlflow, _source(labels), 5000), where
        assert not _ingress_allowed(policies, mlflow, _source(labels), 5001), where
    assert not _ingress_allowed(policies, mlflow, _source({"app": "client"}), 5000)
    assert not _ingress_allowed(policies, mlflow, _source({"app.kubernetes.io/component": "training"}), 5000)
    assert not _ingress_allowed(policies, mlflow, _source({}, OTHER_NAMESPACE), 5000)


def test_policy_evaluator_follows_networkpolicy_semantics() -> None:
    def policy(selector: dict[str, Any], ingress: list[dict[str, Any]] | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"podSelector": selector, "policyTypes": ["Ingress"]}
        if ingress is not None:
            spec["ingress"] = ingress
        return {"spec": spec}

    target = {"app": "db"}
    client = _source({"app": "api"})
    assert _ingress_allowed([], target, client, 5432)  # not isolated
    deny = policy({}, None)
    assert not _ingress_allowed([deny], target, client, 5432)
    allow_api = policy({"matchLabels": target}, [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}])
    assert _ingress_allowed([deny, allow_api], target, client, 5432)
    assert not _ingress_allowed([deny, allow_api], target, _source({"app": "api"}, OTHER_NAMESPACE), 5432)
    with_port = policy({"matchLabels": target}, [{"ports": [{"port": 5432}]}])
    assert _ingress_allowed([deny, with_port], target, _source({}, OTHER_NAMESPACE), 5432)
    assert not _ingress_allowed([deny, with_port], target, client, 5433)
    both = policy(
        {"matchLabels": target},
        [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "api"}}}]}],
    )
    assert _ingress_allowed([deny, both], target, _source({"app": "api"}, OTHER_NAMESPACE), 1)
    assert not _ingress_allowed([deny, both], target, _source({"app": "web"}, OTHER_NAMESPACE), 1)
    expression = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}
    assert _selects(expression, {"tier": "b"}) and not _selects(expression, {"tier": "c"})
    assert not _selects(expression, {})


# --------------------------------------------------------------------------- the bucket, defined once

# A bucket name as S3 allows it: a placeholder (RETRIEVAL_BUCKET, $(RETRIEVAL_BUCKET), <bucket>) is none.
_S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/")
BUCKET_COMPONENT = K8S / "components" / "bucket"
# Every s3:// URI the manifests carry: storage.path of the three RayJobs, index.out of one, the served index.
S3_URIS_RENDERED = 5


def _bucket(objects: tuple[dict[str, Any], ...]) -> str:
    (config,) = [item for item in _of_kind(objects, "ConfigMap") if item["metadata"]["name"] == "retrieval-config"]
    return str(config["data"]["RETRIEVAL_BUCKET"])


def _s3_buckets(objects: tuple[dict[str, Any], ...]) -> list[str]:
    """The bucket of every s3:// URI rendered (MLflow's $(RETRIEVAL_BUCKET) is expanded by the kubelet, not here)."""
    text = yaml.safe_dump_all(objects)
    return list(_S3_URI.findall(text))


def _source_files() -> list[Path]:
    """The kustomize sources; k8s/iam holds AWS policy documents (checked against the rendered bucket)."""
    return [
        path
        for path in sorted(K8S.rglob("*"))
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json"} and "iam" not in path.parts
    ]


def test_the_bucket_is_written_once_in_the_sources() -> None:
    definitions = []
    for path in _source_files():
        text = path.read_text()
        definitions += [(path.relative_to(K8S), line.strip()) for line in text.splitlines()
                        if re.match(r"\s*RETRIEVAL_BUCKET:\s*\S", line)]  # fmt: skip
        literal = _S3_URI.findall(text)
        assert not literal, f"{path.relative_to(K8S)} names bucket(s) {literal}: use the RETRIEVAL_BUCKET placeholder"
    assert definitions == [(Path("base/configmap.yaml"), "RETRIEVAL_BUCKET: retrieval")]
    # The script that writes serveConfigV2 writes the placeholder too.
    script = _render_script()
    assert script.CLUSTER_OVERRIDES["index"].startswith(f"s3://{script.BUCKET_PLACEHOLDER}/")


def _index_hint(objects: tuple[dict[str, Any], ...], bucket: str) -> str:
    """Where each s3:// URI's bucket sits when a string is split at "/" (the index the component needs)."""
    hints = []
    for item in objects:
        for field in ("entrypoint", "serveConfigV2"):
            value = item.get("spec", {}).get(field)
            if isinstance(value, str) and "s3://" in value:
                parts = value.split("/")
                found = [index for index, part in enumerate(parts) if index > 1 and parts[index - 2].endswith("s3:")]
                hints.append(f"{item['kind']}/{item['metadata']['name']} {field}: bucket at /-index {found}")
    return "; ".join(hints) + f" (k8s/components/bucket should put {bucket!r} there)"


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_bucket_reaches_every_s3_uri_of_every_overlay(overlay: str) -> None:
    objects = _render(overlay)
    bucket = _bucket(objects)
    found = _s3_buckets(objects)
    assert found == [bucket] * S3_URIS_RENDERED, _index_hint(objects, bucket)
    assert "RETRIEVAL_BUCKET/" not in yaml.safe_dump_all(objects)


@requires_kubectl
def test_an_overlay_sets_another_bucket_in_one_place(tmp_path: Path) -> None:
    """The recipe of k8s/README.md: a component of the overlay's own, listed before k8s/components/bucket."""
    component = tmp_path / "bucket"
    component.mkdir()
    (component / "kustomization.yaml").write_text(
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1alpha1",
            "kind": "Component",
            "patches": [{
                "target": {"kind": "ConfigMap", "name": "retrieval-config"},
                "patch": '[{"op": "replace", "path": "/data/RETRIEVAL_BUCKET", "value": "prod-search-2"}]',
            }],
        })
    )  # fmt: skip
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({
            "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
            "components": ["bucket", os.path.relpath(BUCKET_COMPONENT, tmp_path)],
        })
    )  # fmt: skip
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = tuple(document for document in yaml.safe_load_all(result.stdout) if document)
    assert _bucket(objects) == "prod-search-2"
    assert _s3_buckets(objects) == ["prod-search-2"] * S3_URIS_RENDERED, _index_hint(objects, "prod-search-2")
    # The gpu overlay's own replacement survives: the jobs still train on GPUs.
    for job in _of_kind(objects, "RayJob"):
        assert job["spec"]["entrypoint"].endswith("--set scaling.use_gpu=true")


# --------------------------------------------------------------------------- monitoring (k8s/components/monitoring)

MONITORING = "overlays/monitoring"
# No CRD of the Prometheus operator is available offline: these are SUBSETS, written here, of the
# openAPIV3Schema of monitoring.coreos.com/v1 PodMonitor and PrometheusRule (prometheus-operator), with the
# fields the manifests use or may plausibly use, their types and required keys. Unknown fields are
# rejected (as _strict does for the KubeRay CRDs), so a misspelt field fails here, not in the cluster.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"}, "values": _STRINGS},
        }},
    },
}  # fmt: skip
_RELABEL = {
    "type": "object",
    "properties": {
        "sourceLabels": _STRINGS, "separator": {"type": "string"}, "targetLabel": {"type": "string"},
        "regex": {"type": "string"}, "modulus": {"type": "integer"}, "replacement": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                            "uppercase", "keepequal", "dropequal", "Replace", "Keep", "Drop", "HashMod", "LabelMap",
                            "LabelDrop", "LabelKeep", "Lowercase", "Uppercase", "KeepEqual", "DropEqual"]},
    },
}  # fmt: skip
_METADATA = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRING_MAP,
                   "annotations": _STRING_MAP},
}  # fmt: skip
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "jobLabel": {"type": "string"}, "podTargetLabels": _STRINGS, "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object", "properties": {"any": {"type": "boolean"},
                                                                           "matchNames": _STRINGS}},
                    "sampleLimit": {"type": "integer"}, "targetLimit": {"type": "integer"},
                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"}, "portNumber": {"type": "integer"}, "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": _DURATION,
                            "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"}, "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    }},
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {"type": "object", "properties": {"groups": {"type": "array", "items": {
                "type": "object", "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "labels": _STRING_MAP,
                    "limit": {"type": "integer"}, "query_offset": _DURATION,
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]},
                            "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STRING_MAP,
                            "annotations": _STRING_MAP,
                        },
                    }},
                },
            }}}},
        },
    },
}  # fmt: skip


def _monitoring_errors(item: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_strict(MONITORING_SCHEMAS[item["kind"]]))
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(item)]


@requires_kubectl
def test_podmonitor_and_prometheusrule_validate_against_the_schema_subsets() -> None:
    found = [item for item in _render(MONITORING) if item["kind"] in MONITORING_KINDS]
    assert sorted(item["kind"] for item in found) == sorted(MONITORING_KINDS)
    for item in found:
        assert _monitoring_errors(item) == [], item["kind"]
    monitor = copy.deepcopy(_of_kind(tuple(found), "PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    errors = _monitoring_errors(monitor)
    assert any("'podMetricsEndpoint' was unexpected" in error for error in errors), errors
    rule = copy.deepcopy(_of_kind(tuple(found), "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    assert any("does not match" in error for error in _monitoring_errors(rule))


@requires_kubectl
def test_the_podmonitor_scrapes_every_ray_pod_on_ports_they_declare() -> None:
    objects = _render(MONITORING)
    (monitor,) = _of_kind(objects, "PodMonitor")
    pods = _ray_pods(objects)
    assert len(pods) == 10
    assert all(_selects(monitor["spec"]["selector"], labels) for labels in pods.values())
    mlflow = _of_kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert not _selects(monitor["spec"]["selector"], mlflow)
    ports = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    # `metrics` (8080) is the port KubeRay adds to every Ray container; the head-only ones are ours.
    assert ports == {"metrics", "as-metrics", "dash-metrics"}
    for item in objects:
        if item["kind"] in KUBERAY_KINDS:
            head = _ray_cluster_spec(item)["headGroupSpec"]["template"]["spec"]["containers"][0]
            declared = {port["name"]: port["containerPort"] for port in head["ports"]}
            assert {"as-metrics": 44217, "dash-metrics": 44227}.items() <= declared.items(), item["metadata"]["name"]


@requires_kubectl
def test_prometheus_reaches_the_metrics_ports_of_ray_pods_and_nothing_else() -> None:
    objects = _render(MONITORING)
    policies = _of_kind(objects, "NetworkPolicy")
    prometheus = _source({"app.kubernetes.io/name": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"})
    for where, labels in _ray_pods(objects).items():
        for port in (8080, 44217, 44227):
            assert _ingress_allowed(policies, labels, prometheus, port), (where, port)
        # (8000, Serve's HTTP port, is ray-serve-http's business: open to any pod by default.)
        for port in (6379, 8265, 10001, 52365):
            assert not _ingress_allowed(policies, labels, prometheus, port), (where, port)
        assert not _ingress_allowed(policies, labels, _source({"app": "client"}), 8080), where
    # Without the component nobody outside the Ray cluster reaches the metrics port.
    base = _render("base")
    for where, labels in _ray_pods(base).items():
        assert not _ingress_allowed(_of_kind(base, "NetworkPolicy"), labels, prometheus, 8080), where


@requires_kubectl
def test_every_ray_head_knows_where_prometheus_and_grafana_are() -> None:
    objects = _render(MONITORING)
    (settings,) = [
        item for item in _of_kind(objects, "ConfigMap") if item["metadata"]["name"] == "ray-dashboard-monitoring"
    ]
    assert set(settings["data"]) == {"RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"}
    assert all(value.startswith(("http://", "https://")) for value in settings["data"].values())
    heads = 0
    for item in objects:
        if item["kind"] in KUBERAY_KINDS:
            head = _ray_cluster_spec(item)["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert {"configMapRef": {"name": "ray-dashboard-monitoring"}} in head["envFrom"], item["metadata"]["name"]
            heads += 1
    assert heads == 5
    for overlay in ("base", "overlays/dev", "overlays/gpu"):
        assert "ray-dashboard-monitoring" not in yaml.safe_dump_all(_render(overlay))


def _defined_metrics() -> set[str]:
    """Every sample name the app exports through Ray, parsed from the definitions in retrieval/serving/metrics.py."""
    source = REPO_ROOT / "platform" / "retrieval" / "serving" / "metrics.py"
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MetricSpec" and len(node.args) >= 2:
            name, kind = (ast.literal_eval(argument) for argument in node.args[:2])
            names |= {f"ray_{name}{suffix}" for suffix in suffixes[kind]}
    # The same as the definitions the application records with (parsed, so a rename shows here).
    assert names == {name for spec in METRICS for name in spec.exported_names(prefix=RAY_EXPORT_PREFIX)}
    return names


@cache
def _ray_serve_metrics() -> set[str]:
    """Every sample name of Serve's own metrics in the installed Ray (ray_serve_*), read from its source."""
    import ray.serve

    names = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        for name in re.findall(r"(?:Counter|Gauge|Histogram)\(\s*\"(serve_[a-z_]+)\"", path.read_text()):
            names |= {f"ray_{name}{suffix}" for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    return names


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (every name here starts with ray_; labels and functions do not)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(ray_[a-zA-Z0-9_:]+)\b", without_strings))


def _dashboard() -> dict[str, Any]:
    (maps,) = [item for item in _of_kind(_render(MONITORING), "ConfigMap")
               if item["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]  # fmt: skip
    (text,) = maps["data"].values()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return exprs


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())


@requires_kubectl
def test_the_dashboard_parses_and_queries_only_metrics_the_code_defines() -> None:
    dashboard = _dashboard()
    ours, serve = _defined_metrics(), _ray_serve_metrics()
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names and _balanced(expr), expr
        unknown = {name for name in names if name not in ours and name not in serve}
        assert not unknown, f"{expr}: {sorted(unknown)} is neither a metric of retrieval.serving.metrics nor Serve's"
        used |= names & ours
    # What the dashboard is for: partial answers, shard timeouts, batch sizes, latency by route, swaps, versions.
    for name in ("ray_retrieval_search_replies_total", "ray_retrieval_shard_requests_total",
                 "ray_retrieval_batch_size_bucket", "ray_retrieval_request_seconds_bucket",
                 "ray_retrieval_swaps_total", "ray_retrieval_swap_seconds_bucket", "ray_retrieval_index_info",
                 "ray_retrieval_requests_total", "ray_retrieval_shard_seconds_bucket"):  # fmt: skip
        assert name in used, name
    assert any('outcome="timeout"' in expr for expr in exprs)
    assert any('answer="partial"' in expr for expr in exprs)
    assert any("by (endpoint, le)" in expr for expr in exprs)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    queried = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert all(panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for panel in queried)


@requires_kubectl
def test_the_dashboard_links_to_rays_own_dashboards() -> None:
    import ray.dashboard.modules.metrics.dashboards as ray_dashboards

    folder = Path(ray_dashboards.__file__).parent
    uids = {uid for path in folder.glob("*.py") for uid in re.findall(r'default_uid="([^"]+)"', path.read_text())}
    linked = {link["url"].removeprefix("/d/") for link in _dashboard()["links"]}
    assert {"rayServeDashboard", "rayServeDeploymentDashboard", "rayDefaultDashboard"} <= linked
    assert linked <= uids, linked - uids


def test_a_renamed_metric_is_caught() -> None:
    assert _metric_names('sum(rate(ray_retrieval_swaps_total{outcome="failed"}[5m]))') == {"ray_retrieval_swaps_total"}
    assert "ray_retrieval_swaps_total" in _defined_metrics()
    assert "ray_retrieval_swap_total" not in _defined_metrics() | _ray_serve_metrics()
    assert "ray_serve_deployment_replica_healthy" in _ray_serve_metrics()
    assert not _balanced("sum(rate(ray_retrieval_swaps_total[5m])")


@requires_kubectl
def test_alert_rules_cover_the_failures_and_query_defined_metrics() -> None:
    objects = _render(MONITORING)
    (rule_object,) = _of_kind(objects, "PrometheusRule")
    rules = {rule["alert"]: rule for group in rule_object["spec"]["groups"] for rule in group["rules"]}
    assert set(rules) == {
        "RetrievalHighPartialAnswerRate",
        "RetrievalShardTimeouts",
        "RetrievalHigh5xxRate",
        "RetrievalSwapFailed",
        "RetrievalNoHealthyReplicas",
    }
    ours, serve = _defined_metrics(), _ray_serve_metrics()
    for name, rule in rules.items():
        names = _metric_names(rule["expr"])
        assert names and _balanced(rule["expr"]), name
        assert names <= ours | serve, (name, names - ours - serve)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert 'status=~"5.."' in rules["RetrievalHigh5xxRate"]["expr"]
    assert 'outcome="failed"' in rules["RetrievalSwapFailed"]["expr"]
    # The replica-health rule filters on the Serve application the RayService runs.
    (service,) = _of_kind(objects, "RayService")
    applications = {app["name"] for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]}
    filtered = set(re.findall(r'application="([^"]+)"', rules["RetrievalNoHealthyReplicas"]["expr"]))
    assert filtered and filtered <= applications
