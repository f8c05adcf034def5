"""DeepInversion-style synthesis (thesis ch. 7): the BatchNorm-statistics loss and the image optimiser.

The BN loss is recomputed by hand from the intermediate activations of a tiny network
(Conv -> BN -> ReLU -> Conv -> BN) with set running statistics; synthesis on that network must
bring the BN loss well below that of noise, classify its images as the targets, be repeatable
for a seed, and leave the teacher exactly as it was.
"""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch
from torch import nn

from retrieval.models.inversion import BatchNormStatistics, synthesize_images, total_variation

CLASSES = 3


class _TinyTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
        )
        self.head = nn.Linear(4, CLASSES)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            # Running statistics of a "training set" of coloured, smooth images, so that they are
            # reachable and far from those of Gaussian noise.
            for layer in _norms(self):
                layer.momentum = None  # a cumulative average over the passes below
            # Class c reads channel c, so that every class is within reach of some image.
            self.head.weight.copy_(4 * torch.eye(CLASSES, 4))
            self.head.bias.zero_()
            self.features.train()
            for _ in range(4):
                colours = torch.tensor([0.8, -0.4, 0.3]).view(1, 3, 1, 1) + 0.2 * torch.randn(
                    16, 3, 1, 1, generator=generator
                )
                texture = torch.nn.functional.interpolate(
                    torch.randn(16, 3, 2, 2, generator=generator), size=(8, 8), mode="bilinear"
                )
                self.features(colours + 0.5 * texture)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def _norms(teacher: _TinyTeacher) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    return cast(nn.BatchNorm2d, teacher.features[1]), cast(nn.BatchNorm2d, teacher.features[4])


def _hand_bn_loss(teacher: _TinyTeacher, images: torch.Tensor, first_bn_multiplier: float) -> float:
    """Per-channel statistics over (N, H, W) by explicit loops, for both BN inputs."""
    first_input = teacher.features[0](images)
    second_input = teacher.features[3](teacher.features[2](teacher.features[1](first_input)))
    first_norm, second_norm = _norms(teacher)
    total = 0.0
    for weight, layer_input, layer in (
        (first_bn_multiplier, first_input, first_norm),
        (1.0, second_input, second_norm),
    ):
        mean_gap, var_gap = 0.0, 0.0
        for channel in range(layer_input.shape[1]):
            values = layer_input[:, channel].flatten().tolist()
            mean = sum(values) / len(values)
            variance = sum((value - mean) ** 2 for value in values) / len(values)
            mean_gap += (mean - float(torch.as_tensor(layer.running_mean)[channel])) ** 2
            var_gap += (variance - float(torch.as_tensor(layer.running_var)[channel])) ** 2
        total += weight * (math.sqrt(mean_gap) + math.sqrt(var_gap))
    return total


def _bn_loss(teacher: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad(), BatchNormStatistics(teacher) as statistics:
        teacher(images)
        return statistics.loss().item()


def test_batchnorm_statistics_loss_matches_a_hand_computation() -> None:
    teacher = _TinyTeacher().eval()
    images = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), BatchNormStatistics(teacher) as statistics:
        teacher(images)
        for multiplier in (1.0, 10.0):
            expected = _hand_bn_loss(teacher, images, multiplier)
            assert statistics.loss(first_bn_multiplier=multiplier).item() == pytest.approx(expected, rel=1e-5)


def test_batchnorm_statistics_hooks_are_removed_on_exit() -> None:
    teacher = _TinyTeacher().eval()
    with BatchNormStatistics(teacher) as statistics:
        teacher(torch.zeros(2, 3, 4, 4))
    statistics.reset()
    teacher(torch.zeros(2, 3, 4, 4))
    assert statistics.recorded == 0
    assert all(not layer._forward_hooks for layer in teacher.modules())
    with pytest.raises(RuntimeError, match="run a forward pass inside the context first"):
        statistics.loss()


