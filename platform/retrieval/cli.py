"""The `retrieval` command: train, tune, extract, index (build, list, show, prune), models, evaluate, serve, demo.

Every subcommand validates its inputs at the edge; a bad spec, path, model URI or
argument is reported as one clear line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError, first_and_last_line, redact_credentials
from retrieval.logs import LOG_FORMATS, configure_logging

logger = logging.getLogger("retrieval")

DEFAULT_DEMO_SPEC = "jobs/digits_deep_metric.yaml"
EXIT_CODES = """exit status:
  0    success
  2    bad input or a refused operation (the one-line message on stderr says which and why)
  130  interrupted (Ctrl-C)
  any other: an unexpected failure (a traceback follows; please report it)"""


INDEX_STATES = """version states:
  complete    a valid manifest and every shard file it names
  building    no manifest yet and a file written within --building-grace (an upload or build in progress);
              never pruned, nor is a local build's hidden .building-* staging folder
  incomplete  no manifest and nothing written for longer (an interrupted upload or prune); pruned
  damaged     a manifest that is invalid, names another version, or names missing files; pruned"""


def _add_index_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS)"
    )
    parser.add_argument(
        "--building-grace",
        type=float,
        default=60.0,
        metavar="MINUTES",
        help="a version without a manifest whose newest file is younger than this is being written (default 60)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for --serve-url's reply (default 30)"
    )


def _version_line() -> str:
    """``retrieval-platform X`` and the versions of the stack it runs on (read without importing them)."""
    from importlib import metadata

    from retrieval import __version__

    parts = []
    for package in ("ray", "torch", "torchvision", "faiss-cpu", "mlflow"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} missing")
    return f"retrieval-platform {__version__} ({', '.join(parts)}; python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_default_subcommand(list(sys.argv[1:] if argv is None else argv)))
    configure_logging(verbose=args.verbose, log_format=args.log_format)
    # A fresh local ray.init() turns on token authentication; a local demo needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        result: int = args.handler(args)
        return result
    except RetrievalError as error:
        print(f"error: {redact_credentials(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version_line())
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging for the platform (libraries stay at WARNING)"
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="log lines as text (default) or JSON objects"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a job spec with Ray Train, evaluate, register in MLflow")
    train.add_argument("spec", help="job spec YAML (jobs/...)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. train.epochs=3",
    )
    train.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or a new local cluster)"
    )
    train.add_argument("--summary", type=Path, default=None, help="write the outcome as JSON here")
    train.add_argument(
        "--system-metrics",
        action="store_true",
        help="log MLflow system metrics (CPU, memory, disk, network, GPU) to the run: tracking.system_metrics=true",
    )
    train.set_defaults(handler=_train)

    tune = commands.add_parser("tune", help="sweep a method's loss weights with Ray Tune (tune_spaces/...yaml)")
    tune.add_argument("space", help="sweep file (tune_spaces/...)")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep-file key, e.g. num_samples=8 or overrides.train.epochs=2",
    )
    tune.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or a new local cluster)"
    )
    tune.add_argument("--summary", type=Path, default=None, help="write the outcome as JSON here")
    tune.add_argument(
        "--system-metrics",
        action="store_true",
        help="log MLflow system metrics to every trial's run (the trials' tracking.system_metrics=true)",
    )
    tune.set_defaults(handler=_tune)

    extract = commands.add_parser(
        "extract", help="embed a gallery with Ray workers into a float32/float16 .npy + manifest (bounded memory)"
    )
    extract.add_argument(
        "--model", required=True, help="models:/name/version, models:/name@alias, or a model package folder"
    )
    extract.add_argument("--out", required=True, help="output folder (features.npy + features.json)")
    extract.add_argument("--workers", type=int, default=1, help="Ray tasks, each over a contiguous range")
    extract.add_argument("--split", choices=["test", "train", "all"], default="test", help="which split to embed")
    extract.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="dtype of the stored features"
    )
    extract.add_argument("--batch-size", type=int, default=256, help="images embedded per batch (default 256)")
    extract.add_argument("--gpu", action="store_true", help="one GPU per task")
    extract.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    extract.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or local)")
    extract.set_defaults(handler=_extract)

    index = commands.add_parser(
        "index",
        help="`index build`: write a sharded Faiss index from a model; `index list|show|prune`: a root's versions",
        description=(
            "Build an index version (`retrieval index build --model ...`; the original form `retrieval index "
            "--model ...` still means the same), or look after an index root, a local folder or "
            "s3://bucket/prefix: list its versions, show one's manifest, prune old ones."
        ),
        epilog=INDEX_STATES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser(
        "build", help="embed a gallery with a registered model and write a sharded Faiss index (makes it CURRENT)"
    )
    build.add_argument(
        "--model", required=True, help="models:/name/version, models:/name@alias, or a model package folder"
    )
    build.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    build.add_argument(
        "--out",
        default=None,
        help="index root, a folder or s3://bucket/prefix (default: the model's job spec index.out)",
    )
    build.add_argument("--shards", type=int, default=None, help="number of shards (default: from the job spec)")
    build.add_argument("--factory", default=None, help="Faiss factory string (default: from the job spec)")
    build.add_argument("--gallery", choices=["test", "train", "all"], default=None, help="which split to index")
    build.add_argument(
        "--modality",
        choices=["image", "text"],
        default=None,
        help="cross-modal models: index the retrieval set's images or its texts (default: the job spec's)",
    )
    build.set_defaults(handler=_index)

    index_list = index_commands.add_parser(
        "list",
        help="every version of an index root: state, size, vectors, shards, model, creation time, CURRENT, served",
        epilog=INDEX_STATES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index_list.add_argument("root", metavar="ROOT", help="index root: a local folder or s3://bucket/prefix")
    _add_index_store_options(index_list)
    index_list.add_argument(
        "--serve-url",
        default=None,
        help="a running search app's base URL: mark the versions it serves (every version its replicas hold with "
        "RETRIEVAL_ADMIN_TOKEN set, else the active one from its /readyz)",
    )
    index_list.add_argument("--json", action="store_true", help="print the listing as JSON")
    index_list.set_defaults(handler=_index_list)

    index_show = index_commands.add_parser("show", help="the manifest of one index version, in full (JSON)")
    index_show.add_argument(
        "reference",
        metavar="ROOT[/VERSION]",
        help="an index root (its CURRENT version), a version under it (ROOT/VERSION), or a manifest.json",
    )
    index_show.add_argument(
        "--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS)"
    )
    index_show.set_defaults(handler=_index_show)

    prune = index_commands.add_parser(
        "prune",
        help="delete old index versions: never CURRENT, a served version or one being written",
        description=(
            "Delete the versions of an index root that a retention rule lets go: every version except the KEEP "
            "newest complete ones, the one CURRENT names, the ones --serve-url's app holds, ones being written, "
            "and (with --older-than) ones built more recently than DAYS ago. Incomplete or damaged versions "
            "(nothing can load them) are deleted too. A deletion never leaves a version that looks valid: a local "
            "version folder is renamed away in one step, then removed; in S3 its manifest.json goes first. "
            "CURRENT and the served versions are checked again just before each deletion."
        ),
        epilog=INDEX_STATES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument("root", metavar="ROOT", help="index root: a local folder or s3://bucket/prefix")
    prune.add_argument(
        "--keep", type=int, required=True, metavar="N", help="how many of the newest complete versions to keep (>= 0)"
    )
    prune.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="delete only versions built more than DAYS days ago (fractions allowed, e.g. 0.5)",
    )
    prune.add_argument("--dry-run", action="store_true", help="print what would be deleted and why; delete nothing")
    prune.add_argument(
        "--serve-url",
        default=None,
        help="a running search app's base URL: every version its replicas hold is kept (needs RETRIEVAL_ADMIN_TOKEN; "
        "if the app cannot be asked, nothing is deleted)",
    )
    _add_index_store_options(prune)
    prune.set_defaults(handler=_index_prune)

    models = commands.add_parser("models", help="the model registry: registered models, versions, aliases, scores")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_list = models_commands.add_parser(
        "list", help="every registered model's versions with aliases, scores, index versions and run links"
    )
    models_list.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    models_list.add_argument("--name", default=None, help="only this registered model")
    models_list.add_argument("--json", action="store_true", help="print the versions as JSON (every score and tag)")
    models_list.set_defaults(handler=_models_list)
    models_show = models_commands.add_parser(
        "show", help="one model version in full: aliases, tags, scores, run metrics and params, digest, artifacts"
    )
    models_show.add_argument(
        "reference",
        metavar="NAME[/VERSION|@ALIAS]",
        help="a registered model's newest version, a version number, or an alias (models:/ prefix optional)",
    )
    models_show.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    models_show.add_argument("--json", action="store_true", help="print the version as JSON")
    models_show.set_defaults(handler=_models_show)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a job's off-the-shelf variants (poolings, whitening, QE) or a registered model on its protocol",
    )
    evaluate.add_argument("spec", nargs="?", default=None, help="job spec YAML for an evaluation-only run")
    evaluate.add_argument(
        "--model", default=None, help="models:/name/version, models:/name@alias, or a model package folder"
    )
    evaluate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a spec key"
    )
    evaluate.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the spec's)"
    )
    evaluate.add_argument("--no-track", action="store_true", help="print the table only; log nothing to MLflow")
    evaluate.add_argument("--summary", type=Path, default=None, help="write the table as JSON here")
    evaluate.set_defaults(handler=_evaluate)

    search = commands.add_parser("search", help="query a running search service (retrieval.client)")
    search.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=Path, help="an image file: its nearest gallery items")
    query.add_argument("--id", type=int, help="a gallery item's id: its neighbours (itself excluded)")
    query.add_argument("--text", help="a sentence (cross-modal models)")
    query.add_argument("--vector", help="a query vector as JSON, e.g. [0.1, 0.2, ...]")
    search.add_argument("-k", "--k", type=int, default=None, help="how many results (default: the service's)")
    search.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="an index setting, e.g. nprobe=16"
    )
    search.add_argument(
        "--token-env",
        default="RETRIEVAL_QUERY_TOKEN",
        help="environment variable holding the query token, if the service needs one (default RETRIEVAL_QUERY_TOKEN)",
    )
    search.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    search.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    search.set_defaults(handler=_search)

    serve = commands.add_parser(
        "serve",
        help="`serve run|deploy CONFIG`: a Serve config, as Ray's `serve run|deploy`; `serve swap|status`: a live app",
    )
    serve_commands = serve.add_subparsers(dest="serve_command", required=True)
    serve_run = serve_commands.add_parser(
        "run",
        help="run a Serve config file (serve/...yaml) until Ctrl-C, as Ray's `serve run CONFIG` (checked first)",
    )
    serve_run.add_argument("config", help="Ray Serve config file")
    serve_run.add_argument("--address", default=None, help="Ray cluster address (default: a new local cluster)")
    serve_run.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds for Serve to start and every application to be RUNNING; start-up failures of Serve's proxy "
        "or controller are retried within it (default 300)",
    )
    serve_run.set_defaults(handler=_serve)
    serve_deploy = serve_commands.add_parser(
        "deploy",
        help="submit a Serve config file to a running cluster's dashboard, as Ray's `serve deploy CONFIG`",
    )
    serve_deploy.add_argument("config", help="Ray Serve config file")
    serve_deploy.add_argument(
        "--address",
        default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://localhost:8265"),
        help="the Ray dashboard's HTTP address (default $RAY_DASHBOARD_ADDRESS or http://localhost:8265)",
    )
    serve_deploy.add_argument(
        "--wait", action="store_true", help="wait until every application is RUNNING (an error if one fails)"
    )
    serve_deploy.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    serve_deploy.set_defaults(handler=_serve_deploy)
    serve_swap = serve_commands.add_parser(
        "swap", help="rolling swap of a running app's index (token from RETRIEVAL_ADMIN_TOKEN)"
    )
    serve_swap.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    serve_swap.add_argument(
        "--to", required=True, help="an index version name, or model:N (newest version built by model version N)"
    )
    serve_swap.add_argument("--index-root", default=None, help="the served index root (local), for --to model:N")
    serve_swap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the swap")
    serve_status = serve_commands.add_parser(
        "status", help="what a running app serves: active index and model, a swap in progress, every replica"
    )
    serve_status.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    serve_status.add_argument("--json", action="store_true", help="print the status as JSON")
    serve_status.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    serve_status.set_defaults(handler=_serve_status)
    serve_swap.set_defaults(handler=_serve_swap)

    demo = commands.add_parser("demo", help="train, register, index, serve and query the bundled digits, end to end")
    demo.add_argument("--spec", default=DEFAULT_DEMO_SPEC, help=f"job spec (default {DEFAULT_DEMO_SPEC})")
    demo.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the demo's job spec, e.g. train.epochs=3",
    )
    demo.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    demo.add_argument(
        "--once", action="store_true", help="stop after the sample queries instead of serving until Ctrl-C"
    )
    demo.add_argument("--summary", type=Path, default=None, help="write the demo's JSON summary here")
    demo.add_argument("--address", default=None, help="Ray cluster address (default: a new local cluster)")
    demo.set_defaults(handler=_demo)
    return parser


# --------------------------------------------------------------------------- subcommands


def _train(args: argparse.Namespace) -> int:
    from retrieval.config import load_job_spec

    overrides = [*args.overrides, *(["tracking.system_metrics=true"] if args.system_metrics else [])]
    spec = load_job_spec(args.spec, overrides)
    if spec.incremental is not None:
        return _train_incremental(spec, args)
    from retrieval.evaluation.suite import format_results_table
    from retrieval.train import run_training
    from retrieval.train.driver import check_job_inputs

    check_job_inputs(spec)
    _init_ray(args.address)

    outcome = run_training(spec)
    print(format_results_table(outcome.metrics, outcome.baselines, ks=spec.evaluation.recall_ks))
    print(_registration_line(outcome.summary()))
    link = _run_link(spec.tracking.uri(), outcome.run_id)
    print(f"MLflow run: {link}")
    if args.summary:
        _write_json(args.summary, {**outcome.summary(), "mlflow_run_link": link})
    return 0


def _train_incremental(spec: Any, args: argparse.Namespace) -> int:
    from retrieval.data.tasks import build_task_sequence
    from retrieval.train.incremental import run_incremental

    assert spec.incremental is not None
    # Fails fast, before Ray starts, on a task whose data cannot be built.
    build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
    _init_ray(args.address)
    outcome = run_incremental(spec)
    summary = outcome.summary()
    print(format_incremental_summary(summary))
    link = _run_link(spec.tracking.uri(), summary["mlflow_run_id"])
    print(f"MLflow run: {link}")
    if args.summary:
        _write_json(args.summary, {**summary, "mlflow_run_link": link})
    return 0


def format_incremental_summary(summary: Mapping[str, Any]) -> str:
    """The Recall@1 task x task matrix and each task's registered version, as printed text."""
    import numpy as np

    from retrieval.evaluation.forgetting import format_matrix

    matrix = np.array(
        [[np.nan if value is None else value for value in row] for row in summary["recall@1_matrix"]], dtype=float
    )
    lines = [
        f"{summary['job']} ({summary['method']}): recall@1 on each task's test split after each task",
        format_matrix(matrix, task_names=summary["task_names"], metric="recall@1"),
    ]
    for task in summary["tasks"]:
        model = task["model"]
        line = f"after {task['name']}: {model.get('name')} v{model.get('version')} {model.get('aliases')}"
        if task.get("index_version"):
            line += f", index {task['index_version']}"
        if task.get("swap"):
            line += ", swapped" if task["swap"].get("ok") else f", swap failed: {task['swap'].get('error')}"
        if task.get("specialist"):
            student = task["scores"][str(task["task"])].get("recall@1")
            line += f"; new task recall@1: student {student:.4f}, specialist {task['specialist'].get('recall@1'):.4f}"
        lines.append(line)
    return "\n".join(lines)


