"""train.py's command line: the parser, `-c` YAML defaults, resume defaults, and the checks before any work.

Precedence: CLI > `-c` YAML > the arguments saved in the `--resume` state > code defaults. Unlike timm,
unknown YAML keys are an error. `parse_args` returns validated arguments or raises ValueError with one line
naming the flag; nothing is built or written before it returns.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from typing import Any, Mapping, NoReturn

import torch
import yaml
from accelerate.utils import is_tensorboard_available
from timm import utils
from timm.models import is_model
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

from ..config import LAYER_KINDS, LEVELS, MATCHINGS, SELECTIONS, VARIANTS, WEConfig
from .bad_images import DEFAULT_MAX_BAD_IMAGES
from .dataset import PACKAGES, TRAIN_SPLITS
from .errors import UsageError, one_line
from .state import resolve_resume, saved_args

_logger = logging.getLogger(__name__)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's str_to_interp_mode


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as `UsageError` rather than printed with the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _none_or(kind):
    def convert(value: str):
        return None if str(value).lower() in ("none", "null", "") else kind(value)
    convert.__name__ = kind.__name__
    return convert


def _alpha(value: str):
    return value if value == "adaptive" else float(value)


def get_args_parser() -> argparse.ArgumentParser:
    """train.py's full parser, unparsed (tests and tools reuse it)."""
    parser = ArgumentParser(prog="train.py", description="timm + Accelerate training with Weight Evolution")
    parser.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file of argument defaults (CLI wins)")
    for add in (_data_args, _model_args, _optim_args, _sched_args, _aug_args, _ema_args, _we_train_args, _misc_args):
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
    g.add_argument("--max-bad-images", type=int, default=DEFAULT_MAX_BAD_IMAGES, metavar="N",
                   help="unreadable images (skipped, named in a warning) tolerated per split and epoch before the "
                        f"run stops (default: {DEFAULT_MAX_BAD_IMAGES})")


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
    g.add_argument("--interpolation", default="", type=str, metavar="NAME", choices=("", *INTERPOLATIONS),
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
    g.add_argument("--fast-norm", action="store_true", default=False, help="timm's experimental fast-norm")
    g.add_argument("--model-dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="store the model and feed its inputs in this dtype, without AMP (default: float32)")
    g.add_argument("--head-init-scale", type=float, default=None, help="scale the classifier's initial weights")
    g.add_argument("--head-init-bias", type=float, default=None, help="the classifier's initial bias value")
    g.add_argument("--torchcompile-mode", type=str, default=None, help="torch.compile mode (default: None)")
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
    g.add_argument("--lr-base-scale", type=str, default="", metavar="SCALE", choices=("", "linear", "sqrt"),
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
    g.add_argument("--color-jitter-prob", type=float, default=None, metavar="PCT",
                   help="probability of applying any color jitter (default: always)")
    g.add_argument("--grayscale-prob", type=float, default=None, metavar="PCT",
                   help="probability of a random grayscale conversion (default: none)")
    g.add_argument("--gaussian-blur-prob", type=float, default=None, metavar="PCT",
                   help="probability of a gaussian blur (default: none)")
    g.add_argument("--train-crop-mode", type=str, default=None, help="crop mode in training (timm's)")
    g.add_argument("--aa", type=str, default=None, metavar="NAME",
                   help='AutoAugment policy, e.g. "rand-m9-mstd0.5" (default: None)')
    g.add_argument("--reprob", type=float, default=0.0, metavar="PCT", help="random erase probability (default: 0)")
    g.add_argument("--remode", type=str, default="pixel", choices=("pixel", "rand", "const"), help='random erase mode (default: "pixel")')
    g.add_argument("--recount", type=int, default=1, help="random erase count (default: 1)")
    g.add_argument("--aug-repeats", type=float, default=0, metavar="N",
                   help="repeated augmentation: each image N times per epoch, the copies spread over the processes, "
                        "the epoch as long as without (timm's RepeatAugSampler; default: 0, off)")
    g.add_argument("--aug-splits", type=int, default=0, metavar="N",
                   help="every sample as its clean image plus N-1 augmented views, batches N times larger "
                        "(timm's AugMixDataset; default: 0, off; else >= 2)")
    g.add_argument("--jsd-loss", action="store_true", default=False,
                   help="Jensen-Shannon consistency + cross-entropy over the --aug-splits views (timm's JsdCrossEntropy)")
    g.add_argument("--resplit", action="store_true", default=False,
                   help="do not random-erase the first (clean) split of a batch")
    g.add_argument("--split-bn", action="store_true", default=False,
                   help="separate BatchNorm statistics per augmentation split (timm's SplitBatchNorm2d; the extra "
                        "layers are training-only and left out of the saved weights files)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, enabled if > 0")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, enabled if > 0")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of cutmix instead of mixup when both on")
    g.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"), help='"batch", "pair" or "elem"')
    g.add_argument("--mixup-off-epoch", default=0, type=int, metavar="N",
                   help="turn off mixup after this epoch (0: never)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--bce-loss", action="store_true", default=False, help="binary cross-entropy loss")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="threshold for binarizing soft BCE targets")
    g.add_argument("--bce-sum", action="store_true", default=False, help="sum over classes in the BCE loss")
    g.add_argument("--bce-pos-weight", type=float, default=None, help="positive weighting for the BCE loss")
    g.add_argument("--train-interpolation", type=str, default="random", choices=("", "random", *INTERPOLATIONS),
                   help='training interpolation (default: "random")')
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    g.add_argument("--drop-path", type=float, default=None, metavar="PCT", help="drop path rate (default: None)")
    g.add_argument("--drop-block", type=float, default=None, metavar="PCT", help="drop block rate (default: None)")
    g.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum override")
    g.add_argument("--bn-eps", type=float, default=None, help="BatchNorm epsilon override")
    g.add_argument("--dist-bn", type=str, default="reduce", choices=("reduce", "broadcast", ""),
                   help="share BN running stats across ranks each epoch")
    g.add_argument("--sync-bn", action="store_true", default=False,
                   help="synchronized BatchNorm across processes (torch SyncBatchNorm; CUDA only)")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a process waits for the others in a collective before failing "
                        "(default: the backend's, 30 min for gloo, 10 min for NCCL)")


