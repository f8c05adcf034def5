"""Instance-level (landmark) retrieval benchmarks: revisited Oxford/Paris, INRIA Holidays, UKBench.

Retrieval here is not by class: each query has its own lists of relevant database
images. A benchmark is a database, a set of queries and, per query, the database
indices that count as easy and hard positives and those to ignore (junk), which is
what the revisited protocol's Easy/Medium/Hard mAP, Holidays' mAP and UKBench's N-S
score are computed from.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.config import LANDMARK_DATASETS, dataset_names
from retrieval.data.base import ImageDataset, ImageFileLoader, ImageLoader, read_image
from retrieval.data.catalog import load_landmark_dataset
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

# The layouts `load_revisited` reads (gnd_<name>.pkl); which benchmarks exist is `retrieval.config.DATASETS`.
REVISITED_NAMES: tuple[str, ...] = ("roxford5k", "rparis6k")
# The landmark benchmarks of the dataset table (kind "landmark"), in table order.
LANDMARK_BENCHMARKS: tuple[str, ...] = LANDMARK_DATASETS

_HOLIDAYS_NAME = re.compile(r"^([0-9]{4})([0-9]{2})$")
_UKBENCH_NAME = re.compile(r"^ukbench([0-9]{5})$")
_UKBENCH_GROUP_SIZE = 4


def _index_array(values: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class QueryGroundTruth:
    """The database images a query's ranking is judged by (indices into the database).

    Attributes:
        easy: Easy positives `[E]`, int64 (Holidays and UKBench: every positive).
        hard: Hard positives `[H]`, int64 (empty except for the revisited datasets).
        junk: Images removed from the ranking before scoring `[J]`, int64.
    """

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray

    def __post_init__(self) -> None:
        # Read-only int64 copies, so a metric cannot change the benchmark it scores.
        for field_name in ("easy", "hard", "junk"):
            object.__setattr__(self, field_name, _index_array(getattr(self, field_name)))


@dataclass(frozen=True, eq=False)
class LandmarkBenchmark:
    """A landmark retrieval benchmark: database and query images and the ground truth of each query.

    Both datasets have labels all 0 (class names ["database"] and ["query"]), no
    transform, and sources that are their image files.

    Attributes:
        name: One of `LANDMARK_BENCHMARKS`.
        database: The images searched, `[N]`.
        queries: The query images `[Q]`, already cropped to their box where the
            benchmark gives one.
        ground_truth: One `QueryGroundTruth` per query, indices into `database`.

    Raises:
        DatasetError: The number of ground truths differs from the number of queries, or
            an index lies outside `[0, len(database))`.
    """

    name: str
    database: ImageDataset
    queries: ImageDataset
    ground_truth: list[QueryGroundTruth]

    def __post_init__(self) -> None:
        if len(self.ground_truth) != len(self.queries):
            raise DatasetError(
                f"benchmark {self.name}: {len(self.queries)} queries but {len(self.ground_truth)} ground truths"
            )
        for query_index, truth in enumerate(self.ground_truth):
            for field_name in ("easy", "hard", "junk"):
                indices = getattr(truth, field_name)
                if indices.size and (indices.min() < 0 or indices.max() >= len(self.database)):
                    raise DatasetError(
                        f"benchmark {self.name}: query {query_index} {field_name} indices must lie in "
                        f"[0, {len(self.database)}), got range [{indices.min()}, {indices.max()}]"
                    )


@dataclass(frozen=True)
class CroppedImageFileLoader:
    """Loads one image file lazily, as RGB, cropped to a box. Picklable.

    Attributes:
        path: Image file.
        box: `(x1, y1, x2, y2)` in the original image's pixels; rounded to whole pixels
            (as `PIL.Image.crop` does) and clamped to the image.
    """

    path: Path
    box: tuple[float, float, float, float]

    def __call__(self) -> Image.Image:
        image = read_image(self.path)
        width, height = image.size
        x1, y1, x2, y2 = (round(value) for value in self.box)
        left, top = min(max(x1, 0), width), min(max(y1, 0), height)
        right, bottom = min(max(x2, 0), width), min(max(y2, 0), height)
        if right <= left or bottom <= top:
            raise DatasetError(
                f"query box {list(self.box)} of {self.path} holds no pixel of the {width}x{height} image"
            )
        return image.crop((left, top, right, bottom))


def _dataset(*, loaders: Sequence[ImageLoader], sources: Sequence[str], class_name: str) -> ImageDataset:
    return ImageDataset(
        loaders=loaders,
        labels=np.zeros(len(loaders), dtype=np.int64),
        class_names=[class_name],
        sources=sources,
        transform=None,
    )


def _check_root(root: str | Path) -> Path:
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DatasetError(f"dataset root {root_path} does not exist")
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root_path} is not a directory")
    return root_path


def _jpeg_stems(folder: Path) -> dict[str, Path]:
    """The `.jpg`/`.jpeg` files of `folder` (any case, hidden ones skipped), by file name stem."""
    return {
        path.stem: path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg") and not path.name.startswith(".")
    }


def _missing_files_error(missing: Sequence[Path], *, listed_in: Path) -> DatasetError:
    shown = ", ".join(str(path) for path in missing[:5])
    return DatasetError(f"{len(missing)} image(s) listed in {listed_in} do not exist, e.g. {shown}")


def _checked_indices(value: object, *, key: str, where: str, num_database: int) -> np.ndarray:
    if value is None:
        return _index_array([])
    try:
        indices = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{where}: {key!r} must be a list of database indices, got {value!r}") from error
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise DatasetError(f"{where}: {key!r} must be a list of integer database indices, got dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_database):
        raise DatasetError(
            f"{where}: {key!r} index range [{indices.min()}, {indices.max()}] is outside the "
            f"{num_database} database images"
        )
    return _index_array(indices)


def _checked_box(value: object, *, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        box = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{where}: 'bbx' must be 4 numbers [x1, y1, x2, y2] or None, got {value!r}") from error
    if box.size != 4 or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(
            f"{where}: 'bbx' must be 4 finite numbers [x1, y1, x2, y2] with x2 > x1, y2 > y1, got {value!r}"
        )
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def _read_ground_truth_pickle(path: Path) -> tuple[list[str], list[str], list[object]]:
    """Returns the database names `[N]`, the query names `[Q]` and the per-query records `[Q]`."""
    try:
        with path.open("rb") as stream:
            contents = pickle.load(stream)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
        raise DatasetError(f"cannot read ground truth {path}: {type(error).__name__}: {error}") from error
    if not isinstance(contents, dict):
        raise DatasetError(f"ground truth {path} must hold a dict, got {type(contents).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in contents:
            raise DatasetError(f"ground truth {path} has no key {key!r} (keys: {sorted(map(str, contents))})")
        if not isinstance(contents[key], (list, tuple)):
            raise DatasetError(f"ground truth {path}: {key!r} must be a list, got {type(contents[key]).__name__}")
    database_names = [str(image_name) for image_name in contents["imlist"]]
    query_names = [str(image_name) for image_name in contents["qimlist"]]
    records = list(contents["gnd"])
    if len(records) != len(query_names):
        raise DatasetError(f"{path}: 'gnd' has {len(records)} entries for {len(query_names)} queries")
    return database_names, query_names, records


def load_revisited(*, root: str | Path, name: str) -> LandmarkBenchmark:
    """Loads revisited Oxford5k or Paris6k in the revisitop / cnnimageretrieval-pytorch layout.

    Expected tree (`root` is the dataset folder or the folder holding it)::

        roxford5k/                      or rparis6k/
        ├── gnd_roxford5k.pkl           dict: 'imlist', 'qimlist', 'gnd'
        └── jpg/
            ├── all_souls_000000.jpg    one file per name of 'imlist' and 'qimlist'
            └── ...

    'imlist' names the database images and 'qimlist' the queries (names without
    extension); 'gnd' has one dict per query with 'bbx' (`[x1, y1, x2, y2]` in pixels,
    or None) and 'easy', 'hard', 'junk' (indices into 'imlist'). Queries are cropped to
    their box, as the protocol prescribes. The protocol's Easy setting scores easy
    positives and ignores hard + junk; Medium scores easy + hard and ignores junk;
    Hard scores hard and ignores easy + junk.

    The ground truth is a Python pickle, which can run code when read: load only the
    files published by the benchmark's authors.

    Args:
        root: The dataset folder (holding `gnd_<name>.pkl`) or its parent.
        name: "roxford5k" or "rparis6k".

    Returns:
        The benchmark: database `[N]`, queries `[Q]`, one ground truth per query.

    Raises:
        DatasetError: `name` is not a revisited dataset; the ground truth file is
            missing, unreadable or malformed (the message names the file, the query and
            the key); or an image file is missing.
    """
    if name not in REVISITED_NAMES:
        raise DatasetError(f"unknown revisited dataset {name!r}; expected one of {list(REVISITED_NAMES)}")
    root_path = _check_root(root)
    file_name = f"gnd_{name}.pkl"
    candidates = (root_path, root_path / name)
    dataset_root = next((candidate for candidate in candidates if (candidate / file_name).is_file()), None)
    if dataset_root is None:
        raise DatasetError(
            f"no {name} ground truth under {root_path}: expected {candidates[0] / file_name} "
            f"or {candidates[1] / file_name}"
        )
    gnd_path = dataset_root / file_name
    database_names, query_names, query_records = _read_ground_truth_pickle(gnd_path)

    images_folder = dataset_root / "jpg"
    database_paths = [images_folder / f"{image_name}.jpg" for image_name in database_names]
    query_paths = [images_folder / f"{image_name}.jpg" for image_name in query_names]
    missing = [path for path in (*database_paths, *query_paths) if not path.is_file()]
    if missing:
        raise _missing_files_error(missing, listed_in=gnd_path)

    ground_truth: list[QueryGroundTruth] = []
    query_loaders: list[ImageLoader] = []
    for query_index, (query_name, record) in enumerate(zip(query_names, query_records, strict=True)):
        where = f"{gnd_path} query {query_index} ({query_name!r})"
        if not isinstance(record, dict):
            raise DatasetError(
                f"{where}: expected a dict with 'bbx', 'easy', 'hard', 'junk', got {type(record).__name__}"
            )
        for key in ("easy", "hard", "junk"):
            if key not in record:
                raise DatasetError(f"{where}: no key {key!r} (keys: {sorted(map(str, record))})")
        ground_truth.append(
            QueryGroundTruth(
                **{
                    key: _checked_indices(record[key], key=key, where=where, num_database=len(database_paths))
                    for key in ("easy", "hard", "junk")
                }
            )
        )
        box = _checked_box(record.get("bbx"), where=where)
        query_path = query_paths[query_index]
        query_loaders.append(
            ImageFileLoader(path=query_path) if box is None else CroppedImageFileLoader(path=query_path, box=box)
        )

    logger.info("%s %s: %d database images, %d queries", name, dataset_root, len(database_paths), len(query_paths))
    return LandmarkBenchmark(
        name=name,
        database=_dataset(
            loaders=[ImageFileLoader(path=path) for path in database_paths],
            sources=[str(path) for path in database_paths],
            class_name="database",
        ),
        queries=_dataset(loaders=query_loaders, sources=[str(path) for path in query_paths], class_name="query"),
        ground_truth=ground_truth,
    )


def _images_folder(root_path: Path, *, subfolder: str) -> Path:
    # The archives unpack into a subfolder; a user may also point at that folder itself.
    return root_path / subfolder if (root_path / subfolder).is_dir() else root_path


def load_holidays(*, root: str | Path) -> LandmarkBenchmark:
    """Loads INRIA Holidays (1,491 images, 500 queries) from its published archives.

    Expected tree (jpg1.tar.gz and jpg2.tar.gz unpack into `jpg/`; the images may
    also lie directly in `root`)::

        root/
        └── jpg/
            ├── 100000.jpg      group 1000, its query (last two digits 00)
            ├── 100001.jpg      group 1000, a relevant image
            ├── 100100.jpg
            └── ...

    The database is every image, sorted by name; the queries are the images whose
    name ends in "00", one per group (the first four digits). A query's easy
    positives are the other images of its group, it has no hard positives, and its
    junk is its own database index, so it is left out of its own ranking as the
    Holidays protocol prescribes.

    Args:
        root: The folder holding `jpg/`, or the image folder itself.

    Returns:
        The benchmark: database `[N]`, queries `[Q]`, one ground truth per query.

    Raises:
        DatasetError: `root` is missing; it holds no JPEG; a JPEG is not named with six
            digits; or a group has no query image (name ending in "00").
    """
    root_path = _check_root(root)
    images_folder = _images_folder(root_path, subfolder="jpg")
    files = _jpeg_stems(images_folder)
    if not files:
        raise DatasetError(f"no Holidays image (.jpg) in {images_folder}")
    bad_names = sorted(stem for stem in files if not _HOLIDAYS_NAME.match(stem))
    if bad_names:
        raise DatasetError(
            f"Holidays images must be named with six digits (e.g. 100000.jpg), got {len(bad_names)} other(s) in "
            f"{images_folder}, e.g. {bad_names[:5]}"
        )
    database_stems = sorted(files)
    members_of_group: dict[str, list[int]] = {}
    for database_index, stem in enumerate(database_stems):
        members_of_group.setdefault(stem[:4], []).append(database_index)
    groups_without_query = sorted(group for group in members_of_group if f"{group}00" not in files)
    if groups_without_query:
        raise DatasetError(
            f"Holidays groups need a query image named <group>00.jpg; in {images_folder} "
            f"{len(groups_without_query)} group(s) have none, e.g. {groups_without_query[:5]}"
        )

    database_paths = [files[stem] for stem in database_stems]
    query_indices = [database_index for database_index, stem in enumerate(database_stems) if stem.endswith("00")]
    ground_truth = [
        QueryGroundTruth(
            easy=_index_array(
                [member for member in members_of_group[database_stems[query_index][:4]] if member != query_index]
            ),
            hard=_index_array([]),
            junk=_index_array([query_index]),
        )
        for query_index in query_indices
    ]
    logger.info("Holidays %s: %d database images, %d queries", images_folder, len(database_paths), len(query_indices))
    return LandmarkBenchmark(
        name="holidays",
        database=_dataset(
            loaders=[ImageFileLoader(path=path) for path in database_paths],
            sources=[str(path) for path in database_paths],
            class_name="database",
        ),
        queries=_dataset(
            loaders=[ImageFileLoader(path=database_paths[index]) for index in query_indices],
            sources=[str(database_paths[index]) for index in query_indices],
            class_name="query",
        ),
        ground_truth=ground_truth,
    )


def load_ukbench(*, root: str | Path) -> LandmarkBenchmark:
    """Loads UKBench (10,200 images of 2,550 objects, 4 views each) from its published layout.

    Expected tree (the images may also lie directly in `root`)::

        root/
        └── full/
            ├── ukbench00000.jpg    object 0, view 1
            ├── ukbench00001.jpg    object 0, view 2
            ├── ...
            └── ukbench10199.jpg

    Image `n` shows object `n // 4`. Every image is a query against the whole database
    (queries and database are the same images, in number order); its easy positives
    are the 4 images of its object, itself included, as the N-S score (relevant images
    in the top 4) counts it; hard and junk are empty.

    Args:
        root: The folder holding `full/`, or the image folder itself.

    Returns:
        The benchmark: database `[N]`, queries `[N]`, one ground truth per query.

    Raises:
        DatasetError: `root` is missing; it holds no image; a JPEG is not named
            ukbench<5 digits>.jpg; the numbers are not 0..N-1; or N is not a multiple of 4.
    """
    root_path = _check_root(root)
    images_folder = _images_folder(root_path, subfolder="full")
    files = _jpeg_stems(images_folder)
    if not files:
        raise DatasetError(f"no UKBench image (.jpg) in {images_folder}")
    path_of_number: dict[int, Path] = {}
    bad_names: list[str] = []
    for stem, path in sorted(files.items()):
        match = _UKBENCH_NAME.match(stem)
        if match is None:
            bad_names.append(stem)
        else:
            path_of_number[int(match.group(1))] = path
    if bad_names:
        raise DatasetError(
            f"UKBench images must be named ukbench<5 digits>.jpg, got {len(bad_names)} other(s) in {images_folder}, "
            f"e.g. {bad_names[:5]}"
        )
    expected_count = max(path_of_number) + 1
    missing_numbers = sorted(set(range(expected_count)) - set(path_of_number))
    if missing_numbers:
        raise DatasetError(
            f"UKBench images must be numbered 0..N-1 with none missing: {images_folder} lacks "
            f"{len(missing_numbers)} number(s), e.g. "
            + ", ".join(f"ukbench{number:05d}.jpg" for number in missing_numbers[:5])
        )
    if expected_count % _UKBENCH_GROUP_SIZE:
        raise DatasetError(
            f"UKBench holds {_UKBENCH_GROUP_SIZE} images per object, but {images_folder} has {expected_count} "
            f"images, not a multiple of {_UKBENCH_GROUP_SIZE}"
        )

    paths = [path_of_number[number] for number in range(expected_count)]
    ground_truth = [
        QueryGroundTruth(
            easy=_index_array(np.arange(_UKBENCH_GROUP_SIZE) + number // _UKBENCH_GROUP_SIZE * _UKBENCH_GROUP_SIZE),
            hard=_index_array([]),
            junk=_index_array([]),
        )
        for number in range(expected_count)
    ]
    loaders = [ImageFileLoader(path=path) for path in paths]
    sources = [str(path) for path in paths]
    logger.info("UKBench %s: %d images of %d objects", images_folder, len(paths), len(paths) // _UKBENCH_GROUP_SIZE)
    return LandmarkBenchmark(
        name="ukbench",
        database=_dataset(loaders=loaders, sources=sources, class_name="database"),
        queries=_dataset(loaders=loaders, sources=sources, class_name="query"),
        ground_truth=ground_truth,
    )


def load_roxford5k(*, root: str | Path) -> LandmarkBenchmark:
    """Revisited Oxford5k from `root` (the `roxford5k` row of the dataset table; see `load_revisited`)."""
    return load_revisited(root=root, name="roxford5k")


def load_rparis6k(*, root: str | Path) -> LandmarkBenchmark:
    """Revisited Paris6k from `root` (the `rparis6k` row of the dataset table; see `load_revisited`)."""
    return load_revisited(root=root, name="rparis6k")


def load_landmark_benchmark(*, name: str, root: str | Path) -> LandmarkBenchmark:
    """Loads the landmark benchmark `name` from `root` with the loader its dataset table row names.

    Args:
        name: A dataset of kind "landmark" in `retrieval.config.DATASETS`: "roxford5k",
            "rparis6k", "holidays", "ukbench", ...
        root: The benchmark's folder.

    Returns:
        The benchmark.

    Raises:
        DatasetError: `name` is unknown, or the loader rejects the data.
    """
    benchmarks = dataset_names("landmark")
    if name not in benchmarks:
        raise DatasetError(f"unknown landmark benchmark {name!r}; expected one of {list(benchmarks)}")
    return load_landmark_dataset(name, root=root)
