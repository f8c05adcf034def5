"""`retrieval index list|show|prune` (issue 18, item 4) and the original `retrieval index --model ...` form.

The served versions come from a real HTTP app on 127.0.0.1 (`build_http_api` under uvicorn) whose
``/admin/status`` is a real `SwapBook` with a swap in progress, so prune must keep both versions.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.cli import _default_subcommand, _parser, main
from retrieval.config import ServingSpec
from retrieval.index.manifest import ModelRef, read_manifest, set_current_version
from retrieval.index.shards import build_shards

ADMIN_TOKEN = "s3cret-admin-token-for-prune"
ADMIN_ENV = "RETRIEVAL_ADMIN_TOKEN"


def build_version(root: Path, name: str, *, count: int, model_version: str) -> Path:
    vectors = np.random.default_rng(count).standard_normal((count, 4)).astype(np.float32)
    return build_shards(
        vectors=vectors,
        ids=np.arange(count),
        items=[{"label": str(item % 3)} for item in range(count)],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="digits", version=model_version, uri=f"models:/digits/{model_version}"),
        gallery={"dataset": "random"},
        index_version=name,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """v1..v4 built in order; CURRENT -> v4."""
    root = tmp_path / "indices"
    for number in range(1, 5):
        build_version(root, f"v{number}", count=10 + number, model_version=str(number))
    return root


class HeldShard:
    """A shard replica as the readiness probe sees it: the versions it holds."""

    remote = True

    def __init__(self, versions: list[str]) -> None:
        self.versions = versions

    async def loaded_versions(self) -> list[str]:
        return list(self.versions)


class BookAdmin:
    """`SwapAdmin` over a real `SwapBook`: ``/admin/status`` is the book's status."""

    def __init__(self, book: Any) -> None:
        self.book = book

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.book.status()
        return status

    async def swap(self, index: str) -> dict[str, Any]:
        raise AssertionError("no swap through this test app")

    async def abort(self) -> dict[str, Any]:
        raise AssertionError("no abort through this test app")


@contextmanager
def app_serving(root: Path, *, active: str, prepared: str | None) -> Iterator[str]:
    """A search app on 127.0.0.1 serving ``active`` with a swap to ``prepared`` in progress."""
    import uvicorn

    from retrieval.serving.http import build_http_api
    from retrieval.serving.service import SearchService
    from retrieval.serving.swap import IndexRef, ReplicaReport, SwapBook

    manifests = {name: read_manifest(root / name)[0] for name in (active, prepared) if name}
    held = list(manifests)
    spec = ServingSpec(index=str(root), admin_token_env=ADMIN_ENV)
    service = SearchService(
        manifest=manifests[active],
        spec=spec,
        shards=[HeldShard(held) for _ in manifests[active].shards],
        embedder=HeldShard(held),  # type: ignore[arg-type]
    )
    book = SwapBook(initial=IndexRef.of(manifests[active], str(root / active / "manifest.json")))
    if prepared is not None:
        book.begin(IndexRef.of(manifests[prepared], str(root / prepared / "manifest.json")), owner="operator")
    book.report(ReplicaReport(replica="shard-0-a", deployment="Shard0", holds=tuple(held)))
    api = build_http_api(service, admin=BookAdmin(book))  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test app did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def nobody_listens() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def versions_in(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.is_dir())


def test_the_original_index_form_still_builds_and_the_new_subcommands_parse() -> None:
    parser = _parser()
    old = parser.parse_args(_default_subcommand(["-v", "index", "--model", "models:/m@champion", "--shards", "2"]))
    new = parser.parse_args(_default_subcommand(["index", "build", "--model", "models:/m@champion", "--shards", "2"]))
    for args in (old, new):
        assert (args.handler.__name__, args.model, args.shards) == ("_index", "models:/m@champion", 2)
    logged = parser.parse_args(_default_subcommand(["--log-format", "json", "index", "--model", "m"]))
    assert logged.handler.__name__ == "_index" and logged.log_format == "json"
    served = parser.parse_args(_default_subcommand(["--log-format", "json", "serve", "serve/digits.yaml"]))
    assert (served.handler.__name__, served.config) == ("_serve", "serve/digits.yaml")
    listed = parser.parse_args(_default_subcommand(["index", "list", "s3://b/p", "--json"]))
    assert (listed.handler.__name__, listed.root, listed.json) == ("_index_list", "s3://b/p", True)