def test_batchnorm_statistics_need_a_batchnorm_layer() -> None:
    with pytest.raises(ValueError, match="Sequential has no BatchNorm layer"):
        BatchNormStatistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_total_variation_is_the_l2_norm_of_neighbour_differences() -> None:
    images = torch.tensor([[[[0.0, 1.0], [3.0, 7.0]]]])
    # Horizontal 1, 4; vertical 3, 6; anti-diagonal 3 - 1; diagonal 7 - 0.
    expected = math.sqrt(1 + 16) + math.sqrt(9 + 36) + 2 + 7
    assert total_variation(images).item() == pytest.approx(expected)
    assert total_variation(torch.full((2, 3, 4, 4), 0.3)).item() == 0.0


def _synthesize(teacher: nn.Module, **overrides: object) -> torch.Tensor:
    arguments: dict[str, object] = {
        "targets": torch.tensor([0, 1, 2, 0, 1, 2]),
        "image_size": 8,
        "iterations": 30,
        "batch_size": 4,
        "progress": False,
        "seed": 3,
    }
    arguments.update(overrides)
    return synthesize_images(teacher, teacher, **arguments)  # type: ignore[arg-type]


def test_synthesis_matches_the_batchnorm_statistics_far_better_than_noise() -> None:
    teacher = _TinyTeacher().eval()
    images = _synthesize(teacher)
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.float32 and not images.requires_grad

    noise = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    for start in (0, 4):  # the batches as they were optimised (BN statistics are per batch)
        synthesised_loss = _bn_loss(teacher, images[start : start + 4])
        noise_loss = _bn_loss(teacher, noise[start : start + 4])
        assert synthesised_loss < 0.1 * noise_loss


def test_synthesis_cross_entropy_pulls_the_images_towards_their_targets() -> None:
    teacher = _TinyTeacher().eval()
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        alone = teacher(_synthesize(teacher, targets=targets, bn_weight=0.0))
        with_ce = teacher(_synthesize(teacher, targets=targets)).softmax(dim=1)[range(6), targets]
        without_ce = teacher(_synthesize(teacher, targets=targets, ce_weight=0.0)).softmax(dim=1)[range(6), targets]
    assert torch.equal(alone.argmax(dim=1), targets)
    assert torch.all(with_ce > without_ce)


def test_synthesis_is_deterministic_for_a_seed_and_leaves_the_teacher_untouched() -> None:
    teacher = _TinyTeacher()
    teacher.train()
    teacher.head.eval()
    teacher.head.bias.requires_grad_(False)
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}

    first = _synthesize(teacher, iterations=5)
    second = _synthesize(teacher, iterations=5)
    other_seed = _synthesize(teacher, iterations=5, seed=4)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, other_seed)

    after = teacher.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name  # running statistics included
    assert teacher.training and teacher.features.training and not teacher.head.training
    assert teacher.head.weight.requires_grad and not teacher.head.bias.requires_grad
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_synthesis_without_classifier_and_bounded_to_the_pixel_range() -> None:
    teacher = _TinyTeacher().eval()
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 0.2)
    images = synthesize_images(
        teacher.features,
        None,
        targets=torch.zeros(4, dtype=torch.int64),
        image_size=6,
        iterations=10,
        progress=False,
        mean=mean,
        std=std,
    )
    for channel in range(3):
        pixels = images[:, channel] * std[channel] + mean[channel]
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_synthesis_rejects_a_logits_fn_that_skips_the_teacher() -> None:
    teacher = _TinyTeacher().eval()
    head = nn.Linear(3 * 8 * 8, CLASSES)
    with pytest.raises(ValueError, match="logits_fn did not run the teacher"):
        synthesize_images(
            teacher,
            lambda images: head(images.flatten(1)),
            targets=torch.zeros(2, dtype=torch.int64),
            image_size=8,
            iterations=1,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"targets must be a non-empty \[N\] int64 tensor"):
        synthesize_images(teacher, None, targets=torch.zeros(2), image_size=8, progress=False)
