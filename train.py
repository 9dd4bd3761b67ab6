#!/usr/bin/env python3
"""Train any timm model with Weight Evolution (Lin et al., ACM MM 2021) on Hugging Face Accelerate.

    python train.py -c hparams/digits_demo.yaml                             # CPU demo, built-in data
    python train.py --data-dir /data/imagenet --model resnet34 --weight-evolution
    accelerate launch train.py -c hparams/imagenet_resnet34_we.yaml --data-dir /data/imagenet
    python train.py --resume output/train/digits-demo-we/last.pth.tar       # continue a run, with its settings

Modeled on timm's train.py: the flags we share mean the same (`we_timm.recipes.args`); `-c/--config` YAML
sets defaults (CLI > YAML > the --resume state's arguments > code defaults; unknown YAML keys are an error);
runs land in output/train/<experiment>/ with args.yaml, summary.csv and checkpoints (`we_timm.recipes.files`).
Each epoch: train -> evaluate -> checkpoint -> weight evolution on the unwrapped fp32 parameters (none after
the last epoch); under DDP the ranks then verify they hold identical parameters.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from timm import utils
from timm.data import Mixup, resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from we_timm import WeightEvolution
from we_timm.recipes import errors, files, inspect, resuming, state
from we_timm.recipes.args import get_args_parser, parse_args  # noqa: F401
from we_timm.recipes.args_checks import mixup_active, we_config_from_args
from we_timm.recipes.bad_images import report_bad_images
from we_timm.recipes.checkpoint import load_weights
from we_timm.recipes.data import DeviceInputs, build_train_loaders, load_train_data, prepare_loader
from we_timm.recipes.engine import Trainer, evaluate, train_one_epoch
from we_timm.recipes.evolve import evolve
from we_timm.recipes.keeper import CheckpointKeeper
from we_timm.recipes.models import check_pretrained_reachable, load_into_model
from we_timm.recipes.runtime import (bind_evolution, check_backend, check_precision, cuda_settings, loader_config,
                                     mixed_precision, optimizer_kernel, steady_malloc)

_logger = logging.getLogger("train")


# ============================================================================ building


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
    if args.pretrained and not args.pretrained_path:
        check_pretrained_reachable(args.model)
    if args.fast_norm:
        set_fast_norm()
    size = args.input_size[1:] if args.input_size else args.img_size
    model = None
    if size is not None and "img_size" not in kwargs:
        model = _create_model(args.model, pretrained, {**kwargs, "img_size": size}, factory, optional="img_size")
        if model is not None:
            kwargs["img_size"] = list(size) if isinstance(size, list) else size
    if model is None:
        model = _create_model(args.model, pretrained, kwargs, factory)
    with torch.no_grad():  # timm's head init (after weights from --pretrained, before --initial-checkpoint)
        if args.head_init_scale is not None:
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            model.get_classifier().bias.fill_(args.head_init_bias)
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
        raise ValueError(f"cannot create model {name} with {kwargs}: {errors.one_line(e)}") from None
    except (RuntimeError, OSError, ValueError, AssertionError) as e:
        raise ValueError(f"cannot create model {name}: {errors.one_line(e)[:300]}") from None


def build_loss(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """timm's choice of training loss, and the mixup/cutmix transform if enabled."""
    bce = dict(sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:  # over the --aug-splits views of each sample (no mixup: args checks refuse it)
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing), None
    if mixup_active(args):
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        if args.bce_loss:
            return BinaryCrossEntropy(target_threshold=args.bce_target_thresh, **bce), mixup_fn
        return SoftTargetCrossEntropy(), mixup_fn  # smoothing is part of the mixed targets
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh, **bce), None
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerate: `--amp` overrides the accelerate config's mixed precision; with CUDA, batches are copied to the
    device without blocking (`loader_config`). The loaders' order and augmentation come from `sampling.EpochShuffle` /
    `SeededSamples` (seeded by (seed, epoch, index)), so Accelerate is left no sampler to re-seed."""
    try:
        acc = Accelerator(
            mixed_precision=mixed_precision(args.amp, args.amp_dtype),
            gradient_accumulation_steps=args.grad_accum_steps,
            log_with="tensorboard" if args.log_tensorboard else None,
            project_dir=args.output or "./output/train",  # the run folder is set once created (make_output_dir)
            step_scheduler_with_optimizer=False,
            dataloader_config=loader_config(),
            kwargs_handlers=[] if args.dist_timeout is None else [
                InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))],
        )
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"cannot set up Accelerate: {errors.one_line(e)}") from None
    check_precision(acc)
    return acc


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


def setup(args: argparse.Namespace, acc: Accelerator) -> tuple[Trainer, dict[str, Any] | None]:
    """Build data, model, optimizer, schedule, EMA and WE, and load --resume state. Nothing is written yet."""
    check_backend(acc, args)
    utils.random_seed(args.seed, 0)  # same initial weights on every rank
    train_set, val_set, num_classes = load_train_data(args)
    model, model_kwargs = build_model(args, args.num_classes or num_classes)
    if args.split_bn:  # timm: a BatchNorm per augmentation split, initialised from the loaded weights
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    if args.sync_bn and acc.num_processes > 1:  # timm: only when distributed; before EMA, WE and DDP see the model
        model = convert_sync_batchnorm(model)
    args.num_classes = getattr(model, "num_classes", None) or args.num_classes or num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=acc.is_main_process)
    loaders = build_train_loaders(args, data_config, train_set, val_set, acc.process_index, acc.num_processes,
                                  device=acc.device)
    loader_train, loader_eval = (prepare_loader(acc, loader) for loader in loaders)
    if len(loader_train) == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {args.batch_size} per process")
    resumed = resuming.load_state(args.resume) if args.resume and args.resume != "auto" else None
    resuming.check_same_start(acc.num_processes, args.resume, resumed)
    if resumed is not None:
        resuming.check_resumable(args, resumed.get("args", {}), args.resume)
        load_into_model(model, resuming.model_weights(resumed))  # before EMA and optimizer are derived from it
    model.to(acc.device, dtype=getattr(torch, args.model_dtype or "float32"))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    resolve_lr(args, acc.num_processes)
    kernel = optimizer_kernel(args.opt, args.opt_kwargs, acc)  # torch's fused step where it applies
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **kernel, **args.opt_kwargs)
    except (TypeError, AssertionError) as e:
        raise ValueError(f"cannot create optimizer {args.opt} (--opt, --opt-kwargs): {errors.one_line(e)}") from None
    if kernel and acc.is_main_process:
        _logger.info(f"{type(optimizer).__name__} steps with torch's fused kernel (--opt-kwargs fused=False: "
                     "torch's default, as timm's train.py)")
    updates = -(-len(loader_train) // args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates)
    we_config = we_config_from_args(args)
    loss_fn, mixup_fn = build_loss(args, args.num_classes)
    ema = None
    if args.model_ema:
        ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    meta = {  # state.MODEL_KEYS, kept in each training state
        "architecture": args.model, "num_classes": int(args.num_classes),
        "data_config": files.json_safe(data_config), "model_kwargs": files.json_safe(model_kwargs),
        "we_config": we_config.to_dict() if we_config else None,
    }
    t = Trainer(
        args, acc, model, model, optimizer, scheduler, loss_fn.to(acc.device), mixup_fn, ema,
        WeightEvolution(model, we_config) if we_config else None, loader_train, loader_eval, num_epochs, meta,
        CheckpointKeeper(None, args.checkpoint_hist, decreasing=args.eval_metric == "loss"),
    )
    if we_config and ema is not None and args.we_ema == "evolve":
        t.we_ema = WeightEvolution(ema.module, we_config)
    if not args.no_prefetcher:  # timm's prefetcher: the workers hand over uint8 images
        dtype = getattr(torch, args.model_dtype or "float32")
        t.train_inputs = DeviceInputs(data_config, acc.device, dtype, args.reprob, args.remode, args.recount,
                                      re_num_splits=(args.aug_splits or 2) if args.resplit else 0)
        t.eval_inputs = DeviceInputs(data_config, acc.device, dtype)
    return t, resumed


# ============================================================================ the run folder


def make_output_dir(t: Trainer) -> None:
    """Create the run folder (main process) once everything is validated; write args.yaml; start trackers."""
    args, acc = t.args, t.accelerator
    if not acc.is_main_process:
        return
    size = t.meta["data_config"]["input_size"][-1]
    name = args.experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{safe_model_name(args.model)}-{size}"
    out_dir = os.path.join(args.output or "./output/train", name)
    resuming.check_run_folder_free(out_dir, args.resume)
    os.makedirs(out_dir, exist_ok=True)
    for tmp in files.remove_stale_temps(out_dir):
        _logger.warning(f"removed {tmp}, a partial file left by an interrupted checkpoint write")
    saved = {k: v for k, v in files.json_safe(vars(args)).items() if k != "config"}
    files.write_text(os.path.join(out_dir, "args.yaml"), yaml.safe_dump(saved, default_flow_style=False))
    if args.log_tensorboard:
        acc.project_configuration.project_dir = acc.project_configuration.logging_dir = out_dir
        scalars = {k: v for k, v in saved.items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers("tensorboard", config=scalars)
    t.out_dir = t.keeper.out_dir = out_dir


def write_run_files(t: Trainer, plot: bool = False) -> None:
    if t.out_dir is None:
        return
    files.write_summary(os.path.join(t.out_dir, "summary.csv"), t.history)
    if t.we is not None:
        files.write_jsonl(os.path.join(t.out_dir, "we_stats.jsonl"), t.we_records)
    if plot and t.history:
        files.plot_summary(os.path.join(t.out_dir, "summary.png"), t.history)


# ============================================================================ the epochs


def start(t: Trainer, resumed: dict[str, Any] | None) -> int:
    """Restore, create the run folder, prepare for Accelerate; apply a resumed WE step. Returns the first epoch."""
    args, acc = t.args, t.accelerator
    start_epoch = state.restore_state(t, resumed) if resumed is not None else 0
    make_output_dir(t)
    if resumed is not None and t.out_dir is not None:  # a kill mid-save: links and evictions it did not make
        for path in t.keeper.reconcile(start_epoch - 1):
            _logger.warning(f"repaired {path}: the checkpoint save of epoch {start_epoch - 1} was interrupted")
    t.model, t.optimizer = acc.prepare(t.model, t.optimizer)
    t.we = bind_evolution(acc, t.model, t.we)  # WE edits the parameters that train (FSDP shards them in prepare)
    if resumed is not None and state.optimizer_after_prepare(acc):  # into the sharded parameters (FSDP)
        state.restore_optimizer(t, resumed)
    if resumed is not None and acc.scaler is not None and resumed.get("scaler") is not None:
        acc.scaler.load_state_dict(resumed["scaler"])
    if args.torchcompile:
        t.model = torch.compile(t.model, backend=args.torchcompile, mode=args.torchcompile_mode)
    pending = start_epoch - 1
    if resumed is not None and t.we is not None and 0 <= pending < t.num_epochs - 1 and t.we.last_epoch != pending:
        evolve(t, pending)  # the step the checkpoint was saved before (WE_SPEC "Where it runs in training")
    start_epoch = args.start_epoch if args.start_epoch is not None else start_epoch
    if start_epoch > 0 and args.sched_on_updates:
        t.scheduler.step_update(start_epoch * t.updates_per_epoch)
    elif start_epoch > 0:
        t.scheduler.step(start_epoch)
    return start_epoch


def run_epochs(t: Trainer, start_epoch: int) -> None:
    """Per epoch: train -> evaluate -> checkpoint -> weight evolution (none after the last epoch)."""
    args, acc = t.args, t.accelerator
    for epoch in range(start_epoch, t.num_epochs):
        t.loader_train.set_epoch(epoch)  # the epoch's sample order and augmentation seeds
        loader, resume, t.resume_point = t.loader_train, t.resume_point, None
        if resume is not None:  # a recovery state: continue after its updates (the sampler skips, nothing is read)
            loader = acc.skip_first_batches(loader, resume.updates * args.grad_accum_steps)
            loader._non_blocking = acc.non_blocking  # Accelerate's rebuilt loader leaves it out
        begin = time.perf_counter()
        train_metrics = train_one_epoch(epoch, t, loader, resume)
        seconds = time.perf_counter() - begin
        if acc.num_processes > 1 and args.dist_bn:  # timm: the model's and the EMA's BN running stats
            for model in (t.raw_model, t.model_ema):
                if model is not None:
                    utils.distribute_bn(model, acc.num_processes, args.dist_bn == "reduce")
        models = {"model": t.model} if t.model_ema is None else {"model": t.model, "ema": t.model_ema.module}
        dtype = getattr(torch, args.model_dtype) if args.model_dtype else None  # loss, top1, top5 of model and EMA
        metrics = {kind: evaluate(model, t.loader_eval, acc, channels_last=args.channels_last, progress=False,
                                  dtype=dtype, inputs_fn=t.eval_inputs) for kind, model in models.items()}
        eval_metrics = metrics["ema" if t.model_ema is not None else "model"]  # timm: EMA's metrics when enabled
        report_bad_images(epoch, t.loader_train.dataset, t.loader_eval.dataset)
        lrs = [g["lr"] for g in t.optimizer.param_groups]
        t.history.append(OrderedDict(
            epoch=epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
            **{f"eval_{k}": eval_metrics[k] for k in ("loss", "top1", "top5")}, lr=sum(lrs) / len(lrs),
        ))
        for kind, m in metrics.items():  # non-finite weights that the training loss did not show yet
            if not math.isfinite(m["loss"]):
                raise errors.NonFiniteLossError(
                    f"the validation loss of the {kind} became {m['loss']} in epoch {epoch}; training stopped "
                    f"before saving epoch {epoch}, so the newest checkpoint predates it and is intact")
        state.save_checkpoint(t, epoch, {kind: {k: m[k] for k in ("loss", "top1", "top5")} for kind, m in metrics.items()})
        if t.we is not None and epoch < t.num_epochs - 1:
            inspect.write_before_step(t, epoch)  # --we-inspect-every: what this step will do, as CSV + PNG
            evolve(t, epoch)
        t.scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        write_run_files(t)
        acc.log({k: v for k, v in t.history[-1].items() if k != "epoch" and isinstance(v, (int, float))}, step=epoch)
        _logger.info(f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}, eval loss {eval_metrics['loss']:.4f}, "
                     f"top1 {eval_metrics['top1']:.2f}, top5 {eval_metrics['top5']:.2f} ({seconds:.1f}s training)")


def release(t: Trainer) -> None:
    """The `.safetensors` of `last` and `model_best` (+ `_ema`), from the training states on disk."""
    changed = state.write_release_files(t)
    if changed:
        _logger.info(f"Release files: {', '.join(os.path.basename(p) for p in changed)}")


# ============================================================================ main


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns {"best": (metric, epoch) or None, "output": the run folder (main process) or None}."""
    cuda_settings()  # timm's TF32 matmuls and cudnn.benchmark, with CUDA
    acc = build_accelerator(args)
    if not logging.root.handlers:
        utils.setup_default_logging()
    if not acc.is_main_process:
        logging.root.setLevel(logging.WARNING)
    try:
        with errors.process_group_ends(acc):
            return fit(args, acc)
    except RuntimeError as e:
        error = errors.as_distributed_error(e, acc.process_index, acc.num_processes)
        if error is e:
            raise
        raise error from e


