#!/usr/bin/env python3
"""Train any timm model with Weight Evolution (Lin et al., ACM MM 2021) on Hugging Face Accelerate.

    python train.py -c hparams/digits_demo.yaml                             # CPU demo, built-in data
    python train.py --data-dir /data/imagenet --model resnet34 --weight-evolution
    accelerate launch train.py -c hparams/imagenet_resnet34_we.yaml --data-dir /data/imagenet
    python train.py --resume output/train/digits-demo-we/last.pth.tar       # continue a run, with its settings

Modeled on timm's train.py: the flags we share mean the same; `-c/--config` YAML
sets defaults (CLI > YAML > the --resume state's arguments > code defaults;
unlike timm, unknown YAML keys are an error); runs land in output/train/<experiment>/ with args.yaml, summary.csv and
checkpoints (see `we_timm.run_io`). Each epoch: train -> evaluate -> checkpoint
-> weight evolution on the unwrapped fp32 parameters (none after the last
epoch); under DDP the ranks then verify they hold identical parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import timm
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, is_tensorboard_available
from timm import utils
from timm.data import Mixup, create_loader, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import validate
from we_timm import WEConfig, WeightEvolution
from we_timm import cli as we_cli
from we_timm import run_io
from we_timm.cli import ArgumentParser
from we_timm.checkpoint import (CheckpointError, is_safetensors_file, load_into_model, load_weights,
                                remove_stale_temps)
from we_timm.config import LAYER_KINDS, LEVELS, MATCHINGS, SELECTIONS, VARIANTS
from we_timm.data import create_dataset, num_classes_of, probe_dataset

_logger = logging.getLogger("train")


class RankMismatchError(RuntimeError):
    """Data-parallel ranks hold different parameters after a weight-evolution step."""


class DistributedError(RuntimeError):
    """A collective failed: another process died, or stalled for longer than --dist-timeout."""


def as_distributed_error(e: RuntimeError, acc: Accelerator) -> RuntimeError:
    """`e` as a one-line DistributedError when it is a failed collective of a multi-process run, else `e`."""
    if acc.num_processes < 2 or not we_cli.is_collective_failure(e):
        return e
    text = " ".join(str(e).split())
    return DistributedError(
        f"process {acc.process_index} of {acc.num_processes} stopped: a collective failed because another process "
        f"died or stalled past --dist-timeout (checkpoints on disk are complete; --resume auto continues): {text[:300]}"
    )


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; raised on every rank before anything more is saved."""


# ============================================================================ arguments


def _none_or(kind):
    def convert(value: str):
        return None if str(value).lower() in ("none", "null", "") else kind(value)
    convert.__name__ = kind.__name__
    return convert


def _alpha(value: str):
    return value if value == "adaptive" else float(value)


def get_args_parser() -> argparse.ArgumentParser:
    """The full parser, unparsed (tests and tools reuse it)."""
    parser = ArgumentParser(description="timm + Accelerate training with Weight Evolution")
    parser.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file of argument defaults (CLI wins)")
    for add in (_data_args, _model_args, _optim_args, _sched_args, _aug_args, _ema_args, _we_args, _misc_args):
        add(parser)
    return parser


def _data_args(parser):
    g = parser.add_argument_group("Dataset parameters")
    g.add_argument("--data-dir", metavar="DIR",
                   help="path to dataset root (ImageFolder with train/ and validation/ inside)")
    g.add_argument("--dataset", metavar="NAME", default="",
                   help='"digits" (built-in, offline), "imagefolder" (or "") = ImageFolder/ImageTar, or timm names '
                        'like torch/cifar10 (default: digits without --data-dir)')
    g.add_argument("--train-split", metavar="NAME", default="train", help="dataset train split (default: train)")
    g.add_argument("--val-split", metavar="NAME", default="validation",
                   help="dataset validation split (default: validation)")
    g.add_argument("--train-num-samples", type=int, default=None, metavar="N",
                   help="use only the first N training samples (default: all)")
    g.add_argument("--val-num-samples", type=int, default=None, metavar="N",
                   help="use only the first N validation samples (default: all)")
    g.add_argument("--dataset-download", action="store_true", default=False, help="allow torch/ datasets to download")
    g.add_argument("--class-map", default="", type=str, metavar="FILENAME",
                   help='path to class to idx mapping file (default: "")')


def _model_args(parser):
    g = parser.add_argument_group("Model parameters")
    g.add_argument("--model", default="resnet50", type=str, metavar="MODEL",
                   help='name of the timm model (default: "resnet50")')
    g.add_argument("--pretrained", action="store_true", default=False,
                   help="start from the model's pretrained weights (needs them cached or --pretrained-path)")
    g.add_argument("--pretrained-path", default=None, type=str, metavar="PATH",
                   help="load this local file as the pretrained weights (head adapted to --num-classes)")
    g.add_argument("--initial-checkpoint", default="", type=str, metavar="PATH",
                   help="initialize model weights from this checkpoint (.safetensors or timm .pth)")
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="resume the full training state from last.pth.tar / checkpoint-N.pth.tar; a run folder or "
                        '"auto" (the --output/--experiment folder) resumes its newest complete state, and "auto" '
                        "starts the run if there is none yet")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="do not restore optimizer state when resuming")
    g.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="number of label classes (default: the dataset's)")
    g.add_argument("--gp", default=None, type=str, metavar="POOL", help="global pool type (model default if None)")
    g.add_argument("--img-size", type=int, default=None, metavar="N", help="image size (default: model default)")
    g.add_argument("--in-chans", type=int, default=None, metavar="N", help="image input channels (default: 3)")
    g.add_argument("--input-size", default=None, nargs=3, type=int, metavar=("C", "H", "W"),
                   help="input dimensions (c h w), model default if empty")
    g.add_argument("--crop-pct", default=None, type=float, metavar="N", help="center crop percent for validation")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="override dataset mean")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="override dataset std")
    g.add_argument("--interpolation", default="", type=str, metavar="NAME",
                   help="image resize interpolation (overrides model)")
    g.add_argument("-b", "--batch-size", type=int, default=128, metavar="N",
                   help="training batch size per process (default: 128)")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                   help="validation batch size (default: --batch-size)")
    g.add_argument("--channels-last", action="store_true", default=False, help="use channels_last memory layout")
    g.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                   help="steps to accumulate gradients over (default: 1)")
    g.add_argument("--grad-checkpointing", action="store_true", default=False,
                   help="gradient checkpointing through model blocks")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs,
                   help="extra create_model kwargs, key=value")
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor",
                   help="torch.compile with this backend (default: inductor)")


