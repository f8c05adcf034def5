"""The incremental-learning penalties against plain NumPy / loop references (thesis ch. 5-7).

References are written from the formulas in METHODS.md, one pair or one row at a time:
KD and correlation distillation as `T^2 * mean_i sum_c p_ic (log p_ic - log q_ic)`, MMD as a
double loop over pairs with the bandwidth rule (base = mean off-diagonal squared distance of the
joint set, divided by multiplier^(kernels // 2)), the Fisher as the mean of per-sample squared
gradients from a plain loop (one backward per sample), EWC as an explicit sum.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from retrieval.losses.distillation import (
    correlation_distillation,
    empirical_fisher,
    ewc_penalty,
    knowledge_distillation,
    multi_kernel_mmd,
)


def _softmax(row: np.ndarray) -> np.ndarray:
    shifted = np.exp(row - row.max())
    return shifted / shifted.sum()


def _reference_row_kl(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    """`T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))`, one row at a time."""
    total = 0.0
    for teacher_row, student_row in zip(teacher, student, strict=True):
        p = _softmax(teacher_row / temperature)
        q = _softmax(student_row / temperature)
        total += sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(len(p)))
    return temperature**2 * total / len(teacher)


def _reference_mmd(source: np.ndarray, target: np.ndarray, kernels: int, multiplier: float) -> float:
    joint = np.concatenate([source, target]).astype(np.float64)
    count = len(joint)
    distances = [[float(np.sum((joint[i] - joint[j]) ** 2)) for j in range(count)] for i in range(count)]
    off_diagonal = [distances[i][j] for i in range(count) for j in range(count) if i != j]
    base = sum(off_diagonal) / len(off_diagonal)
    bandwidths = [base * multiplier ** (index - kernels // 2) for index in range(kernels)]

    def kernel(i: int, j: int) -> float:
        return sum(math.exp(-distances[i][j] / bandwidth) for bandwidth in bandwidths)

    rows, cols = range(len(source)), range(len(source), count)
    within_source = sum(kernel(i, j) for i in rows for j in rows) / len(rows) ** 2
    within_target = sum(kernel(i, j) for i in cols for j in cols) / len(cols) ** 2
    across = sum(kernel(i, j) for i in rows for j in cols) / (len(rows) * len(cols))
    return within_source + within_target - 2 * across


# ---------------------------------------------------------------- knowledge distillation


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_knowledge_distillation_matches_the_row_by_row_kl(temperature: float) -> None:
    generator = np.random.default_rng(0)
    student = generator.normal(size=(4, 6)) * 3
    teacher = generator.normal(size=(4, 6)) * 3
    loss = knowledge_distillation(torch.tensor(student), torch.tensor(teacher), temperature=temperature)
    assert float(loss) == pytest.approx(_reference_row_kl(teacher, student, temperature), rel=1e-9)


def test_knowledge_distillation_is_zero_for_agreeing_models_and_reaches_only_the_student() -> None:
    student = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], requires_grad=True)
    teacher = student.detach().clone().requires_grad_(True)
    assert knowledge_distillation(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    knowledge_distillation(student * 2, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_knowledge_distillation_names_both_shapes_on_a_mismatch() -> None:
    with pytest.raises(ValueError, match=r"student_logits \[2, 3\] and teacher_logits \[2, 4\]"):
        knowledge_distillation(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knowledge_distillation(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


# ---------------------------------------------------------------- MMD


@pytest.mark.parametrize(("kernels", "multiplier"), [(5, 2.0), (3, 1.5), (1, 2.0)])
def test_mmd_matches_a_double_loop_over_pairs(kernels: int, multiplier: float) -> None:
    generator = np.random.default_rng(1)
    source = generator.normal(size=(5, 3))
    target = generator.normal(size=(4, 3)) + 0.7
    loss = multi_kernel_mmd(torch.tensor(source), torch.tensor(target), kernels=kernels, multiplier=multiplier)
    assert float(loss) == pytest.approx(_reference_mmd(source, target, kernels, multiplier), rel=1e-9)


def test_mmd_is_zero_for_identical_inputs_even_when_all_points_coincide() -> None:
    points = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert float(multi_kernel_mmd(points, points.clone())) == 0.0
    same = torch.ones(3, 4, requires_grad=True)
    loss = multi_kernel_mmd(same, torch.ones(3, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert same.grad is not None and torch.isfinite(same.grad).all()


def test_mmd_grows_with_the_shift_between_distributions() -> None:
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(64, 8, generator=generator)
    same_distribution = torch.randn(64, 8, generator=generator)
    shifted = torch.randn(64, 8, generator=generator) + 1.0
    same = float(multi_kernel_mmd(source, same_distribution))
    assert float(multi_kernel_mmd(source, shifted)) > 5 * same > 0


def test_mmd_bandwidth_is_detached_so_gradient_flows_only_through_the_kernels() -> None:
    source = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 1.0]], requires_grad=True)
    multi_kernel_mmd(source, target, kernels=1).backward()
    # Hand derivative with a constant bandwidth b = mean off-diagonal squared distance = 30 / 12.
    bandwidth = 30 / 12
    rows = [np.array([0.0, 0.0]), np.array([1.0, 0.0])]
    cols = [np.array([0.0, 1.0]), np.array([2.0, 1.0])]
    expected = np.zeros((2, 2))
    for k, y_k in enumerate(cols):
        for y_j in cols:
            kernel = math.exp(-np.sum((y_k - y_j) ** 2) / bandwidth)
            # Each ordered pair (k, j) and (j, k) of K_yy contributes; 1/4 = 1/|Y|^2.
            expected[k] += 2 * (1 / 4) * kernel * (-2 * (y_k - y_j) / bandwidth)
        for x_i in rows:
            kernel = math.exp(-np.sum((x_i - y_k) ** 2) / bandwidth)
            expected[k] -= 2 * (1 / 4) * kernel * (-2 * (y_k - x_i) / bandwidth)
    assert target.grad is not None
    np.testing.assert_allclose(target.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_mmd_rejects_mismatched_dimensions() -> None:
    with pytest.raises(ValueError, match=r"source \[3, 4\] and target \[3, 5\] must have the same dimension"):
        multi_kernel_mmd(torch.zeros(3, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------- correlation distillation


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_correlation_distillation_matches_numpy(temperature: float) -> None:
    generator = np.random.default_rng(3)
    student = generator.normal(size=(5, 4))
    teacher = generator.normal(size=(5, 6))
    loss = correlation_distillation(torch.tensor(student), torch.tensor(teacher), temperature=temperature)
    expected = _reference_row_kl(teacher @ teacher.T, student @ student.T, temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_correlation_distillation_gradient_reaches_the_student_only() -> None:
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(4, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 3, generator=generator, requires_grad=True)
    correlation_distillation(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_correlation_distillation_needs_the_same_images() -> None:
    with pytest.raises(ValueError, match=r"student \[4, 3\] and teacher \[5, 3\] must embed the same B images"):
        correlation_distillation(torch.zeros(4, 3), torch.zeros(5, 3))


# ---------------------------------------------------------------- Fisher and EWC


class _SmallConvClassifier(nn.Module):
    """Conv + BatchNorm + dropout + linear: every part the Fisher pass must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.norm(self.conv(images))).mean(dim=(2, 3))
        return self.head(self.dropout(features))


