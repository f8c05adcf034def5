"""Penalties that keep a student close to an earlier model in incremental learning (thesis ch. 5-7).

Pure functions over tensors, tested alone against plain references; the incremental methods
only call them:

- `knowledge_distillation`: Hinton's KD on the old classifier's outputs (ch. 5).
- `multi_kernel_mmd`: multi-kernel Gaussian MMD between teacher and student embeddings (ch. 5).
- `correlation_distillation`: KD on the rows of the batch's similarity matrix (ch. 6 and 7).
- `empirical_fisher` (per-sample gradients) and `ewc_penalty`: elastic weight consolidation
  (Kirkpatrick et al., PNAS 2017), the classic regularisation baseline of the incremental experiments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# A wrapper whose parameter names carry a "module." prefix the bare model's names do not have.
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _check_matrix(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a [B, D] matrix, got shape {list(tensor.shape)}")


def _row_kl_divergence(
    teacher_scores: torch.Tensor, student_scores: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """`T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))` over the rows of two `[B, C]` score matrices."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_log_probs = F.log_softmax(teacher_scores.detach() / temperature, dim=1)
    student_log_probs = F.log_softmax(student_scores / temperature, dim=1)
    # "batchmean" divides the summed KL by the number of rows: the mean over rows of KL per row.
    divergence = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return divergence * temperature**2


def knowledge_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 2.0
) -> torch.Tensor:
    """Knowledge distillation on classifier outputs (Hinton et al. 2015; thesis ch. 5 `L_kd`).

    `L_kd = T^2 * mean_i KL( softmax(t_i / T) || softmax(s_i / T) )`; the `T^2` keeps the
    gradient's scale independent of `T`. The teacher is detached: no gradient reaches it.

    Args:
        student_logits: `[B, C]` the student's logits over the old classes.
        teacher_logits: `[B, C]` the frozen teacher's logits for the same images.
        temperature: softening temperature `T` > 0.

    Returns:
        Scalar loss, 0 when the two agree.

    Raises:
        ValueError: the logits are not matrices of the same shape, or `temperature` <= 0.

    >>> round(float(knowledge_distillation(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]))), 4)
    0.4438
    """
    _check_matrix("student_logits", student_logits)
    _check_matrix("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {list(student_logits.shape)} and teacher_logits {list(teacher_logits.shape)} "
            "must have the same shape [B, C]"
        )
    return _row_kl_divergence(teacher_logits, student_logits, temperature=temperature)