def _optim_args(parser):
    g = parser.add_argument_group("Optimizer parameters")
    g.add_argument("--opt", default="sgd", type=str, metavar="OPTIMIZER", help='timm optimizer name (default: "sgd")')
    g.add_argument("--opt-eps", default=None, type=float, metavar="EPSILON",
                   help="optimizer epsilon (default: optimizer's)")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA",
                   help="optimizer betas (default: optimizer's)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="optimizer momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=2e-5, help="weight decay (default: 2e-5)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip gradient norm (default: no clipping)")
    g.add_argument("--clip-mode", type=str, default="norm", choices=("norm", "value", "agc"),
                   help='gradient clipping mode (default: "norm")')
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning rate decay (default: None)")
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=utils.ParseKwargs,
                   help="extra optimizer kwargs, key=value")


def _sched_args(parser):
    g = parser.add_argument_group("Learning rate schedule parameters")
    g.add_argument("--sched", type=str, default="cosine", metavar="SCHEDULER",
                   help='LR scheduler (default: "cosine"; step/multistep give WE its stages)')
    g.add_argument("--sched-on-updates", action="store_true", default=False,
                   help="step the LR schedule per update instead of per epoch")
    g.add_argument("--lr", type=float, default=None, metavar="LR",
                   help="learning rate, overrides --lr-base (default: None)")
    g.add_argument("--lr-base", type=float, default=0.1, metavar="LR",
                   help="base LR: lr = lr_base * global_batch_size / lr_base_size")
    g.add_argument("--lr-base-size", type=int, default=256, metavar="DIV",
                   help="base learning rate batch size (default: 256)")
    g.add_argument("--lr-base-scale", type=str, default="", metavar="SCALE",
                   help='"linear" or "sqrt" (default: by optimizer)')
    g.add_argument("--warmup-lr", type=float, default=1e-5, metavar="LR", help="warmup learning rate (default: 1e-5)")
    g.add_argument("--min-lr", type=float, default=0, metavar="LR",
                   help="lower LR bound for cyclic schedulers (default: 0)")
    g.add_argument("--epochs", type=int, default=300, metavar="N", help="number of epochs to train (default: 300)")
    g.add_argument("--start-epoch", default=None, type=int, metavar="N",
                   help="manual start epoch (overrides the resumed one)")
    g.add_argument("--decay-milestones", default=[90, 180, 270], type=int, nargs="+", metavar="MILESTONES",
                   help="multistep decay epochs (timm: milestone m lowers the LR from 0-based epoch m-1)")
    g.add_argument("--decay-epochs", type=float, default=90, metavar="N", help="epoch interval to decay LR (step)")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N", help="epochs to warm up LR (default: 5)")
    g.add_argument("--warmup-prefix", action="store_true", default=False,
                   help="exclude warmup period from decay schedule")
    g.add_argument("--cooldown-epochs", type=int, default=0, metavar="N",
                   help="epochs at min_lr after a cyclic schedule")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N",
                   help="patience epochs for plateau LR scheduler")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE", help="LR decay rate (default: 0.1)")


def _aug_args(parser):
    g = parser.add_argument_group("Augmentation and regularization parameters")
    g.add_argument("--no-aug", action="store_true", default=False, help="disable all training augmentation")
    g.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0], metavar="PCT",
                   help="random resize scale (default: 0.08 1.0)")
    g.add_argument("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0], metavar="RATIO",
                   help="random resize aspect ratio")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    g.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability (default: 0)")
    g.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT", help="color jitter factor (default: 0.4)")
    g.add_argument("--aa", type=str, default=None, metavar="NAME",
                   help='AutoAugment policy, e.g. "rand-m9-mstd0.5" (default: None)')
    g.add_argument("--reprob", type=float, default=0.0, metavar="PCT", help="random erase probability (default: 0)")
    g.add_argument("--remode", type=str, default="pixel", help='random erase mode (default: "pixel")')
    g.add_argument("--recount", type=int, default=1, help="random erase count (default: 1)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, enabled if > 0")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, enabled if > 0")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of cutmix instead of mixup when both on")
    g.add_argument("--mixup-mode", type=str, default="batch", help='"batch", "pair" or "elem"')
    g.add_argument("--mixup-off-epoch", default=0, type=int, metavar="N",
                   help="turn off mixup after this epoch (0: never)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--bce-loss", action="store_true", default=False, help="binary cross-entropy loss")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="threshold for binarizing soft BCE targets")
    g.add_argument("--train-interpolation", type=str, default="random",
                   help='training interpolation (default: "random")')
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    g.add_argument("--drop-path", type=float, default=None, metavar="PCT", help="drop path rate (default: None)")
    g.add_argument("--drop-block", type=float, default=None, metavar="PCT", help="drop block rate (default: None)")
    g.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum override")
    g.add_argument("--bn-eps", type=float, default=None, help="BatchNorm epsilon override")
    g.add_argument("--dist-bn", type=str, default="reduce", choices=("reduce", "broadcast", ""),
                   help="share BN running stats across ranks each epoch")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a process waits for the others in a collective before failing "
                        "(default: the backend's, 30 min for gloo, 10 min for NCCL)")