def _log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


def test_the_empirical_fisher_is_the_mean_of_per_sample_squared_gradients() -> None:
    torch.manual_seed(0)
    model = _SmallConvClassifier()
    with torch.no_grad():  # BatchNorm with running statistics of its own, as after training
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    model.train()
    model.dropout.eval()  # a mixed state, which must come back as it was
    running = (model.norm.running_mean.clone(), model.norm.running_var.clone())
    images, labels = torch.randn(10, 3, 6, 6), torch.randint(0, 3, (10,))
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    fisher = empirical_fisher(model, batches, _log_likelihood, max_samples=7, chunk_size=3)

    # The reference: a plain loop, one backward per sample, eval mode, the first 7 samples.
    reference = copy.deepcopy(model).eval()
    expected = {name: torch.zeros_like(parameter) for name, parameter in reference.named_parameters()}
    for index in range(7):
        reference.zero_grad()
        _log_likelihood(reference(images[index : index + 1]), labels[index : index + 1]).sum().backward()
        for name, parameter in reference.named_parameters():
            assert parameter.grad is not None
            expected[name] += parameter.grad**2 / 7
    assert set(fisher) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-5, atol=1e-8)
    assert not any(value.requires_grad for value in fisher.values())
    # The squared gradient of a batch is about batch-size times smaller: not what EWC needs.
    reference.zero_grad()
    _log_likelihood(reference(images[:7]), labels[:7]).mean().backward()
    assert reference.head.weight.grad is not None
    assert float((reference.head.weight.grad**2).sum()) < 0.5 * float(fisher["head.weight"].sum())
    # Modes and BatchNorm statistics as they were, and no gradient left on the model.
    assert model.training and model.norm.training and not model.dropout.training
    assert torch.equal(model.norm.running_mean, running[0]) and torch.equal(model.norm.running_var, running[1])
    assert all(parameter.grad is None for parameter in model.parameters())


