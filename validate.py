#!/usr/bin/env python3
"""Evaluate a checkpoint released by train.py (or any timm model) on a labelled image set.

    python validate.py --checkpoint output/run/model_best.safetensors --dataset digits
    python validate.py --checkpoint model_best.safetensors --data-dir /data/imagenet --split val
    python validate.py --model resnet18 --checkpoint timm_checkpoint.pth.tar --data-dir /data/imagenet
    accelerate launch validate.py --checkpoint ... --data-dir ...   # any number of processes

A train.py checkpoint carries its architecture, class count, evaluation data
config and training args as safetensors metadata, so `--model` and `--img-size`
are only needed for foreign checkpoints; unset `--batch-size`, `--amp` and
`--channels-last` follow the training run, and without `--data-dir`/`--dataset`
the run's own data is used, so train.py's eval numbers reproduce exactly.
Every sample is counted exactly once across processes (`gather_for_metrics`
drops the padding of the last, uneven batch).
Bad inputs end with one `error: ...` line and a non-zero exit; `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from typing import Any

import timm
import torch
from accelerate import Accelerator
from timm.data import create_transform, resolve_data_config

from we_timm.recipes import errors, files
from we_timm.recipes.args import ArgumentParser
from we_timm.recipes.checkpoint import check_pretrained_reachable, create_model_from_checkpoint, model_name
from we_timm.recipes.data import eval_dataset
from we_timm.recipes.engine import check_precision, evaluate, mixed_precision
from we_timm.recipes.errors import CheckpointError, DataError

_logger = logging.getLogger("validate")

DEFAULT_BATCH_SIZE = 256  # timm validate.py's default
# train.py / timm train.py arguments that resolve_data_config reads
DATA_ARGS = ("input_size", "img_size", "in_chans", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="validate.py", description="Validate a we_timm / timm checkpoint")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", "-m", default=None, help="timm architecture; default: the checkpoint's metadata")
    group.add_argument("--checkpoint", default="", help=".safetensors (train.py) or timm .pth/.pth.tar weights")
    group.add_argument("--pretrained", action="store_true", help="no checkpoint: use timm's pretrained weights (needs a cache)")
    group.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights (<name>_ema.safetensors or state_dict_ema)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier size; default: the checkpoint's metadata")

    group = parser.add_argument_group("Data")
    group.add_argument("--data-dir", default=None, help="image folder root (timm ImageFolder layout, split sub-folders searched)")
    group.add_argument("--dataset", default="", help="'' for an image folder, 'digits' for sklearn digits, or a timm dataset name; default: the checkpoint's training data")
    group.add_argument("--split", default="validation", help="dataset split to evaluate")
    group.add_argument("--img-size", type=int, default=None, help="square input size; default: checkpoint data config")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="full input size, overrides --img-size")
    group.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction; default: checkpoint data config")
    group.add_argument("--crop-mode", default=None, help="crop mode (center, squash, border); default: checkpoint data config")
    group.add_argument("--interpolation", default=None, help="resize interpolation; default: checkpoint data config")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std")
    group.add_argument("--num-samples", type=int, default=None, metavar="N", help="evaluate only the first N samples (train.py's --val-num-samples)")
    group.add_argument("--class-map", default="", help="class to index mapping file for image folders")
    group.add_argument("--batch-size", "-b", type=int, default=None, help=f"images per process and step; default: the checkpoint's eval batch size, else {DEFAULT_BATCH_SIZE}")
    group.add_argument("--workers", "-j", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes per process (default: min(4, CPUs))")

    group = parser.add_argument_group("Runtime")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast the forward pass; default: as the checkpoint was trained")
    group.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"), help="autocast dtype with --amp; default: the checkpoint's, else bfloat16")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC memory format; default: as the checkpoint was trained")
    group.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present")
    group.add_argument("--results-file", default="", help="write the results row to this file")
    group.add_argument("--results-format", default="csv", choices=("csv", "json"), help="format of --results-file")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--debug", action="store_true", help="raise with a traceback instead of a one-line error")
    return parser


# ----------------------------------------------------------------------------- model and data


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The timm model with the checkpoint's weights loaded, and the checkpoint metadata."""
    if args.checkpoint:
        model, metadata, path = create_model_from_checkpoint(
            args.checkpoint, model_name=args.model, num_classes=args.num_classes, use_ema=args.use_ema,
        )
        metadata = {**metadata, "checkpoint": path}
        return model, metadata
    if not args.model:
        raise CheckpointError("nothing to evaluate: give --checkpoint (or --model with --pretrained)")
    if not timm.is_model(args.model):
        raise CheckpointError(f"unknown timm architecture {args.model!r}")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.pretrained:
        check_pretrained_reachable(args.model)
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs), {}


def resolve_eval_config(args: argparse.Namespace, model: torch.nn.Module, metadata: dict[str, Any]) -> dict[str, Any]:
    """timm `resolve_data_config`: CLI flags > the checkpoint's data config > the model's pretrained_cfg.

    A checkpoint without a data config but with its training args (timm / train.py
    `.pth.tar`) gets the config those args resolved to when it was trained.
    """
    saved = metadata.get("data_config")
    train_args = metadata.get("args")
    if not saved and isinstance(train_args, dict):
        saved = resolve_data_config({k: train_args.get(k) for k in DATA_ARGS}, model=model)
    base = {**model.pretrained_cfg, **saved} if saved else None
    return resolve_data_config(vars(args), pretrained_cfg=base, model=model)


