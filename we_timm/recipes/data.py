"""Data for train.py and validate.py: the built-in offline `digits` set, timm's datasets and loaders.

`digits` is scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
classes; no download): each image becomes a grayscale-as-RGB PIL image,
upsampled to `image_size` pixels so timm's transforms (random resized crop,
flips, AutoAugment, normalisation) apply as to any photo. The train /
validation split is stratified and fixed by `split_seed`, so every run, rank
and resume sees the same images in each split.

Everything else goes through `timm.data.create_dataset`: ImageFolder / ImageTar
for an empty name (or "imagefolder"), `torch/cifar10`, `hfds/...`, ... . Loaders
are timm's `create_loader`. Every failure a user can cause is a one-line `DataError`.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import random
import pickle
from typing import Any, Callable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from .errors import DataError, DataReadError, one_line

_logger = logging.getLogger(__name__)

DIGITS = "digits"
FOLDER_NAMES = ("", "folder", "imagefolder")  # timm's ImageFolder / ImageTar reader
TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("validation", "val", "valid", "eval", "test")
DIGITS_IMAGE_SIZE = 32  # digits are upsampled from 8 px so that crops and AutoAugment have room to act
DIGITS_VAL_FRACTION = 0.2  # 80/20 stratified split: 1437 train / 360 validation images
DIGITS_SPLIT_SEED = 0  # fixed split, independent of --seed (which only drives training randomness)
SUBSET_SEED = 0  # --train/val-num-samples of a map-style set: one fixed random subset, independent of --seed
# timm's iterable (streaming) datasets: name prefix -> the package its reader needs; each rank reads its own shards
STREAMING = {"wds": "webdataset", "hfids": "datasets", "tfds": "tensorflow_datasets"}
PACKAGES = {**STREAMING, "hfds": "datasets"}


class DigitsDataset(torch.utils.data.Dataset):
    """One split of scikit-learn's digits as `(PIL RGB image, int label)` pairs.

    timm's `create_loader` sets `.transform`; `.classes` and `.targets` follow
    torchvision's datasets.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = DIGITS_IMAGE_SIZE,
        val_fraction: float = DIGITS_VAL_FRACTION,
        split_seed: int = DIGITS_SPLIT_SEED,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        split = split.lower()
        if split not in TRAIN_SPLITS + EVAL_SPLITS:
            raise DataError(f"digits has splits 'train' and 'validation', not {split!r}")
        if image_size < 8:
            raise DataError(f"digits image_size must be >= 8, got {image_size}")
        data = load_digits()
        index = np.arange(len(data.target))
        train_idx, val_idx = train_test_split(
            index, test_size=val_fraction, random_state=split_seed, stratify=data.target
        )
        keep = np.sort(train_idx if split in TRAIN_SPLITS else val_idx)
        # 0..16 ink levels -> 0..255 grey levels
        self.images = np.round(data.images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self.targets = [int(t) for t in data.target[keep]]
        self.classes = [str(c) for c in range(10)]
        self.split = split
        self.image_size = image_size
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class DatasetView(torch.utils.data.Dataset):
    """A dataset over another one; setting `.transform` (as timm's `create_loader` does) reaches the wrapped one."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    @property
    def transform(self) -> Callable | None:
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.dataset.transform = value


class FixedSubset(DatasetView):
    """`num_samples` items of a map-style dataset drawn at random once (the same in every run and process),
    kept in their original order: a class-sorted image folder keeps all its classes, unlike its first N items.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_samples: int):
        super().__init__(dataset)
        n = len(dataset)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[: min(int(num_samples), n)]
        self.indices = sorted(pick.tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, index); also used per training step (index = step)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


def seed_everything(key: int, devices: bool = True) -> None:
    """Seed Python's, NumPy's and torch's global generators (what timm's transforms, mixup and dropout draw from).

    `devices=False` seeds torch's CPU generator only: 1 us instead of `torch.manual_seed`'s ~170 us (which also
    seeds every accelerator), enough for the CPU transforms of a sample.
    """
    random.seed(key)
    np.random.seed(key % 2 ** 32)
    if devices:
        torch.manual_seed(key)
    else:
        torch.default_generator.manual_seed(key)


