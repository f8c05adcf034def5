"""Incremental methods in one process: task data, the carry between tasks, each method's loss terms."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retrieval.config import JobSpec, load_job_spec
from retrieval.data.tasks import TaskData, build_task_sequence
from retrieval.errors import DatasetError
from retrieval.losses.feature_estimation import estimate_older_features
from retrieval.methods import METHODS, build_method, load_model_package, save_model_package
from retrieval.methods.incremental import IncrementalMethod, TaskCarry, _sample_batches, network
from retrieval.methods.training import begin_task, training_loader

JOBS = Path(__file__).resolve().parents[3] / "jobs"
EXTRA_TERMS_AT_TASK_1 = {
    "incremental_finetune": set(),
    "incremental_joint": set(),
    "lwf": {"kd"},
    "ewc": {"ewc"},
    "incremental_kd_mmd": {"kd", "mmd"},
    "feature_estimation": {"corr"},
    "dual_distillation": {"corr_old", "corr_replay", "corr_new"},
}


def job(method: str, tasks: list[dict[str, Any]], **method_settings: Any) -> JobSpec:
    settings: dict[str, Any] = {"name": method, **method_settings}
    if method == "dual_distillation":
        settings.setdefault("synthesis", {"iterations": 2, "images_per_class": 1, "batch_size": 8})
    if method == "ewc":
        settings.setdefault("fisher_samples", 6)
    return JobSpec.model_validate(
        {
            "name": f"test-{method}",
            "method": settings,
            "dataset": {"name": "digits", "image_size": 16},
            "model": {"backbone": "resnet18", "embedding_dim": 16},
            "train": {"classes_per_batch": 2, "samples_per_class": 4, "seed": 3},
            "incremental": {"tasks": tasks, "test_fraction": 0.3},
        }
    )


TWO_TASKS = [{"classes": "0-2"}, {"classes": "3-5"}]
THREE_TASKS = [{"classes": "0-1"}, {"classes": "2-3"}, {"classes": "4-5"}]


def first_batch(
    method: IncrementalMethod, tasks: list[TaskData], index: int, spec: JobSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    loader, sampler = training_loader(
        method.training_data(tasks, index),
        training_labels=None,
        classes_per_batch=2,
        spec=spec,
        num_replicas=1,
        rank=0,
    )
    sampler.set_epoch(0)
    images, labels, _ = next(iter(loader))
    return images, labels


def batches_of(method: IncrementalMethod, tasks: list[TaskData], index: int, spec: JobSpec) -> Any:
    """Training batches of task `index`, epoch after epoch (the first is `first_batch`'s)."""
    loader, sampler = training_loader(
        method.training_data(tasks, index), training_labels=None, classes_per_batch=2, spec=spec, num_replicas=1, rank=0
    )
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            yield images, labels
        epoch += 1


def train_task(
    method: IncrementalMethod,
    spec: JobSpec,
    tasks: list[TaskData],
    carry: TaskCarry,
    *,
    steps: int = 2,
    optimizer_factory: Any = None,
) -> tuple[torch.nn.Module, TaskCarry, dict[str, dict[str, torch.Tensor]]]:
    """Every phase of one task for `steps` optimiser steps; the trained model, the next carry, the terms per phase."""
    index = carry.task
    terms_by_phase = {}
    model = method.build_model()
    for phase in method.phases(index):
        model = method.build_model()
        begin_task(
            method, model, task={"index": index, "phase": phase}, carry=carry, spec=spec, device=torch.device("cpu")
        )
        optimizer = (optimizer_factory or (lambda parameters: torch.optim.SGD(parameters, lr=0.01)))(model.parameters())
        loss = method.build_loss()
        model.train()
        batches = batches_of(method, tasks, index, spec)
        for _ in range(steps):
            images, labels = next(batches)
            terms = method.training_step(model=model, loss=loss, images=images, labels=labels)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
        terms_by_phase[phase] = terms
        if phase == "specialist":
            carry = method.finish_specialist(model=model, carry=carry)  # type: ignore[attr-defined]
    following = method.finish_task(model=model, carry=carry, task_data=tasks[index], device=torch.device("cpu"))
    return model, following, terms_by_phase


@pytest.mark.parametrize("name", sorted(EXTRA_TERMS_AT_TASK_1))
def test_each_method_trains_two_tasks_with_its_own_terms(name: str) -> None:
    torch.manual_seed(0)
    spec = job(name, TWO_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]

    first, carry, terms = train_task(method, spec, tasks, TaskCarry(task=0, classes=tasks[0].classes))
    assert set(terms["student"]) == {"loss", "metric", "ce"}
    assert network(first).classifier.num_classes == 3
    assert carry.task == 1 and carry.previous_state is not None

    carry = replace(carry, classes=tasks[1].classes)
    second, _, terms = train_task(method, spec, tasks, carry)
    student_terms = terms["student"]
    assert set(student_terms) == {"loss", "metric", "ce"} | EXTRA_TERMS_AT_TASK_1[name]
    assert all(torch.isfinite(value) for value in student_terms.values())
    # The classifier grew to 6 classes and started from the first task's rows.
    assert network(second).classifier.num_classes == 6
    if name == "dual_distillation":
        assert set(terms["specialist"]) == {"loss", "metric", "ce"}


def test_the_classifier_keeps_old_rows_when_it_grows() -> None:
    spec = job("lwf", TWO_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    first = method.build_model()
    network(first).classifier.grow(3)
    carry = TaskCarry(task=1, classes=tasks[1].classes, previous_state=first.state_dict())
    student = method.build_model()
    method.begin_task(model=student, carry=carry, phase="student", device=torch.device("cpu"))
    old_rows = network(first).classifier.weight.detach()
    assert torch.equal(network(student).classifier.weight.detach()[:3], old_rows)
    assert network(student).classifier.num_classes == 6
    # The teacher is frozen and kept apart from the student.
    assert method.teacher is not None and not any(p.requires_grad for p in method.teacher.parameters())


def test_feature_estimation_distils_estimated_older_models_from_the_third_task() -> None:
    torch.manual_seed(0)
    spec = job("feature_estimation", THREE_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    for index in range(3):
        carry = replace(carry, classes=tasks[index].classes)
        _, carry, terms = train_task(method, spec, tasks, carry)
        if index == 1:
            # Task 1 finished: the backward map from model 1 to model 0 is recorded, 3 x D floats, no images.
            assert set(carry.drift) == {1}
            assert carry.drift[1].scale.shape == (16,) and carry.drift[1].residual_std.shape == (16,)
    assert "corr_estimated" in terms["student"]
    assert set(carry.drift) == {1, 2}
    assert carry.previous_state is not None and carry.replay_images is None


def test_on_a_real_three_task_run_the_estimate_is_closer_to_the_oldest_model_than_the_penultimate_model() -> None:
    """Model 0 is kept here for the test only; at task 2 the method has model 1 and the map of task 1."""
    torch.manual_seed(0)
    spec = job("feature_estimation", THREE_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    models = []
    for index in range(2):
        carry = replace(carry, classes=tasks[index].classes)
        model, carry, _ = train_task(
            method, spec, tasks, carry, steps=30, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3)
        )
        models.append(model.eval())
    # The third task's batch: the current images, which neither map was fitted on.
    images = torch.stack([tasks[2].test[position][0] for position in range(0, len(tasks[2].test), 3)])
    with torch.no_grad():
        oldest, penultimate = (method.embed(model, images) for model in models)
    (estimate,) = estimate_older_features(penultimate, [carry.drift[1]], noise_scale=0.0)

    def relative_error(features: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(features - oldest) / torch.linalg.vector_norm(oldest))

    errors = relative_error(estimate), relative_error(penultimate)
    print(f"relative error to model 0: estimate {errors[0]:.3f}, model 1 {errors[1]:.3f}")
    assert relative_error(penultimate) > 0.05  # the models really drifted
    assert relative_error(estimate) < 0.9 * relative_error(penultimate)


def test_ewc_keeps_one_fisher_per_finished_task() -> None:
    torch.manual_seed(0)
    spec = job("ewc", THREE_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    for index in range(2):
        carry = replace(carry, classes=tasks[index].classes)
        _, carry, _ = train_task(method, spec, tasks, carry)
    assert len(carry.fisher) == 2
    fisher, anchor = carry.fisher[1]
    assert set(fisher) == set(anchor) and all(value.min() >= 0 for value in fisher.values())


def test_the_ewc_fisher_of_a_finished_task_is_the_per_sample_loop_reference() -> None:
    """F = mean_i (grad log p(y_i|x_i))^2 over the task's sampled images, BatchNorm on running statistics."""
    torch.manual_seed(0)
    spec = job("ewc", TWO_TASKS, fisher_samples=5)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    model, carry, _ = train_task(method, spec, tasks, carry)
    fisher, anchor = carry.fisher[0]

    # The same five images (the method's seeded sample), one backward per image, eval mode.
    images, labels = next(_sample_batches(tasks[0], 5, spec, torch.device("cpu"), salt=1))
    assert len(images) == 5
    reference = copy.deepcopy(model).eval()
    expected = {name: torch.zeros_like(parameter) for name, parameter in reference.named_parameters()}
    for index in range(5):
        reference.zero_grad()
        _, logits = reference(images[index : index + 1])
        torch.log_softmax(logits[:, 0:3], dim=1)[0, labels[index]].backward()
        for name, parameter in reference.named_parameters():
            if parameter.grad is not None:
                expected[name] += parameter.grad**2 / 5
    assert set(fisher) == set(expected) == set(anchor)
    # float32 rounding: parameters with ~0 importance (e.g. a bias before BatchNorm) are compared absolutely.
    largest = max(float(value.max()) for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-3, atol=1e-6 * largest)
    assert float(fisher["classifier.weight"].sum()) > 0


def test_ewc_refuses_an_untrained_classifier_and_the_old_fisher_setting() -> None:
    with pytest.raises(ValueError, match="ewc needs ce_weight > 0"):
        job("ewc", TWO_TASKS, ce_weight=0.0)
    with pytest.raises(ValueError, match="fisher_batches"):
        job("ewc", TWO_TASKS, fisher_batches=8)


def test_dual_distillation_replays_synthesised_images_of_every_old_class() -> None:
    torch.manual_seed(0)
    spec = job("dual_distillation", THREE_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    carry = TaskCarry(task=0, classes=tasks[0].classes)
    for index in range(2):
        carry = replace(carry, classes=tasks[index].classes)
        _, carry, _ = train_task(method, spec, tasks, carry)
    assert carry.replay_images is not None and carry.replay_labels is not None
    assert carry.replay_images.shape == (4, 3, 16, 16)
    assert carry.replay_labels.tolist() == [0, 1, 2, 3]
    # The specialist of a task is not carried into the next one.
    assert carry.specialist_state is None


@pytest.mark.parametrize(
    "name", ["incremental_finetune", "lwf", "incremental_kd_mmd", "dual_distillation", "incremental_joint"]
)
def test_a_task_loader_never_yields_an_image_of_another_task(name: str) -> None:
    spec = job(name, THREE_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    for index, task in enumerate(tasks):
        allowed = tasks[: index + 1] if method.reads_old_tasks else [task]
        allowed_sources = {item.train.source(position) for item in allowed for position in range(len(item.train))}
        allowed_classes = {class_id for item in allowed for class_id in item.classes}
        data = method.training_data(tasks, index)
        for rank in range(2):
            loader, sampler = training_loader(
                data, training_labels=None, classes_per_batch=2, spec=spec, num_replicas=2, rank=rank
            )
            for epoch in range(2):
                sampler.set_epoch(epoch)
                for _, labels, positions in loader:
                    assert set(labels.tolist()) <= allowed_classes
                    assert {data.source(int(position)) for position in positions} <= allowed_sources
    if not method.reads_old_tasks:
        # And the images of task 2 are not among those of tasks 0 and 1 (sources are distinct images).
        assert not {tasks[2].train.source(p) for p in range(len(tasks[2].train))} & {
            tasks[0].train.source(p) for p in range(len(tasks[0].train))
        }


def test_task_splits_are_fixed_and_class_ids_follow_task_order() -> None:
    spec = job("lwf", [{"classes": "5-9"}, {"classes": [0, 1]}])
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    assert tasks[0].classes == (0, 1, 2, 3, 4) and tasks[1].classes == (5, 6)
    # Sequence class 0 is digit 5.
    assert tasks[0].train.class_names[0] == "5" and tasks[1].train.class_names[5] == "0"
    again = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    assert [again[1].test.source(p) for p in range(len(again[1].test))] == [
        tasks[1].test.source(p) for p in range(len(tasks[1].test))
    ]
    train_sources = {tasks[0].train.source(p) for p in range(len(tasks[0].train))}
    assert not train_sources & {tasks[0].test.source(p) for p in range(len(tasks[0].test))}
    # 30% of each class is held out for testing (digit 5 has 182 images).
    test_fives = int(np.sum(tasks[0].test.labels == 0))
    assert test_fives == 182 - round(0.7 * 182)


def test_bad_task_sequences_are_refused_with_the_task_named() -> None:
    spec = job("lwf", [{"classes": "0-4"}, {"classes": "4-6"}])
    with pytest.raises(DatasetError, match=r"tasks\[1\] repeats class id\(s\) \[4\]"):
        build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    spec = job("lwf", [{"classes": "0-4"}, {"classes": "8-12"}])
    with pytest.raises(DatasetError, match=r"tasks\[1\]\.classes names class id\(s\) \[10, 11, 12\]"):
        build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]


def test_incremental_methods_need_a_sequence_and_others_refuse_one() -> None:
    with pytest.raises(ValueError, match="'ewc' is incremental and needs an 'incremental' section"):
        JobSpec.model_validate({"name": "x", "method": {"name": "ewc"}})
    with pytest.raises(ValueError, match="'deep_metric' trains one task"):
        JobSpec.model_validate(
            {"name": "x", "method": {"name": "deep_metric"}, "incremental": {"tasks": [{"classes": "0-4"}]}}
        )


def test_a_grown_model_round_trips_through_a_model_package(tmp_path: Path) -> None:
    spec = job("incremental_kd_mmd", TWO_TASKS)
    method = build_method(spec)
    model = method.build_model()
    network(model).classifier.grow(10)
    folder = save_model_package(tmp_path / "package", spec=spec, state_dict=model.state_dict())
    package = load_model_package(folder)
    assert network(package.model).classifier.num_classes == 10
    images = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = method.embed(model, images)
        actual = package.method.embed(package.model, images)
    torch.testing.assert_close(actual, expected)
    assert package.dim == 16


@pytest.mark.parametrize(
    "path", sorted(path for path in JOBS.glob("*.yaml") if path.stem != "runtime_env"), ids=lambda path: path.stem
)
def test_every_incremental_job_file_is_valid(path: Path) -> None:
    spec = load_job_spec(path)
    if spec.incremental is None:
        return
    assert spec.method.name in METHODS
    if all(task.dataset is None for task in spec.incremental.tasks) and spec.dataset.name == "digits":
        # On the bundled data, the sequence can be built here.
        tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
        assert [len(task.classes) for task in tasks] == [5, 5]


# ---------------------------------------------------------------- ch. 7: synthesis targets and replay


def _centroids(model: torch.nn.Module, method: IncrementalMethod, task: TaskData) -> torch.Tensor:
    """`[C, D]` unit-norm class centroids of the task's training images (test transform), computed here."""
    data = task.train.with_transform(task.test.transform)
    images = torch.stack([data[position][0] for position in range(len(data))])
    with torch.no_grad():
        embeddings = method.embed(model.eval(), images)
    labels = torch.as_tensor(np.array(data.labels))
    return torch.nn.functional.normalize(
        torch.stack([embeddings[labels == class_id].mean(dim=0) for class_id in task.classes]), dim=1
    )


@pytest.mark.parametrize("ce_weight", [0.0, 1.0], ids=["class-mean-target", "head-target"])
def test_synthesised_images_are_embedded_as_their_target_class_by_the_old_teacher(ce_weight: float) -> None:
    """With ce_weight 0 (the ch. 7 default) the head is untrained: synthesis must aim at the class means."""
    torch.manual_seed(0)
    spec = job(
        "dual_distillation",
        [{"classes": "0-4"}, {"classes": "5-9"}],
        ce_weight=ce_weight,
        # Jitter and flips off: they are augmentations, not what this test is about (a mirrored
        # or shifted digit is another image to a teacher trained for 10 steps).
        synthesis={"iterations": 40, "images_per_class": 4, "batch_size": 20, "jitter": 0.0, "flip": False},
    )
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    model, carry, _ = train_task(
        method,
        spec,
        tasks,
        TaskCarry(task=0, classes=tasks[0].classes),
        steps=10,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    assert carry.replay_images is not None and carry.replay_labels is not None
    assert carry.class_means is not None and carry.class_means.shape == (5, 16)
    targets = carry.replay_labels
    with torch.no_grad():
        embeddings, logits = model.eval()(carry.replay_images)
    # Nearest class centroid of the real training images under the old teacher (chance: 1/5).
    centroids = _centroids(model, method, tasks[0])
    nearest = (torch.nn.functional.normalize(embeddings, dim=1) @ centroids.T).argmax(dim=1)
    embedded = float((nearest == targets).float().mean())
    classified = float((logits[:, :5].argmax(dim=1) == targets).float().mean())
    print(f"ce_weight {ce_weight}: right class by centroid {embedded:.2f}, by head {classified:.2f} (chance 0.2)")
    # Without a trained head the images are embedded as their class; with one, the head classifies them so.
    assert (embedded if ce_weight == 0 else classified) >= 0.8


def test_synthesis_uses_the_specified_jitter_and_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval.methods.incremental as incremental

    spec = job("dual_distillation", TWO_TASKS, synthesis={"iterations": 1, "images_per_class": 1, "jitter": 0.25})
    defaults = spec.method.synthesis  # type: ignore[union-attr]
    assert 0.01 <= defaults.bn_weight <= 0.05 and defaults.ce_weight == 1.0
    assert (defaults.tv_weight, defaults.l2_weight, defaults.first_bn_multiplier) == (1e-4, 1e-5, 10.0)
    assert job("dual_distillation", TWO_TASKS).method.synthesis.jitter == 0.125  # type: ignore[union-attr]
    seen: dict[str, Any] = {}
    original = incremental.synthesize_images

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(incremental, "synthesize_images", recording)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    model = method.build_model()
    network(model).classifier.grow(3)
    method.finish_task(
        model=model, carry=TaskCarry(task=0, classes=tasks[0].classes), task_data=tasks[0], device=torch.device("cpu")
    )
    assert seen["jitter"] == 4  # a quarter of 16 px
    assert seen["bn_weight"] == defaults.bn_weight and seen["tv_weight"] == 1e-4 and seen["l2_weight"] == 1e-5


def test_synthesis_never_aims_at_an_untrained_head_and_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="class_target 'head' needs ce_weight > 0"):
        job("dual_distillation", TWO_TASKS, synthesis={"class_target": "head"})
    with pytest.raises(ValueError, match="jiter"):
        job("dual_distillation", TWO_TASKS, synthesis={"jiter": 0.1})
    with pytest.raises(ValueError, match="jitter"):
        job("dual_distillation", TWO_TASKS, synthesis={"jitter": 0.9})
    spec = job("dual_distillation", TWO_TASKS)
    assert spec.method.synthesis_target == "class_mean"  # type: ignore[union-attr]
    headed = job("dual_distillation", TWO_TASKS, ce_weight=0.5)
    assert headed.method.synthesis_target == "head"  # type: ignore[union-attr]


def test_replay_images_go_through_the_student_in_a_pass_of_their_own() -> None:
    """After a student step, its BatchNorm running statistics are those of the real images alone."""
    torch.manual_seed(0)
    spec = job("dual_distillation", TWO_TASKS)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    _, carry, _ = train_task(method, spec, tasks, TaskCarry(task=0, classes=tasks[0].classes))
    carry = replace(carry, classes=tasks[1].classes)
    student = method.build_model()
    method.begin_task(model=student, carry=carry, phase="student", device=torch.device("cpu"))
    student.train()
    reference = copy.deepcopy(student)
    images, labels = first_batch(method, tasks, 1, spec)
    terms = method.training_step(model=student, loss=method.build_loss(), images=images, labels=labels)
    assert "corr_replay" in terms  # the replay images were used
    with torch.no_grad():
        reference(images)  # the real images alone, in train mode
    norms = [
        (name, module)
        for name, module in student.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    ]
    references = dict(reference.named_modules())
    assert norms
    for name, module in norms:
        torch.testing.assert_close(module.running_mean, references[name].running_mean, msg=name)
        torch.testing.assert_close(module.running_var, references[name].running_var, msg=name)
    assert all(module.training for _, module in norms)  # the replay pass put them back in train mode