def _ema_args(parser):
    g = parser.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action="store_true", default=False,
                   help="track an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay (default: 0.9998)")
    g.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup")


def _we_args(parser):
    d = WEConfig()
    g = parser.add_argument_group("Weight evolution", "WEConfig fields (WE_SPEC.md), used with --weight-evolution")
    g.add_argument("--weight-evolution", action=argparse.BooleanOptionalAction, default=False,
                   help="evolve inferior filters after every epoch but the last (--no-weight-evolution: baseline)")
    g.add_argument("--we-variant", default=d.variant, choices=VARIANTS,
                   help="paper equations or the authors' official code")
    g.add_argument("--we-rate", type=float, default=d.rate, help="r-hat, selection rate of the conv (and linear) pool")
    g.add_argument("--we-rate-norm", type=_none_or(float), default=d.rate_norm,
                   help="r-hat of the norm-scale pool (default: --we-rate)")
    g.add_argument("--we-rate-bias", type=_none_or(float), default=d.rate_bias,
                   help="r-hat of the bias pool (default: --we-rate)")
    g.add_argument("--we-beta", type=float, default=d.beta, help="stage decay of the rate, Eq. (2)")
    g.add_argument("--we-eta", type=float, default=d.eta, help="sigmoid temperature, Eq. (2)")
    g.add_argument("--we-gamma", type=float, default=d.gamma, help="local relative-importance threshold")
    g.add_argument("--we-milestones", type=int, nargs="*", default=None,
                   help="stage boundaries (default: the LR decay epochs of step/multistep)")
    g.add_argument("--we-layers", nargs="+", default=list(d.layers), choices=LAYER_KINDS, help="layer kinds evolved")
    g.add_argument("--we-selection", default=d.selection, choices=SELECTIONS,
                   help="global_local, global (WE-G) or local (WE-L)")
    g.add_argument("--we-matching", default=d.matching, choices=MATCHINGS, help="forward or reverse (WE-RM)")
    g.add_argument("--we-alpha", type=_alpha, default=d.alpha, help='"adaptive" or a fixed float in [0, 1]')
    g.add_argument("--we-level", default=d.level, choices=LEVELS, help="element or filter crossover")
    g.add_argument("--we-ln-c", type=float, default=d.ln_c, help="official variant: the release's ln_c")