def _tune(args: argparse.Namespace) -> int:
    from retrieval.config import load_sweep_spec
    from retrieval.train.driver import check_job_inputs

    overrides = sweep_overrides(args.space, args.overrides, system_metrics=args.system_metrics)
    sweep = load_sweep_spec(args.space, overrides)
    check_job_inputs(sweep.base_job)
    _init_ray(args.address)
    from retrieval.tune import run_sweep

    outcome = run_sweep(args.space, overrides=overrides)
    print(outcome.table())
    model = outcome.model
    print(
        f"best trial {outcome.best_trial_id}: {outcome.metric} {outcome.rows_best_metric():.4f}; "
        f"registered {model.name} version {model.version} ({', '.join(model.aliases)}); "
        f"MLflow parent run {outcome.parent_run_id}"
    )
    link = _run_link(sweep.base_job.tracking.uri(), outcome.parent_run_id)
    print(f"MLflow sweep run: {link}")
    if args.summary:
        _write_json(args.summary, {**outcome.summary(), "mlflow_run_link": link})
    return 0


def sweep_overrides(space: str, overrides: Sequence[str], *, system_metrics: bool) -> list[str]:
    """The sweep file's ``--set`` overrides, plus ``tracking.system_metrics`` for every trial with ``system_metrics``.

    A sweep file's ``overrides:`` maps dotted job keys to values; ``--set overrides.tracking...``
    would nest a ``tracking`` mapping there that replaces the job's whole tracking section, so
    the flag adds its dotted key to the file's own overrides (after the user's ``--set``) instead.
    """
    if not system_metrics:
        return list(overrides)
    from retrieval.config import apply_override, read_yaml_mapping

    data = read_yaml_mapping(space)
    for override in overrides:
        apply_override(data, override)
    existing = data.get("overrides") or {}
    if not isinstance(existing, dict):
        raise RetrievalError(f"{space}: 'overrides' must be a mapping of dotted job keys to values")
    merged = {**existing, "tracking.system_metrics": True}
    return [*overrides, f"overrides={json.dumps(merged)}"]


