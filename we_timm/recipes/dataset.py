"""Datasets for train.py and validate.py: the built-in offline `digits` set and timm's datasets.

`digits` is scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
classes; no download): each image becomes a grayscale-as-RGB PIL image,
upsampled to `image_size` pixels so timm's transforms (random resized crop,
flips, AutoAugment, normalisation) apply as to any photo. The train /
validation split is stratified and fixed by `split_seed`, so every run, rank
and resume sees the same images in each split.

Everything else goes through `timm.data.create_dataset`: ImageFolder / ImageTar
for an empty name (or "imagefolder"), `torch/cifar10`, `hfds/...`, ... , with the image-folder layout
and class checks. Every failure a user can cause is a one-line `DataError`.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Callable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from .errors import DataError, one_line

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