def _misc_args(parser):
    g = parser.add_argument_group("Miscellaneous parameters")
    g.add_argument("--seed", type=int, default=42, metavar="S", help="random seed (default: 42)")
    g.add_argument("--worker-seeding", type=str, default="all", help="worker seed mode (default: all)")
    g.add_argument("--log-interval", type=int, default=50, metavar="N", help="updates between training log lines")
    g.add_argument("--checkpoint-hist", type=int, default=10, metavar="N",
                   help="number of best checkpoints to keep (default: 10)")
    g.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="data loading workers (default: 4 with a GPU, 0 on CPU)")
    g.add_argument("--amp", action="store_true", default=False,
                   help="mixed precision (else the accelerate config decides)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                   help="AMP dtype with --amp (default: float16)")
    g.add_argument("--pin-mem", action="store_true", default=False, help="pin CPU memory in DataLoader")
    g.add_argument("--output", default="", type=str, metavar="PATH", help="output root (default: ./output/train)")
    g.add_argument("--experiment", default="", type=str, metavar="NAME",
                   help="run folder name (default: date-model-imgsize)")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                   help='checkpoint ranking metric (default: "top1")')
    g.add_argument("--log-tensorboard", action="store_true", default=False,
                   help="log metrics to TensorBoard via Accelerate trackers")
    g.add_argument("--debug", action="store_true", default=False, help="show tracebacks instead of one-line errors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI > `-c` YAML > the --resume state's arguments > defaults; then derived defaults and validation.

    Bad input raises ValueError. `--resume run/last.pth.tar` alone continues a run with its own settings.
    """
    parser = get_args_parser()
    first = ArgumentParser(add_help=False)  # reads only the sources of defaults
    for flag in ("-c/--config", "--resume", "--output", "--experiment"):
        first.add_argument(*flag.split("/"), default="")
    known, _ = first.parse_known_args(argv)
    config = run_io.load_config(parser, known.config) if known.config else {}
    resume = known.resume or config.get("resume", "")
    if resume == "auto" or os.path.isdir(resume):
        resume = find_resume(resume, known.output or config.get("output", ""),
                             known.experiment or config.get("experiment", ""))
    if resume != "auto" and os.path.isfile(resume):
        saved = {k: v for k, v in load_state(resume, mmap=True).get("args", {}).items()
                 if k not in ("resume", "config", "start_epoch")}
        folder = os.path.dirname(os.path.abspath(resume))  # the run continues where its state is, even if moved
        saved.update(output=os.path.dirname(folder), experiment=os.path.basename(folder))  # CLI / YAML still win
        parser.set_defaults(**run_io.config_defaults(parser, saved, f"arguments saved in {resume}", strict=False))
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.config, args.resume = known.config, resume
    resolve_args(args)
    return args


def find_resume(resume: str, output: str, experiment: str) -> str:
    """`--resume auto|FOLDER` -> the folder's newest complete training state; "auto" if there is none yet."""
    if resume == "auto" and not experiment:
        raise ValueError("--resume auto needs --experiment: it resumes the run folder <--output>/<--experiment>")
    folder = os.path.join(output or "./output/train", experiment) if resume == "auto" else resume
    path = run_io.newest_state(folder)
    if path is None and resume != "auto":
        raise ValueError(f"--resume {folder}: no last.pth.tar or checkpoint-N.pth.tar in this folder")
    if path is None:
        _logger.warning(f"--resume auto: no training state in {folder} yet; starting the run")
    return path or "auto"


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
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (timm.is_model(args.model) or ":" in args.model, f"unknown timm model {args.model!r} (see timm.list_models())"),
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
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    we_config_from_args(args)  # validates the --we-* values


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
    return WEConfig(**values)


# ============================================================================ building


def load_data(args: argparse.Namespace) -> tuple[Any, Any, int | None]:
    """Train and validation datasets (no transforms yet) and their class count if they declare one."""
    common = dict(name=args.dataset, root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
    train = create_dataset(split=args.train_split, is_training=True, num_samples=args.train_num_samples, **common)
    val = create_dataset(split=args.val_split, is_training=False, num_samples=args.val_num_samples, **common)
    for split, dataset in ((args.train_split, train), (args.val_split, val)):
        probe_dataset(dataset, split)
    return train, val, num_classes_of(train)


def build_model(args: argparse.Namespace, num_classes: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model and the kwargs that rebuild it (besides num_classes; drop rates excluded).

    `--img-size` / `--input-size` reach models that take `img_size` (ViTs...);
    weights come from `--pretrained(-path)` or `--initial-checkpoint`.
    """
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
    kwargs = dict(in_chans=in_chans, global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(args.model_kwargs)
    factory = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                   drop_block_rate=args.drop_block)
    if args.pretrained_path:  # timm's --pretrained-path: a local file as the pretrained weights, head re-initialised
        factory["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)
    pretrained = args.pretrained or bool(args.pretrained_path)
    size = args.input_size[1:] if args.input_size else args.img_size
    model = None
    if size is not None and "img_size" not in kwargs:
        model = _create_model(args.model, pretrained, {**kwargs, "img_size": size}, factory, optional="img_size")
        if model is not None:
            kwargs["img_size"] = list(size) if isinstance(size, list) else size
    if model is None:
        model = _create_model(args.model, pretrained, kwargs, factory)
    if args.initial_checkpoint:
        state_dict, _ = load_weights(args.initial_checkpoint)
        load_into_model(model, state_dict)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model, kwargs


def _create_model(name: str, pretrained: bool, kwargs: dict, factory: dict, optional: str = "") -> nn.Module | None:
    """`timm.create_model`; None if the model rejects the `optional` kwarg, ValueError on other failures."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs, **factory)
    except TypeError as e:
        if optional and optional in str(e):
            return None
        raise ValueError(f"cannot create model {name} with {kwargs}: {' '.join(str(e).split())}") from None
    except (RuntimeError, OSError, ValueError, AssertionError) as e:
        raise ValueError(f"cannot create model {name}: {' '.join(str(e).split())[:300]}") from None


def build_loaders(args: argparse.Namespace, data_config: dict, train_set: Any, val_set: Any) -> tuple[Any, Any]:
    """timm transforms and loaders (no prefetcher: Accelerate places batches; sharding happens in `prepare`)."""
    common = dict(
        input_size=data_config["input_size"], mean=data_config["mean"], std=data_config["std"],
        num_workers=args.workers, pin_memory=args.pin_mem, use_prefetcher=False, distributed=False,
        persistent_workers=False,  # workers re-seeded each epoch from the (seed, epoch) RNG: exact resume
        device=torch.device("cpu"),
    )
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config["interpolation"]
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


def build_loss(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """timm's choice of training loss, and the mixup/cutmix transform if enabled."""
    if mixup_active(args):
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        if args.bce_loss:
            return BinaryCrossEntropy(target_threshold=args.bce_target_thresh), mixup_fn
        return SoftTargetCrossEntropy(), mixup_fn  # smoothing is part of the mixed targets
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh), None
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerate: `--amp` overrides the accelerate config's mixed precision; shuffles seeded by (seed, epoch)."""
    precision = {"bfloat16": "bf16", "float16": "fp16"}[args.amp_dtype] if args.amp else None
    try:
        return Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=args.grad_accum_steps,
            log_with="tensorboard" if args.log_tensorboard else None,
            project_dir=args.output or "./output/train",  # the run folder is set once created (make_output_dir)
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[] if args.dist_timeout is None else [
                InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))],
        )
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"cannot set up Accelerate: {' '.join(str(e).split())}") from None


