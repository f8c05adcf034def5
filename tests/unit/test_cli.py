"""The CLI's answer to bad input: one clear line on stderr, exit status 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retrieval.cli import main
from retrieval.errors import RetrievalError

JOB = Path(__file__).resolve().parents[2] / "jobs" / "digits_deep_metric.yaml"


def test_train_missing_spec_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_train_unknown_key_names_file_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = yaml.safe_load(JOB.read_text())
    spec["train"]["epoch"] = 3
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in error


def test_train_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(JOB), "--set", "train.epochs=many"]) == 2
    error = capsys.readouterr().err
    assert "--set train.epochs=many" in error
    assert "train.epochs" in error


def test_train_dataset_folder_that_does_not_exist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    code = main(["train", str(JOB), "--set", "dataset.name=image_folder", "--set", f"dataset.root={missing}"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_train_more_classes_per_batch_than_the_split_has(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(JOB), "--set", "train.classes_per_batch=6"]) == 2
    assert "only 5 classes" in capsys.readouterr().err


def test_index_unknown_registered_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["index", "--model", "models:/no-such-model@champion", "--tracking-uri", tracking]) == 2
    assert "models:/no-such-model@champion: no such registered model" in capsys.readouterr().err


def test_index_malformed_model_uri_and_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["index", "--model", "models:/only-a-name"]) == 2
    assert "is not a model URI" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 2
    assert "neither a models:/ URI nor a model package folder" in capsys.readouterr().err


def test_index_from_a_local_model_package(
    model_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "index"
    assert main(["index", "--model", str(model_package), "--out", str(out), "--shards", "3"]) == 0
    manifest = yaml.safe_load((next(out.glob("*/manifest.json"))).read_text())
    assert len(manifest["shards"]) == 3
    assert manifest["num_items"] == 896  # digits 5-9, the held-out gallery of the package's job
    assert manifest["model"]["uri"] == str(model_package.resolve())
    assert "index manifest:" in capsys.readouterr().out


# --------------------------------------------------------------------------- serve start-up (issue 16, item 13)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def _proxy_died() -> Exception:
    import ray.exceptions

    return ray.exceptions.ActorDiedError()  # "The actor died unexpectedly before finishing this task."


def test_serve_start_up_is_retried_through_a_dying_proxy() -> None:
    from retrieval.cli import start_with_retries

    clock, resets, failures = _Clock(), [], [_proxy_died(), _proxy_died()]

    def start() -> None:
        if failures:
            raise failures.pop()

    attempts = start_with_retries(start, budget_s=60, reset=lambda: resets.append(1), sleep=clock.sleep, clock=clock)
    assert (attempts, len(resets), clock.sleeps) == (3, 2, [2.0, 4.0])


def test_serve_start_up_that_keeps_failing_ends_in_one_line_within_its_budget() -> None:
    from retrieval.cli import start_with_retries

    clock = _Clock()

    def start() -> None:
        raise _proxy_died()

    with pytest.raises(RetrievalError) as raised:
        start_with_retries(start, budget_s=20, reset=lambda: None, sleep=clock.sleep, clock=clock)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("Serve did not start within 20 s (")
    assert "--startup-timeout" in message and "The actor died unexpectedly" in message
    assert clock.now <= 20


def test_a_deploy_failure_is_reported_at_once_in_one_line() -> None:
    from retrieval.cli import start_with_retries

    calls = []

    def start() -> None:
        calls.append(1)
        raise RuntimeError(
            'Deploying application retrieval failed:\nTraceback (most recent call last):\n  File "x.py", line 1\n'
            "retrieval.errors.IndexIntegrityError: shard-000.faiss: sha256 mismatch"
        )

    with pytest.raises(RetrievalError) as raised:
        start_with_retries(start, budget_s=60, reset=lambda: None, sleep=lambda _: None)
    assert calls == [1]
    assert str(raised.value) == (
        "Serve could not deploy the application: Deploying application retrieval failed: ... "
        "retrieval.errors.IndexIntegrityError: shard-000.faiss: sha256 mismatch"
    )


# --------------------------------------------------------------------------- logging, --version, help (issue 18)


def test_version_names_the_platform_and_its_stack(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("retrieval-platform 0.1.0 (")
    assert f"ray {metadata.version('ray')}" in out and f"torch {metadata.version('torch')}" in out


def test_help_documents_exit_codes_and_every_option_has_help() -> None:
    import argparse

    from retrieval.cli import _parser

    parser = _parser()
    assert "exit status:" in parser.format_help() and "130" in parser.format_help()
    missing = []

    def walk(current: argparse.ArgumentParser, path: str) -> None:
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "retrieval")
    assert missing == []


def _log_lines(monkeypatch: pytest.MonkeyPatch, argv_flags: list[str]) -> str:
    import io
    import logging

    from retrieval import cli

    stream = io.StringIO()
    from retrieval.logs import configure_logging as real

    def emit(args: object) -> int:
        logging.getLogger("retrieval.test").debug("ours at debug")
        logging.getLogger("retrieval.test").info("ours at info")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
        logging.getLogger("botocore.hooks").debug("Event choose-service-name")
        logging.getLogger("urllib3").warning("a library warning")
        return 0

    class Parser:
        def parse_args(self, argv: object) -> object:
            import argparse

            return argparse.Namespace(
                handler=emit, verbose="-v" in argv_flags, log_format="json" if "json" in argv_flags else "text"
            )

    monkeypatch.setattr(cli, "_parser", Parser)
    monkeypatch.setattr(cli, "configure_logging", lambda **kwargs: real(stream=stream, **kwargs))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert cli.main(["train", "x.yaml"]) == 0
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("retrieval").setLevel(logging.NOTSET)
    return stream.getvalue()


def test_logging_keeps_libraries_at_warning_and_verbose_is_ours_only(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = _log_lines(monkeypatch, [])
    assert "ours at info" in quiet and "ours at debug" not in quiet
    assert "Loading faiss" not in quiet and "a library warning" in quiet
    verbose = _log_lines(monkeypatch, ["-v"])
    assert "ours at debug" in verbose and "choose-service-name" not in verbose and "Loading faiss" not in verbose


def test_json_log_lines_are_one_object_each(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    lines = [json.loads(line) for line in _log_lines(monkeypatch, ["json"]).splitlines()]
    assert [(line["logger"], line["level"], line["message"]) for line in lines] == [
        ("retrieval.test", "INFO", "ours at info"),
        ("urllib3", "WARNING", "a library warning"),
    ]
    assert all(line["time"].endswith("+00:00") for line in lines)