def _extract(args: argparse.Namespace) -> int:
    import tempfile

    from retrieval.methods import save_model_package
    from retrieval.tracking import load_embedder

    if args.workers < 1:
        raise RetrievalError(f"--workers must be at least 1, got {args.workers}")
    package = load_embedder(args.model, tracking_uri=_tracking_uri(args.tracking_uri))
    _init_ray(args.address)
    from retrieval.train.extract import extract_features_distributed

    with tempfile.TemporaryDirectory() as folder:
        # Workers load the model from a package folder; a registered model is written out once.
        local = (
            Path(args.model)
            if Path(args.model).is_dir()
            else save_model_package(Path(folder) / "package", spec=package.spec, state_dict=package.model.state_dict())
        )
        features = extract_features_distributed(
            package_dir=local,
            out_dir=args.out,
            num_workers=args.workers,
            batch_size=args.batch_size,
            dtype=args.dtype,
            split=args.split,
            model=args.model,
            use_gpu=args.gpu,
        )
    manifest = features.manifest
    rates = ", ".join(f"{part.images_per_second:.1f}" for part in features.parts)
    print(
        f"features: {features.path} ({manifest.count} x {manifest.dim} {manifest.dtype}); images/s per worker: {rates}"
    )
    return 0


def _index(args: argparse.Namespace) -> int:
    from retrieval.tracking.indexing import build_index_from_model

    manifest = build_index_from_model(
        args.model,
        tracking_uri=_tracking_uri(args.tracking_uri),
        out=args.out,
        shards=args.shards,
        factory=args.factory,
        gallery=args.gallery,
        modality=args.modality,
    )
    print(f"index manifest: {manifest}")
    return 0


