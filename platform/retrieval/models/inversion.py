"""Representative images of old tasks synthesised from a teacher's BatchNorm statistics (thesis ch. 7).

DeepInversion (Yin et al., CVPR 2020): starting from noise, images are optimised so that,
through the frozen teacher, every BatchNorm layer's batch mean and variance match the running
statistics it kept from its training data, `R_bn = sum_l w_l (|mu_l(x) - mu_l_run|_2 +
|var_l(x) - var_l_run|_2)` (the first layer weighted by `first_bn_multiplier`), plus a class
term towards target old classes and total-variation and L2 image priors. The images then serve
as a tiny replay set of the old tasks for distillation.

The class term must aim at something trained: the teacher's classifier head when cross-entropy
trained it, otherwise the old classes' mean embeddings (`class_mean_logits`: a softmax over
cosine similarities to every old class mean, temperature 0.1).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNormStatistics:
    """Records the batch statistics of a model's BatchNorm inputs and scores them against the running ones.

    Used as a context manager: on entry a forward hook goes on every BatchNorm layer that
    tracks running statistics (in `model.modules()` order); each forward pass records, per
    layer, the per-channel mean and biased variance of its input over all dimensions but the
    channel one (N, H, W for 2-D maps); on exit the hooks are removed. A layer called twice in
    one forward pass keeps the statistics of its last call.

    >>> network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> with BatchNormStatistics(network) as statistics:
    ...     _ = network(torch.zeros(2, 3, 8, 8))
    >>> statistics.loss().shape
    torch.Size([])
    """

    def __init__(self, model: nn.Module) -> None:
        """Finds the BatchNorm layers.

        Raises:
            ValueError: the model has no BatchNorm layer with running statistics.
        """
        self.layers = [
            module for module in model.modules() if isinstance(module, _BATCH_NORMS) and module.running_mean is not None
        ]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to match")
        self._batch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchNormStatistics:
        for position, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._recorder(position)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, position: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            features = inputs[0]
            dims = [0, *range(2, features.dim())]
            self._batch[position] = (features.mean(dim=dims), features.var(dim=dims, unbiased=False))

        return record

    @property
    def recorded(self) -> int:
        """How many layers have recorded statistics since the last `reset`."""
        return len(self._batch)

    def reset(self) -> None:
        """Forgets the recorded statistics (before the next forward pass)."""
        self._batch.clear()

    def loss(self, first_bn_multiplier: float = 10.0) -> torch.Tensor:
        """`sum_l w_l (|mu_l - running_mean_l|_2 + |var_l - running_var_l|_2)` over the recorded layers.

        `w_l` is `first_bn_multiplier` for the first BatchNorm layer in `model.modules()` order
        and 1 for the others; the norms are plain (not squared) Euclidean norms over channels.

        Returns:
            Scalar, differentiable in the forward pass's input.

        Raises:
            RuntimeError: no forward pass went through the hooked layers.
        """
        if not self._batch:
            raise RuntimeError("no BatchNorm statistics recorded: run a forward pass inside the context first")
        terms = []
        for position, (mean, variance) in sorted(self._batch.items()):
            layer = self.layers[position]
            running_mean = torch.as_tensor(layer.running_mean).to(mean.dtype)
            running_var = torch.as_tensor(layer.running_var).to(variance.dtype)
            term = torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(variance - running_var)
            terms.append(first_bn_multiplier * term if position == 0 else term)
        return torch.stack(terms).sum()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's L2 total variation: norms of the differences between neighbouring pixels.

    `TV = |x[..., :, :-1] - x[..., :, 1:]|_2 + |x[..., :-1, :] - x[..., 1:, :]|_2
    + |x[..., 1:, :-1] - x[..., :-1, 1:]|_2 + |x[..., :-1, :-1] - x[..., 1:, 1:]|_2`: horizontal,
    vertical and both diagonal neighbours, each a plain Euclidean norm over the whole batch.

    Args:
        images: `[N, C, H, W]`.

    Returns:
        Scalar >= 0, 0 for constant images.

    Raises:
        ValueError: `images` is not 4-D.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    differences = (
        images[..., :, :-1] - images[..., :, 1:],
        images[..., :-1, :] - images[..., 1:, :],
        images[..., 1:, :-1] - images[..., :-1, 1:],
        images[..., :-1, :-1] - images[..., 1:, 1:],
    )
    return torch.stack([torch.linalg.vector_norm(difference) for difference in differences]).sum()


def _freeze(model: nn.Module) -> tuple[dict[nn.Module, bool], dict[nn.Parameter, bool]]:
    """Puts the model in eval mode without gradients; returns what to restore."""
    modes = {module: module.training for module in model.modules()}
    grads = {parameter: parameter.requires_grad for parameter in model.parameters()}
    model.eval()
    model.requires_grad_(False)
    return modes, grads


def _restore(modes: dict[nn.Module, bool], grads: dict[nn.Parameter, bool]) -> None:
    for module, training in modes.items():
        module.training = training
    for parameter, requires_grad in grads.items():
        parameter.requires_grad_(requires_grad)


def class_mean_logits(embeddings: torch.Tensor, class_means: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """`cos(f, m_c) / temperature` for every class mean `m_c`: logits whose cross-entropy towards
    class c pulls an embedding to c's mean and away from the others'.

    Args:
        embeddings: `[B, D]`.
        class_means: `[C, D]` the mean embedding of each class (need not be unit norm).
        temperature: > 0; 0.1 as METHODS.md ch. 7 says.

    Returns:
        `[B, C]` logits, differentiable in `embeddings` (the means are constants).

    Raises:
        ValueError: shapes that are not `[B, D]` and `[C, D]`, or temperature <= 0.

    >>> class_mean_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    tensor([[10.,  0.]])
    """
    if embeddings.dim() != 2 or class_means.dim() != 2 or embeddings.shape[1] != class_means.shape[1]:
        raise ValueError(
            f"embeddings {list(embeddings.shape)} and class_means {list(class_means.shape)} must be [B, D] and [C, D]"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    means = F.normalize(class_means.detach().to(embeddings.dtype), dim=1)
    return F.normalize(embeddings, dim=1) @ means.T / temperature


def synthesize_images(
    teacher: nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    targets: torch.Tensor,
    image_size: int,
    iterations: int = 2000,
    lr: float = 0.1,
    first_bn_multiplier: float = 10.0,
    bn_weight: float = 0.05,
    ce_weight: float = 1.0,
    tv_weight: float = 1e-4,
    l2_weight: float = 1e-5,
    jitter: int | None = None,
    flip: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Images of the given classes synthesised from the teacher's BatchNorm statistics (DeepInversion).

    For each batch of `batch_size` targets, images start as Gaussian noise and Adam (betas 0.5,
    0.9; cosine learning rate from `lr` to 0 over `iterations`) minimises

        bn_weight * R_bn + ce_weight * CE(logits_fn(x'), targets) + tv_weight * TV(x')
        + l2_weight * mean_n |x'_n|_2

    where `x'` is the images randomly rolled by up to `jitter` pixels each way (default 1/8 of the
    image side) and, with `flip`, mirrored left-right with probability 1/2 at each step. The
    default weights are DeepInversion's relative ones: class term 1, `R_bn` 0.05 (its range is
    0.01-0.05), TV 1e-4, L2 1e-5, first BatchNorm layer x10. The teacher is frozen (eval mode,
    no parameter gradients) for the duration, and each module's mode and each parameter's
    `requires_grad` are restored afterwards.

    Args:
        teacher: the old model; its BatchNorm layers' running statistics are matched. Pass the
            whole model that `logits_fn` runs (not only its backbone) so that all of it is frozen.
        logits_fn: `[n, C, S, S]` images -> `[n, classes]` logits over the old classes, from
            something trained: the teacher's head when cross-entropy trained it, else
            `class_mean_logits` of its embeddings. It must run the teacher (e.g.
            `lambda x: head(teacher(x))`), whose BatchNorm layers are hooked;
            any other module it uses should be frozen by the caller (its gradients would
            accumulate). None skips the cross-entropy and runs `teacher(x)` alone.
        targets: `[N]` int64 class of each image to synthesise.
        image_size: side S of the square images.
        iterations: optimisation steps per batch.
        lr: Adam's initial learning rate.
        first_bn_multiplier: weight of the first BatchNorm layer in `R_bn`.
        bn_weight, ce_weight, tv_weight, l2_weight: weights of the four terms above.
        jitter: largest random roll in pixels (0: none; None: `round(image_size / 8)`).
        flip: random horizontal flips.
        batch_size: images optimised together (BatchNorm statistics are over a batch).
        seed: the noise, jitter and flips are deterministic for a seed (on CPU; GPU kernels may
            add rounding differences).
        device: where to optimise; the teacher must already be there.
        progress: show a tqdm bar over `iterations * batches` steps (only when stderr is a
            terminal, as in feature extraction, so Ray workers' logs stay clean).
        channels: C, the teacher's input channels.
        mean, std: the per-channel normalisation of the teacher's inputs; when both are given,
            the images are kept within the normalised image of [0, 1] pixels after every step
            (as DeepInversion does). None leaves them unbounded.

    Returns:
        `[N, C, S, S]` detached float32 images in the teacher's normalised input space, on CPU.

    Raises:
        ValueError: bad targets (not 1-D int64, empty), sizes, counts or normalisation, the
            teacher having no BatchNorm layer, or a `logits_fn` that does not run the teacher.
    """
    if targets.dim() != 1 or targets.dtype != torch.int64 or len(targets) == 0:
        raise ValueError(
            f"targets must be a non-empty [N] int64 tensor, got shape {list(targets.shape)} dtype {targets.dtype}"
        )
    for name, value in (("image_size", image_size), ("iterations", iterations), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if jitter is None:
        jitter = round(image_size / 8)
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (to bound the images) or neither")
    target_device = torch.device(device)
    bounds = None
    if mean is not None and std is not None:
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need {channels} values with std > 0, got mean={list(mean)} std={list(std)}")
        centre = torch.tensor(mean, device=target_device).view(1, channels, 1, 1)
        spread = torch.tensor(std, device=target_device).view(1, channels, 1, 1)
        bounds = (-centre / spread, (1 - centre) / spread)

    statistics = BatchNormStatistics(teacher)
    generator = torch.Generator().manual_seed(seed)
    choices = random.Random(seed)
    starts = range(0, len(targets), batch_size)
    synthesised: list[torch.Tensor] = []
    modes, grads = _freeze(teacher)
    try:
        # The images need gradients even when the caller runs under torch.no_grad().
        with (
            torch.enable_grad(),
            statistics,
            tqdm(total=iterations * len(starts), desc="synthesising images", disable=None if progress else True) as bar,
        ):
            for batch_index, start in enumerate(starts):
                batch_targets = targets[start : start + batch_size].to(target_device)
                noise = torch.randn(
                    (len(batch_targets), channels, image_size, image_size), generator=generator, dtype=torch.float32
                )
                images = noise.to(target_device).requires_grad_(True)
                optimizer = torch.optim.Adam([images], lr=lr, betas=(0.5, 0.9))
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
                for _ in range(iterations):
                    shifted = images
                    if jitter:
                        offsets = (choices.randint(-jitter, jitter), choices.randint(-jitter, jitter))
                        shifted = torch.roll(shifted, shifts=offsets, dims=(2, 3))
                    if flip and choices.random() < 0.5:
                        shifted = torch.flip(shifted, dims=(3,))
                    statistics.reset()
                    loss = _synthesis_loss(
                        shifted,
                        teacher=teacher,
                        logits_fn=logits_fn,
                        targets=batch_targets,
                        statistics=statistics,
                        first_bn_multiplier=first_bn_multiplier,
                        weights=(bn_weight, ce_weight, tv_weight, l2_weight),
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    if bounds is not None:
                        with torch.no_grad():
                            images.copy_(torch.maximum(torch.minimum(images, bounds[1]), bounds[0]))
                    bar.update(1)
                logger.info(
                    "synthesised batch %d/%d (%d images): final loss %.4f",
                    batch_index + 1,
                    len(starts),
                    len(batch_targets),
                    loss.item(),
                )
                synthesised.append(images.detach().cpu())
    finally:
        _restore(modes, grads)
    return torch.cat(synthesised)


def _synthesis_loss(
    images: torch.Tensor,
    *,
    teacher: nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    targets: torch.Tensor,
    statistics: BatchNormStatistics,
    first_bn_multiplier: float,
    weights: tuple[float, float, float, float],
) -> torch.Tensor:
    """One step's objective for a jittered batch `[n, C, S, S]`; the teacher's hooks are live."""
    bn_weight, ce_weight, tv_weight, l2_weight = weights
    loss = tv_weight * total_variation(images) + l2_weight * torch.linalg.vector_norm(images.flatten(1), dim=1).mean()
    if logits_fn is None:
        teacher(images)
    else:
        loss = loss + ce_weight * F.cross_entropy(logits_fn(images), targets)
        if not statistics.recorded:
            raise ValueError("logits_fn did not run the teacher: none of its BatchNorm layers saw the images")
    return loss + bn_weight * statistics.loss(first_bn_multiplier)