def test_the_empirical_fisher_skips_frozen_parameters_and_strips_the_wrapper_prefix() -> None:
    torch.manual_seed(0)
    model = _SmallConvClassifier()
    model.conv.requires_grad_(False)
    wrapped = nn.DataParallel(model)  # on CPU a plain wrapper whose names start with "module."
    fisher = empirical_fisher(wrapped, [(torch.randn(2, 3, 6, 6), torch.tensor([0, 2]))], _log_likelihood)
    assert sorted(fisher) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]


def test_the_empirical_fisher_needs_a_sample() -> None:
    with pytest.raises(ValueError, match="batches is empty"):
        empirical_fisher(_SmallConvClassifier(), [], _log_likelihood)
    with pytest.raises(ValueError, match="max_samples must be >= 1, got 0"):
        empirical_fisher(_SmallConvClassifier(), [], _log_likelihood, max_samples=0)


class _Classifier(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.head = nn.Linear(2, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.head(self.body(inputs)))


def test_ewc_penalty_is_the_fisher_weighted_squared_distance_over_the_old_rows_of_a_grown_head() -> None:
    torch.manual_seed(0)
    old = _Classifier(classes=2)
    anchor = {name: parameter.detach().clone() for name, parameter in old.named_parameters()}
    fisher = {name: torch.rand_like(parameter) for name, parameter in anchor.items()}
    del fisher["body.bias"]  # a parameter without importance is free

    grown = _Classifier(classes=4)
    # Same old rows would give 0; perturb the old and new rows by known amounts.
    with torch.no_grad():
        grown.body.weight.copy_(anchor["body.weight"] + 0.1)
        grown.body.bias.copy_(anchor["body.bias"] + 5.0)
        grown.head.weight[:2] = anchor["head.weight"] - 0.2
        grown.head.bias[:2] = anchor["head.bias"] + 0.3

    expected = 0.0
    for name, importance in fisher.items():
        current = dict(grown.named_parameters())[name].detach()
        rows = anchor[name].shape[0]
        flat_importance = importance.flatten().tolist()
        flat_difference = (current[:rows] - anchor[name]).flatten().tolist()
        expected += sum(f * d * d for f, d in zip(flat_importance, flat_difference, strict=True))

    penalty = ewc_penalty(grown, fisher=fisher, anchor=anchor)
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    wrapped = ewc_penalty(nn.DataParallel(grown), fisher=fisher, anchor=anchor)
    assert wrapped.item() == pytest.approx(expected, rel=1e-5)

    penalty.backward()
    assert grown.head.weight.grad is not None
    assert torch.all(grown.head.weight.grad[2:] == 0)  # the new classes' rows are free
    assert grown.body.bias.grad is None


def test_ewc_penalty_is_zero_at_the_anchor() -> None:
    model = _Classifier(classes=3)
    anchor = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    fisher = {name: torch.ones_like(parameter) for name, parameter in anchor.items()}
    assert ewc_penalty(model, fisher=fisher, anchor=anchor).item() == 0.0


def test_ewc_penalty_names_a_parameter_the_model_lacks() -> None:
    model = _Classifier(classes=3)
    with pytest.raises(ValueError, match=r"'head.scale', which the model does not have"):
        ewc_penalty(model, fisher={"head.scale": torch.ones(1)}, anchor={"head.scale": torch.ones(1)})
    with pytest.raises(
        ValueError, match=r"'head.weight' has shape \[3, 2\], which cannot extend the anchor's \[4, 2\]"
    ):
        ewc_penalty(model, fisher={"head.weight": torch.ones(4, 2)}, anchor={"head.weight": torch.ones(4, 2)})


@pytest.fixture
def single_process_group() -> Iterator[None]:
    """A one-rank gloo group in this process, so a real DistributedDataParallel can wrap a model."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("single_process_group")
def test_fisher_and_ewc_see_through_distributed_data_parallel() -> None:
    model = _Classifier(classes=3)
    wrapped = nn.parallel.DistributedDataParallel(model)
    assert next(name for name, _ in wrapped.named_parameters()).startswith("module.")

    batches = [(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 0]))]
    fisher = empirical_fisher(wrapped, batches, _log_likelihood)
    assert fisher.keys() == dict(model.named_parameters()).keys()
    np.testing.assert_allclose(
        fisher["head.bias"].numpy(), empirical_fisher(model, batches, _log_likelihood)["head.bias"].numpy(), rtol=1e-6
    )
    anchor = {name: parameter.detach() - 0.5 for name, parameter in model.named_parameters()}
    expected = sum(float((importance * 0.25).sum()) for importance in fisher.values())
    assert ewc_penalty(wrapped, fisher=fisher, anchor=anchor).item() == pytest.approx(expected, rel=1e-5)