def _index_list(args: argparse.Namespace) -> int:
    from retrieval.index.inventory import list_index, listing_json, open_index_store

    store = open_index_store(args.root, endpoint_url=args.endpoint_url)
    listing = list_index(store, building_grace=_grace(args.building_grace))
    served = _served(args.serve_url, timeout_s=args.timeout, need_every_replica=False) if args.serve_url else None
    held = served.held if served is not None else frozenset()
    if args.json:
        body = listing_json(listing, served=held)
        if served is not None:
            body["served_from"] = {"url": args.serve_url, "active": served.active, "every_replica": served.complete}
        print(json.dumps(body, indent=2))
        return 0
    print(f"index root {listing.location}: CURRENT -> {listing.current or '(none)'}")
    if served is not None:
        scope = "held by its replicas" if served.complete else "active (from /readyz; a swap in progress is not seen)"
        print(f"served by {args.serve_url}: {', '.join(sorted(held))} {scope}")
    rows = []
    for version in listing.versions:
        manifest = version.manifest
        marks = []
        if version.name == listing.current and not version.staging:
            marks.append("CURRENT")
        if version.name in held and not version.staging:
            marks.append("SERVED" if served is None or version.name == served.active else "SERVED (held)")
        if version.problem:
            marks.append(version.problem)
        rows.append(
            [
                version.name,
                version.state,
                version.created.strftime("%Y-%m-%d %H:%M:%S"),
                "-" if manifest is None else str(manifest.num_items),
                "-" if manifest is None else str(len(manifest.shards)),
                str(version.size_bytes),
                "-" if manifest is None else f"{manifest.model.name} v{manifest.model.version}",
                "; ".join(marks),
            ]
        )
    if not rows:
        print("no index versions")
    else:
        print(_columns(["VERSION", "STATE", "CREATED (UTC)", "VECTORS", "SHARDS", "BYTES", "MODEL", ""], rows))
    for leftover in listing.leftovers:
        print(f"leftover of an interrupted prune: {leftover} (the next prune removes it)")
    return 0


