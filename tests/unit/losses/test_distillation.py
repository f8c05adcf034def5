"""The incremental-learning penalties against plain NumPy / loop references (thesis ch. 5-7).

References are written from the formulas in METHODS.md, one pair or one row at a time:
KD and correlation distillation as `T^2 * mean_i sum_c p_ic (log p_ic - log q_ic)`, MMD as a
double loop over pairs with the bandwidth rule (base = mean off-diagonal squared distance of the
joint set, divided by multiplier^(kernels // 2)), Fisher as squared gradients of a hand-derived
linear model, EWC as an explicit sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from retrieval.losses.distillation import (
    correlation_distillation,
    ewc_penalty,
    fisher_diagonal,
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


class _TwoParameterModel(nn.Module):
    """`y = w x + b` on scalars, so the gradients of a squared error are known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))
        self.bias = nn.Parameter(torch.tensor(-0.25))
        self.dropout = nn.Dropout(0.5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.weight * inputs + self.bias)


def _squared_error(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ((model(inputs) - labels) ** 2).mean()


def test_fisher_diagonal_is_the_mean_squared_gradient_of_each_batch() -> None:
    batches = [
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])),
        (torch.tensor([-1.0, 3.0, 0.5]), torch.tensor([2.0, 0.0, 1.0])),
    ]
    model = _TwoParameterModel()
    model.train()
    model.dropout.eval()  # a mixed state, which must come back as it was
    fisher = fisher_diagonal(model, batches, _squared_error)

    weight, bias = 0.5, -0.25
    expected_weight, expected_bias = 0.0, 0.0
    for inputs, labels in batches:
        residuals = [weight * float(x) + bias - float(y) for x, y in zip(inputs, labels, strict=True)]
        # d/dw mean (r^2) = mean(2 r x), d/db = mean(2 r); dropout is off (eval) while measuring.
        grad_weight = sum(2 * r * float(x) for r, x in zip(residuals, inputs, strict=True)) / len(residuals)
        grad_bias = sum(2 * r for r in residuals) / len(residuals)
        expected_weight += grad_weight**2 / len(batches)
        expected_bias += grad_bias**2 / len(batches)

    assert set(fisher) == {"weight", "bias"}
    assert float(fisher["weight"]) == pytest.approx(expected_weight, rel=1e-6)
    assert float(fisher["bias"]) == pytest.approx(expected_bias, rel=1e-6)
    assert not fisher["weight"].requires_grad
    assert model.training and not model.dropout.training
    assert model.weight.grad is None and model.bias.grad is None


def test_fisher_diagonal_skips_frozen_parameters_and_strips_the_wrapper_prefix() -> None:
    model = _TwoParameterModel()
    model.bias.requires_grad_(False)
    wrapped = nn.DataParallel(model)  # on CPU a plain wrapper whose names start with "module."
    fisher = fisher_diagonal(wrapped, [(torch.tensor([1.0]), torch.tensor([0.0]))], _squared_error)
    assert list(fisher) == ["weight"]
    assert float(fisher["weight"]) == pytest.approx((2 * 0.25 * 1.0) ** 2)


def test_fisher_diagonal_needs_a_batch() -> None:
    with pytest.raises(ValueError, match="batches is empty"):
        fisher_diagonal(_TwoParameterModel(), [], _squared_error)


class _Classifier(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.head = nn.Linear(2, classes)


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

    def objective(network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bare = cast(
            _Classifier, network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
        )
        return nn.functional.cross_entropy(bare.head(bare.body(images)), labels)

    batches = [(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 0]))]
    fisher = fisher_diagonal(wrapped, batches, objective)
    assert fisher.keys() == dict(model.named_parameters()).keys()
    np.testing.assert_allclose(
        fisher["head.bias"].numpy(), fisher_diagonal(model, batches, objective)["head.bias"].numpy(), rtol=1e-6
    )
    anchor = {name: parameter.detach() - 0.5 for name, parameter in model.named_parameters()}
    expected = sum(float((importance * 0.25).sum()) for importance in fisher.values())
    assert ewc_penalty(wrapped, fisher=fisher, anchor=anchor).item() == pytest.approx(expected, rel=1e-5)