def _ema_args(parser):
    g = parser.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action="store_true", default=False,
                   help="track an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay (default: 0.9998)")
    g.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup")


def add_we_args(parser: argparse.ArgumentParser) -> Any:
    """The "Weight evolution" group: --weight-evolution and one --we-<field> per WEConfig field (train.py, inspect);
    returns the group."""
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
    return g


def _we_train_args(parser):
    """The WE group plus what only training has: inspection reports, and what else a WE step touches."""
    g = add_we_args(parser)
    g.add_argument("--we-inspect-every", type=int, default=0, metavar="N",
                   help="write we_inspect/epoch_<E>.csv/.png (python -m we_timm.inspect's report) into the run "
                        "folder before the WE step of every N-th epoch (default: 0, off)")
    g.add_argument("--we-ema", default="follow", choices=("follow", "evolve"),
                   help="follow: the EMA keeps averaging the evolved weights (default); evolve: the EMA gets its own "
                        "WE step after the model's")
    g.add_argument("--we-reset-opt-state", action="store_true", default=False,
                   help="zero the optimizer state (momentum, Adam moments) of every value a WE step changes "
                        "(default: keep it, as the authors' code does)")


def _misc_args(parser):
    g = parser.add_argument_group("Miscellaneous parameters")
    g.add_argument("--seed", type=int, default=42, metavar="S", help="random seed (default: 42)")
    g.add_argument("--worker-seeding", type=str, default="all", choices=("all", "part"),
                   help="timm's worker seed mode; it only changes streaming (wds/, hfds/, ...) sets: every sample of "
                        "a map-style set is seeded from (seed, epoch, index) whatever the worker (default: all)")
    g.add_argument("--log-interval", type=int, default=50, metavar="N", help="updates between training log lines")
    g.add_argument("--checkpoint-hist", type=int, default=10, metavar="N",
                   help="number of best checkpoints to keep (default: 10)")
    g.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                   help="write recovery.pth.tar every N updates, replacing the previous one (default: 0, off)")
    g.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="data loading workers (default: 4 with a GPU, 0 on CPU)")
    g.add_argument("--amp", action="store_true", default=False,
                   help="mixed precision (else the accelerate config decides)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                   help="AMP dtype with --amp (default: float16)")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None,
                   help="pin the DataLoader's batches in CPU memory, for asynchronous copies to the device "
                        "(default: on with a CUDA device)")
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="workers hand over normalised float images (default: uint8, normalised and erased on the "
                        "device, as timm's prefetcher)")
    g.add_argument("--output", default="", type=str, metavar="PATH", help="output root (default: ./output/train)")
    g.add_argument("--experiment", default="", type=str, metavar="NAME",
                   help="run folder name (default: date-model-imgsize)")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                   help='checkpoint ranking metric (default: "top1")')
    g.add_argument("--plot-summary", action="store_true", default=False,
                   help="also draw summary.csv as summary.png (curves, WE selection) when training ends (default: "
                        "off, as timm: matplotlib adds ~1 s to the run)")
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
    config = load_config(parser, known.config) if known.config else {}
    resume = resolve_resume(known.resume or config.get("resume", ""), known.output or config.get("output", ""),
                            known.experiment or config.get("experiment", ""))
    if resume != "auto" and os.path.isfile(resume):  # the state's own settings; CLI and YAML still win
        parser.set_defaults(**config_defaults(parser, saved_args(resume), f"arguments saved in {resume}", strict=False))
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.config, args.resume = known.config, resume
    resolve_args(args)
    return args


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