def resolve_runtime_args(args: argparse.Namespace, metadata: dict[str, Any]) -> None:
    """Unset batch size / AMP / channels-last follow the checkpoint's training args (same numbers)."""
    train_args = metadata.get("args") if isinstance(metadata.get("args"), dict) else {}
    if args.batch_size is None:
        args.batch_size = train_args.get("validation_batch_size") or train_args.get("batch_size") or DEFAULT_BATCH_SIZE
    if args.amp is None:
        args.amp = bool(train_args.get("amp", False))
    if args.amp_dtype is None:
        args.amp_dtype = train_args.get("amp_dtype") if train_args.get("amp_dtype") in ("bfloat16", "float16") else "bfloat16"
    if args.channels_last is None:
        args.channels_last = bool(train_args.get("channels_last", False))
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")


def build_dataset(args: argparse.Namespace, transform, metadata: dict[str, Any]) -> torch.utils.data.Dataset:
    """train.py's datasets: `digits`, or a timm dataset / image folder under `--data-dir`.

    Without `--dataset` and `--data-dir`, the checkpoint's training data is used.
    """
    train_args = metadata.get("args") if isinstance(metadata.get("args"), dict) else {}
    if not args.dataset and not args.data_dir and (train_args.get("dataset") or train_args.get("data_dir")):
        args.dataset, args.data_dir = train_args.get("dataset") or "", train_args.get("data_dir")
        _logger.info("evaluating on the checkpoint's training data: %s", args.dataset or args.data_dir)
    return eval_dataset(args.dataset, args.data_dir, args.split, transform, num_samples=args.num_samples,
                        class_map=args.class_map)


# ----------------------------------------------------------------------------- evaluation


def write_results(results: dict[str, Any], path: str, fmt: str) -> None:
    """Append a CSV row (header when new) or write a JSON object."""
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        return
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results))
        if new:
            writer.writeheader()
        writer.writerow(results)


def _accelerator(args: argparse.Namespace) -> Accelerator:
    accelerator = Accelerator(mixed_precision=mixed_precision(args.amp, args.amp_dtype) or "no", cpu=args.cpu)
    check_precision(accelerator)
    return accelerator


def check_args(args: argparse.Namespace) -> None:
    """Values checked before any work, and --results-file writable before the evaluation (not after it)."""
    for flag, value in (("--img-size", args.img_size), ("--num-classes", args.num_classes),
                        ("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                        ("--input-size", min(args.input_size) if args.input_size else None)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise DataError(f"--workers must be >= 0, got {args.workers}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise DataError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.results_file:
        files.check_writable(args.results_file, "--results-file")


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Build, evaluate, report; raises CheckpointError / DataError on bad inputs."""
    check_args(args)
    model, metadata = build_model(args)
    resolve_runtime_args(args, metadata)
    accelerator = _accelerator(args)
    with errors.process_group_ends(accelerator):
        return _validate(args, model, metadata, accelerator)


def _validate(args: argparse.Namespace, model: torch.nn.Module, metadata: dict[str, Any],
              accelerator: Accelerator) -> dict[str, Any]:
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_eval_config(args, model, metadata)
    transform = create_transform(**data_config, is_training=False)
    dataset = build_dataset(args, transform, metadata)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, drop_last=False)
    # Only the loader is prepared (sharded per process); evaluation needs no DDP wrapper.
    model = model.to(accelerator.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    loader = accelerator.prepare(loader)
    start = time.perf_counter()
    metrics = evaluate(model, loader, accelerator, channels_last=args.channels_last, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    results = {
        "model": model_name(model),
        "checkpoint": metadata.get("checkpoint", ""),
        "epoch": metadata.get("epoch"),
        "ema": bool(metadata.get("ema", False)),
        "top1": metrics["top1"],
        "top1_err": round(100 - metrics["top1"], 4),
        "top5": metrics["top5"],
        "top5_err": round(100 - metrics["top5"], 4),
        "loss": metrics["loss"],
        "num_samples": metrics["num_samples"],
        "param_count": round(param_count / 1e6, 4),
        "img_size": data_config["input_size"][-1],
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "images_per_sec": round(metrics["num_samples"] / max(seconds, 1e-9), 2),
        "num_processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        if args.results_file:
            write_results(results, args.results_file, args.results_format)
        print(f"--result\n{json.dumps(results, indent=4)}")
    return results


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run `validate(args)`; bad inputs become `SystemExit("error: <one line>")` unless `--debug`."""
    with errors.one_line_errors(args.debug):
        return validate(args)


def cli(argv: list[str] | None = None) -> int:
    """Entry point (`python validate.py`, `we-validate`): a malformed command line also ends with one `error:` line."""
    return errors.run(lambda a: main(get_args_parser().parse_args(a)), argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(cli())