def resolve_lr(args: argparse.Namespace, world_size: int) -> None:
    """timm's rule: without --lr, scale --lr-base by the global batch size."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    if not args.lr_base_scale:
        args.lr_base_scale = "sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear"
    ratio = global_batch / args.lr_base_size
    args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == "sqrt" else ratio)
    _logger.info(f"Learning rate {args.lr:g} from --lr-base {args.lr_base:g}, global batch {global_batch}, "
                 f"{args.lr_base_scale} scaling")


# ============================================================================ training


@dataclass
class Trainer:
    """The run's objects, shared by the epoch functions (instead of timm's 15-argument train_one_epoch)."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: nn.Module  # prepared (DDP / compiled) module used for forward passes
    raw_model: nn.Module  # the unwrapped fp32 module: EMA source, WE target, checkpoint weights
    optimizer: Any
    scheduler: Any
    loss_fn: nn.Module
    mixup_fn: Mixup | None
    model_ema: utils.ModelEmaV3 | None
    we: WeightEvolution | None
    loader_train: Any
    loader_eval: Any
    num_epochs: int  # from the scheduler (epochs + cooldown)
    meta: dict[str, Any]  # safetensors metadata shared by every checkpoint of the run
    keeper: run_io.CheckpointKeeper
    out_dir: str | None = None  # the run folder, on the main process only
    num_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # summary.csv rows
    we_records: list[dict[str, Any]] = field(default_factory=list)  # we_stats.jsonl lines

    @property
    def updates_per_epoch(self) -> int:
        return -(-len(self.loader_train) // self.args.grad_accum_steps)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python/NumPy/torch from (seed, epoch, rank): augmentation and dropout then never depend on history."""
    utils.random_seed(seed + 1000 * epoch, rank)


def _clip(t: Trainer) -> None:
    args, acc = t.args, t.accelerator
    if args.clip_mode == "norm":
        acc.clip_grad_norm_(t.model.parameters(), args.clip_grad)
    elif args.clip_mode == "value":
        acc.clip_grad_value_(t.model.parameters(), args.clip_grad)
    else:
        acc.unscale_gradients()
        params = timm.models.model_parameters(t.raw_model, exclude_head=True)
        utils.dispatch_clip_grad(params, args.clip_grad, mode="agc")


def _optimizer_step(t: Trainer) -> None:
    """Step and clear the optimizer (through the fp16 loss scaler if any) after a synced backward.

    On the single-device / DDP paths the torch optimizer inside Accelerate's
    `AcceleratedOptimizer` is stepped directly: the wrapper only delegates there,
    but first probes the filesystem for an optional package on every call
    (0.1-1 ms a step). Other backends (DeepSpeed, XLA, Megatron) keep the wrapper.
    """
    acc, wrapper = t.accelerator, t.optimizer
    if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA, DistributedType.MEGATRON_LM):
        wrapper.step()
        wrapper.zero_grad()
        return
    opt = getattr(wrapper, "optimizer", wrapper)
    if acc.scaler is not None:
        acc.scaler.step(opt)
        acc.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _log_progress(t: Trainer, epoch: int, update_idx: int, loss: torch.Tensor, sums: torch.Tensor, seen: int,
                  start: float) -> None:
    lrs = [g["lr"] for g in t.optimizer.param_groups]
    elapsed = max(time.perf_counter() - start, 1e-9)
    n = t.updates_per_epoch
    _logger.info(
        f"Train: {epoch} [{update_idx:>4d}/{n} ({100.0 * update_idx / max(1, n - 1):>3.0f}%)]  "
        f"Loss: {loss.item():#.3g} ({(sums[1] / sums[2]).item():#.3g})  "
        f"{seen * t.accelerator.num_processes / elapsed:>7.1f} img/s  LR: {sum(lrs) / len(lrs):.3e}"
    )


def train_one_epoch(epoch: int, t: Trainer, loader: Any) -> OrderedDict:
    """One pass over `loader` with gradient accumulation, clipping, EMA and per-update LR steps."""
    args, acc = t.args, t.accelerator
    if t.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        t.mixup_fn.mixup_enabled = False
    t.model.train()
    # loss sum, loss sum over finite losses, samples with a finite loss: on the device, no host sync per step
    sums = torch.zeros(3, device=acc.device)
    update_idx, seen, start = 0, 0, time.perf_counter()
    bar = tqdm(we_cli.read_batches(loader, "training"), total=len(loader), desc=f"epoch {epoch}", leave=False,
               disable=None if acc.is_main_process else True)
    for inputs, target in bar:
        if t.mixup_fn is not None:
            inputs, target = t.mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(t.model):
            loss = t.loss_fn(t.model(inputs), target)
            acc.backward(loss)
            if acc.sync_gradients:
                if args.clip_grad is not None:
                    _clip(t)
                _optimizer_step(t)
        value = loss.detach().float()
        finite = torch.isfinite(value)
        sums += torch.stack([value, torch.where(finite, value, 0.0), finite.float()]) * inputs.shape[0]
        seen += inputs.shape[0]
        if not acc.sync_gradients:
            continue
        t.num_updates += 1
        if t.model_ema is not None:
            t.model_ema.update(t.raw_model, step=t.num_updates)
        if update_idx % args.log_interval == 0:
            check_loss(t, sums, epoch, update_idx)
            if acc.is_main_process:
                _log_progress(t, epoch, update_idx, loss, sums, seen, start)
        update_idx += 1
        t.scheduler.step_update(num_updates=t.num_updates)
    if hasattr(t.optimizer, "sync_lookahead"):
        t.optimizer.sync_lookahead()
    total = check_loss(t, sums, epoch, update_idx)
    return OrderedDict(loss=(total[1] / total[2]).item())  # the mean of the finite losses


def check_loss(t: Trainer, sums: torch.Tensor, epoch: int, update_idx: int) -> torch.Tensor:
    """Sum `sums` over ranks; stop (NonFiniteLossError on every rank) once any loss was NaN/inf: the weights are
    lost, and the epoch's checkpoint is not written, so the newest checkpoint on disk is the last good one.

    With fp16's loss scaler a non-finite loss is not fatal: the scaler skips that step (timm's behaviour).
    """
    total = t.accelerator.reduce(sums.clone(), reduction="sum")
    if t.accelerator.scaler is None and not torch.isfinite(total[0]):
        kept = (f"the newest checkpoint, last.pth.tar of epoch {epoch - 1}, predates it and is intact: "
                "lower --lr, set --clip-grad or use --amp-dtype bfloat16, then --resume it") if epoch > 0 else \
            "no checkpoint was written yet: lower --lr, set --clip-grad or use --amp-dtype bfloat16"
        raise NonFiniteLossError(f"the training loss became {total[0].item()} in epoch {epoch} "
                                 f"(by update {update_idx + 1}); training stopped, {kept}")
    return total


def evaluate(model: nn.Module, loader: Any, acc: Accelerator, args: argparse.Namespace) -> OrderedDict:
    """Loss, top-1 and top-5 (%) over the whole validation set, identical on every rank (validate.py's loop)."""
    metrics = validate.evaluate(model, loader, acc, channels_last=args.channels_last, progress=False)
    return OrderedDict((k, metrics[k]) for k in ("loss", "top1", "top5"))


