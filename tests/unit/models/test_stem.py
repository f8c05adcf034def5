"""`model.stem`: the small-images stem (3x3 stride-1 first convolution, no max-pool) and its `auto` rule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from retrieval.config import JobSpec, ModelSpec
from retrieval.errors import ConfigError
from retrieval.methods import build_method, load_model_package, save_model_package
from retrieval.models import EmbeddingNetwork, build_backbone
from retrieval.models.backbones import apply_stem

SpecFactory = Callable[..., JobSpec]


def _last_map_side(trunk: nn.Module, image_size: int) -> tuple[int, int]:
    trunk.eval()
    with torch.no_grad():
        shape = trunk(torch.zeros(1, 3, image_size, image_size)).shape
    return int(shape[-2]), int(shape[-1])


@pytest.mark.parametrize(
    ("name", "stem", "image_size", "side"),
    [
        # ImageNet stem: stride 32 -> a 32 px digit leaves 1 x 1.
        ("resnet18", "imagenet", 32, 1),
        # Small stem: stride 8 -> 32 / 8 = 4 and 64 / 8 = 8.
        ("resnet18", "small", 32, 4),
        ("resnet18", "small", 64, 8),
        ("densenet121", "imagenet", 32, 1),
        ("densenet121", "small", 32, 4),
    ],
)
def test_last_feature_map_size(name: str, stem: str, image_size: int, side: int) -> None:
    trunk, _ = build_backbone(name=name, weights=None, stem=stem)  # type: ignore[arg-type]
    assert _last_map_side(trunk, image_size) == (side, side)


def test_small_stem_is_a_3x3_stride_1_convolution_without_max_pool() -> None:
    network = apply_stem(torchvision.models.resnet18(weights=None), name="resnet18", weights=None, stem="small")
    assert isinstance(network.conv1, nn.Conv2d)
    assert (network.conv1.kernel_size, network.conv1.stride, network.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert (network.conv1.in_channels, network.conv1.out_channels) == (3, 64)
    assert isinstance(network.maxpool, nn.Identity)
    # Only the stem changed: the first residual stage is as torchvision builds it.
    reference = torchvision.models.resnet18(weights=None)
    assert [tuple(p.shape) for p in network.layer1.parameters()] == [
        tuple(p.shape) for p in reference.layer1.parameters()
    ]


def test_pretrained_weights_keep_every_layer_but_the_new_first_convolution(caplog: pytest.LogCaptureFixture) -> None:
    # Stands in for pretrained weights (no download in tests): the stem must keep them outside conv1.
    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None)
    before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="retrieval.models.backbones"):
        apply_stem(network, name="resnet18", weights="IMAGENET1K_V1", stem="small")
    assert "freshly initialised" in caplog.text and "IMAGENET1K_V1" in caplog.text
    after = network.state_dict()
    assert after["conv1.weight"].shape == (64, 3, 3, 3)
    for name, tensor in before.items():
        if name != "conv1.weight":
            assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("name", ["vgg16", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small"])
def test_small_stem_is_refused_by_name_where_there_is_no_imagenet_stem(name: str) -> None:
    with pytest.raises(ValueError, match=f"not available for backbone '{name}'"):
        build_backbone(name=name, weights=None, stem="small")
    with pytest.raises(ConfigError, match=f"stem 'small' is not available for backbone '{name}'"):
        JobSpec.from_mapping(
            {"name": "job", "method": {"name": "deep_metric"}, "model": {"backbone": name, "stem": "small"}},
            source="spec.yaml",
        )


def test_unresolved_auto_stem_is_refused_when_building() -> None:
    with pytest.raises(ValueError, match=r"'auto'.*resolved against the image size"):
        build_backbone(name="resnet18", weights=None, stem="auto")


def test_a_bad_stem_value_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.stem.*'auto', 'imagenet' or 'small'.*tiny"):
        JobSpec.from_mapping(
            {"name": "job", "method": {"name": "deep_metric"}, "model": {"stem": "tiny"}}, source="spec.yaml"
        )


@pytest.mark.parametrize(
    ("model", "image_size", "expected"),
    [
        ({}, 32, "imagenet"),  # the default: `small` did not measure better on the demo
        ({"stem": "auto"}, 32, "small"),
        ({"stem": "auto"}, 64, "small"),
        ({"stem": "auto"}, 65, "imagenet"),
        ({"stem": "auto"}, 224, "imagenet"),
        ({"stem": "auto", "backbone": "vgg16"}, 32, "imagenet"),
        ({"stem": "auto", "backbone": "densenet121"}, 32, "small"),
        ({"stem": "imagenet"}, 32, "imagenet"),
        ({"stem": "small"}, 224, "small"),
    ],
)
def test_auto_stem_resolves_against_the_image_size(model: dict[str, str], image_size: int, expected: str) -> None:
    spec = JobSpec.from_mapping(
        {"name": "job", "method": {"name": "deep_metric"}, "dataset": {"image_size": image_size}, "model": model},
        source="spec.yaml",
    )
    assert spec.model.stem == expected
    # The spec saved with a model names the stem that was built, never `auto`.
    assert spec.model_dump(mode="json")["model"]["stem"] == expected


def test_auto_stem_counts_every_task_dataset_of_an_incremental_job() -> None:
    data = {
        "name": "job",
        "method": {"name": "incremental_finetune"},
        "dataset": {"image_size": 32},
        "model": {"stem": "auto"},
        "incremental": {"tasks": [{"classes": "0-4"}, {"classes": "5-9", "dataset": {"image_size": 128}}]},
    }
    assert JobSpec.from_mapping(data, source="spec.yaml").model.stem == "imagenet"


def test_bare_model_spec_keeps_auto_until_a_job_resolves_it() -> None:
    assert ModelSpec().stem == "imagenet"
    assert ModelSpec(stem="auto").stem == "auto"
    assert ModelSpec(stem="auto").resolved_stem([32]) == "small"
    assert ModelSpec(stem="auto").resolved_stem([32, 96]) == "imagenet"
    assert ModelSpec(stem="imagenet").resolved_stem([32]) == "imagenet"


def test_stem_from_the_job_spec_reaches_the_model(make_job_spec: SpecFactory) -> None:
    for stem, side in (("small", 4), ("imagenet", 1)):
        spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16, "stem": stem})
        model = build_method(spec).build_model()
        assert isinstance(model, EmbeddingNetwork)
        assert _last_map_side(model.trunk, spec.dataset.image_size) == (side, side)
        first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
        assert first.kernel_size == ((3, 3) if stem == "small" else (7, 7))


def test_stem_reaches_a_layer_fusion_model(make_job_spec: SpecFactory) -> None:
    spec = make_job_spec(model={"backbone": "resnet18", "fusion_layers": ["layer3", "layer4"], "stem": "small"})
    model = build_method(spec).build_model()
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert convolutions[0].kernel_size == (3, 3) and convolutions[0].stride == (1, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, spec.model.embedding_dim)


def test_model_package_round_trips_a_small_stem_model(make_job_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16, "stem": "small"})
    torch.manual_seed(3)
    model = build_method(spec).build_model()
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 32, 32))  # BatchNorm statistics away from their initial values
    model.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).numpy()
    folder = save_model_package(tmp_path / "package", spec=spec, state_dict=model.state_dict())
    assert yaml.safe_load((folder / "job.yaml").read_text())["model"]["stem"] == "small"

    torch.manual_seed(4)
    package = load_model_package(folder)
    assert package.spec.model.stem == "small"
    np.testing.assert_allclose(package.embed_tensor(images), expected, rtol=1e-5, atol=1e-6)


def test_a_package_saved_before_the_stem_option_loads_with_the_imagenet_stem(
    make_job_spec: SpecFactory, tmp_path: Path
) -> None:
    # Such a package's job.yaml has no model.stem, and its weights are of the ImageNet stem,
    # whatever the default stem is or becomes.
    spec = make_job_spec(model={"backbone": "resnet18", "embedding_dim": 16, "stem": "imagenet"})
    torch.manual_seed(5)
    model = build_method(spec).build_model().eval()
    folder = save_model_package(tmp_path / "package", spec=spec, state_dict=model.state_dict())
    stored = yaml.safe_load((folder / "job.yaml").read_text())
    del stored["model"]["stem"]
    (folder / "job.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))

    package = load_model_package(folder)
    assert package.spec.model.stem == "imagenet"
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(package.embed_tensor(images), expected, rtol=1e-5, atol=1e-6)
