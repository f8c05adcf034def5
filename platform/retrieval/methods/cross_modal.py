"""Cross-modal methods: entropy-regularised hashing (thesis ch. 3) and adversarial real-valued retrieval (ch. 4).

Both are `RetrievalMethod`s trained by the one worker loop; their own parts of the protocol make
them two-player: the modality classifiers are the adversary (`build_adversary`), and `train_step`
runs the alternating schedule (`alternating_step`) of the encoders (the "generator") and the
classifiers (the "discriminator") on pairs drawn by `training_loader`. A method here defines each
player's loss terms on a batch, how a batch's texts are prepared, how items are embedded for
retrieval, how a model is scored (`evaluate`, `evaluate_package`) and what its index holds
(`gallery`). What it derives from the training data (the vocabulary, the tag width, the number of
labels) is a `TextContext`, built the same way on every worker (`load_training_data`) and saved
with the model (`package_files`).

Modality labels: image 0, text 1. A batch has `B` images and `T` texts (a tag vector per image,
or every caption of each image), `owner[t]` the batch position of text `t`'s image. The
modality classifiers see both modalities with equal weight whatever `T / B` is, and their
accuracy is the balanced accuracy (chance: 0.5).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from retrieval.config import (
    AdversarialCrossModalSpec,
    CrossModalHashingSpec,
    JobSpec,
    OptimizerSpec,
    TextEncoderSpec,
)
from retrieval.data.cross_modal import CrossModalDataset, CrossModalSplits, cross_modal_datasets_from_spec
from retrieval.errors import ConfigError, DatasetError, ModelNotFoundError
from retrieval.evaluation.cross_modal import cross_modal_hash_scores, cross_modal_recall
from retrieval.losses.cross_modal import (
    bidirectional_ranking_loss,
    bit_balance_loss,
    label_calibration_loss,
    label_similarity,
    modality_entropy_loss,
    pairwise_likelihood_loss,
    projection_matching_loss,
    quantization_loss,
)
from retrieval.methods.base import (
    Evaluation,
    Gallery,
    GalleryName,
    Modality,
    Players,
    RetrievalMethod,
    TaskAssignment,
    TrainingData,
    unwrap,
)
from retrieval.models.cross_modal import CrossModalNetwork, CrossModalOutput, ModalityDiscriminator
from retrieval.models.text import Vocabulary, build_text_encoder

if TYPE_CHECKING:
    from retrieval.evaluation.suite import SuiteResult
    from retrieval.methods.package import ModelPackage

TEXT_CONTEXT_FILE = "text_context.json"
# The classifiers' running accuracy on the training batches, and their accuracy after each epoch
# on the held-out query and retrieval items (what `score_model` adds with a discriminator).
DISCRIMINATOR_KEYS = (
    "train/disc/feature_accuracy",
    "train/disc/code_accuracy",
    "disc/feature_accuracy",
    "disc/code_accuracy",
)
HELD_OUT_DISCRIMINATOR_PREFIX = "disc/"

IMAGE, TEXT = 0, 1


@dataclass(frozen=True)
class TextContext:
    """What a cross-modal model's architecture takes from its training data; saved with the model.

    Attributes:
        vocabulary: the words of the training captions (GRU encoder), else None.
        tag_dim: width of the tag / bag-of-words vector (BoW encoder), else None.
        num_labels: categories of the dataset (multi-hot width), or None where it has none.
        tag_names: the word of each tag column (BoW encoder), so a free-text query becomes a tag vector.
    """

    vocabulary: Vocabulary | None
    tag_dim: int | None
    num_labels: int | None
    tag_names: tuple[str, ...] = ()

    @classmethod
    def from_dataset(cls, dataset: CrossModalDataset, *, text: TextEncoderSpec) -> TextContext:
        """The context of a training split (deterministic: every worker builds the same one)."""
        vocabulary = None
        if text.kind == "gru":
            captions, _ = dataset.texts()
            vocabulary = Vocabulary.build(captions, min_count=text.min_word_count)
        if text.kind == "bow" and dataset.tag_dim is None:
            raise ConfigError(
                "method.text.kind 'bow' reads tag vectors, but this dataset has captions only; use 'gru' or 'minilm'"
            )
        return cls(
            vocabulary=vocabulary,
            tag_dim=dataset.tag_dim if text.kind == "bow" else None,
            num_labels=dataset.num_labels,
            tag_names=tuple(dataset.tag_names) if text.kind == "bow" else (),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "vocabulary": None if self.vocabulary is None else json.loads(self.vocabulary.to_json()),
                "tag_dim": self.tag_dim,
                "num_labels": self.num_labels,
                "tag_names": list(self.tag_names),
            }
        )

    @classmethod
    def from_json(cls, text: str, *, source: str) -> TextContext:
        """Raises ModelNotFoundError naming `source` when the JSON is not a text context."""
        try:
            data = json.loads(text)
            vocabulary = data["vocabulary"]
            return cls(
                vocabulary=None if vocabulary is None else Vocabulary.from_json(json.dumps(vocabulary)),
                tag_dim=None if data["tag_dim"] is None else int(data["tag_dim"]),
                num_labels=None if data["num_labels"] is None else int(data["num_labels"]),
                tag_names=tuple(str(name) for name in data.get("tag_names", [])),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ModelNotFoundError(f"{source}: not a text context of a cross-modal model: {error}") from error


@dataclass
class CrossModalBatch:
    """One training or scoring batch.

    Attributes:
        images: `[B, 3, H, W]`.
        text_inputs: prepared texts (`TextEncoder.prepare`), `T` of them.
        owner: `[T]` int64, the batch position of each text's image.
        labels: `[B, C]` multi-hot float, or None.
    """

    images: torch.Tensor
    text_inputs: dict[str, torch.Tensor]
    owner: torch.Tensor
    labels: torch.Tensor | None

    def to(self, device: torch.device) -> CrossModalBatch:
        return CrossModalBatch(
            images=self.images.to(device),
            text_inputs={name: value.to(device) for name, value in self.text_inputs.items()},
            owner=self.owner.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )

    @property
    def positive(self) -> torch.Tensor:
        """`[B, T]` bool: text `t` describes image `i`."""
        return self.owner.unsqueeze(0) == torch.arange(self.images.shape[0], device=self.owner.device).unsqueeze(1)


@dataclass
class EncodedSplit:
    """Retrieval representations of a split: codes for a hashing model, unit vectors otherwise.

    Attributes:
        images: `[N, K or D]` float32.
        texts: `[T, K or D]` float32.
        owner: `[T]` int64 image index of each text.
        image_labels: `[N, C]` multi-hot, or None.
        image_features, text_features: `[N, D]`, `[T, D]` common-space features, what the feature
            modality classifier reads (`encode_split` fills them; None where not kept).
        image_codes, text_codes: `[N, K]`, `[T, K]` relaxed codes in (-1, 1) before the sign, what the
            code modality classifier reads (hashing only, else None).
    """

    images: np.ndarray
    texts: np.ndarray
    owner: np.ndarray
    image_labels: np.ndarray | None
    image_features: np.ndarray | None = None
    text_features: np.ndarray | None = None
    image_codes: np.ndarray | None = None
    text_codes: np.ndarray | None = None

    @property
    def text_labels(self) -> np.ndarray | None:
        return None if self.image_labels is None else self.image_labels[self.owner]


class CrossModalMethod(RetrievalMethod):
    """A cross-modal method: two encoders, a modality discriminator (the adversary), and each player's loss.

    Its architecture takes a `TextContext` from the training data: `load_training_data` (or
    `bind_training_split`) builds it on every worker, `package_files` saves it with the model and
    `load_package_files` reads it back before a stored model is built.

    Args:
        spec: the validated job spec (method: one of the cross-modal method specs).
        context: what the architecture takes from the training data, when already known.
    """

    hashing: ClassVar[bool]
    modalities = ("image", "text")
    required_package_files = (TEXT_CONTEXT_FILE,)
    settings: CrossModalHashingSpec | AdversarialCrossModalSpec

    def __init__(self, spec: JobSpec, *, context: TextContext | None = None) -> None:
        super().__init__(spec)
        self._context = context
        self._train_split: CrossModalDataset | None = None

    @property
    def context(self) -> TextContext:
        """The text context; raises if neither training data nor a package has given it yet."""
        if self._context is None:
            raise ConfigError(
                f"method {self.name!r} has no text context yet: it comes from the training split "
                "(load_training_data / bind_training_split) or from a model package (load_package_files)"
            )
        return self._context

    def bind_training_split(self, dataset: CrossModalDataset) -> CrossModalMethod:
        """Take the text context of a training split (deterministic: every worker builds the same one)."""
        self._context = TextContext.from_dataset(dataset, text=self.text_spec)
        self._check_context()
        return self

    def _check_context(self) -> None:
        """A method's own requirements on its text context (default: none)."""

    @property
    def text_spec(self) -> TextEncoderSpec:
        """The text encoder's settings."""
        return self.settings.text

    @property
    def discriminator_steps(self) -> int:
        """Steps of the modality classifiers per step of the encoders."""
        return self.settings.discriminator_steps

    @property
    def discriminator_lr(self) -> float | None:
        """Learning rate of the modality classifiers (None: the encoders' rate)."""
        return self.settings.discriminator_lr

    # ----------------------------------------------------------------- training (the protocol's parts)

    def load_training_data(self, task: TaskAssignment | None = None) -> TrainingData:
        if task is not None:
            raise ConfigError(f"method {self.name!r} does not train task sequences")
        splits = cross_modal_datasets_from_spec(self.spec.dataset)
        self.bind_training_split(splits.train)
        self._train_split = splits.train
        return TrainingData(
            train=splits.train,
            evaluation=splits,
            epochs=self.spec.train.epochs,
            classes_per_batch=self.spec.train.classes_per_batch,
        )

    def check_inputs(self) -> None:
        splits = cross_modal_datasets_from_spec(self.spec.dataset)
        workers = self.spec.scaling.num_workers
        needed = 2 * workers
        if len(splits.train) < needed:
            raise DatasetError(
                f"the training split of {self.spec.dataset.name!r} has {len(splits.train)} pairs; "
                f"{workers} workers need at least {needed}"
            )
        # Builds the text context (and, for a BoW encoder, checks the dataset has tag vectors).
        self.bind_training_split(splits.train)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The encoders' parameters that train (a frozen pretrained text encoder's do not)."""
        return [parameter for parameter in model.parameters() if parameter.requires_grad]

    def build_adversary(self) -> ModalityDiscriminator:
        return self.build_discriminator()

    def adversary_optimizer(self) -> OptimizerSpec:
        return self.spec.optimizer.model_copy(update={"lr": self.discriminator_lr or self.spec.optimizer.lr})

    def training_loader(
        self,
        data: TrainingData,
        *,
        training_labels: np.ndarray | None,
        num_replicas: int,
        rank: int,
    ) -> tuple[DataLoader[Any], DistributedSampler[Any]]:
        """This worker's shard of the training pairs, in batches of `train.pairs_per_batch` (images and indices)."""
        pairs = data.train
        sampler: DistributedSampler[Any] = DistributedSampler(
            pairs, num_replicas=num_replicas, rank=rank, shuffle=True, seed=self.spec.train.seed, drop_last=True
        )
        batch_size = min(self.spec.train.pairs_per_batch, max(len(pairs) // num_replicas, 2))  # type: ignore[arg-type]
        loader = DataLoader(
            pairs,
            batch_sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=True),
            num_workers=self.spec.train.loader_workers,
        )
        return loader, sampler

    def train_step(
        self,
        players: Players,
        *,
        loss: nn.Module,
        batch: Any,
        training_labels: np.ndarray | None,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """One step of the two-player schedule (`alternating_step`); the classifiers' terms under `disc/`."""
        if players.adversary is None or players.adversary_optimizer is None:
            raise TypeError(f"method {self.name!r} trains against its modality classifiers: none given")
        images, indices = batch
        prepared = self.make_batch(players.bare_model, self._training_split, images, indices).to(device)
        terms, adversary = alternating_step(
            self,
            model=players.model,
            discriminator=players.adversary,
            generator_optimizer=players.optimizer,
            discriminator_optimizer=players.adversary_optimizer,
            batch=prepared,
        )
        return {**terms, **{f"disc/{name}": value for name, value in adversary.items()}}

    @property
    def _training_split(self) -> CrossModalDataset:
        if self._train_split is None:
            raise ConfigError(f"method {self.name!r}: train_step before load_training_data")
        return self._train_split

    # ----------------------------------------------------------------- scoring

    def evaluate(
        self, model: nn.Module, data: TrainingData, *, device: torch.device, adversary: nn.Module | None = None
    ) -> dict[str, float]:
        """The method's scores on the query and retrieval splits, and the classifiers' held-out accuracy."""
        return score_model(self, model, spec=self.spec, splits=data.evaluation, device=device, discriminator=adversary)

    def evaluate_package(self, package: ModelPackage, *, history: Sequence[Mapping[str, Any]] = ()) -> Evaluation:
        """Scores on the job's query / retrieval splits, the results table, curves and (hashing) PR and P@N plots."""
        query, retrieval = encode_evaluation_splits(self, package.model, spec=self.spec)
        metrics = self.score(query, retrieval)
        evaluation = Evaluation(metrics=metrics, documents={"evaluation/results.json": {"trained": metrics}})
        add_cross_modal_figures(
            evaluation, method=self, spec=self.spec, query=query, retrieval=retrieval, history=history
        )
        return evaluation

    def evaluate_suite(self, model: nn.Module, *, spec: JobSpec, device: torch.device | str) -> SuiteResult:
        """The model's scores on `spec`'s query / retrieval splits (protocol `cross_modal`)."""
        from retrieval.evaluation.suite import SuiteResult

        metrics = score_model(self, model, spec=spec, device=device)
        primary = "map@all" if self.hashing else "rsum"
        return SuiteResult(job=spec.name, protocol="cross_modal", rows={"trained": metrics}, primary=primary)

    # ----------------------------------------------------------------- the package and the index

    @property
    def code_bits(self) -> int | None:
        return self.embedding_dim if self.hashing else None

    def package_files(self) -> dict[str, str]:
        return {TEXT_CONTEXT_FILE: self.context.to_json()}

    def load_package_files(self, folder: Path) -> None:
        context_file = Path(folder) / TEXT_CONTEXT_FILE
        if not context_file.is_file():
            raise ModelNotFoundError(f"{folder}: cross-modal model package without {TEXT_CONTEXT_FILE}")
        self._context = TextContext.from_json(context_file.read_text(), source=str(context_file))
        self._check_context()

    def gallery(self, package: ModelPackage, gallery: GalleryName, *, modality: Modality, batch_size: int) -> Gallery:
        """The retrieval split's images (one item per image) or texts (one item per caption)."""
        from retrieval.methods.cross_modal_gallery import cross_modal_gallery

        return cross_modal_gallery(self, package, gallery, modality=modality, batch_size=batch_size)

    @abstractmethod
    def build_model(self) -> CrossModalNetwork:
        """A fresh network (backbone weights per the spec)."""

    def _network(
        self, *, common_dim: int, text_dim: int, bits: int | None, normalize: bool, num_labels: int | None
    ) -> CrossModalNetwork:
        """The spec's image trunk and text encoder (`text_dim` wide) into a `common_dim` space."""
        model_spec = self.spec.model
        return CrossModalNetwork(
            backbone=model_spec.backbone,
            weights=model_spec.weights,
            pooling=model_spec.pooling,
            gem_p=model_spec.gem_p,
            stem=model_spec.stem,
            text_encoder=build_text_encoder(
                self.settings.text,
                output_dim=text_dim,
                vocabulary=self.context.vocabulary,
                tag_dim=self.context.tag_dim,
            ),
            common_dim=common_dim,
            bits=bits,
            normalize=normalize,
            num_labels=num_labels,
        )

    @abstractmethod
    def build_discriminator(self) -> ModalityDiscriminator:
        """Fresh modality classifiers."""

    @abstractmethod
    def generator_terms(
        self, *, output: CrossModalOutput, discriminator: nn.Module, batch: CrossModalBatch
    ) -> dict[str, torch.Tensor]:
        """The encoders' loss terms; `"loss"` is the weighted total to back-propagate.

        Args:
            output: the network's output on `batch` (with gradients).
            discriminator: the modality classifiers, not DDP-wrapped (their gradients from this
                loss are discarded: only the encoders step on it).
            batch: the batch.
        """

    # ----------------------------------------------------------------- shared by both methods

    def discriminator_terms(
        self, *, output: CrossModalOutput, discriminator: nn.Module, batch: CrossModalBatch
    ) -> dict[str, torch.Tensor]:
        """The modality classifiers' loss (balanced cross-entropy) and balanced accuracy, on detached inputs."""
        image_count, text_count = output.image_features.shape[0], output.text_features.shape[0]
        features = torch.cat([output.image_features, output.text_features]).detach()
        codes = None
        if output.image_codes is not None and output.text_codes is not None:
            codes = torch.cat([output.image_codes, output.text_codes]).detach()
        feature_logits, code_logits = discriminator(features, codes)
        modality = torch.cat(
            [
                torch.full((image_count,), IMAGE, dtype=torch.long, device=features.device),
                torch.full((text_count,), TEXT, dtype=torch.long, device=features.device),
            ]
        )
        terms = {
            "feature_ce": _balanced_cross_entropy(feature_logits, modality),
            "feature_accuracy": _balanced_accuracy(feature_logits, modality),
        }
        total = terms["feature_ce"]
        if code_logits is not None:
            terms["code_ce"] = _balanced_cross_entropy(code_logits, modality)
            terms["code_accuracy"] = _balanced_accuracy(code_logits, modality)
            total = total + terms["code_ce"]
        terms["loss"] = total
        return terms

    def entropy_terms(
        self, *, output: CrossModalOutput, discriminator: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`L_ent` of the features and of the codes (None without codes), each modality weighted equally."""
        feature_image, code_image = discriminator(output.image_features, output.image_codes)
        feature_text, code_text = discriminator(output.text_features, output.text_codes)
        feature_entropy = 0.5 * (modality_entropy_loss(feature_image) + modality_entropy_loss(feature_text))
        if code_image is None or code_text is None:
            return feature_entropy, None
        return feature_entropy, 0.5 * (modality_entropy_loss(code_image) + modality_entropy_loss(code_text))

    def texts_of(
        self, dataset: CrossModalDataset, indices: Sequence[int]
    ) -> tuple[list[str], np.ndarray | None, np.ndarray]:
        """The texts of some images: `(texts, tag rows or None, owner)`, owner `[T]` positions in `indices`.

        The BoW encoder reads one tag vector per image; sentence encoders read every caption.
        """
        positions = list(range(len(indices)))
        if self.text_spec.kind == "bow":
            if dataset.tags is None:
                raise ConfigError("method.text.kind 'bow' reads tag vectors, but this dataset has captions only")
            texts = [" ".join(dataset.captions[index][:1]) for index in indices]
            return texts, dataset.tags[np.asarray(indices, dtype=np.int64)], np.asarray(positions, dtype=np.int64)
        texts, owner = [], []
        for position, index in enumerate(indices):
            for caption in dataset.captions[index]:
                texts.append(caption)
                owner.append(position)
        return texts, None, np.asarray(owner, dtype=np.int64)

    def make_batch(
        self, model: nn.Module, dataset: CrossModalDataset, images: torch.Tensor, indices: torch.Tensor
    ) -> CrossModalBatch:
        """A batch of `images` `[B, 3, H, W]` (dataset items `indices` `[B]`) with their texts, on the CPU."""
        index_list = [int(index) for index in indices]
        texts, tags, owner = self.texts_of(dataset, index_list)
        labels = None
        if dataset.labels is not None:
            labels = torch.from_numpy(np.asarray(dataset.labels[np.asarray(index_list)], dtype=np.float32))
        return CrossModalBatch(
            images=images,
            text_inputs=_bare(model).text.prepare(texts, tags),
            owner=torch.from_numpy(owner),
            labels=labels,
        )

    def retrieval_vectors(self, features: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """What an item is retrieved by: sign codes (±1) for hashing, the unit feature otherwise."""
        if self.hashing:
            if codes is None:
                raise TypeError("a hashing method needs codes")
            return torch.where(codes > 0, 1.0, -1.0)
        return features

    @torch.no_grad()
    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Retrieval vectors `[B, K or D]` of images `[B, 3, H, W]`."""
        network = _bare(model)
        features = network.image_features(images)
        return self.retrieval_vectors(features, network.image_codes(features) if self.hashing else None)

    @torch.no_grad()
    def embed_texts(self, model: nn.Module, texts: Sequence[str], tags: np.ndarray | None = None) -> torch.Tensor:
        """Retrieval vectors `[T, K or D]` of texts (tag rows `[T, V]` for a BoW encoder)."""
        network = _bare(model)
        device = next(network.parameters()).device
        if self.text_spec.kind == "bow" and tags is None:
            if self.context.tag_dim is None:
                raise ConfigError("a BoW text encoder needs the width of its tag vectors")
            tags = tag_vectors(texts, tag_names=self.context.tag_names, tag_dim=self.context.tag_dim)
        inputs = {name: value.to(device) for name, value in network.text.prepare(list(texts), tags).items()}
        features = network.text_features(inputs)
        return self.retrieval_vectors(features, network.text_codes(features) if self.hashing else None)

    @torch.no_grad()
    def encode_split(
        self, model: nn.Module, dataset: CrossModalDataset, *, batch_size: int, device: torch.device | str = "cpu"
    ) -> EncodedSplit:
        """Retrieval vectors of every image and every text of a split (model in eval mode).

        The split also keeps what the modality classifiers read (features, and relaxed codes for
        hashing), so `modality_accuracy` can score them on held-out items without a second pass.
        """
        network = _bare(model)
        was_training = network.training
        network.eval()
        images, texts, owners = [], [], []
        image_features, text_features, image_codes, text_codes = [], [], [], []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for batch_images, indices in loader:
            batch = self.make_batch(network, dataset, batch_images, indices).to(torch.device(device))
            output = network(batch.images, batch.text_inputs)
            images.append(self.retrieval_vectors(output.image_features, output.image_codes).float().cpu().numpy())
            texts.append(self.retrieval_vectors(output.text_features, output.text_codes).float().cpu().numpy())
            owners.append(batch.owner.cpu().numpy() + int(indices[0]))
            if self.hashing:
                # Real-valued methods retrieve by the features themselves: `images`/`texts` already hold them.
                image_features.append(output.image_features.float().cpu().numpy())
                text_features.append(output.text_features.float().cpu().numpy())
            if output.image_codes is not None and output.text_codes is not None:
                image_codes.append(output.image_codes.float().cpu().numpy())
                text_codes.append(output.text_codes.float().cpu().numpy())
        network.train(was_training)
        encoded_images, encoded_texts = np.concatenate(images), np.concatenate(texts)
        return EncodedSplit(
            images=encoded_images,
            texts=encoded_texts,
            owner=np.concatenate(owners),
            image_labels=None if dataset.labels is None else np.asarray(dataset.labels, dtype=np.float32),
            image_features=np.concatenate(image_features) if self.hashing else encoded_images,
            text_features=np.concatenate(text_features) if self.hashing else encoded_texts,
            image_codes=np.concatenate(image_codes) if image_codes else None,
            text_codes=np.concatenate(text_codes) if text_codes else None,
        )

    @abstractmethod
    def score(self, query: EncodedSplit, retrieval: EncodedSplit) -> dict[str, float]:
        """The method's retrieval metrics for queries against the retrieval set."""


class CrossModalHashing(CrossModalMethod):
    """Ch. 3: pairwise likelihood on codes and features, quantisation, entropy against two modality classifiers."""

    name = "cross_modal_hashing"
    hashing = True

    def __init__(self, spec: JobSpec, *, context: TextContext | None = None) -> None:
        super().__init__(spec, context=context)
        if not isinstance(spec.method, CrossModalHashingSpec):
            raise TypeError(f"CrossModalHashing needs a cross_modal_hashing method spec, got {spec.method.name!r}")
        self.settings: CrossModalHashingSpec = spec.method

    def build_model(self) -> CrossModalNetwork:
        settings = self.settings
        return self._network(
            common_dim=settings.feature_dim,
            text_dim=settings.feature_dim,
            bits=settings.bits,
            normalize=False,
            num_labels=None,
        )

    def build_discriminator(self) -> ModalityDiscriminator:
        return ModalityDiscriminator(feature_dim=self.settings.feature_dim, bits=self.settings.bits)

    @property
    def embedding_dim(self) -> int:
        """K: every embedding is a K-bit sign code."""
        return self.settings.bits

    def generator_terms(
        self, *, output: CrossModalOutput, discriminator: nn.Module, batch: CrossModalBatch
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        if output.image_codes is None or output.text_codes is None:
            raise TypeError("the hashing method needs a network with hash layers")
        if batch.labels is not None:
            similarity = label_similarity(batch.labels, batch.labels[batch.owner])
        else:
            similarity = batch.positive.float()
        feature_entropy, code_entropy = self.entropy_terms(output=output, discriminator=discriminator)
        codes = torch.cat([output.image_codes, output.text_codes])
        terms = {
            "code_pair": pairwise_likelihood_loss(output.image_codes, output.text_codes, similarity),
            "feature_pair": pairwise_likelihood_loss(output.image_features, output.text_features, similarity),
            "quantization": quantization_loss(codes),
            "bit_balance": bit_balance_loss(codes),
            "feature_entropy": feature_entropy,
            "code_entropy": code_entropy if code_entropy is not None else torch.zeros_like(feature_entropy),
        }
        terms["entropy"] = terms["feature_entropy"] + terms["code_entropy"]
        terms["loss"] = (
            settings.code_pair_weight * terms["code_pair"]
            + settings.feature_pair_weight * terms["feature_pair"]
            + settings.quantization_weight * terms["quantization"]
            + settings.entropy_weight * terms["entropy"]
            + settings.bit_balance_weight * terms["bit_balance"]
        )
        return terms

    def score(self, query: EncodedSplit, retrieval: EncodedSplit) -> dict[str, float]:
        query_labels, retrieval_labels = relevance_labels(query), relevance_labels(retrieval)
        # A cut-off beyond the retrieval set counts the whole set, under the name the spec asked for.
        gallery = min(len(retrieval.images), len(retrieval.texts))
        top_n = self.spec.evaluation.map_top_n
        ns = self.spec.evaluation.precision_ns
        renamed = [(f"map@{min(top_n, gallery)}", f"map@{top_n}")]
        renamed += [(f"p@{min(n, gallery)}", f"p@{n}") for n in ns]
        raw = cross_modal_hash_scores(
            query.images,
            query_labels,
            query.texts,
            query_labels[query.owner],
            retrieval.images,
            retrieval_labels,
            retrieval.texts,
            retrieval_labels[retrieval.owner],
            top_n=min(top_n, gallery),
            ns=sorted({min(n, gallery) for n in ns}),
        )
        scores = {}
        for key, value in raw.items():
            direction, name = key.split("/", 1)
            if name == "map@all":
                scores[key] = value
            for requested in [asked for got, asked in renamed if got == name]:
                scores[f"{direction}/{requested}"] = value
        scores["map@all"] = 0.5 * (scores["i2t/map@all"] + scores["t2i/map@all"])
        return scores


class AdversarialCrossModal(CrossModalMethod):
    """Ch. 4: bi-directional ranking + projection matching (KL) + entropy against a modality classifier."""

    name = "adversarial_cross_modal"
    hashing = False

    def __init__(self, spec: JobSpec, *, context: TextContext | None = None) -> None:
        super().__init__(spec, context=context)
        if not isinstance(spec.method, AdversarialCrossModalSpec):
            raise TypeError(
                f"AdversarialCrossModal needs an adversarial_cross_modal method spec, got {spec.method.name!r}"
            )
        self.settings: AdversarialCrossModalSpec = spec.method
        if context is not None:
            self._check_context()

    def _check_context(self) -> None:
        if self.settings.label_weight > 0 and self.context.num_labels is None:
            raise ConfigError(
                "method.label_weight > 0 needs category labels, but this dataset has none (e.g. Flickr30K, COCO)"
            )

    def build_model(self) -> CrossModalNetwork:
        settings = self.settings
        return self._network(
            common_dim=settings.embedding_dim,
            text_dim=settings.text.hidden_dim,
            bits=None,
            normalize=True,
            # Only built when used: a parameter that never receives a gradient stalls DDP.
            num_labels=self.context.num_labels if settings.label_weight > 0 else None,
        )

    def build_discriminator(self) -> ModalityDiscriminator:
        return ModalityDiscriminator(feature_dim=self.settings.embedding_dim, bits=None)

    @property
    def embedding_dim(self) -> int:
        """The common space's width."""
        return self.settings.embedding_dim

    def generator_terms(
        self, *, output: CrossModalOutput, discriminator: nn.Module, batch: CrossModalBatch
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        positive = batch.positive
        feature_entropy, _ = self.entropy_terms(output=output, discriminator=discriminator)
        terms = {
            "ranking": bidirectional_ranking_loss(
                output.image_features,
                output.text_features,
                positive,
                margin=settings.ranking_margin,
                hardest=self.epoch >= settings.ranking_warmup_epochs,
            ),
            "projection": projection_matching_loss(
                _or(output.image_projections, output.image_features),
                _or(output.text_projections, output.text_features),
                positive.float(),
            ),
            "entropy": feature_entropy,
        }
        total = (
            settings.ranking_weight * terms["ranking"]
            + settings.projection_weight * terms["projection"]
            + settings.entropy_weight * terms["entropy"]
        )
        if output.label_logits is not None and batch.labels is not None:
            labels = torch.cat([batch.labels, batch.labels[batch.owner]])
            terms["label"] = label_calibration_loss(output.label_logits, labels, temperature=settings.label_temperature)
            total = total + settings.label_weight * terms["label"]
        terms["loss"] = total
        return terms

    def score(self, query: EncodedSplit, retrieval: EncodedSplit) -> dict[str, float]:
        # The thesis' protocol: images and sentences of the test split retrieve each other.
        return cross_modal_recall(query.images, query.texts, query.owner, ks=self.spec.evaluation.recall_ks)


def alternating_step(
    method: CrossModalMethod,
    *,
    model: nn.Module,
    discriminator: nn.Module,
    generator_optimizer: torch.optim.Optimizer,
    discriminator_optimizer: torch.optim.Optimizer,
    batch: CrossModalBatch,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step of the two-player schedule; returns the encoders' and the classifiers' terms.

    The encoders embed the batch once; the modality classifiers take `method.discriminator_steps`
    steps on the detached features (and codes); then the encoders step on their loss, whose
    entropy term reads the just-updated classifiers. Nothing here draws random numbers, so the
    schedule is fixed by the seed of the data order and of the initial weights.

    Args:
        model: the network, possibly DDP-wrapped (its forward runs both encoders in one call).
        discriminator: the modality classifiers, possibly DDP-wrapped (their own steps all-reduce).
        batch: on the model's device.
    """
    output = model(batch.images, batch.text_inputs)
    adversary: dict[str, torch.Tensor] = {}
    for _ in range(method.discriminator_steps):
        adversary = method.discriminator_terms(output=output, discriminator=discriminator, batch=batch)
        discriminator_optimizer.zero_grad(set_to_none=True)
        adversary["loss"].backward()
        discriminator_optimizer.step()
    # The classifiers are read bare here: the encoders' loss must neither all-reduce nor step their gradients.
    bare_discriminator = (
        discriminator.module if isinstance(discriminator, nn.parallel.DistributedDataParallel) else discriminator
    )
    terms = method.generator_terms(output=output, discriminator=bare_discriminator, batch=batch)
    generator_optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    generator_optimizer.step()
    discriminator_optimizer.zero_grad(set_to_none=True)
    return terms, adversary


@torch.no_grad()
def modality_accuracy(discriminator: nn.Module, splits: Sequence[EncodedSplit]) -> dict[str, float]:
    """Balanced accuracy of the trained modality classifiers on the items of `splits` (e.g. held-out ones).

    Each classifier reads what it was trained on: the features (`feature_accuracy`) and, for
    hashing, the relaxed codes (`code_accuracy`). Balanced: the mean of the accuracy on the
    images and the accuracy on the texts, pooled over the splits, so five captions per image do
    not outvote the images; 0.5 is a classifier that cannot tell the modalities apart.

    Raises:
        ValueError: a split without the features `encode_split` keeps, or no split at all.
    """
    if not splits:
        raise ValueError("modality_accuracy needs at least one encoded split")
    if any(split.image_features is None or split.text_features is None for split in splits):
        raise ValueError("modality_accuracy needs the features `encode_split` keeps; this split has none")
    bare = discriminator.module if isinstance(discriminator, nn.parallel.DistributedDataParallel) else discriminator
    if not isinstance(bare, ModalityDiscriminator):
        raise TypeError(f"expected a ModalityDiscriminator, got {type(bare).__name__}")
    parameter = next(bare.parameters())
    was_training = bare.training
    bare.eval()

    def balanced(classifier: nn.Module, image_key: str, text_key: str) -> float:
        rates = []
        for key, modality in ((image_key, IMAGE), (text_key, TEXT)):
            hits = []
            for split in splits:
                values = torch.from_numpy(np.ascontiguousarray(getattr(split, key)))
                logits = classifier(values.to(device=parameter.device, dtype=parameter.dtype))
                hits.append((logits.argmax(dim=1) == modality).cpu())
            rates.append(float(torch.cat(hits).double().mean()))
        return 0.5 * (rates[0] + rates[1])

    scores = {"feature_accuracy": balanced(bare.features, "image_features", "text_features")}
    has_codes = all(split.image_codes is not None and split.text_codes is not None for split in splits)
    if has_codes and bare.codes is not None:
        scores["code_accuracy"] = balanced(bare.codes, "image_codes", "text_codes")
    bare.train(was_training)
    return scores


def method_for(spec: JobSpec, train_split: CrossModalDataset) -> CrossModalMethod:
    """The job's cross-modal method with the text context of its training split."""
    from retrieval.methods.registry import build_method

    method = build_method(spec)
    if not isinstance(method, CrossModalMethod):
        raise TypeError(f"method {spec.method.name!r} is not cross-modal")
    return method.bind_training_split(train_split)


def score_model(
    method: CrossModalMethod,
    model: torch.nn.Module,
    *,
    spec: JobSpec,
    splits: CrossModalSplits | None = None,
    device: torch.device | str = "cpu",
    discriminator: torch.nn.Module | None = None,
) -> dict[str, float]:
    """The method's metrics of `model` on the job's query and retrieval splits (read from the spec if not given).

    With the trained `discriminator`, also its balanced accuracy on the features (and codes) of
    both modalities of those held-out items: `disc/feature_accuracy` (and `disc/code_accuracy`);
    0.5 when the modality classifier cannot tell images from texts.
    """
    query, retrieval = encode_evaluation_splits(method, model, spec=spec, splits=splits, device=device)
    scores = method.score(query, retrieval)
    if discriminator is not None:
        held_out = modality_accuracy(discriminator, [query, retrieval])
        scores.update({f"{HELD_OUT_DISCRIMINATOR_PREFIX}{key}": value for key, value in held_out.items()})
    return scores


def encode_evaluation_splits(
    method: CrossModalMethod,
    model: torch.nn.Module,
    *,
    spec: JobSpec,
    splits: CrossModalSplits | None = None,
    device: torch.device | str = "cpu",
) -> tuple[EncodedSplit, EncodedSplit]:
    # A worker passes the splits it already holds: a caption JSON is not parsed again every epoch.
    splits = splits or cross_modal_datasets_from_spec(spec.dataset)
    batch_size = spec.train.embed_batch_size
    query = method.encode_split(model, splits.query, batch_size=batch_size, device=device)
    retrieval = method.encode_split(model, splits.retrieval, batch_size=batch_size, device=device)
    return query, retrieval


def add_cross_modal_figures(
    evaluation: Evaluation,
    *,
    method: CrossModalMethod,
    spec: JobSpec,
    query: EncodedSplit,
    retrieval: EncodedSplit,
    history: Sequence[Mapping[str, Any]],
) -> None:
    """The results table, training curves, the discriminator's accuracy and (hashing) PR and P@N curves."""
    from retrieval.evaluation.cross_modal import hamming_pr_curve, precision_at_n
    from retrieval.evaluation.cross_modal_plots import (
        discriminator_accuracy_figure,
        pr_curve_figure,
        precision_at_n_figure,
    )
    from retrieval.evaluation.plots import training_curve_figure
    from retrieval.evaluation.suite import format_table
    from retrieval.models.codes import pack_codes

    metrics = evaluation.metrics
    columns = sorted(metrics)
    evaluation.texts["evaluation/table.md"] = (
        format_table({"trained": metrics}, columns, markdown=True, label="model") + "\n"
    )
    rows = [dict(row) for row in history]
    if rows:
        keys = [key for key in DISCRIMINATOR_KEYS if any(key in row for row in rows)]
        if keys:
            evaluation.figures["training/discriminator_accuracy.png"] = discriminator_accuracy_figure(
                rows, keys=keys, title=f"{spec.name}: modality classifier accuracy (0.5 = maximally uncertain)"
            )
        loss_keys = [key for key in ("train/loss", "train/entropy") if any(key in row for row in rows)]
        evaluation.figures["training/curves.png"] = training_curve_figure(rows, keys=loss_keys)
    if not method.hashing:
        return
    query_labels, retrieval_labels = relevance_labels(query), relevance_labels(retrieval)
    directions = {
        "i2t": (query.images, query_labels, retrieval.texts, retrieval_labels[retrieval.owner]),
        "t2i": (query.texts, query_labels[query.owner], retrieval.images, retrieval_labels),
    }
    bits = query.images.shape[1]
    pr_curves, p_at_n = {}, {}
    for direction, (queries, labels_q, gallery, labels_r) in directions.items():
        packed_queries, packed_gallery = pack_codes(queries), pack_codes(gallery)
        name = f"{direction} {bits} bits"
        pr_curves[name] = hamming_pr_curve(packed_queries, labels_q, packed_gallery, labels_r)
        # A cut-off beyond the gallery counts the whole gallery, as in the method's own scores.
        ns = sorted({min(n, len(gallery)) for n in spec.evaluation.precision_ns})
        p_at_n[name] = precision_at_n(packed_queries, labels_q, packed_gallery, labels_r, ns=ns)
    evaluation.documents["evaluation/curves.json"] = {
        "pr_curves": {
            name: {"precision": list(map(float, p)), "recall": list(map(float, r))}
            for name, (p, r) in pr_curves.items()
        },
        "precision_at_n": {name: {str(n): v for n, v in values.items()} for name, values in p_at_n.items()},
    }
    evaluation.figures["evaluation/pr_curves.png"] = pr_curve_figure(
        pr_curves, title=f"{spec.name}: precision-recall (Hamming radius)"
    )
    evaluation.figures["evaluation/precision_at_n.png"] = precision_at_n_figure(
        p_at_n, title=f"{spec.name}: precision@N"
    )


def tag_vectors(texts: Sequence[str], *, tag_names: Sequence[str], tag_dim: int) -> np.ndarray:
    """Tag vectors `[T, V]` of free texts: 1 where a tag word occurs in the text (a text query to a BoW model)."""
    from retrieval.models.text import tokenize

    if len(tag_names) != tag_dim:
        raise ConfigError(f"the model has {tag_dim} tags but {len(tag_names)} tag names")
    position = {name.lower(): column for column, name in enumerate(tag_names)}
    vectors = np.zeros((len(texts), tag_dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in tokenize(text):
            column = position.get(word)
            if column is not None:
                vectors[row, column] = 1.0
    return vectors


def _or(value: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if value is None else value


def relevance_labels(split: EncodedSplit) -> np.ndarray:
    """Multi-hot labels for relevance; a dataset without categories: each image is its own class."""
    if split.image_labels is not None:
        return split.image_labels
    return np.eye(split.images.shape[0], dtype=np.float32)


def _balanced_cross_entropy(logits: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Mean of the per-modality mean cross-entropies: 5 captions per image do not outvote the image."""
    losses = F.cross_entropy(logits, modality, reduction="none")
    return 0.5 * (losses[modality == IMAGE].mean() + losses[modality == TEXT].mean())


def _balanced_accuracy(logits: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    correct = (logits.argmax(dim=1) == modality).float()
    return 0.5 * (correct[modality == IMAGE].mean() + correct[modality == TEXT].mean()).detach()


def _bare(model: nn.Module) -> CrossModalNetwork:
    network = unwrap(model)
    if not isinstance(network, CrossModalNetwork):
        raise TypeError(f"expected a CrossModalNetwork, got {type(network).__name__}")
    return network
