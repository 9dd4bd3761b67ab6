"""What train.py and validate.py load: the datasets (`dataset`) wrapped for seeded sampling (`sampling`) and
bad-image counting (`bad_images`), timm's transforms and loaders, and the prefetcher's device step."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch.utils.data

from .bad_images import DEFAULT_MAX_BAD_IMAGES, count_bad_images
from .dataset import DIGITS, check_same_classes, create_dataset, num_classes_of, probe_dataset
from .errors import DataError, one_line
from .sampling import EpochShuffle, SeededSamples


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
        train, val = (count_bad_images(d, what, args.max_bad_images)
                      for d, what in ((train, "training"), (val, "validation")))
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
    non-blocking host-to-device copy (`runtime.loader_config`) run asynchronously."""
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

    A map-style set other than digits counts its unreadable images (`count_bad_images`, read back by
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
    return dataset if name == DIGITS else count_bad_images(dataset, "validation", max_bad_images, "in this evaluation")
