"""train.py's command line: the parser and `parse_args`, which reads the sources of defaults in order.

Precedence: CLI > `-c` YAML (`args_yaml`) > the arguments saved in the `--resume` state > code defaults.
Unlike timm, unknown YAML keys are an error. `parse_args` returns arguments checked by `args_checks` or
raises ValueError with one line naming the flag; nothing is built or written before it returns.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from timm import utils

from ..config import LAYER_KINDS, LEVELS, MATCHINGS, SELECTIONS, VARIANTS, WEConfig
from .args_checks import resolve_args
from .args_yaml import config_defaults, load_config
from .bad_images import DEFAULT_MAX_BAD_IMAGES
from .errors import UsageError
from .resuming import resolve_resume, saved_args

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
    _image_aug_args(g)
    _mix_and_regularization_args(g)


def _image_aug_args(g):
    """The training images' augmentation: timm's transforms, random erasing, repeats and splits."""
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


def _mix_and_regularization_args(g):
    """Mixup / CutMix, the loss (smoothing, BCE), training interpolation, dropout, BatchNorm (and across
    processes), the collectives' timeout."""
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
