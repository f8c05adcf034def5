"""The kustomize tree in k8s/: renders, validates strictly against the KubeRay CRDs and the
Kubernetes schemas, and agrees with the rest of the repository (job specs, Serve config, routes).

Offline and Ray-free: `kubectl kustomize` renders, jsonschema checks the CRDs' openAPIV3Schema
(unknown fields rejected), kubernetes-validate checks the built-in kinds in strict mode.
The CRDs are read from ../shared/k8s-schemas/kuberay (or $RETRIEVAL_K8S_SCHEMAS), never copied here.
"""

from __future__ import annotations

import copy
import importlib.util
import os
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

REPO_ROOT = Path(__file__).resolve().parents[3]
K8S = REPO_ROOT / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/gpu")
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
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
    assert {item["metadata"]["name"] for item in _of_kind(objects, "ConfigMap")} == {"retrieval-config"}


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
    builtins = [item for item in _render(overlay) if item["kind"] not in KUBERAY_KINDS]
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
    assert _of_kind(_render(overlay), "RayService")[0]["spec"]["serveConfigV2"] == expected


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