class SeededSamples(DatasetView):
    """A training set whose sample `i` of draw `d` is read and augmented with every RNG seeded from (seed, d, i).

    Keys are `d * len + i` (what `EpochShuffle` yields; the draw is the epoch, or with --aug-repeats one per copy),
    so a sample's augmentation depends on nothing else: not on the worker that reads it, on worker persistence,
    on what was read before, or on a resume mid-epoch.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        super().__init__(dataset)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        draw, index = divmod(int(key), len(self.dataset))
        seed_everything(sample_seed(self.seed, draw, index), devices=False)
        return self.dataset[index]


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of `n` samples per epoch, drawn from (seed, epoch) alone; yields `SeededSamples` keys.

    `set_epoch` (called by Accelerate's loader) picks the epoch; the order never depends on history.

    `repeats` > 0 is timm's RepeatAugSampler (--aug-repeats): the epoch's order lists every image `repeats` times
    in a row and this process takes every `world`-th entry from `rank` on, so the copies of an image land on
    different processes (on one process: in the same or the next batch). Each process keeps timm's count of
    samples (`repeat_selection`), so an epoch is about as long as without repeats. Every copy is its own draw, a
    different augmentation. The sampler is already per process: Accelerate must not shard it (`per_rank`).
    """

    def __init__(self, n: int, seed: int, repeats: float = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.repeats, self.rank, self.world = repeats, rank, world
        self.per_rank = repeats > 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return repeat_selection(self.n, self.world) if self.per_rank else self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1)))
        if not self.per_rank:
            return iter((order + self.epoch * self.n).tolist())
        keys = self.repeated_keys(order)
        return iter(keys[self.rank::self.world][: len(self)].tolist())

    def repeated_keys(self, order: torch.Tensor) -> torch.Tensor:
        """Every process's keys of the epoch, in order: image `order[j]` at positions `i` with `i // repeats == j`
        (timm's rule, fractional repeats included), padded by the first entries to a multiple of `world`."""
        size, per_copy = math.ceil(self.repeats * self.n), math.ceil(self.repeats)
        j = torch.div(torch.arange(size, dtype=torch.float64), self.repeats, rounding_mode="floor").long()
        _, counts = torch.unique_consecutive(j, return_counts=True)
        copy = torch.arange(size) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pad = -size % self.world
        j, copy = torch.cat([j, j[:pad]]), torch.cat([copy, copy[:pad] + per_copy])  # padding: draws of their own
        return (self.epoch * 2 * per_copy + copy) * self.n + order[j]