def synced_tensors(t: Trainer) -> list[tuple[str, torch.Tensor]]:
    """What every rank holds bit-identically after a WE step: the parameters, the EMA's parameters, and with
    --dist-bn the BN running statistics of both (timm's distribute_bn syncs exactly those)."""
    models = [("", t.raw_model)] + ([("ema.", t.model_ema.module)] if t.model_ema is not None else [])
    items = []
    for prefix, model in models:
        items += [(prefix + n, p) for n, p in model.named_parameters()]
        if t.args.dist_bn:
            items += [(prefix + n, b) for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    return items


def check_ranks_agree(t: Trainer, epoch: int) -> None:
    """All-gather checksums of `synced_tensors`; RankMismatchError naming the tensors if ranks differ."""
    acc = t.accelerator
    items = synced_tensors(t)
    gathered = acc.gather(run_io.checksums(v for _, v in items)[None]).view(acc.num_processes, -1)
    differs = (gathered != gathered[0]).any(0).tolist()
    if any(differs):
        names = [n for (n, _), d in zip(items, differs) if d]
        raise RankMismatchError(
            f"after the weight-evolution step of epoch {epoch}, ranks hold different values "
            f"({len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        )
    _logger.info(f"WE step {epoch}: parameters{', BN statistics' if t.args.dist_bn else ''}"
                 f"{' and EMA' if t.model_ema is not None else ''} identical on {acc.num_processes} ranks")


def evolve(t: Trainer, epoch: int) -> None:
    """`we.step(epoch)` on the unwrapped fp32 parameters; stats go to the epoch's summary row and we_stats.jsonl."""
    start = time.perf_counter()
    stats = t.we.step(epoch)
    seconds = time.perf_counter() - start
    if t.accelerator.num_processes > 1:
        check_ranks_agree(t, epoch)
    row = {**stats.to_dict(), "we_time_s": seconds}
    rows = [r for r in t.history if r["epoch"] == epoch]
    (rows[-1] if rows else t.history.append(OrderedDict(epoch=epoch)) or t.history[-1]).update(row)
    t.we_records.append({"epoch": epoch, **row, "inferior": dict(stats.inferior), "skipped": list(stats.skipped)})
    _logger.info(
        f"WE step {epoch}: {row['we_inferior']} inferior filters evolved, {row['we_changed']} values changed "
        f"(rate conv {row.get('we_rate_conv', 0.0):.4f}) in {seconds * 1000:.1f} ms"
    )


# ============================================================================ checkpoints and resume


def training_state(t: Trainer, epoch: int, rng: list) -> dict[str, Any]:
    """Everything --resume needs, loadable with `torch.load(weights_only=True)`."""
    scaler = t.accelerator.scaler
    return {
        "format": run_io.STATE_FORMAT,
        "version": run_io.STATE_VERSION,
        "epoch": epoch,
        "num_updates": t.num_updates,
        "model": t.raw_model.state_dict(),
        "model_ema": None if t.model_ema is None else t.model_ema.module.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": run_io.json_safe(t.scheduler.state_dict()),  # informative: rebuilt from args on resume
        "scaler": None if scaler is None else scaler.state_dict(),
        "we": None if t.we is None else t.we.state_dict(),
        "rng": rng,  # per rank
        "checkpoints": t.keeper.state_dict(),
        "history": run_io.json_safe(t.history),
        "we_records": run_io.json_safe(t.we_records),
        "args": run_io.json_safe(vars(t.args)),
    }


def save_checkpoint(t: Trainer, epoch: int, metrics: dict[str, dict]) -> None:
    """Collective (every rank's RNG state is gathered); the main process writes `last` and the kept copies."""
    rng = gather_object([run_io.rng_state()])
    if t.out_dir is None:
        return
    def weights(module: nn.Module, kind: str) -> tuple[dict, dict]:
        sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        return sd, {**t.meta, "epoch": epoch, "metrics": metrics[kind], "ema": kind == "ema"}
    files = {"model": weights(t.raw_model, "model")}
    if t.model_ema is not None:
        files["ema"] = weights(t.model_ema.module, "ema")
    metric = metrics["ema" if t.model_ema is not None else "model"][t.args.eval_metric]
    if t.keeper.save(epoch, metric, files, lambda: training_state(t, epoch, rng)):
        _logger.info(f"New best {t.args.eval_metric} {metric:.4f} at epoch {epoch}")


def load_state(path: str, mmap: bool = False) -> dict[str, Any]:
    """A training state written by `save_checkpoint` (ValueError for anything else)."""
    if is_safetensors_file(path):
        raise ValueError(
            f"--resume {path} holds model weights only; resume from last.pth.tar or checkpoint-N.pth.tar, "
            "or start from these weights with --initial-checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # corrupt, truncated or foreign pickles
        raise ValueError(f"cannot read training state {path}: {' '.join(str(e).split())[:200]}") from None
    return run_io.check_state(state, path)


def warn_changed_args(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """torchtune-style: say which settings differ from the checkpointed run's."""
    ignore = {"resume", "output", "experiment", "start_epoch", "config", "log_interval", "workers", "debug",
              "log_tensorboard", "pin_mem", "checkpoint_hist"}
    now = run_io.json_safe(vars(args))
    changed = sorted(k for k in now if k not in ignore and k in saved and now[k] != saved[k])
    if changed:
        _logger.warning("resuming with settings that differ from the checkpoint's: "
                        + ", ".join(f"{k}={now[k]!r} (was {saved[k]!r})" for k in changed))


def check_same_start(acc: Accelerator, resume: str, state: dict[str, Any] | None) -> None:
    """Every process must resume the same state (each picks it: `--resume auto` reads the run folder)."""
    if acc.num_processes < 2:
        return
    mine = (os.path.abspath(resume) if resume and resume != "auto" else "", None if state is None else state["epoch"])
    every = gather_object([mine])
    if any(other != every[0] for other in every):
        starts = ", ".join(f"process {i}: {path or 'a new run'} (epoch {epoch})"
                           for i, (path, epoch) in enumerate(every))
        raise ValueError(f"the processes would start from different states ({starts}); the run folder must be on "
                         "a filesystem every process sees, unchanged while the run starts")


def check_resumable(args: argparse.Namespace, saved: dict[str, Any], path: str) -> None:
    """Refuse a resume whose settings contradict the checkpoint's in a way training cannot continue from."""
    refuse = [("model", "--model")]
    if args.weight_evolution and saved.get("weight_evolution"):
        refuse.append(("we_variant", "--we-variant"))  # one variant's counters and schedule mean nothing to the other
    for key, flag in refuse:
        if key in saved and getattr(args, key) != saved[key]:
            raise ValueError(f"cannot resume {path}: it was trained with {flag} {saved[key]}, "
                             f"not {getattr(args, key)}; start a new run (--initial-checkpoint to start from its weights)")


def restore_state(t: Trainer, state: dict[str, Any]) -> int:
    """Load a training state (model weights already in) into the unprepared objects; returns the next epoch."""
    if t.model_ema is not None and state.get("model_ema") is not None:
        load_into_model(t.model_ema.module, state["model_ema"])
    elif t.model_ema is not None:
        _logger.warning("the checkpoint has no EMA weights; EMA starts from the resumed model weights")
    if not t.args.no_resume_opt:
        t.optimizer.load_state_dict(state["optimizer"])
    if t.we is not None and state.get("we") is not None:
        t.we.load_state_dict(state["we"])
    t.keeper.load_state_dict(state.get("checkpoints", {}))
    t.num_updates = int(state.get("num_updates", 0))
    t.history = [dict(r) for r in state.get("history", []) if r.get("epoch", -1) <= state["epoch"]]
    t.we_records = [dict(r) for r in state.get("we_records", []) if r.get("epoch", -1) < state["epoch"]]
    warn_changed_args(t.args, state.get("args", {}))
    return int(state["epoch"]) + 1


def restore_rng(state: dict[str, Any], acc: Accelerator) -> None:
    rng = state.get("rng") or []
    if len(rng) == acc.num_processes:
        run_io.set_rng_state(rng[acc.process_index])
    else:
        _logger.warning(f"the checkpoint holds RNG states of {len(rng)} processes, this run has {acc.num_processes}")


# ============================================================================ main


def setup(args: argparse.Namespace, acc: Accelerator) -> tuple[Trainer, dict[str, Any] | None]:
    """Build data, model, optimizer, schedule, EMA and WE, and load --resume state. Nothing is written yet."""
    utils.random_seed(args.seed, 0)  # same initial weights on every rank
    train_set, val_set, num_classes = load_data(args)
    model, model_kwargs = build_model(args, args.num_classes or num_classes)
    args.num_classes = getattr(model, "num_classes", None) or args.num_classes or num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=acc.is_main_process)
    loader_train, loader_eval = acc.prepare(*build_loaders(args, data_config, train_set, val_set))
    if len(loader_train) == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {args.batch_size} per process")
    state = load_state(args.resume) if args.resume and args.resume != "auto" else None
    check_same_start(acc, args.resume, state)
    if state is not None:
        check_resumable(args, state.get("args", {}), args.resume)
        load_into_model(model, state["model"])  # before EMA and optimizer are derived from the model
    model.to(acc.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    resolve_lr(args, acc.num_processes)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    updates = -(-len(loader_train) // args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates)
    we_config = we_config_from_args(args)
    loss_fn, mixup_fn = build_loss(args, args.num_classes)
    ema = None
    if args.model_ema:
        ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    meta = {
        "format": "we_timm", "architecture": args.model, "num_classes": int(args.num_classes),
        "data_config": run_io.json_safe(data_config), "model_kwargs": run_io.json_safe(model_kwargs),
        "we_config": we_config.to_dict() if we_config else None, "args": run_io.json_safe(vars(args)),
    }
    t = Trainer(
        args, acc, model, model, optimizer, scheduler, loss_fn.to(acc.device), mixup_fn, ema,
        WeightEvolution(model, we_config) if we_config else None, loader_train, loader_eval, num_epochs, meta,
        run_io.CheckpointKeeper(None, args.checkpoint_hist, decreasing=args.eval_metric == "loss"),
    )
    return t, state


def make_output_dir(t: Trainer) -> None:
    """Create the run folder (main process) once everything is validated; write args.yaml; start trackers."""
    args, acc = t.args, t.accelerator
    if not acc.is_main_process:
        return
    size = t.meta["data_config"]["input_size"][-1]
    name = args.experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{safe_model_name(args.model)}-{size}"
    out_dir = os.path.join(args.output or "./output/train", name)
    if os.path.exists(os.path.join(out_dir, "args.yaml")) and not args.resume:
        raise ValueError(f"{out_dir} already holds a run; pass a new --experiment, or --resume {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    for tmp in remove_stale_temps(out_dir):
        _logger.warning(f"removed {tmp}, a partial file left by an interrupted checkpoint write")
    saved = {k: v for k, v in run_io.json_safe(vars(args)).items() if k != "config"}
    run_io.write_text(os.path.join(out_dir, "args.yaml"), yaml.safe_dump(saved, default_flow_style=False))
    if args.log_tensorboard:
        acc.project_configuration.project_dir = acc.project_configuration.logging_dir = out_dir
        scalars = {k: v for k, v in saved.items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers("tensorboard", config=scalars)
    t.out_dir = t.keeper.out_dir = out_dir


def write_run_files(t: Trainer, plot: bool = False) -> None:
    if t.out_dir is None:
        return
    run_io.write_summary(os.path.join(t.out_dir, "summary.csv"), t.history)
    if t.we is not None:
        run_io.write_jsonl(os.path.join(t.out_dir, "we_stats.jsonl"), t.we_records)
    if plot and t.history:
        run_io.plot_summary(os.path.join(t.out_dir, "summary.png"), t.history)


def start(t: Trainer, state: dict[str, Any] | None) -> int:
    """Restore, create the run folder, prepare for Accelerate; apply a resumed WE step. Returns the first epoch."""
    args, acc = t.args, t.accelerator
    start_epoch = restore_state(t, state) if state is not None else 0
    make_output_dir(t)
    t.model, t.optimizer = acc.prepare(t.model, t.optimizer)
    if state is not None and acc.scaler is not None and state.get("scaler") is not None:
        acc.scaler.load_state_dict(state["scaler"])
    if args.torchcompile:
        t.model = torch.compile(t.model, backend=args.torchcompile)
    pending = start_epoch - 1
    if state is not None and t.we is not None and 0 <= pending < t.num_epochs - 1 and t.we.last_epoch != pending:
        evolve(t, pending)  # the step the checkpoint was saved before (WE_SPEC "Where it runs in training")
    start_epoch = args.start_epoch if args.start_epoch is not None else start_epoch
    if start_epoch > 0 and args.sched_on_updates:
        t.scheduler.step_update(start_epoch * t.updates_per_epoch)
    elif start_epoch > 0:
        t.scheduler.step(start_epoch)
    if state is not None:
        restore_rng(state, acc)
    return start_epoch


def run_epochs(t: Trainer, start_epoch: int) -> None:
    """Per epoch: train -> evaluate -> checkpoint -> weight evolution (none after the last epoch)."""
    args, acc = t.args, t.accelerator
    for epoch in range(start_epoch, t.num_epochs):
        seed_epoch(args.seed, epoch, acc.process_index)
        t.loader_train.set_epoch(epoch)
        begin = time.perf_counter()
        train_metrics = train_one_epoch(epoch, t, t.loader_train)
        seconds = time.perf_counter() - begin
        if acc.num_processes > 1 and args.dist_bn:  # timm: the model's and the EMA's BN running stats
            for model in (t.raw_model, t.model_ema):
                if model is not None:
                    utils.distribute_bn(model, acc.num_processes, args.dist_bn == "reduce")
        metrics = {"model": evaluate(t.model, t.loader_eval, acc, args)}
        if t.model_ema is not None:
            metrics["ema"] = evaluate(t.model_ema.module, t.loader_eval, acc, args)
        eval_metrics = metrics["ema" if t.model_ema is not None else "model"]  # timm: EMA's metrics when enabled
        lrs = [g["lr"] for g in t.optimizer.param_groups]
        t.history.append(OrderedDict(
            epoch=epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
            **{f"eval_{k}": v for k, v in eval_metrics.items()}, lr=sum(lrs) / len(lrs),
        ))
        for kind, m in metrics.items():  # non-finite weights that the training loss did not show yet
            if not math.isfinite(m["loss"]):
                raise NonFiniteLossError(
                    f"the validation loss of the {kind} became {m['loss']} in epoch {epoch}; training stopped "
                    f"before saving epoch {epoch}, so the newest checkpoint predates it and is intact")
        save_checkpoint(t, epoch, metrics)
        if t.we is not None and epoch < t.num_epochs - 1:
            evolve(t, epoch)
        t.scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        write_run_files(t)
        acc.log({k: v for k, v in t.history[-1].items() if k != "epoch" and isinstance(v, (int, float))}, step=epoch)
        _logger.info(f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}, eval loss {eval_metrics['loss']:.4f}, "
                     f"top1 {eval_metrics['top1']:.2f}, top5 {eval_metrics['top5']:.2f} ({seconds:.1f}s training)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns {"best": (metric, epoch) or None, "output": the run folder (main process) or None}."""
    acc = build_accelerator(args)
    if not logging.root.handlers:
        utils.setup_default_logging()
    if not acc.is_main_process:
        logging.root.setLevel(logging.WARNING)
    try:
        with we_cli.process_group_ends(acc):
            return fit(args, acc)
    except RuntimeError as e:
        error = as_distributed_error(e, acc)
        if error is e:
            raise
        raise error from e


def fit(args: argparse.Namespace, acc: Accelerator) -> dict[str, Any]:
    """Everything after the Accelerator: set up, restore, train the epochs, write the final files."""
    t, state = setup(args, acc)
    start_epoch = start(t, state)
    params = sum(p.numel() for p in t.raw_model.parameters()) / 1e6
    _logger.info(f"Model {args.model} ({params:.2f}M params), {acc.num_processes} process(es) on {acc.device}, "
                 f"mixed precision {acc.mixed_precision}, epochs {start_epoch}..{t.num_epochs - 1}, "
                 f"WE {t.we.config if t.we else 'off'}, output {t.out_dir}")
    if start_epoch >= t.num_epochs:
        _logger.warning(f"the run already completed its {t.num_epochs} epochs; pass a larger --epochs to train longer")
    try:
        with logging_redirect_tqdm():
            run_epochs(t, start_epoch)
    except KeyboardInterrupt:
        _logger.warning("interrupted")
    write_run_files(t, plot=True)
    if t.keeper.best is not None and t.out_dir is not None:
        _logger.info(f"*** Best metric: {t.keeper.best[0]} (epoch {t.keeper.best[1]})")
    return {"best": t.keeper.best, "output": t.out_dir}


def cli(argv: list[str] | None = None) -> int:
    """Entry point: bad input ends with one `error: ...` line and exit status 1 (tracebacks with --debug).

    OSError included: unreadable data met mid-run, a full disk; checkpoints on disk stay complete (atomic writes).
    """
    errors = (ValueError, OSError, CheckpointError, RankMismatchError, DistributedError, we_cli.Terminated)
    with we_cli.sigterm_as_error():
        return we_cli.run(lambda a: main(parse_args(a)), argv, errors)


if __name__ == "__main__":
    sys.exit(cli())
