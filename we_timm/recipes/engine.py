"""The training engine shared by train.py and validate.py: the `Trainer`, one epoch of training, and
evaluation. The process setup is `runtime`'s, the weight-evolution step `evolve`'s.

Functions take the `Trainer` (the run's objects) instead of timm's 15 arguments. Nothing here parses
arguments or writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from timm import utils
from timm.data import Mixup
from timm.models import model_parameters
from torch import nn
from tqdm import tqdm

from ..evolution import WeightEvolution
from .sampling import sample_seed, seed_everything
from .errors import DataError, NonFiniteLossError, read_batches
from .shards import is_sharded
from .keeper import CheckpointKeeper
from .resuming import ResumePoint
from .state import save_recovery

_logger = logging.getLogger(__name__)


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
    meta: dict[str, Any]  # what rebuilds the model (architecture, classes, kwargs, data config) and the WE config
    keeper: CheckpointKeeper
    we_ema: WeightEvolution | None = None  # --we-ema evolve: the EMA's own WE step
    out_dir: str | None = None  # the run folder, on the main process only
    resume_point: ResumePoint | None = None  # where a recovery state left the first epoch
    train_inputs: Callable[[torch.Tensor], torch.Tensor] | None = None  # prefetcher: normalise + erase on device
    eval_inputs: Callable[[torch.Tensor], torch.Tensor] | None = None  # prefetcher: normalise on device
    num_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # summary.csv rows
    we_records: list[dict[str, Any]] = field(default_factory=list)  # we_stats.jsonl lines

    @property
    def updates_per_epoch(self) -> int:
        return -(-len(self.loader_train) // self.args.grad_accum_steps)


def seed_step(seed: int, epoch: int, batch: int, rank: int) -> None:
    """Seed Python/NumPy/torch from (seed, epoch, batch, rank) before each training batch: mixup, dropout and
    drop-path then never depend on history (samples are seeded by `SeededSamples`), so a run resumed at any
    update draws what the uninterrupted run drew."""
    seed_everything(sample_seed(seed + 1_000_000_007 * (rank + 1), epoch, batch))


def _clip(t: Trainer) -> None:
    args, acc = t.args, t.accelerator
    if args.clip_mode == "norm":
        acc.clip_grad_norm_(t.model.parameters(), args.clip_grad)
    elif args.clip_mode == "value":
        acc.clip_grad_value_(t.model.parameters(), args.clip_grad)
    else:
        acc.unscale_gradients()
        params = model_parameters(t.raw_model, exclude_head=True)
        utils.dispatch_clip_grad(params, args.clip_grad, mode="agc")


def optimizer_step(t: Trainer) -> None:
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


def train_one_epoch(epoch: int, t: Trainer, loader: Any, resume: ResumePoint | None = None) -> OrderedDict:
    """One pass over `loader` with gradient accumulation, clipping, EMA and per-update LR steps; a recovery
    state every --recovery-interval updates. `resume`: `loader` starts after that point's updates."""
    args, acc = t.args, t.accelerator
    if t.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        t.mixup_fn.mixup_enabled = False
    t.model.train()
    # loss sum, loss sum over finite losses, samples with a finite loss: on the device, no host sync per step
    sums = torch.zeros(3, device=acc.device) if resume is None else torch.tensor(resume.sums, device=acc.device)
    update_idx, seen, start = 0 if resume is None else resume.updates, 0, time.perf_counter()
    bar = tqdm(read_batches(loader, "training"), total=len(loader), desc=f"epoch {epoch}", leave=False,
               disable=None if acc.is_main_process else True)
    for batch_idx, (inputs, target) in enumerate(bar, start=update_idx * args.grad_accum_steps):
        seed_step(args.seed, epoch, batch_idx, acc.process_index)
        if t.train_inputs is not None:
            inputs = t.train_inputs(inputs)
        if t.mixup_fn is not None:
            inputs, target = t.mixup_fn(inputs, target)
        if args.model_dtype:
            inputs = inputs.to(getattr(torch, args.model_dtype))
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(t.model):
            loss = t.loss_fn(t.model(inputs), target)
            acc.backward(loss)
            if acc.sync_gradients:
                if args.clip_grad is not None:
                    _clip(t)
                optimizer_step(t)
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
        if args.recovery_interval and update_idx % args.recovery_interval == 0 and update_idx < t.updates_per_epoch:
            save_recovery(t, epoch, update_idx, sums)
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



def inference(model: nn.Module) -> contextlib.AbstractContextManager:
    """`torch.inference_mode()`, or `torch.no_grad()` for a model sharded by FSDP2: under inference mode its
    forward all-gathers into buffers that become inference tensors, which the next training forward cannot
    write ("Inplace update to inference tensor outside InferenceMode")."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def evaluate(model, loader, accelerator: Accelerator, **kwargs: Any) -> dict[str, float]:
    """`evaluate_batches` under `inference(model)`."""
    with inference(model):
        return evaluate_batches(model, loader, accelerator, **kwargs)


def evaluate_batches(model, loader, accelerator: Accelerator, *, channels_last: bool = False, progress: bool = True,
                     dtype: torch.dtype | None = None, inputs_fn: Callable | None = None) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 (%) over every sample exactly once, identical on all processes.

    train.py and validate.py both call this, so validate.py reproduces train.py's numbers: logits and
    targets gathered per step (`gather_for_metrics` drops the padded duplicates of the last batch), float64
    sums of per-batch loss sums and of top-k hits, divided by the sample count. A streaming dataset's ranks
    read disjoint shards of their own: each sums its samples, and the sums are added up at the end.
    """
    model.eval()
    streaming = isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset)
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss sum, top-1 hits, top-5 hits, samples
    bar = tqdm(read_batches(loader, "validation"), total=len(loader), desc="validate", leave=False,
               disable=not (progress and accelerator.is_local_main_process))
    for inputs, target in bar:
        inputs = inputs if inputs_fn is None else inputs_fn(inputs)
        inputs = inputs if dtype is None else inputs.to(dtype)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            output = model(inputs)
        output = output[0] if isinstance(output, (tuple, list)) else output
        if streaming:  # every rank must see a bad label, or the others would wait for it in the next collective
            output = output.float()
            extremes = accelerator.gather(torch.stack([target.max(), -target.min()])[None])
            high, low = int(extremes[:, 0].max()), -int(extremes[:, 1].max())
        else:
            output, target = accelerator.gather_for_metrics((output.float(), target))
            high, low = int(target.max()), int(target.min())
        if high >= output.shape[-1] or low < 0:
            raise DataError(f"label {high if low >= 0 else low} out of range for a model with {output.shape[-1]} "
                            "classes")
        hits = output.topk(min(5, output.shape[-1]), dim=-1).indices.eq(target[:, None])
        totals += torch.stack([
            F.cross_entropy(output, target, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(-1).sum().double(), totals.new_tensor(float(target.numel())),
        ])
    if streaming:
        totals = accelerator.reduce(totals, reduction="sum")
    n = totals[3].item()
    if n == 0:
        raise DataError("no samples were evaluated")
    return {"loss": totals[0].item() / n, "top1": 100.0 * totals[1].item() / n, "top5": 100.0 * totals[2].item() / n, "num_samples": int(n)}
