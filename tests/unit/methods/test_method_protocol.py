"""The one method protocol, kept by every registered method whatever its family (issue 19).

For each of `METHODS` (image metric learning, incremental task sequences, image-text retrieval),
through the same code the Ray Train worker runs (`MethodTrainer`): it builds from its spec,
takes a training step that changes its weights, checkpoints and restores exactly (the restored
trainer's state equals the saved one, and its next step gives the same weights as the original's),
packages and embeds identically (images, and texts where it embeds them), and registers in MLflow
and loads back from the registry embedding the same.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from retrieval.config import JobSpec
from retrieval.methods import METHODS, build_method, load_model_package, save_model_package
from retrieval.methods.base import RetrievalMethod, TaskAssignment
from retrieval.methods.incremental import TaskCarry
from retrieval.methods.training import MethodTrainer, package_files_of
from retrieval.serialization import load_state

IMAGE_SIZE = 32
EMBEDDING_DIM = 16
# Per method, what its tiny job needs beyond the defaults (text encoders that need no download).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "cross_modal_hashing": {"bits": 16, "feature_dim": 32, "text": {"kind": "bow", "hidden_dim": 32}},
    "adversarial_cross_modal": {
        "embedding_dim": 32,
        "text": {"kind": "gru", "word_dim": 16, "hidden_dim": 32, "max_words": 12},
    },
}


def contract_spec(name: str) -> JobSpec:
    """A tiny job of method `name` on bundled data of the kind the method trains on."""
    method_class = METHODS[name]
    data: dict[str, Any] = {
        "name": f"contract-{name}",
        "method": {"name": name, **METHOD_SETTINGS.get(name, {})},
        "model": {"backbone": "resnet18", "weights": None, "embedding_dim": EMBEDDING_DIM},
        "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
        "train": {"epochs": 2, "classes_per_batch": 2, "samples_per_class": 4, "batch_size": 8, "seed": 0},
        "evaluation": {"recall_ks": [1], "map_top_n": 10, "precision_ns": [1, 5]},
    }
    if "text" in method_class.modalities:
        data["dataset"] = {
            "name": "digit_pairs",
            "image_size": IMAGE_SIZE,
            "augment": False,
            "cross_modal": {"size": 60, "query_size": 10, "train_size": 30, "seed": 3},
        }
    else:
        data["dataset"] = {
            "name": "digits",
            "image_size": IMAGE_SIZE,
            "augment": False,
            "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
        }
    if method_class.carry_type is not None:
        data["incremental"] = {"tasks": [{"classes": "0-1"}, {"classes": "2-3"}]}
    return JobSpec.from_mapping(data, source="contract_spec")


def first_task(method: RetrievalMethod) -> tuple[TaskAssignment | None, Any]:
    """The first task of a sequence and its empty carry, for a method that trains sequences; else none."""
    if method.carry_type is None:
        return None, None
    assert method.carry_type is TaskCarry, f"no contract carry for {method.carry_type}"
    return TaskAssignment(index=0, phase="student", epochs=2, step_offset=0), TaskCarry(task=0, classes=(0, 1))


def trainer_for(spec: JobSpec) -> MethodTrainer:
    method = build_method(spec)
    task, carry = first_task(method)
    return MethodTrainer(method, task=task, carry=carry)


def assert_same_state(actual: Any, expected: Any, *, path: str = "state") -> None:
    """Two training states are equal: every tensor bit for bit, every other value equal."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert torch.equal(actual, expected), f"{path} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys {set(actual) ^ set(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], path=f"{path}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for position, (left, right) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(left, right, path=f"{path}[{position}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def through_a_file(state: dict[str, Any]) -> dict[str, Any]:
    """A training state as a checkpoint holds it: written and read back (no tensor shared with the trainer)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return load_state(buffer.getvalue(), what="the contract's checkpoint")


def weights(trainer: MethodTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in trainer.players.bare_model.state_dict().items()}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A fresh MLflow registry (sqlite) and a run to register the contract's packages from."""
    from retrieval.tracking.runs import TrainingRun

    root = tmp_path_factory.mktemp("registry")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=tracking,
        experiment="contract",
        artifact_location=str(root / "artifacts"),
        run_key="contract",
        run_name="contract",
        params={},
        tags={},
    )
    yield run
    run.finish()


def test_every_family_is_in_the_one_registry() -> None:
    families = {("text" in method.modalities, method.carry_type is not None) for method in METHODS.values()}
    assert families == {(False, False), (False, True), (True, False)}
    thesis = {
        "deep_metric",
        "classification",
        "unsupervised_metric",
        "cross_modal_hashing",
        "adversarial_cross_modal",
        "incremental_finetune",
        "incremental_joint",
        "lwf",
        "ewc",
        "incremental_kd_mmd",
        "feature_estimation",
        "dual_distillation",
    }
    assert thesis <= set(METHODS), sorted(thesis - set(METHODS))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_keeps_the_protocol(name: str, registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.tracking.registry import load_embedder, register_model_package

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    spec = contract_spec(name)

    # Builds from its spec, and takes a step that changes its weights.
    trainer = trainer_for(spec)
    assert type(trainer.method) is METHODS[name] and trainer.method.name == name
    before = weights(trainer)
    sums, steps = trainer.train_epoch(0, max_steps=1)
    assert steps == 1 and math.isfinite(sums["loss"]), sums
    after = weights(trainer)
    assert any(not torch.equal(before[key], after[key]) for key in before), "the step left every weight as it was"

    # Checkpoints and restores exactly: the same state, and the same next step.
    state = through_a_file(trainer.state(0))
    restored = trainer_for(spec)
    assert restored.restore(state) == 1
    assert_same_state(restored.state(0), state)
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    model = restored.players.bare_model.eval()
    with torch.no_grad():
        expected = restored.method.embed(model, images)
        expected_texts = (
            restored.method.embed_texts(model, ["one two", "seven"]) if restored.method.embeds_texts else None
        )
    trainer.train_epoch(1, max_steps=1)
    restored.train_epoch(1, max_steps=1)
    assert_same_state(weights(restored), weights(trainer), path="weights after the next step")

    # Packages and embeds identically.
    package_dir = save_model_package(
        tmp_path / "package", spec=spec, state_dict=state["model"], extra_files=package_files_of(state)
    )
    package = load_model_package(package_dir)
    assert type(package.method) is METHODS[name]
    embedded = torch.from_numpy(package.embed_tensor(images))
    assert embedded.shape == (len(images), package.dim)
    torch.testing.assert_close(embedded, expected.float(), rtol=0, atol=0)
    if expected_texts is not None:
        torch.testing.assert_close(
            torch.from_numpy(package.embed_texts(["one two", "seven"])), expected_texts.float(), rtol=0, atol=0
        )
    assert package.code_bits in (None, package.dim)

    # Registers, and the registry's copy embeds the same.
    registered = register_model_package(
        package_dir,
        tracking_uri=registry.tracking_uri,
        run_id=registry.run_id,
        registered_model=f"contract-{name}",
        tags=package.method.registration_tags(),
    )
    loaded = load_embedder(registered.uri, tracking_uri=registry.tracking_uri)
    torch.testing.assert_close(torch.from_numpy(loaded.embed_tensor(images)), embedded, rtol=0, atol=0)