def _index_show(args: argparse.Namespace) -> int:
    from retrieval.index.inventory import manifest_json, open_index_reference, read_version_manifest

    store, version = open_index_reference(args.reference, endpoint_url=args.endpoint_url)
    _, text = read_version_manifest(store, version)
    print(manifest_json(text))
    return 0


def _index_prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from retrieval.index.inventory import list_index, open_index_store, plan_prune, prune_index

    if args.keep < 0:
        raise RetrievalError(f"--keep must be 0 or more, got {args.keep}")
    if args.older_than is not None and not args.older_than > 0:
        raise RetrievalError(f"--older-than must be more than 0 days, got {args.older_than:g}")
    store = open_index_store(args.root, endpoint_url=args.endpoint_url)
    served = _served(args.serve_url, timeout_s=args.timeout, need_every_replica=True) if args.serve_url else None
    protected = served.held if served is not None else frozenset()
    reason = f"held by {args.serve_url}" if served is not None else "served"
    listing = list_index(store, building_grace=_grace(args.building_grace))
    decisions = plan_prune(
        listing,
        keep=args.keep,
        older_than=None if args.older_than is None else timedelta(days=args.older_than),
        protected=protected,
        protected_reason=reason,
    )
    doomed = [decision for decision in decisions if decision.delete]
    kept = [decision for decision in decisions if not decision.delete]
    print(f"index root {listing.location}: CURRENT -> {listing.current}")
    for decision in kept:
        print(f"  keep    {decision.version}: {decision.reason}")
    verb = "would delete" if args.dry_run else "delete"
    for decision in doomed:
        print(f"  {verb:<7} {decision.version} ({decision.size_bytes} bytes): {decision.reason}")
    if args.dry_run:
        total = sum(decision.size_bytes for decision in doomed)
        leftovers = f" and {len(listing.leftovers)} leftovers of an interrupted prune" if listing.leftovers else ""
        print(f"dry run: would delete {len(doomed)} versions ({total} bytes){leftovers}; nothing was deleted")
        return 0

    def still_protected() -> frozenset[str]:
        if served is None:
            return frozenset()
        try:
            return _served(args.serve_url, timeout_s=args.timeout, need_every_replica=True).held
        except RetrievalError as error:
            raise RetrievalError(f"stopped pruning: {error}") from None

    outcome = prune_index(store, decisions, still_protected=still_protected, protected_reason=reason)
    for version, why in outcome.spared.items():
        print(f"  spared  {version}: {why}")
    for leftover in outcome.leftovers_removed:
        print(f"  removed {leftover} (left by an interrupted prune)")
    print(f"deleted {len(outcome.deleted)} versions, {outcome.freed_bytes} bytes")
    return 0


def _grace(minutes: float) -> Any:
    from datetime import timedelta

    if not minutes > 0:
        raise RetrievalError(f"--building-grace must be more than 0 minutes, got {minutes:g}")
    return timedelta(minutes=minutes)


