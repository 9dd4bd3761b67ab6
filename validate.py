#!/usr/bin/env python3
"""Evaluate a checkpoint released by train.py (or any timm model) on a labelled image set.

    python validate.py --checkpoint output/run/model_best.safetensors --dataset digits
    python validate.py --checkpoint model_best.safetensors --data-dir /data/imagenet --split val
    python validate.py --model resnet18 --checkpoint timm_checkpoint.pth.tar --data-dir /data/imagenet
    python validate.py --checkpoint output/train/run/ --results-file run.csv   # every checkpoint of a folder
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
from timm.data.loader import fast_collate
from timm.layers import apply_test_time_pool
from timm.utils import reparameterize_model

from we_timm.recipes import errors, files
from we_timm.recipes.args_validate import DEFAULT_EVAL_BATCH_SIZE
from we_timm.recipes.args_validate import get_validate_parser as get_args_parser
from we_timm.recipes.bad_images import take_bad_images
from we_timm.recipes.data import DeviceInputs, eval_dataset, pin_memory, prepare_loader
from we_timm.recipes.engine import evaluate
from we_timm.recipes.errors import CheckpointError, DataError
from we_timm.recipes.models import (check_pretrained_reachable, checkpoint_files, create_model_from_checkpoint,
                                    local_models, model_name)
from we_timm.recipes.runtime import check_precision, cuda_settings, loader_config, mixed_precision, steady_malloc

_logger = logging.getLogger("validate")

# train.py / timm train.py arguments that resolve_data_config reads
DATA_ARGS = ("input_size", "img_size", "in_chans", "interpolation", "mean", "std", "crop_pct", "crop_mode")


# ----------------------------------------------------------------------------- model and data


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The timm model with the checkpoint's weights loaded, and the checkpoint metadata."""
    if args.checkpoint:
        model, metadata, path = create_model_from_checkpoint(
            args.checkpoint, model_name=args.model, num_classes=args.num_classes, use_ema=args.use_ema,
            **args.model_kwargs,
        )
        metadata = {**metadata, "checkpoint": path}
        return model, metadata
    if not args.model:
        raise CheckpointError("nothing to evaluate: give --checkpoint (or --model with --pretrained)")
    if not timm.is_model(args.model):
        raise CheckpointError(f"unknown timm architecture {args.model!r}")
    kwargs = {**args.model_kwargs, **({} if args.num_classes is None else {"num_classes": args.num_classes})}
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
    # the checkpoint's own evaluation config wins over the architecture's test size and test crop
    base = {**{k: v for k, v in model.pretrained_cfg.items() if not k.startswith("test_")}, **saved} if saved else None
    return resolve_data_config(vars(args), pretrained_cfg=base, model=model, use_test_size=not args.use_train_size)


def resolve_runtime_args(args: argparse.Namespace, metadata: dict[str, Any]) -> None:
    """Unset batch size / AMP / channels-last follow the checkpoint's training args (same numbers)."""
    train_args = metadata.get("args") if isinstance(metadata.get("args"), dict) else {}
    if args.batch_size is None:
        args.batch_size = train_args.get("validation_batch_size") or train_args.get("batch_size") or DEFAULT_EVAL_BATCH_SIZE
    if args.amp is None:
        args.amp = bool(train_args.get("amp", False))
    if args.amp_dtype is None:
        args.amp_dtype = train_args.get("amp_dtype") if train_args.get("amp_dtype") in ("bfloat16", "float16") else "bfloat16"
    if args.channels_last is None:
        args.channels_last = bool(train_args.get("channels_last", False))
    if args.prefetcher is None:  # the input path training evaluated with (timm's default: the prefetcher)
        args.prefetcher = not train_args.get("no_prefetcher", False)
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
                        class_map=args.class_map, max_bad_images=args.max_bad_images)


# ----------------------------------------------------------------------------- evaluation


def _accelerator(args: argparse.Namespace) -> Accelerator:
    accelerator = Accelerator(mixed_precision=mixed_precision(args.amp, args.amp_dtype) or "no", cpu=args.cpu,
                              dataloader_config=loader_config())
    check_precision(accelerator)
    return accelerator