def repeat_selection(n: int, world: int) -> int:
    """Samples per process and epoch with --aug-repeats: timm's RepeatAugSampler count (the data set rounded down
    to a multiple of 256, split over the processes); for sets under 256 images, where that is 0, ceil(n / world)."""
    return (n // 256 * 256) // world or math.ceil(n / world)


DEFAULT_MAX_BAD_IMAGES = 10  # unreadable images tolerated per split and epoch (timm skips them) before the run stops
_reading: list["BadImageCounter"] = []  # the counter whose item this process is reading


class _SkippedSamples(logging.Filter):
    """Sees timm's "Skipped sample (index i)" warnings (in whichever process reads) and counts them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if _reading and msg.startswith("Skipped sample"):
            _reading[-1].skipped(msg)
        return True


_SKIPPED = _SkippedSamples()


class BadImageCounter(DatasetView):
    """A map-style dataset whose unreadable images (skipped by timm) are named with their path and counted
    across DataLoader workers; more than `limit` in one pass (`per`: train.py's epoch, validate.py's
    evaluation) raises DataReadError."""

    def __init__(self, dataset: torch.utils.data.Dataset, what: str, limit: int, per: str = "in one epoch"):
        import multiprocessing

        self.dataset, self.what, self.limit, self.per = dataset, what, limit, per
        self.count = multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Value("i", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        logging.getLogger("timm.data.dataset").addFilter(_SKIPPED)  # once per process (addFilter ignores repeats)
        _reading.append(self)
        try:
            item = self.dataset[index]
        finally:
            _reading.pop()
        if self.count.value > self.limit:
            raise DataReadError(f"more than {self.limit} unreadable {self.what} images {self.per} (named in the "
                                "warnings above); fix or remove them, or raise --max-bad-images")
        return item

    def skipped(self, message: str) -> None:
        inner = getattr(self.dataset, "dataset", self.dataset)  # under FixedSubset
        index = message.split("(index ", 1)[-1].split(")", 1)[0]
        path = inner.filename(int(index), absolute=True) if hasattr(inner, "filename") and index.isdigit() else "?"
        _logger.warning(f"unreadable {self.what} image skipped: {path} ({message.split('). ', 1)[-1]})")
        with self.count.get_lock():
            self.count.value += 1

    def take_count(self) -> int:
        """Unreadable images met since the last call (the epoch's), and start counting anew."""
        with self.count.get_lock():
            n, self.count.value = self.count.value, 0
        return n


def report_bad_images(epoch: int, *datasets: Any) -> None:
    """The end-of-epoch summary of the unreadable images each split skipped."""
    for dataset in datasets:
        while isinstance(dataset, DatasetView) and not isinstance(dataset, BadImageCounter):
            dataset = dataset.dataset  # e.g. under SeededSamples
        if isinstance(dataset, BadImageCounter):
            n = dataset.take_count()
            if n:
                _logger.warning(f"epoch {epoch}: {n} unreadable {dataset.what} image(s) skipped (named above; the "
                                f"run stops beyond --max-bad-images {dataset.limit} in one epoch)")


def num_classes_of(dataset: Any) -> int | None:
    """Class count a dataset declares (torchvision `classes`, timm readers' `class_to_idx`), else None."""
    for obj in (dataset, getattr(dataset, "dataset", None), getattr(dataset, "reader", None)):
        if obj is None:
            continue
        for attr in ("classes", "class_to_idx"):
            value = getattr(obj, attr, None)
            if isinstance(value, (Sequence, dict)) and not isinstance(value, str) and len(value) > 0:
                return len(value)
        reader = getattr(obj, "reader", None)
        if reader is not None and getattr(reader, "class_to_idx", None):
            return len(reader.class_to_idx)
    return None


def probe_dataset(dataset: Any, split: str) -> None:
    """Read one sample before anything is written: unreadable data is a one-line DataError, not a traceback mid-run."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not len(dataset):
        return
    try:
        dataset[0]  # timm's ImageDataset skips a few bad files itself and raises when too many fail in a row
    except (OSError, RuntimeError, ValueError) as e:
        first = f" from {dataset.filename(0, absolute=True)} on" if hasattr(dataset, "filename") else ""
        raise DataError(f"cannot read split {split!r} of the data{first}: {one_line(e)[:200]}") from None


def create_dataset(
    name: str,
    root: str | None,
    split: str,
    *,
    is_training: bool,
    image_size: int = DIGITS_IMAGE_SIZE,
    num_samples: int | None = None,
    **timm_kwargs: Any,
) -> torch.utils.data.Dataset:
    """`digits` or anything `timm.data.create_dataset` knows, optionally cut to `num_samples`.

    `num_samples` has timm's meaning for streaming datasets (`wds/`, `hfids/`, `tfds/`: the samples of an
    epoch, over all processes); a map-style set keeps a fixed random subset (`FixedSubset`). Failures a user
    can cause (missing folder or package, dataset not on disk, unknown split) raise `DataError` in one line.
    """
    if num_samples is not None and num_samples <= 0:
        raise DataError(f"num_samples must be positive, got {num_samples}")
    prefix = name.partition("/")[0].lower() if "/" in name else ""
    if name == DIGITS:
        dataset = DigitsDataset(split, image_size=image_size)
    elif prefix in STREAMING:
        return _timm_dataset(name, root, split, is_training, {**timm_kwargs, "num_samples": num_samples})
    else:
        dataset = _timm_dataset(name, root, split, is_training, timm_kwargs)
    if num_samples is not None and hasattr(dataset, "__len__"):
        dataset = FixedSubset(dataset, num_samples)
    return dataset


def _timm_dataset(name: str, root: str | None, split: str, is_training: bool, kwargs: dict[str, Any]) -> Any:
    from timm.data import create_dataset as timm_create_dataset

    if not root:
        raise DataError(f"dataset {name or 'ImageFolder'} needs a root folder (--data-dir)")
    package = PACKAGES.get(name.partition("/")[0].lower()) if "/" in name else None
    if package and importlib.util.find_spec(package) is None:
        raise DataError(f"--dataset {name} needs the {package} package: pip install 'we_timm[streaming]'")
    name = "" if name.lower() in FOLDER_NAMES else name
    if root and not os.path.isdir(root):
        raise DataError(f"--data-dir {root} is not a directory")
    if not name:  # an image folder: the split folder is found here, never timm's silent fall-back to the root
        folder = split_folder(root, split, is_training)
        check_class_folders(folder, kwargs.get("class_map") or "", all_classes=is_training)
        root, kwargs = folder, {**kwargs, "search_split": False}
    try:
        dataset = timm_create_dataset(name, root=root, split=split, is_training=is_training, **kwargs)
    except (RuntimeError, FileNotFoundError, AssertionError, ValueError, OSError, ImportError) as e:
        what = name or "ImageFolder"
        detail = one_line(e) or type(e).__name__
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise DataError(f"cannot load dataset {what} split {split!r} from {root}: {detail}") from e
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise DataError(f"dataset {name or 'ImageFolder'} split {split!r} under {root} holds no images")
    return dataset


# ----------------------------------------------------------------------------- image folder layout


def split_folder(root: str, split: str, is_training: bool) -> str:
    """`root/<split>` (or a synonym timm accepts: train/training, validation/val/valid/eval/test); DataError if
    there is none. timm would fall back to `root` itself: validating on the training images, or one class."""
    synonyms = TRAIN_SPLITS if split.lower() in TRAIN_SPLITS else EVAL_SPLITS if split.lower() in EVAL_SPLITS else ()
    for name in (split, *synonyms):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    flag = "--train-split NAME" if is_training else "--val-split NAME (validate.py: --split NAME)"
    looked = "/, ".join(dict.fromkeys((split, *synonyms)))
    raise DataError(f"--data-dir {root} has no {split!r} split folder (looked for {looked}/); an image folder needs "
                    f"one folder per split, each with one subfolder per class; name yours with {flag}")


def _image_files(folder: str) -> list[str]:
    from timm.data import get_img_extensions

    exts = get_img_extensions(as_set=True)
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and os.path.splitext(e.name)[1].lower() in exts)


def class_folders(folder: str) -> list[str]:
    """The class subfolders of a split folder (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def read_class_map(path: str) -> list[str]:
    """The class names of a --class-map file (timm's format: .txt one name a line, or a .pkl dict)."""
    from timm.data.readers.class_map import load_class_map

    try:
        return [str(k) for k in load_class_map(path)]
    except (OSError, ValueError, AssertionError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"--class-map {path} cannot be read: {one_line(e)[:200]}") from None


def check_class_folders(folder: str, class_map: str = "", all_classes: bool = True) -> None:
    """A split folder holds one subfolder per class and no loose images; with --class-map, a folder for each of
    its classes (`all_classes`; an evaluation split may lack some) and none other."""
    loose = _image_files(folder)
    if loose:
        raise DataError(f"{len(loose)} image(s) sit directly in the split folder {folder} (e.g. {loose[0]}); put "
                        "each class's images in its own subfolder (<split>/<class>/<image>)")
    found = class_folders(folder)
    if not found:
        raise DataError(f"the split folder {folder} has no class subfolders (<split>/<class>/<image>)")
    if class_map:
        named = read_class_map(class_map)
        missing, extra = _differ(named, found)
        missing = missing if all_classes else []
        if missing or extra:
            raise DataError(f"--class-map {class_map} does not match the class folders of {folder}: "
                            + _difference("named in the map but without a folder", missing,
                                          "folders not in the map (their images would be dropped)", extra))


def _differ(a: Sequence[str], b: Sequence[str]) -> tuple[list[str], list[str]]:
    return sorted(set(a) - set(b)), sorted(set(b) - set(a))


def _difference(what_a: str, a: list[str], what_b: str, b: list[str]) -> str:
    def show(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f", ... (+{len(names) - 5})" if len(names) > 5 else "")

    return "; ".join(f"{what} {show(names)}" for what, names in ((what_a, a), (what_b, b)) if names)


def check_same_classes(train: Any, val: Any, train_split: str, val_split: str, class_map: str) -> None:
    """The training and validation splits label the same classes with the same indices."""
    a = getattr(getattr(train, "reader", None), "class_to_idx", None)
    b = getattr(getattr(val, "reader", None), "class_to_idx", None)
    if not a or not b or a == b or (class_map and set(b) <= set(a)):
        return  # with a class map both splits share its indices; a validation subset is fine
    only_train, only_val = _differ(a, b)
    if only_train or only_val:
        hint = (" (a validation split with fewer classes needs --class-map listing the training classes, so both "
                "splits share one index)" if not only_val else "")
        raise DataError(f"the class folders of splits {train_split!r} and {val_split!r} differ: "
                        + _difference(f"only in {train_split!r}:", only_train, f"only in {val_split!r}:", only_val)
                        + hint)
    raise DataError(f"splits {train_split!r} and {val_split!r} index their classes differently")


# ----------------------------------------------------------------------------- what the scripts load


def load_train_data(args: Any) -> tuple[Any, Any, int | None]:
    """train.py's train and validation datasets (no transforms yet), probed, and the class count they declare."""
    common = dict(name=args.dataset, root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
    train = create_dataset(split=args.train_split, is_training=True, num_samples=args.train_num_samples, **common)
    val = create_dataset(split=args.val_split, is_training=False, num_samples=args.val_num_samples, **common)
    check_same_classes(getattr(train, "dataset", train), getattr(val, "dataset", val), args.train_split,
                       args.val_split, args.class_map)
    for split, dataset in ((args.train_split, train), (args.val_split, val)):
        probe_dataset(dataset, split)
    classes = num_classes_of(train)
    if args.num_classes and classes and args.num_classes < classes:
        raise DataError(f"--num-classes {args.num_classes} is less than the {classes} classes of the training data")
    if args.dataset != DIGITS:  # streaming readers report their own errors
        train, val = (d if isinstance(d, torch.utils.data.IterableDataset) else BadImageCounter(d, what,
                      args.max_bad_images) for d, what in ((train, "training"), (val, "validation")))
    return train, val, classes


def build_train_loaders(args: Any, data_config: dict, train_set: Any, val_set: Any, rank: int = 0,
                        world: int = 1, device: torch.device = torch.device("cpu")) -> tuple[Any, Any]:
    """timm transforms and loaders (no prefetcher: Accelerate places batches; sharding happens in `prepare`).

    A map-style training set is read in `EpochShuffle` order through `SeededSamples`: every sample's
    augmentation is seeded from (seed, epoch, index), so workers can persist and a run resumed mid-epoch
    draws exactly what the uninterrupted run drew. `rank` / `world` place this process's --aug-repeats copies.
    --aug-splits wraps the set in timm's AugMixDataset (the clean image + augmented views of each sample).
    `device`: where the batches go; pinned for a CUDA one unless --no-pin-mem (`pin_memory`).
    """
    from timm.data import AugMixDataset

    seeded = not isinstance(train_set, torch.utils.data.IterableDataset)
    if seeded:
        if args.aug_splits > 1:
            train_set = AugMixDataset(train_set, num_splits=args.aug_splits)
        train_set = SeededSamples(train_set, args.seed)
    common = dict(
        input_size=data_config["input_size"], mean=data_config["mean"], std=data_config["std"],
        num_workers=args.workers, pin_memory=pin_memory(args.pin_mem, device), use_prefetcher=not args.no_prefetcher,
        distributed=False, persistent_workers=True, device=torch.device("cpu"),
    )
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config["interpolation"]
    try:
        return _create_loaders(args, data_config, train_set, val_set, interpolation, common, rank, world)
    except (AssertionError, KeyError, ValueError, TypeError) as e:  # timm's transforms reject the value deep down
        raise DataError(f"cannot build the data transforms (--aa, --interpolation, --scale, --ratio, ...): "
                        f"{one_line(e) or type(e).__name__}") from None


def _create_loaders(args: Any, data_config: dict, train_set: Any, val_set: Any, interpolation: str,
                    common: dict, rank: int, world: int) -> tuple[Any, Any]:
    from timm.data import create_loader

    loader_train = create_loader(
        train_set, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=interpolation,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, train_crop_mode=args.train_crop_mode,
        worker_seeding=args.worker_seeding, num_aug_splits=args.aug_splits, re_split=args.resplit, **common,
    )
    loader_eval = create_loader(
        val_set, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"), **common,
    )
    # the prefetcher's device work (normalise, erase) is `DeviceInputs`: keep timm's DataLoader, not its wrapper
    loader_train, loader_eval = (getattr(loader, "loader", loader) for loader in (loader_train, loader_eval))
    if isinstance(train_set, SeededSamples):  # timm's loader, with the epoch-keyed order instead of its RandomSampler
        loader_train = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, drop_last=True,
            sampler=EpochShuffle(len(train_set), args.seed, args.aug_repeats, rank, world),
            num_workers=loader_train.num_workers, collate_fn=loader_train.collate_fn,
            pin_memory=loader_train.pin_memory, worker_init_fn=loader_train.worker_init_fn,
            persistent_workers=loader_train.persistent_workers,
        )
    return loader_train, loader_eval


class DeviceInputs:
    """timm's prefetcher step, on the batches' device: uint8 images (what the workers hand over, 4x less to copy
    than float32) become `dtype`, are normalised and, in training, randomly erased (`--reprob`)."""

    def __init__(self, data_config: dict, device: torch.device, dtype: torch.dtype = torch.float32,
                 re_prob: float = 0.0, re_mode: str = "const", re_count: int = 1, re_num_splits: int = 0):
        from timm.data.random_erasing import RandomErasing
        from timm.data.loader import adapt_to_chs

        channels = data_config["input_size"][0]
        shape = (1, channels, 1, 1)
        self.dtype = dtype
        self.mean = torch.tensor([255 * x for x in adapt_to_chs(data_config["mean"], channels)], device=device,
                                 dtype=dtype).view(shape)
        self.std = torch.tensor([255 * x for x in adapt_to_chs(data_config["std"], channels)], device=device,
                                dtype=dtype).view(shape)
        self.erase = RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count, num_splits=re_num_splits,
                                   device=device) \
            if re_prob > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.dtype).sub_(self.mean).div_(self.std)
        return images if self.erase is None else self.erase(images)