# ----------------------------------------------------------------------------- validate.py

DEFAULT_EVAL_BATCH_SIZE = 256  # timm validate.py's default


def get_validate_parser() -> argparse.ArgumentParser:
    """validate.py's parser, unparsed."""
    parser = ArgumentParser(prog="validate.py", description="Validate a we_timm / timm checkpoint")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", "-m", default=None, help="timm architecture (default: the checkpoint's metadata); "
                       "a list a,b or a wildcard (resnet*) evaluates each model whose pretrained weights are local")
    group.add_argument("--checkpoint", default="", help=".safetensors (train.py) or timm .pth/.pth.tar weights; "
                       "a folder evaluates each of its checkpoints (one results row each)")
    group.add_argument("--pretrained", action="store_true", help="no checkpoint: use timm's pretrained weights (needs a cache)")
    group.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights (<name>_ema.safetensors or state_dict_ema)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier size; default: the checkpoint's metadata")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs,
                       help="extra create_model kwargs, key=value (over the checkpoint's)")
    group.add_argument("--reparam", action="store_true", help="reparameterize the model (timm's reparameterize_model)")
    group.add_argument("--test-pool", action="store_true", help="test-time pooling (timm's apply_test_time_pool)")

    group = parser.add_argument_group("Data")
    group.add_argument("--data-dir", default=None, help="image folder root (timm ImageFolder layout, split sub-folders searched)")
    group.add_argument("--dataset", default="", help="'' for an image folder, 'digits' for sklearn digits, or a timm dataset name; default: the checkpoint's training data")
    group.add_argument("--split", default="validation", help="dataset split to evaluate")
    group.add_argument("--img-size", type=int, default=None, help="square input size; default: checkpoint data config")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="full input size, overrides --img-size")
    group.add_argument("--use-train-size", action="store_true",
                       help="the model's train input size, not its test size (timm's use_test_size=False)")
    group.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction; default: checkpoint data config")
    group.add_argument("--crop-mode", default=None, help="crop mode (center, squash, border); default: checkpoint data config")
    group.add_argument("--interpolation", default=None, help="resize interpolation; default: checkpoint data config")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std")
    group.add_argument("--num-samples", type=int, default=None, metavar="N", help="evaluate only the first N samples (train.py's --val-num-samples)")
    group.add_argument("--class-map", default="", help="class to index mapping file for image folders")
    group.add_argument("--max-bad-images", type=int, default=DEFAULT_MAX_BAD_IMAGES, metavar="N",
                       help="unreadable images (skipped, named in a warning; timm reads the next image in their place) "
                            f"tolerated before the evaluation stops; the result's bad_images counts them "
                            f"(default: {DEFAULT_MAX_BAD_IMAGES})")
    group.add_argument("--batch-size", "-b", type=int, default=None, help=f"images per process and step; default: the checkpoint's eval batch size, else {DEFAULT_EVAL_BATCH_SIZE}")
    group.add_argument("--workers", "-j", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes per process (default: min(4, CPUs))")

    group = parser.add_argument_group("Runtime")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast the forward pass; default: as the checkpoint was trained")
    group.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"), help="autocast dtype with --amp; default: the checkpoint's, else bfloat16")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC memory format; default: as the checkpoint was trained")
    group.add_argument("--prefetcher", action=argparse.BooleanOptionalAction, default=None,
                       help="uint8 images normalised on the device (timm's prefetcher); default: as the checkpoint "
                            "was trained (--no-prefetcher: normalised by the workers)")
    group.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None,
                       help="pin batches in CPU memory for asynchronous copies to the device (default: on with CUDA)")
    group.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present")
    group.add_argument("--results-file", default="", help="write the results row to this file")
    group.add_argument("--results-format", default="csv", choices=("csv", "json"), help="format of --results-file")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--debug", action="store_true", help="raise with a traceback instead of a one-line error")
    return parser