def test_index_list_prints_every_version_with_current_and_json(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    set_current_version(root, "v3")
    assert main(["index", "list", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"index root {root}: CURRENT -> v3"
    assert out[1].split() == ["VERSION", "STATE", "CREATED", "(UTC)", "VECTORS", "SHARDS", "BYTES", "MODEL"]
    rows = {line.split()[0]: line for line in out[2:]}
    assert list(rows) == ["v4", "v3", "v2", "v1"]
    assert rows["v3"].rstrip().endswith("CURRENT") and not rows["v4"].rstrip().endswith("CURRENT")
    size = sum(path.stat().st_size for path in (root / "v2").iterdir())
    assert rows["v2"].split()[1:2] + rows["v2"].split()[4:9] == ["complete", "12", "2", str(size), "digits", "v2"]

    assert main(["index", "list", str(root), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert (listing["root"], listing["current"], listing["served"]) == (str(root), "v3", [])
    assert [(row["version"], row["current"], row["num_vectors"]) for row in listing["versions"]] == [
        ("v4", False, 14),
        ("v3", True, 13),
        ("v2", False, 12),
        ("v1", False, 11),
    ]
    assert listing["versions"][0]["model"] == {
        "name": "digits",
        "version": "4",
        "uri": "models:/digits/4",
        "run_id": None,
    }


def test_index_show_prints_the_manifest_in_full(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "show", str(root / "v2")]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((root / "v2" / "manifest.json").read_text())
    assert main(["index", "show", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["index_version"] == "v4"
    assert main(["index", "show", str(root / "v9")]) == 2
    assert "no such index root folder" in capsys.readouterr().err


def test_index_prune_dry_run_then_for_real(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    set_current_version(root, "v2")
    before = versions_in(root)
    assert main(["index", "prune", str(root), "--keep", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert versions_in(root) == before
    assert "  keep    v4: one of the 1 newest complete versions" in out
    assert "  keep    v2: named by CURRENT" in out
    assert "  would delete v3 (" in out and "  would delete v1 (" in out
    assert "dry run: would delete 2 versions" in out and "nothing was deleted" in out

    assert main(["index", "prune", str(root), "--keep", "1", "--older-than", "30"]) == 0
    assert versions_in(root) == before  # nothing is 30 days old
    assert "deleted 0 versions" in capsys.readouterr().out

    assert main(["index", "prune", str(root), "--keep", "1"]) == 0
    assert "deleted 2 versions" in capsys.readouterr().out
    assert versions_in(root) == ["v2", "v4"]
    assert read_manifest(root)[0].index_version == "v2"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--keep", "-1"], "--keep must be 0 or more, got -1"),
        (["--keep", "1", "--older-than", "0"], "--older-than must be more than 0 days"),
        (["--keep", "1", "--building-grace", "-5"], "--building-grace must be more than 0 minutes"),
    ],
)
def test_index_prune_refuses_bad_numbers(
    root: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["index", "prune", str(root), *argv]) == 2
    assert message in capsys.readouterr().err
    assert versions_in(root) == ["v1", "v2", "v3", "v4"]


def test_index_prune_refuses_when_the_served_versions_cannot_be_told(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    with app_serving(root, active="v2", prepared=None) as url:
        assert main(["index", "prune", str(root), "--keep", "1", "--serve-url", url]) == 2
    assert "set RETRIEVAL_ADMIN_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)
    gone = nobody_listens()
    assert main(["index", "prune", str(root), "--keep", "1", "--serve-url", gone]) == 2
    error = capsys.readouterr().err
    assert f"--serve-url {gone}: cannot tell which index versions it serves" in error and "nothing was changed" in error
    assert versions_in(root) == ["v1", "v2", "v3", "v4"]


def test_index_list_and_prune_keep_every_version_a_running_app_holds(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app serves v2 and is swapping (back) to v1; CURRENT is v4.
    monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)
    with app_serving(root, active="v2", prepared="v1") as url:
        monkeypatch.delenv(ADMIN_ENV)
        assert main(["index", "list", str(root), "--serve-url", url, "--json"]) == 0
        readyz = json.loads(capsys.readouterr().out)
        assert readyz["served"] == ["v2"] and readyz["served_from"]["every_replica"] is False

        monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)
        assert main(["index", "list", str(root), "--serve-url", url]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
        assert rows["v2"].rstrip().endswith("SERVED") and rows["v1"].rstrip().endswith("SERVED (held)")
        assert rows["v4"].rstrip().endswith("CURRENT")

        assert main(["index", "prune", str(root), "--keep", "0", "--serve-url", url]) == 0
        out = capsys.readouterr().out
    assert f"  keep    v1: held by {url}" in out and f"  keep    v2: held by {url}" in out
    assert versions_in(root) == ["v1", "v2", "v4"]


def test_every_option_of_every_command_has_help() -> None:
    import argparse

    missing = []
    pending = [("retrieval", _parser())]
    while pending:
        name, parser = pending.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {command}", sub) for command, sub in action.choices.items()]
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