def multi_kernel_mmd(
    source: torch.Tensor, target: torch.Tensor, *, kernels: int = 5, multiplier: float = 2.0
) -> torch.Tensor:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (thesis ch. 5 `L_mmd`).

    `MMD^2 = mean(K_xx) + mean(K_yy) - 2 mean(K_xy)`, the biased estimate (diagonals included),
    with `K(a, b) = sum_i exp(-|a - b|^2 / bw_i)` and `bw_i = base * multiplier^(i - kernels // 2)`
    for i = 0 .. kernels - 1. `base` is the mean squared distance over the OFF-diagonal pairs of
    the joint set `[source; target]` (as in DAN, Long et al. 2015), detached so that the
    bandwidth is a statistic of the batch, not something the student can move. With the
    defaults the bandwidths are base/4, base/2, base, 2 base, 4 base.

    Args:
        source: `[B, D]` e.g. the teacher's embeddings.
        target: `[B', D]` e.g. the student's embeddings of the same images.
        kernels: number of Gaussian kernels, >= 1.
        multiplier: ratio between neighbouring bandwidths, > 0.

    Returns:
        Scalar `MMD^2` >= 0 (up to rounding); exactly 0 for identical inputs, also when all
        points coincide (the bandwidth is floored at the dtype's smallest normal number).

    Raises:
        ValueError: inputs that are not matrices with the same D, an empty input, or a bad
            `kernels` / `multiplier`.

    >>> points = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    >>> float(multi_kernel_mmd(points, points))
    0.0
    """
    _check_matrix("source", source)
    _check_matrix("target", target)
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source {list(source.shape)} and target {list(target.shape)} must have the same dimension D")
    if len(source) == 0 or len(target) == 0:
        raise ValueError(f"source {list(source.shape)} and target {list(target.shape)} must not be empty")
    if kernels < 1:
        raise ValueError(f"kernels must be >= 1, got {kernels}")
    if multiplier <= 0:
        raise ValueError(f"multiplier must be > 0, got {multiplier}")
    joint = torch.cat([source, target], dim=0)
    count = len(joint)
    # The direct (non-matmul) distance is exact, so identical rows give exactly 0 and MMD(x, x) = 0.
    squared = torch.cdist(joint, joint, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    base = squared.detach().sum() / (count * count - count)
    base = base / multiplier ** (kernels // 2)
    floor = torch.finfo(squared.dtype).tiny
    kernel = torch.zeros_like(squared)
    for index in range(kernels):
        kernel = kernel + torch.exp(-squared / (base * multiplier**index).clamp_min(floor))
    rows = len(source)
    within_source = kernel[:rows, :rows].mean()
    within_target = kernel[rows:, rows:].mean()
    across = kernel[:rows, rows:].mean()
    return within_source + within_target - 2 * across


def correlation_distillation(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0) -> torch.Tensor:
    """Correlation distillation: KD on the batch's similarity matrices (thesis ch. 6 `L_corr`).

    `S_t = F_t F_t^T` (teacher, detached), `S_s = F_s F_s^T`, and
    `L_corr = T^2 * mean_rows KL( softmax(S_t / T) || softmax(S_s / T) )`: each image's
    similarities to the batch, as a distribution, must stay as the teacher's. This is the
    standard KL direction with a detached teacher (the released code of the paper reverses
    the arguments and lets gradient reach the teacher). Only the batch sizes must agree: the
    two embedding dimensions may differ, as the similarity matrices are both `[B, B]`.

    Args:
        student: `[B, D_s]` the student's embeddings (L2-normalised in the thesis).
        teacher: `[B, D_t]` the frozen teacher's embeddings of the same images.
        temperature: softening temperature `T` > 0.

    Returns:
        Scalar loss, 0 when the two similarity matrices agree.

    Raises:
        ValueError: inputs that are not matrices over the same B images, or `temperature` <= 0.
    """
    _check_matrix("student", student)
    _check_matrix("teacher", teacher)
    if len(student) != len(teacher):
        raise ValueError(
            f"student {list(student.shape)} and teacher {list(teacher.shape)} must embed the same B images"
        )
    teacher = teacher.detach()
    return _row_kl_divergence(teacher @ teacher.T, student @ student.T, temperature=temperature)


def _bare_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, _WRAPPERS) else model


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    log_likelihood: Callable[[Any, torch.Tensor], torch.Tensor],
    *,
    max_samples: int | None = None,
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher information of EWC from per-sample gradients.

    `F_p = (1 / N) * sum_i (d log p(y_i | x_i) / d theta_p)^2` over the first N samples of
    `batches` (all of them, or `max_samples`), for every parameter with `requires_grad`. Each
    sample's gradient is its own (`torch.func.vmap` of `torch.func.grad` over
    `torch.func.functional_call`), not a batch's: squaring a batch-mean gradient underestimates
    F by about the batch size. The model runs in eval mode (dropout off, BatchNorm on its
    running statistics, which are left untouched; a sample's gradient then depends on that
    sample alone), and each module's train/eval mode is restored afterwards.

    Args:
        model: the model after the task; a DistributedDataParallel / DataParallel wrapper is
            unwrapped, so the keys are the bare model's parameter names.
        batches: `(inputs [B, ...], labels [B])` pairs, e.g. a DataLoader over the finished
            task's data, already on the model's device.
        log_likelihood: `(outputs, labels [1]) -> log p(y | x)` (a scalar or one-element
            tensor), where `outputs` is what the bare model returns for one sample `[1, ...]`.
        max_samples: N, the number of samples to use (None: every sample of `batches`).
        chunk_size: samples whose gradients are computed together (memory, not the result).

    Returns:
        Parameter name -> detached `F_p` of the parameter's shape, on the parameter's device.

    Raises:
        ValueError: no sample, or `max_samples` / `chunk_size` < 1.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bare = _bare_model(model)
    parameters = {name: parameter.detach() for name, parameter in bare.named_parameters() if parameter.requires_grad}
    frozen = {name: parameter.detach() for name, parameter in bare.named_parameters() if not parameter.requires_grad}
    buffers = {name: buffer.detach() for name, buffer in bare.named_buffers()}
    totals = {name: torch.zeros_like(parameter) for name, parameter in parameters.items()}

    def sample_log_likelihood(
        trainable: dict[str, torch.Tensor], inputs: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        outputs = torch.func.functional_call(bare, (trainable, frozen, buffers), (inputs.unsqueeze(0),))
        return log_likelihood(outputs, label.unsqueeze(0)).sum()

    per_sample = torch.func.vmap(torch.func.grad(sample_log_likelihood), in_dims=(None, 0, 0))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    count = 0
    try:
        for inputs, labels in batches:
            if max_samples is not None:
                inputs, labels = inputs[: max_samples - count], labels[: max_samples - count]
            for start in range(0, len(inputs), chunk_size):
                chunk = slice(start, start + chunk_size)
                gradients = per_sample(parameters, inputs[chunk], labels[chunk])
                for name, gradient in gradients.items():
                    totals[name] += (gradient.detach() ** 2).sum(dim=0)
            count += len(inputs)
            if max_samples is not None and count >= max_samples:
                break
    finally:
        for module, training in modes.items():
            module.training = training
    if count == 0:
        raise ValueError("batches is empty: the Fisher information needs at least one sample")
    return {name: total / count for name, total in totals.items()}


def ewc_penalty(
    model: nn.Module, *, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The EWC penalty `sum_p sum(F_p * (theta_p - theta*_p)^2)` over the parameters in `fisher`.

    The usual `lambda / 2` factor is the caller's weight. A parameter that grew since the anchor
    was taken (a classifier head with rows for new classes) is compared on its leading
    `anchor.shape[0]` rows: the old classes keep their rows at the front, the new rows are
    free. `fisher` and `anchor` may live on another device (e.g. a CPU checkpoint).

    Args:
        model: the student; a DistributedDataParallel / DataParallel wrapper is unwrapped, so
            names are matched without the "module." prefix.
        fisher: parameter name -> `F_p`, shaped like the anchor (from `empirical_fisher`).
        anchor: parameter name -> `theta*_p`, the parameter after the previous task.

    Returns:
        Scalar penalty on the model's device (0 for an empty `fisher`), differentiable in the
        model's parameters.

    Raises:
        ValueError: a name in `fisher` that the model or `anchor` lacks, or shapes that do not
            line up (fisher vs anchor, or a parameter smaller than its anchor).
    """
    parameters = dict(_bare_model(model).named_parameters())
    device = next(iter(parameters.values())).device if parameters else torch.device("cpu")
    penalty = torch.zeros((), device=device)
    for name, importance in fisher.items():
        if name not in parameters:
            raise ValueError(f"fisher names parameter {name!r}, which the model does not have")
        if name not in anchor:
            raise ValueError(f"fisher names parameter {name!r}, which the anchor does not have")
        parameter = parameters[name]
        previous = anchor[name]
        if importance.shape != previous.shape:
            raise ValueError(
                f"parameter {name!r}: fisher shape {list(importance.shape)} differs from anchor shape "
                f"{list(previous.shape)}"
            )
        current: torch.Tensor = parameter
        if parameter.shape != previous.shape:
            if parameter.dim() == 0 or parameter.shape[1:] != previous.shape[1:] or len(parameter) < len(previous):
                raise ValueError(
                    f"parameter {name!r} has shape {list(parameter.shape)}, which cannot extend the anchor's "
                    f"{list(previous.shape)} by rows"
                )
            current = parameter[: len(previous)]
        difference = current - previous.to(device=parameter.device, dtype=parameter.dtype).detach()
        penalty = penalty + (importance.to(device=parameter.device, dtype=parameter.dtype) * difference**2).sum()
    return penalty