def fit(args: argparse.Namespace, acc: Accelerator) -> dict[str, Any]:
    """Everything after the Accelerator: set up, restore, train the epochs, write the final files."""
    if args.experiment:  # before the data are read; make_output_dir checks it again for a generated name
        resuming.check_run_folder_free(os.path.join(args.output or "./output/train", args.experiment), args.resume)
    t, resumed = setup(args, acc)
    start_epoch = start(t, resumed)
    params = sum(p.numel() for p in t.raw_model.parameters()) / 1e6
    _logger.info(f"Model {args.model} ({params:.2f}M params), {acc.num_processes} process(es) on {acc.device}, "
                 f"mixed precision {acc.mixed_precision}, epochs {start_epoch}..{t.num_epochs - 1}, "
                 f"WE {t.we.config if t.we else 'off'}, output {t.out_dir}")
    if start_epoch >= t.num_epochs:
        _logger.warning(f"the run already completed its {t.num_epochs} epochs; pass a larger --epochs to train longer")
    with logging_redirect_tqdm():  # Ctrl-C ends it: `errors.run` exits 130; summary.csv is as of the last epoch
        try:
            run_epochs(t, start_epoch)
        except BaseException:  # Ctrl-C, SIGTERM, a non-finite loss, bad images, ...: release what was saved
            try:
                release(t)
            except Exception as e:  # the stop's own one-line error is what ends the run
                _logger.warning(f"the .safetensors release files were not written ({errors.one_line(e)}); "
                                "`--resume` of this run writes them")
            raise
    release(t)
    write_run_files(t, plot=args.plot_summary)
    if t.keeper.best is not None and t.out_dir is not None:
        _logger.info(f"*** Best metric: {t.keeper.best[0]} (epoch {t.keeper.best[1]})")
    return {"best": t.keeper.best, "output": t.out_dir}


def cli(argv: list[str] | None = None) -> int:
    """Entry point (`python train.py`, `we-train`): bad input ends with one `error: ...` line and exit status 1
    (tracebacks with --debug). OSError included: unreadable data met mid-run, a full disk; checkpoints on disk
    stay complete (atomic writes). glibc malloc gets steady thresholds (`steady_malloc`)."""
    steady_malloc()
    with errors.sigterm_as_error():
        return errors.run(lambda a: main(parse_args(a)), argv)


if __name__ == "__main__":
    errors.exit_process(cli())