def pin_memory(flag: bool | None, device: torch.device) -> bool:
    """`--pin-mem` / `--no-pin-mem`, else pinned with a CUDA device: pinned batches are what lets the
    non-blocking host-to-device copy (`engine.loader_config`) run asynchronously."""
    return device.type == "cuda" if flag is None else bool(flag)


def prepare_loader(acc: Any, loader: torch.utils.data.DataLoader) -> Any:
    """`accelerator.prepare` for a loader: batches on the device, samples sharded over the processes. A
    streaming dataset's reader already reads only this rank's shards, and an --aug-repeats sampler only this
    rank's samples, so Accelerate only places their batches."""
    per_rank = getattr(loader.sampler, "per_rank", False)
    if not isinstance(loader.dataset, torch.utils.data.IterableDataset) and not per_rank:
        return acc.prepare(loader)
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(loader, device=acc.device, num_processes=1, process_index=0, put_on_device=True,
                               dispatch_batches=False, non_blocking=acc.non_blocking)


def eval_dataset(name: str, root: str | None, split: str, transform: Callable, *, num_samples: int | None = None,
                 class_map: str = "", max_bad_images: int = DEFAULT_MAX_BAD_IMAGES) -> torch.utils.data.Dataset:
    """validate.py's data set: `digits`, or a timm dataset / image folder under `root`, probed, with `transform`.

    A map-style set other than digits counts its unreadable images (`BadImageCounter`, read back by
    `take_bad_images`): timm reads the next image in the place of each, and more than `max_bad_images` stop
    the evaluation."""
    if name != DIGITS:
        if not root:
            raise DataError("no data: give --data-dir (an image folder) or --dataset (e.g. digits)")
        if not os.path.isdir(root):
            raise DataError(f"data dir not found: {root}")
    kwargs = {"class_map": class_map} if class_map else {}
    dataset = create_dataset(name, root, split, is_training=False, num_samples=num_samples, **kwargs)
    probe_dataset(dataset, split)
    if len(dataset) == 0:
        raise DataError(f"dataset is empty: {root or name} (split {split!r})")
    dataset.transform = transform
    if name == DIGITS or isinstance(dataset, torch.utils.data.IterableDataset):  # streaming readers report their own
        return dataset
    return BadImageCounter(dataset, "validation", max_bad_images, per="in this evaluation")


def take_bad_images(dataset: Any) -> int:
    """The unreadable images an `eval_dataset` skipped since the last call (0 for a set that does not count)."""
    return dataset.take_count() if isinstance(dataset, BadImageCounter) else 0
