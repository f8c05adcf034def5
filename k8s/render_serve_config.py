"""Generate the RayService's ``serveConfigV2`` from ``serve/digits.yaml`` (one source of truth).

The Serve config in ``serve/`` is what ``serve run`` / ``serve deploy`` use on one machine. On the
cluster a few values must differ, and only those are overridden here (``CLUSTER_OVERRIDES``):

- ``http_options.host``: ``0.0.0.0``, so the Serve proxy in each pod is reachable from the
  Kubernetes Service (``127.0.0.1`` in ``serve/`` keeps the local demo private);
- ``args.index`` of every application: the index root in object storage
  (``s3://RETRIEVAL_BUCKET/indices/digits``, the bucket filled in by kustomize from the ConfigMap
  ``retrieval-config``) instead of the local ``indices/digits``;
- ``args.tracking_uri``: the in-cluster MLflow Service instead of ``sqlite:///mlflow.db``.

Every other key (applications, deployments' resources, ``max_k``, ...) comes from ``serve/``
unchanged, except that a top-level ``logging_config`` gets the quiet defaults for what it leaves
unset (``retrieval.serving.serve_config.QUIET_LOGGING_CONFIG``: no access-log line per request, INFO).
The result is checked as ``retrieval serve run|deploy`` check a file (every key known to Ray Serve's
schema, the args a ``ServingSpec``) so a typo fails here, not in the cluster.

Usage (from the repository root)::

    python k8s/render_serve_config.py            # rewrite serveConfigV2 in k8s/base/rayservice.yaml
    python k8s/render_serve_config.py --check    # exit 1 if the committed one is stale (CI)
    python k8s/render_serve_config.py --stdout --index s3://other-bucket/indices/digits
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from retrieval.errors import ConfigError
from retrieval.serving.serve_config import QUIET_LOGGING_CONFIG, check_serve_config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "serve" / "digits.yaml"
RAYSERVICE = REPO_ROOT / "k8s" / "base" / "rayservice.yaml"

# Stands for the bucket in what this script writes: kustomize fills in RETRIEVAL_BUCKET of the ConfigMap
# retrieval-config (k8s/base/configmap.yaml, the bucket's one definition) at render time (k8s/components/bucket).
BUCKET_PLACEHOLDER = "RETRIEVAL_BUCKET"
# The cluster-specific values; the MLflow URI is the Service of k8s/base/mlflow.yaml.
CLUSTER_OVERRIDES: dict[str, str] = {
    "host": "0.0.0.0",
    "index": f"s3://{BUCKET_PLACEHOLDER}/indices/digits",
    "tracking_uri": "http://mlflow:5000",
}

_BLOCK_KEY = "  serveConfigV2: |"
_BLOCK_INDENT = "    "


def render(*, serve_config: Path, host: str, index: str, tracking_uri: str) -> str:
    """The serveConfigV2 text: ``serve_config`` with the cluster overrides applied.

    Args:
        serve_config: a Ray Serve config file with an ``applications:`` list.
        host: the Serve proxy's bind address on the cluster.
        index: the index root (or manifest) every application serves.
        tracking_uri: the MLflow tracking URI every application resolves model versions with.

    Returns:
        YAML text, deterministic (keys in the order of ``serve_config``), ending in a newline.

    Raises:
        ConfigError: the file is missing, has no applications, a key is unknown to Ray Serve's
            schema, or an application's args are not a valid ServingSpec.
    """
    if not serve_config.is_file():
        raise ConfigError(f"Serve config {serve_config} does not exist")
    loaded = yaml.safe_load(serve_config.read_text())
    if not isinstance(loaded, dict) or not loaded.get("applications"):
        raise ConfigError(f"{serve_config}: expected a mapping with a non-empty `applications:` list")
    config: dict[str, Any] = copy.deepcopy(loaded)
    http_options = dict(config.get("http_options") or {})
    http_options["host"] = host
    config["http_options"] = http_options
    config["logging_config"] = {**QUIET_LOGGING_CONFIG, **(config.get("logging_config") or {})}
    for application in config["applications"]:
        args = dict(application.get("args") or {})
        args["index"] = index
        args["tracking_uri"] = tracking_uri
        application["args"] = args
    check_serve_config(config, source=f"{serve_config} (rendered for the cluster)")
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def committed(*, rayservice: Path) -> str:
    """The serveConfigV2 text currently in ``rayservice`` (the parsed YAML string)."""
    document = yaml.safe_load(rayservice.read_text())
    try:
        return str(document["spec"]["serveConfigV2"])
    except (KeyError, TypeError) as error:
        raise ConfigError(f"{rayservice}: no spec.serveConfigV2") from error


def write(*, rayservice: Path, text: str) -> None:
    """Replace the literal block after ``serveConfigV2: |`` in ``rayservice`` with ``text``.

    The rest of the file (comments included) is kept byte for byte.
    """
    lines = rayservice.read_text().splitlines(keepends=True)
    try:
        start = next(number for number, line in enumerate(lines) if line.rstrip("\n") == _BLOCK_KEY)
    except StopIteration as error:
        raise ConfigError(f"{rayservice}: no line {_BLOCK_KEY!r} to put the Serve config under") from error
    end = start + 1
    while end < len(lines) and (lines[end].startswith(_BLOCK_INDENT) or not lines[end].strip()):
        end += 1
    block = [f"{_BLOCK_INDENT}{line}\n" if line else "\n" for line in text.splitlines()]
    rayservice.write_text("".join([*lines[: start + 1], *block, *lines[end:]]))


def main(argv: list[str] | None = None) -> int:
    """Command line: rewrite, check or print the generated serveConfigV2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--rayservice", type=Path, default=RAYSERVICE)
    parser.add_argument("--host", default=CLUSTER_OVERRIDES["host"])
    parser.add_argument("--index", default=CLUSTER_OVERRIDES["index"])
    parser.add_argument("--tracking-uri", default=CLUSTER_OVERRIDES["tracking_uri"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed serveConfigV2 is stale")
    mode.add_argument("--stdout", action="store_true", help="print instead of writing")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render(
        serve_config=options.serve_config, host=options.host, index=options.index, tracking_uri=options.tracking_uri
    )
    if options.stdout:
        sys.stdout.write(text)
        return 0
    if options.check:
        if committed(rayservice=options.rayservice) != text:
            logger.error(
                "%s: serveConfigV2 differs from %s; rerun k8s/render_serve_config.py",
                options.rayservice,
                options.serve_config,
            )
            return 1
        logger.info("%s: serveConfigV2 is up to date", options.rayservice)
        return 0
    write(rayservice=options.rayservice, text=text)
    logger.info("wrote serveConfigV2 of %s into %s", options.serve_config, options.rayservice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