# ----------------------------------------------------------------------------- YAML (-c)

# Arguments of timm's train.py (1.0.29) that we_timm does not implement: in a `-c` YAML (e.g. the args.yaml
# of a timm run) they are skipped with one warning; any other unknown key is an error.
STREAMING_PREFIXES = frozenset(PACKAGES)  # wds/, hfds/, hfids/, tfds/: iterable datasets

TIMM_ONLY = frozenset("""
    data dataset_trust_remote_code device
    device_modules distill_loss_weight drop_connect epoch_repeats fuser
    input_img_mode input_key kd_distill_type kd_loss_type kd_model_name
    kd_student_feature_dim kd_teacher_feature_dim kd_temperature kd_token_distill_type layer_decay_min_scale
    layer_decay_no_opt_scale local_rank log_wandb lr_cycle_decay lr_cycle_limit lr_cycle_mul lr_k_decay lr_noise
    lr_noise_pct lr_noise_std model_ema_force_cpu naflex_loader naflex_loss_scale naflex_max_seq_len
    naflex_patch_size_probs naflex_patch_sizes naflex_patchify_channels_first naflex_train_seq_lens no_ddp_bb
    save_images synchronize_step target_key task_loss_weight
    torchscript train_batch_sizes train_batches_per_epoch train_img_sizes train_size_probs
    train_size_random_mix train_size_schedule train_size_schedule_spread tta use_multi_epochs_loader val_interval
    variable_batch_loss_scale wandb_project wandb_resume_id wandb_tags
""".split())


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value as argparse would have produced it from the command line (ValueError if it cannot)."""
    if value is None:
        if action.default is not None:
            raise ValueError(f"{key}: null is not a value (leave the key out for the default, "
                             f"{action.default!r})")
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(action.default, dict):  # key=value actions such as timm ParseKwargs
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"{key}: expected {action.nargs} values, got {value!r}")
        return [_coerce_one(action, key, v) for v in items]
    return _coerce_one(action, key, value)


def _coerce_one(action: argparse.Action, key: str, value: Any) -> Any:
    kind = action.type
    if kind is not None and not (kind is int and isinstance(value, bool)):
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: invalid {getattr(kind, '__name__', 'value')} {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{key}: {value!r} is not one of {list(action.choices)}")
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """YAML file -> validated parser defaults; unknown keys and ill-typed values raise ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=UniqueKeyLoader)
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {one_line(e)}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping of argument names to values")
    return config_defaults(parser, cfg, f"config {path}")


def config_defaults(parser: argparse.ArgumentParser, cfg: Mapping[str, Any], source: str,
                    strict: bool = True) -> dict[str, Any]:
    """`{dest: value}` for `parser.set_defaults`, values typed as on the command line.

    Unknown keys raise ValueError naming `source` (with `strict=False` they are
    logged and skipped, e.g. arguments saved by an older train.py).
    A key of timm's train.py that we_timm does not implement (`TIMM_ONLY`: timm's own args.yaml is a valid
    `-c`) is skipped, all of them named in one warning.
    """
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    keys = {str(k): str(k).replace("-", "_") for k in cfg}
    unknown = sorted(k for k, dest in keys.items() if dest not in actions)
    timm_only = [k for k in unknown if keys[k] in TIMM_ONLY]
    if timm_only:
        _logger.warning("%s: ignoring %d argument(s) of timm's train.py that we_timm does not implement: %s",
                        source, len(timm_only), ", ".join(timm_only))
    unknown = [k for k in unknown if k not in timm_only]
    if unknown and strict:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} (keys are the argument names, e.g. batch_size)")
    if unknown:
        _logger.warning("%s: ignoring unknown argument(s) %s", source, ", ".join(unknown))
    try:
        return {keys[str(k)]: _coerce(actions[keys[str(k)]], str(k), v) for k, v in cfg.items()
                if keys[str(k)] in actions}
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