def _served(url: str, *, timeout_s: float, need_every_replica: bool) -> Any:
    """What the app at ``url`` serves (`ServedVersions`); a RetrievalError when it cannot be told."""
    from retrieval.serving.swap_client import served_versions

    token = os.environ.get("RETRIEVAL_ADMIN_TOKEN", "").strip() or None
    if need_every_replica and token is None:
        raise RetrievalError(
            f"--serve-url {url}: set RETRIEVAL_ADMIN_TOKEN to the app's admin token; only /admin/status names every "
            "version its replicas hold (a swap in progress holds two), so nothing is pruned without it"
        )
    try:
        return served_versions(url, admin_token=token, timeout_s=timeout_s)
    except RetrievalError as error:
        raise RetrievalError(
            f"--serve-url {url}: cannot tell which index versions it serves ({error}); nothing was changed"
        ) from None


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, each column as wide as its widest cell (the last one is not padded)."""
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return "\n".join(lines)


def _models_list(args: argparse.Namespace) -> int:
    from retrieval.tracking.catalog import list_model_versions

    tracking_uri = _tracking_uri(args.tracking_uri)
    records = list_model_versions(tracking_uri=tracking_uri, name=args.name)
    if args.json:
        print(json.dumps({"tracking_uri": redact_credentials(tracking_uri), "versions": [r.to_json() for r in records]},
                         indent=2))  # fmt: skip
        return 0
    if not records:
        print(f"no registered models in {redact_credentials(tracking_uri)}")
        return 0
    server = tracking_uri.startswith(("http://", "https://"))
    rows = []
    for record in records:
        scores = " ".join(f"{key}={value:.4f}" for key, value in record.headline_scores().items()) or "-"
        run = (record.run_link if server else record.run_id) or "-"
        rows.append(
            [
                record.name,
                record.version,
                ",".join(record.aliases) or "-",
                record.created.strftime("%Y-%m-%d %H:%M"),
                scores,
                ",".join(record.index_versions) or "-",
                run,
            ]
        )
    print(_columns(["MODEL", "VERSION", "ALIASES", "REGISTERED (UTC)", "SCORES", "INDEX VERSIONS", "RUN"], rows))
    if not server:
        print(f"browse the runs with: mlflow ui --backend-store-uri {redact_credentials(tracking_uri)}")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from retrieval.tracking.catalog import describe_model_version

    record = describe_model_version(args.reference, tracking_uri=_tracking_uri(args.tracking_uri))
    if args.json:
        print(json.dumps(record.to_json(), indent=2))
        return 0
    lines = [
        f"{record.uri}  ({', '.join('@' + alias for alias in record.aliases) or 'no aliases'})",
        f"  registered       {record.created.strftime('%Y-%m-%d %H:%M:%S')} UTC, status {record.status}",
        f"  package sha256   {record.package_sha256 or '(no retrieval.package_sha256 tag)'}",
        f"  source           {record.source or '-'}",
        f"  artifact URI     {record.artifact_uri or '-'}",
        f"  run              {record.run_link or '-'}",
    ]
    if record.description:
        lines.append(f"  description      {record.description}")
    if record.run_missing:
        lines.append(f"  run problem      {record.run_missing}")
    if record.index_versions:
        lines.append("  index versions built from it:")
        lines.extend(f"    {version}  {where}" for version, where in record.index_versions.items())
    sections: list[tuple[str, Mapping[str, Any]]] = [("scores", record.scores), ("version tags", record.tags)]
    if record.run is not None:
        lines.append(f"  run name         {record.run.get('run_name')}, status {record.run.get('status')}")
        sections += [
            ("run metrics", record.run["metrics"]),
            ("run params", record.run["params"]),
            ("run tags", record.run["tags"]),
        ]
    for title, values in sections:
        lines.append(f"  {title}:" if values else f"  {title}: none")
        for key, value in values.items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            lines.append(f"    {key:<40} {shown}")
    print("\n".join(lines))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from retrieval.config import JobSpec, apply_override, load_job_spec
    from retrieval.evaluation.suite import evaluate_suite

    if (args.spec is None) == (args.model is None):
        raise RetrievalError("evaluate needs exactly one of: a job spec file, or --model")
    if args.model is not None:
        from retrieval.tracking import load_embedder

        package = load_embedder(args.model, tracking_uri=_tracking_uri(args.tracking_uri))
        data = package.spec.model_dump(mode="json")
        for override in args.overrides:
            apply_override(data, override)
        spec = JobSpec.from_mapping(data, source=f"{args.model} job spec")
        result = package.method.evaluate_suite(package.model, spec=spec, device=package.device)
    else:
        spec = load_job_spec(args.spec, args.overrides)
        if spec.incremental is not None:
            return _print_incremental(spec, args)
        result = evaluate_suite(spec)
    print(f"{spec.name} on {spec.dataset.name} ({result.protocol} protocol)")
    print(result.table())
    if not args.no_track:
        from retrieval.tracking.evaluation import log_suite_result

        run_id = log_suite_result(result, spec=spec, model=args.model)
        where = redact_credentials(spec.tracking.uri())
        print(f"logged to MLflow run {run_id} ({where}, experiment {spec.tracking.experiment})")
    if args.summary:
        _write_json(args.summary, {"job": spec.name, "protocol": result.protocol, "rows": result.rows})
    return 0


def _print_incremental(spec: Any, args: argparse.Namespace) -> int:
    """`retrieval evaluate` of an incremental job: its task x task matrix, from the saved progress."""
    from retrieval.train.incremental import read_incremental_summary

    summary = read_incremental_summary(spec)
    if summary is None:
        raise RetrievalError(
            f"incremental job {spec.name!r} has no finished task yet in {spec.storage.path}: train it first"
        )
    print(format_incremental_summary(summary))
    if args.summary:
        _write_json(args.summary, summary)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """`retrieval serve run CONFIG`: Ray's `serve run CONFIG`, after our checks (`retrieval.serving.serve_config`)."""
    from ray import serve

    from retrieval.serving.serve_config import application_urls, read_serve_config, run_config

    # Checked first: a bad file is the user's to fix, never retried, and needs no cluster.
    config = read_serve_config(args.config)
    _init_ray(args.address)
    deadline = time.monotonic() + args.startup_timeout
    start_with_retries(
        lambda: run_config(config, source=args.config, deadline=deadline),
        budget_s=args.startup_timeout,
        reset=serve.shutdown,
    )
    for line in application_urls(config):
        print(f"serving {line}")
    print("Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _serve_deploy(args: argparse.Namespace) -> int:
    """`retrieval serve deploy CONFIG`: Ray's `serve deploy CONFIG`, after our checks."""
    from retrieval.serving.serve_config import read_serve_config, submit_config, wait_until_running

    config = read_serve_config(args.config)
    client = submit_config(config, address=args.address, source=args.config)
    names = ", ".join(application.name for application in config.applications)
    print(f"submitted {args.config} ({names}) to {args.address}")
    if not args.wait:
        print(f"`serve status --address {args.address}` shows whether it runs")
        return 0
    wait_until_running(config, client.get_serve_details, deadline=time.monotonic() + args.timeout)
    print(f"running: {names}")
    return 0


def start_with_retries(
    start: Callable[[], None],
    *,
    budget_s: float,
    reset: Callable[[], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run ``start`` until it succeeds, retrying Serve's known start-up failures within ``budget_s``.

    On a loaded machine Serve's proxy or controller can miss its readiness checks and be killed
    while it starts (`ActorDiedError`, a timeout): that passes, so it is retried after ``reset``
    with a growing pause. Any other failure (a replica's constructor refusing the index, say) is
    reported at once. Either way the caller gets a `RetrievalError` of one line, never a traceback.

    Returns:
        The number of attempts it took.
    """
    import ray.exceptions

    transient = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, TimeoutError, ConnectionError)
    deadline = clock() + budget_s
    pause = 2.0
    for attempt in itertools.count(1):
        try:
            start()
            return attempt
        except RetrievalError:
            raise
        except transient as error:
            if clock() + pause > deadline:
                raise RetrievalError(
                    f"Serve did not start within {budget_s:.0f} s ({attempt} attempts; raise --startup-timeout "
                    f"on a loaded machine): {_one_line(error)}"
                ) from None
            logger.warning(
                "Serve start-up attempt %d failed (%s); retrying in %.0f s", attempt, _one_line(error), pause
            )
            try:
                reset()
            except Exception as reset_error:
                logger.warning("cleaning up after the failed start-up: %s", _one_line(reset_error))
            sleep(pause)
            pause = min(pause * 2, 30.0)
        except Exception as error:
            raise RetrievalError(f"Serve could not deploy the application: {_one_line(error)}") from None
    raise AssertionError("unreachable")


def _one_line(error: BaseException) -> str:
    """An exception as one line: its first line, and its last when a remote traceback sits between."""
    return first_and_last_line(str(error)) or type(error).__name__


def _serve_swap(args: argparse.Namespace) -> int:
    from retrieval.serving.swap_client import request_swap, resolve_swap_target

    token = os.environ.get("RETRIEVAL_ADMIN_TOKEN", "")
    if not token:
        raise RetrievalError("set RETRIEVAL_ADMIN_TOKEN to the application's admin token")
    index = resolve_swap_target(args.to, index_root=args.index_root)
    summary = request_swap(args.url, index=index, token=token, timeout_s=args.timeout)
    model = summary.get("model") or {}
    print(
        f"swapped index {summary['from']} -> {summary['to']} (model {model.get('name')} version "
        f"{model.get('version')}) in {summary['duration_s']:.2f} s on {len(summary.get('replicas', {}))} replicas"
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    import dataclasses

    from retrieval.client import RetrievalClient, SearchResult

    params: dict[str, int] = {}
    for setting in args.param:
        key, sep, value = setting.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise RetrievalError(f"--param {setting!r}: expected KEY=INTEGER, e.g. nprobe=16")
        params[key.strip()] = int(value)
    with RetrievalClient(args.url, token=os.environ.get(args.token_env), timeout_s=args.timeout) as client:
        result: SearchResult
        if args.image is not None:
            result = client.search_image(args.image, k=args.k, params=params)
        elif args.id is not None:
            result = client.search_id(args.id, k=args.k, params=params)
        elif args.text is not None:
            result = client.search_text(args.text, k=args.k, params=params)
        else:
            try:
                vector = json.loads(args.vector)
            except ValueError as error:
                raise RetrievalError(f"--vector: not a JSON list of numbers: {error}") from None
            if not isinstance(vector, list):
                raise RetrievalError("--vector: not a JSON list of numbers")
            result = client.search_vector(vector, k=args.k, params=params)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    partial = f" (PARTIAL: shards {result.missing_shards} missed the deadline)" if result.partial else ""
    print(f"index {result.index_version}, model {result.model.name} version {result.model.version}{partial}")
    for rank, hit in enumerate(result.hits, start=1):
        fields = ", ".join(f"{key}={value}" for key, value in hit.fields.items() if not isinstance(value, (dict, list)))
        print(f"{rank:>3}. id {hit.id:<10} score {hit.score:.4f}  {fields}")
    return 0


def _serve_status(args: argparse.Namespace) -> int:
    from retrieval.serving.swap_client import request_status

    token = os.environ.get("RETRIEVAL_ADMIN_TOKEN", "")
    if not token:
        raise RetrievalError("set RETRIEVAL_ADMIN_TOKEN to the application's admin token")
    status = request_status(args.url, token=token, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    model = status.get("model") or {}
    print(f"{args.url}: index {status['active']}, model {model.get('name')} version {model.get('version')}")
    if status.get("prepared") or status.get("retiring"):
        print(
            f"swap in progress (owner {status.get('swap_owner')}): prepared {status.get('prepared')}, "
            f"retiring {status.get('retiring')}"
        )
    outcome = status.get("last_outcome")
    if outcome:
        print(f"last swap: {outcome.get('outcome')}: {outcome.get('reason', '')}".rstrip(": "))
    replicas = status.get("replicas") or {}
    print(f"{len(replicas)} replicas:")
    for replica, state in sorted(replicas.items(), key=lambda item: (item[1].get("deployment", ""), item[0])):
        errors = state.get("errors") or {}
        in_flight = sum((state.get("in_flight") or {}).values())
        line = f"  {state.get('deployment', '?'):<16} {replica:<12} holds {', '.join(state.get('holds', [])) or '-'}"
        if state.get("active"):
            line += f", answers with {state['active']}, {in_flight} in flight"
        if errors:
            line += "; errors: " + "; ".join(f"{version}: {error}" for version, error in errors.items())
        print(line)
    return 0


# The subcommand an original, shorter form means: `serve CONFIG` is `serve run CONFIG`, and
# `index --model ...` is `index build --model ...`.
_DEFAULT_SUBCOMMANDS = {
    "serve": ("run", ("run", "deploy", "swap", "status")),
    "index": ("build", ("build", "list", "show", "prune")),
}
# The top-level options that take a value (the value is not the command).
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-format",)


def _default_subcommand(argv: list[str]) -> list[str]:
    """The original short forms: ``serve CONFIG`` is ``serve run CONFIG``, ``index --model M`` is ``index build``."""
    position = 0
    while position < len(argv):
        token = argv[position]
        if token in _GLOBAL_OPTIONS_WITH_VALUE:
            position += 2
            continue
        if token.startswith("-"):
            position += 1
            continue
        if token not in _DEFAULT_SUBCOMMANDS:
            return argv
        default, known = _DEFAULT_SUBCOMMANDS[token]
        following = argv[position + 1 : position + 2]
        if following and following[0] not in (*known, "-h", "--help"):
            return [*argv[: position + 1], default, *argv[position + 1 :]]
        return argv
    return argv


def _demo(args: argparse.Namespace) -> int:
    from retrieval.demo import run_demo

    summary = run_demo(
        spec_path=args.spec,
        overrides=args.overrides,
        port=args.port,
        once=args.once,
        address=args.address,
        summary_path=args.summary,
    )
    return 0 if summary["queries"] and all(query["ok"] for query in summary["queries"]) else 1


# --------------------------------------------------------------------------- shared pieces


def _registration_line(summary: Mapping[str, Any]) -> str:
    model = summary["model"]
    status = "promoted to champion" if summary["promoted_to_champion"] else f"not promoted (gate {summary['gate']})"
    return f"registered {model['name']} version {model['version']} ({', '.join(model['aliases'])}); {status}"


def _run_link(tracking_uri: str, run_id: str) -> str:
    """Where to see a run: its page on an MLflow server, or its id and the `mlflow ui` command for a local store."""
    from retrieval.tracking.catalog import run_link_of

    return run_link_of(tracking_uri, run_id)


def _tracking_uri(value: str | None) -> str:
    from retrieval.tracking.runs import resolve_tracking_uri

    return resolve_tracking_uri(value or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def _init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