def check_args(args: argparse.Namespace) -> None:
    """Values checked before any work, and --results-file writable before the evaluation (not after it)."""
    for flag, value in (("--img-size", args.img_size), ("--num-classes", args.num_classes),
                        ("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                        ("--input-size", min(args.input_size) if args.input_size else None)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--workers", args.workers), ("--max-bad-images", args.max_bad_images)):
        if value < 0:
            raise DataError(f"{flag} must be >= 0, got {value}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise DataError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.results_file:
        files.check_writable(args.results_file, "--results-file")


def validate(args: argparse.Namespace, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Build, evaluate, report; raises CheckpointError / DataError on bad inputs."""
    model, metadata = build_model(args)
    resolve_runtime_args(args, metadata)
    if accelerator is not None:
        return _validate(args, model, metadata, accelerator)
    accelerator = _accelerator(args)
    with errors.process_group_ends(accelerator):
        return _validate(args, model, metadata, accelerator)


def bulk_jobs(args: argparse.Namespace) -> list[argparse.Namespace] | None:
    """timm's bulk mode: one argument set per checkpoint of a `--checkpoint` folder, or per model of a
    `--model` list / wildcard (with their local pretrained weights); None for a single evaluation."""
    if args.checkpoint and os.path.isdir(args.checkpoint):
        return [argparse.Namespace(**{**vars(args), "checkpoint": path}) for path in checkpoint_files(args.checkpoint)]
    if args.model and not args.checkpoint and ("," in args.model or any(c in args.model for c in "*?[")):
        models = local_models(args.model)
        if not models:
            raise CheckpointError(f"--model {args.model}: no such model has its pretrained weights on this machine")
        return [argparse.Namespace(**{**vars(args), "model": name, "pretrained": True}) for name in models]
    return None


def validate_bulk(args: argparse.Namespace, jobs: list[argparse.Namespace]) -> list[dict[str, Any]]:
    """Evaluate every job with one Accelerator; one results CSV, a row per job (failures: an `error` column)."""
    args.amp, args.amp_dtype = bool(args.amp), args.amp_dtype or "bfloat16"  # one precision for the whole batch
    accelerator = _accelerator(args)
    rows, failed = [], 0
    with errors.process_group_ends(accelerator):
        for job in jobs:
            job.amp, job.amp_dtype, job.results_file = args.amp, args.amp_dtype, ""
            try:
                rows.append(validate(job, accelerator))
            except errors.USER_ERRORS as e:
                _logger.warning("%s", errors.error_line(e))
                rows.append({"model": job.model, "checkpoint": job.checkpoint, "error": errors.one_line(e)})
                failed += 1
    if args.results_file and accelerator.is_main_process:
        files.write_summary(args.results_file, rows)
    if failed:
        raise CheckpointError(f"{failed} of {len(jobs)} evaluations failed (their errors are above and in the results)")
    return rows


def _validate(args: argparse.Namespace, model: torch.nn.Module, metadata: dict[str, Any],
              accelerator: Accelerator) -> dict[str, Any]:
    if args.reparam:
        model = reparameterize_model(model)
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_eval_config(args, model, metadata)
    if args.test_pool:
        model, _ = apply_test_time_pool(model, data_config)
    transform = create_transform(**data_config, is_training=False, use_prefetcher=args.prefetcher)
    dataset = build_dataset(args, transform, metadata)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                         drop_last=False, collate_fn=fast_collate if args.prefetcher else None,
                                         pin_memory=pin_memory(args.pin_mem, accelerator.device))
    inputs_fn = DeviceInputs(data_config, accelerator.device) if args.prefetcher else None  # as train.py
    # Only the loader is prepared (sharded per process); evaluation needs no DDP wrapper.
    model = model.to(accelerator.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    loader = prepare_loader(accelerator, loader)
    start = time.perf_counter()
    metrics = evaluate(model, loader, accelerator, channels_last=args.channels_last, progress=not args.no_progress,
                       inputs_fn=inputs_fn)
    seconds = time.perf_counter() - start
    # timm's dataset reads the next image in the place of an unreadable one: say how many, summed over processes
    bad = int(accelerator.reduce(torch.tensor(take_bad_images(dataset), device=accelerator.device), "sum"))
    if bad and accelerator.is_main_process:
        _logger.warning(f"{bad} unreadable validation image(s) skipped (named above): timm's dataset read the next "
                        f"image in the place of each, so these metrics count {bad} image(s) twice")
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
        "bad_images": bad,
    }
    if accelerator.is_main_process:
        if args.results_file:
            files.write_results(results, args.results_file, args.results_format)
        print(f"--result\n{json.dumps(results, indent=4)}")
    return results


def main(args: argparse.Namespace) -> dict[str, Any] | list[dict[str, Any]]:
    """Run `validate(args)` (or `validate_bulk`); bad inputs become `SystemExit("error: <one line>")` unless --debug."""
    cuda_settings()  # timm's TF32 matmuls and cudnn.benchmark, with CUDA
    with errors.one_line_errors(args.debug):
        check_args(args)
        jobs = bulk_jobs(args)
        return validate(args) if jobs is None else validate_bulk(args, jobs)


def cli(argv: list[str] | None = None) -> int:
    """Entry point (`python validate.py`, `we-validate`): a malformed command line also ends with one `error:` line.
    glibc malloc gets steady thresholds (`steady_malloc`)."""
    steady_malloc()
    return errors.run(lambda a: main(get_args_parser().parse_args(a)), argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    errors.exit_process(cli())
