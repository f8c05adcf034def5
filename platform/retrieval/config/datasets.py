"""Dataset settings: the dataset table `DATASETS` (every dataset name, its kind and loader) and the
`dataset` section of a job spec (`DatasetSpec`, its `split` and `cross_modal` splits).

The datasets are loaded in `retrieval.data`: `retrieval.data.catalog` imports the loader a row names.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

from pydantic import Field, field_validator, model_validator

from retrieval.config.base import IMAGENET_MEAN, IMAGENET_STD, StrictModel


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
