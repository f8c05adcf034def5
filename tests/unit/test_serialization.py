"""Stored training state loads without running anyone's code (issue 16, item 9)."""

from __future__ import annotations

import io
from dataclasses import make_dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.config import OptimizerSpec
from retrieval.errors import IntegrityError
from retrieval.losses.feature_estimation import BackwardMap
from retrieval.methods.incremental import TaskCarry
from retrieval.methods.training import build_optimizer, build_scheduler
from retrieval.serialization import from_plain, load_state, to_plain


class _Planted:
    """A pickle payload: unpickling it creates a file (stands in for running any command)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.target), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_names_the_file(tmp_path: Path) -> None:
    planted = tmp_path / "ran"
    path = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3, "payload": _Planted(planted)}, path)
    with pytest.raises(IntegrityError, match=rf"{path}: refused to load: it holds objects other than tensors"):
        load_state(path)
    assert not planted.exists()


def test_a_file_that_is_not_a_torch_state_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(IntegrityError, match=rf"{path}: not a readable torch state file"):
        load_state(path)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_checkpoint_a_worker_writes_loads_with_weights_only(tmp_path: Path, schedule: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    spec = OptimizerSpec(name="adamw", lr=0.01, schedule=schedule)
    optimizer = build_optimizer(spec, model.parameters())
    scheduler = build_scheduler(spec, optimizer, epochs=4)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "state.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": 1,
            "text_context": '{"vocab": ["a"]}',
        },
        path,
    )
    state = load_state(path)
    fresh = build_optimizer(spec, model.parameters())
    fresh.load_state_dict(state["optimizer"])
    build_scheduler(spec, fresh, epochs=4).load_state_dict(state["scheduler"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert state["epoch"] == 1


def test_a_task_carry_round_trips_as_plain_state() -> None:
    weights = {"layer.weight": torch.randn(3, 2)}
    carry = TaskCarry(
        task=2,
        classes=(4, 5),
        previous_state=weights,
        fisher=[({"layer.weight": torch.rand(3, 2)}, weights)],
        drift={
            1: BackwardMap(
                scale=np.full(4, 1.2, np.float32),
                shift=np.full(4, -0.1, np.float32),
                residual_std=np.ones(4, np.float32),
            )
        },
        class_means=torch.rand(6, 4),
        replay_images=torch.rand(2, 3, 8, 8),
        replay_labels=torch.tensor([0, 3]),
    )
    buffer = io.BytesIO()
    torch.save(to_plain(carry), buffer)
    loaded = from_plain(load_state(buffer.getvalue()))
    assert isinstance(loaded, TaskCarry)
    assert (loaded.task, loaded.classes) == (2, (4, 5))
    assert torch.equal(loaded.previous_state["layer.weight"], weights["layer.weight"])
    assert torch.equal(loaded.fisher[0][0]["layer.weight"], carry.fisher[0][0]["layer.weight"])
    assert isinstance(loaded.fisher[0], tuple)
    np.testing.assert_array_equal(loaded.drift[1].scale, carry.drift[1].scale)
    assert isinstance(loaded.drift[1], BackwardMap)
    assert torch.equal(loaded.class_means, carry.class_means)
    assert torch.equal(loaded.replay_labels, carry.replay_labels)
    assert loaded.specialist_state is None


def test_plain_state_constructs_only_this_packages_dataclasses() -> None:
    with pytest.raises(IntegrityError, match="not a dataclass of this package"):
        from_plain({"__dataclass__": "os:system", "fields": {}})
    with pytest.raises(IntegrityError, match="not a dataclass of this package"):
        from_plain({"__dataclass__": "retrieval.serialization:load_state", "fields": {}})
    foreign = make_dataclass("Foreign", [("x", int)])(1)
    with pytest.raises(TypeError, match="only this package's dataclasses"):
        to_plain(foreign)
