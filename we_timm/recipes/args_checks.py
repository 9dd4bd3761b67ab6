"""The checks of train.py's arguments before any work, and what they derive: defaults that depend on
other flags, the WE stage boundaries of a step schedule, the run's `WEConfig`.

Each check is (ok, one line naming the flag); `resolve_args` raises ValueError with the first that fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

import torch
from accelerate.utils import is_tensorboard_available
from timm.models import is_model
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

from ..config import WEConfig
from .dataset import PACKAGES, TRAIN_SPLITS

STREAMING_PREFIXES = frozenset(PACKAGES)  # wds/, hfds/, hfids/, tfds/: iterable datasets


def resolve_args(args: argparse.Namespace) -> None:
    """Fill derived defaults and reject bad values before anything is built or written."""
    if not args.dataset and not args.data_dir:
        args.dataset = "digits"  # embedded offline default
    if args.workers is None:
        args.workers = 4 if torch.cuda.is_available() else 0
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.dist_timeout is None or args.dist_timeout > 0, f"--dist-timeout must be > 0, got {args.dist_timeout}"),
        (args.grad_accum_steps >= 1, f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}"),
        (args.log_interval >= 1, f"--log-interval must be >= 1, got {args.log_interval}"),
        (args.recovery_interval >= 0, f"--recovery-interval must be >= 0, got {args.recovery_interval}"),
        (args.we_ema == "follow" or args.model_ema, "--we-ema evolve needs --model-ema"),
        (not args.amp or args.model_dtype in (None, "float32"), "--amp needs --model-dtype float32 (timm's rule)"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.aug_repeats == 0 or args.aug_repeats >= 1, f"--aug-repeats must be 0 (off) or >= 1, got {args.aug_repeats}"),
        (args.aug_splits == 0 or args.aug_splits >= 2,
         f"--aug-splits must be 0 (off) or >= 2 (the clean image and at least one augmented view), got {args.aug_splits}"),
        (not args.jsd_loss or args.aug_splits >= 2, "--jsd-loss needs --aug-splits >= 2"),
        (not (args.jsd_loss and args.bce_loss), "--jsd-loss and --bce-loss exclude each other"),
        (not args.split_bn or args.aug_splits >= 2 or args.resplit, "--split-bn needs --aug-splits >= 2 or --resplit"),
        (not (args.split_bn and args.sync_bn), "--split-bn and --sync-bn exclude each other (timm's rule)"),
        (not (args.aug_splits and mixup_active(args)),
         "--aug-splits cannot be combined with --mixup/--cutmix (timm's rule: mixing would blend the views)"),
        (not (args.aug_splits and args.no_prefetcher),
         "--aug-splits needs the prefetcher path (drop --no-prefetcher): the views are collated into one uint8 batch"),
        (not ((args.aug_repeats or args.aug_splits) and (args.dataset or "").split("/")[0] in STREAMING_PREFIXES),
         "--aug-repeats and --aug-splits need a map-style dataset (e.g. an image folder), not a streaming one"),
        (args.we_inspect_every >= 0, f"--we-inspect-every must be >= 0, got {args.we_inspect_every}"),
        (is_model(args.model) or ":" in args.model, f"unknown timm model {args.model!r} (see timm.list_models())"),
        (not (mixup_active(args) and args.batch_size % 2), f"mixup needs an even --batch-size, not {args.batch_size}"),
        (not args.data_dir or os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is not a directory"),
        (args.dataset == "digits" or args.data_dir, f"--dataset {args.dataset or 'imagefolder'} needs --data-dir"),
        (not args.log_tensorboard or is_tensorboard_available(),
         "--log-tensorboard needs tensorboard: pip install 'we_timm[tensorboard]'"),
    ]
    for flag in ("resume", "initial_checkpoint", "pretrained_path", "class_map"):
        path = getattr(args, flag)
        ok = not path or os.path.isfile(path) or (flag == "resume" and path == "auto")
        checks.append((ok, f"--{flag.replace('_', '-')} {path}: no such file"))
    for ok, message in checks + value_checks(args):
        if not ok:
            raise ValueError(message)
    we_config_from_args(args)  # validates the --we-* values


def _in(value: Any, low: float, high: float, flag: str, high_open: bool = False) -> tuple[bool, str]:
    """(value is None or within [low, high] / [low, high), message naming the flag)."""
    ok = value is None or (low <= value < high if high_open else low <= value <= high)
    return ok, f"{flag} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}"


def _at_least(value: Any, low: int, flag: str) -> tuple[bool, str]:
    return value is None or value >= low, f"{flag} must be >= {low}, got {value}"


def _n_values(values: Any, counts: tuple[int, ...], flag: str) -> tuple[bool, str]:
    ok = values is None or len(values) in counts
    return ok, f"{flag} takes {' or '.join(map(str, counts))} value(s), got {values}"


def experiment_name_check(name: str) -> tuple[bool, str]:
    """An experiment is a plain folder name inside --output: no path separators, not '.' or '..'."""
    ok = not name or (name not in (".", "..") and "/" not in name and os.sep not in name and name.strip() == name)
    return ok, f"--experiment {name!r} must be a plain folder name (no '/', not '.' or '..'); use --output for the parent"


def value_checks(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """(ok, message naming the flag) for every value train.py would otherwise ignore, or fail on mid-run."""
    chans = args.input_size[0] if args.input_size else args.in_chans or 3
    return [
        experiment_name_check(args.experiment),
        _at_least(args.num_classes, 1, "--num-classes"),
        _at_least(args.validation_batch_size, 1, "--validation-batch-size (-vb)"),
        _at_least(args.train_num_samples, 1, "--train-num-samples"),
        _at_least(args.val_num_samples, 1, "--val-num-samples"),
        _at_least(args.img_size, 1, "--img-size"),
        _at_least(min(args.input_size) if args.input_size else None, 1, "--input-size"),
        _at_least(args.checkpoint_hist, 0, "--checkpoint-hist"),
        _at_least(args.max_bad_images, 0, "--max-bad-images"),
        _at_least(args.warmup_epochs, 0, "--warmup-epochs"),
        _at_least(args.lr, 0, "--lr"),
        _at_least(args.cooldown_epochs, 0, "--cooldown-epochs"),
        (args.clip_grad is None or args.clip_grad > 0, f"--clip-grad must be > 0, got {args.clip_grad}"),
        (args.decay_rate > 0, f"--decay-rate must be > 0, got {args.decay_rate}"),
        (not args.output or not os.path.exists(args.output) or os.path.isdir(args.output),
         f"--output {args.output} is not a directory"),
        (len({args.train_split.lower(), args.val_split.lower()} - set(TRAIN_SPLITS[1:])) == 2,
         f"--train-split {args.train_split} and --val-split {args.val_split} name the same split: train.py would "
         "validate on the training images"),
        (chans == 3, f"--in-chans/--input-size give {chans} channel(s), but the data are loaded as RGB images "
                     "(3 channels)"),
        _n_values(args.mean, (1, chans), "--mean"),
        _n_values(args.std, (1, chans), "--std"),
        (not args.std or min(args.std) > 0, f"--std must be > 0, got {args.std}"),
        _n_values(args.scale, (2,), "--scale"),
        _n_values(args.ratio, (2,), "--ratio"),
        _n_values(args.cutmix_minmax, (2,), "--cutmix-minmax"),
        _in(args.smoothing, 0, 1, "--smoothing", high_open=True),
        _in(args.crop_pct, 0, 1, "--crop-pct") if args.crop_pct != 0 else (False, "--crop-pct must be > 0"),
        _in(args.model_ema_decay, 0, 1, "--model-ema-decay"),
        *(_in(getattr(args, k), 0, 1, f"--{k.replace('_', '-')}") for k in ("mixup_prob", "mixup_switch_prob",
                                                                            "reprob", "hflip", "vflip")),
        *(_in(getattr(args, k), 0, 1, f"--{k.replace('_', '-')}", high_open=True)
          for k in ("drop", "drop_path", "drop_block")),
        (args.mixup >= 0 and args.cutmix >= 0, f"--mixup and --cutmix must be >= 0, got {args.mixup}, {args.cutmix}"),
    ]


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def lr_decay_epochs(args: argparse.Namespace) -> list[int]:
    """0-based epochs from which a step/multistep schedule trains with a lowered LR (WE stage boundaries).

    Read off the scheduler itself, so timm's conventions (multistep milestone m
    acts from epoch m-1, warmup prefix) hold; other schedules have no stages.
    """
    if args.sched not in ("step", "multistep"):
        return []
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {**scheduler_kwargs(args), "step_on_epochs": True}
    sched, num_epochs = create_scheduler_v2(opt, **kwargs, updates_per_epoch=1)
    lrs = []
    for epoch in range(num_epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    return [e for e in range(max(1, args.warmup_epochs), num_epochs) if lrs[e] < lrs[e - 1] * (1 - 1e-9)]


def we_config_from_args(args: argparse.Namespace) -> WEConfig | None:
    """The run's `WEConfig` from the --we-* flags (None without --weight-evolution)."""
    if not args.weight_evolution:
        return None
    values = {f.name: getattr(args, f"we_{f.name}") for f in dataclasses.fields(WEConfig)}
    if values["milestones"] is None:
        values["milestones"] = lr_decay_epochs(args)
    try:
        return WEConfig(**values)
    except ValueError as e:  # "WEConfig.rate must ..." -> "--we-rate must ..."
        raise ValueError(re.sub(r"WEConfig\.(\w+)", lambda m: "--we-" + m.group(1).replace("_", "-"), str(e))) from None
