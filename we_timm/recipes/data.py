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

import logging
import os
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
    """A map-style dataset over `self.dataset`; unlike `torch.utils.data.Subset`, setting `.transform` (as
    timm's `create_loader` does) reaches the wrapped dataset."""

    dataset: Any

    @property
    def transform(self) -> Callable | None:
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.dataset.transform = value


class HeadSubset(DatasetView):
    """The first `num_samples` items of a map-style dataset."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_samples: int):
        self.dataset = dataset
        self.num_samples = min(int(num_samples), len(dataset))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Any:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(index)
        return self.dataset[index % self.num_samples]


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
    across DataLoader workers; more than `limit` in one epoch raises DataReadError."""

    def __init__(self, dataset: torch.utils.data.Dataset, what: str, limit: int):
        import multiprocessing

        self.dataset, self.what, self.limit = dataset, what, limit
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
            raise DataReadError(f"more than {self.limit} unreadable {self.what} images in one epoch (named in the "
                                "warnings above); fix or remove them, or raise --max-bad-images")
        return item

    def skipped(self, message: str) -> None:
        inner = getattr(self.dataset, "dataset", self.dataset)  # under HeadSubset
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

    Failures a user can cause (missing folder, dataset not on disk, unknown
    split) raise `DataError` with a one-line message.
    """
    if name == DIGITS:
        dataset = DigitsDataset(split, image_size=image_size)
    else:
        dataset = _timm_dataset(name, root, split, is_training, timm_kwargs)
    if num_samples is not None and isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__"):
        if num_samples <= 0:
            raise DataError(f"num_samples must be positive, got {num_samples}")
        dataset = HeadSubset(dataset, num_samples)
    return dataset


def _timm_dataset(name: str, root: str | None, split: str, is_training: bool, kwargs: dict[str, Any]) -> Any:
    from timm.data import create_dataset as timm_create_dataset

    if not root:
        raise DataError(f"dataset {name or 'ImageFolder'} needs a root folder (--data-dir)")
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
    if args.dataset != DIGITS:
        train, val = (BadImageCounter(d, what, args.max_bad_images) for d, what in ((train, "training"),
                                                                                    (val, "validation")))
    return train, val, classes


def build_train_loaders(args: Any, data_config: dict, train_set: Any, val_set: Any) -> tuple[Any, Any]:
    """timm transforms and loaders (no prefetcher: Accelerate places batches; sharding happens in `prepare`)."""
    from timm.data import create_loader

    common = dict(
        input_size=data_config["input_size"], mean=data_config["mean"], std=data_config["std"],
        num_workers=args.workers, pin_memory=args.pin_mem, use_prefetcher=False, distributed=False,
        persistent_workers=False,  # workers re-seeded each epoch from the (seed, epoch) RNG: exact resume
        device=torch.device("cpu"),
    )
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config["interpolation"]
    try:
        return _create_loaders(args, data_config, train_set, val_set, interpolation, common)
    except (AssertionError, KeyError, ValueError, TypeError) as e:  # timm's transforms reject the value deep down
        raise DataError(f"cannot build the data transforms (--aa, --interpolation, --scale, --ratio, ...): "
                        f"{one_line(e) or type(e).__name__}") from None


def _create_loaders(args: Any, data_config: dict, train_set: Any, val_set: Any, interpolation: str,
                    common: dict) -> tuple[Any, Any]:
    from timm.data import create_loader

    loader_train = create_loader(
        train_set, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=interpolation,
        worker_seeding=args.worker_seeding, **common,
    )
    loader_eval = create_loader(
        val_set, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"), **common,
    )
    return loader_train, loader_eval


def eval_dataset(name: str, root: str | None, split: str, transform: Callable, *, num_samples: int | None = None,
                 class_map: str = "") -> torch.utils.data.Dataset:
    """validate.py's data set: `digits`, or a timm dataset / image folder under `root`, probed, with `transform`."""
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
    return dataset
