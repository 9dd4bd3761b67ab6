"""The training engine shared by train.py and validate.py: the `Trainer`, one epoch of training, evaluation,
and the weight-evolution step with its cross-rank check.

Functions take the `Trainer` (the run's objects) instead of timm's 15 arguments. Nothing here parses
arguments or writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType
from timm import utils
from timm.data import Mixup
from timm.models import model_parameters
from torch import nn
from tqdm import tqdm

from ..evolution import WeightEvolution, is_dtensor
from .sampling import sample_seed, seed_everything
from .errors import DataError, NonFiniteLossError, RankMismatchError, read_batches
from .shards import is_sharded
from .state import CheckpointKeeper, ResumePoint, save_recovery

_logger = logging.getLogger(__name__)

PRECISIONS = {"bfloat16": "bf16", "float16": "fp16"}  # --amp-dtype -> Accelerate's mixed_precision


# glibc's own ceiling for its sliding mmap threshold (4 MiB * sizeof(long)), and twice it for the trim threshold
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 64 << 20
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def steady_malloc() -> bool:
    """Fix glibc malloc's mmap and trim thresholds at the values its own heuristic slides up to: 32 / 64 MiB.

    With the defaults (128 KiB, sliding up only after a large block happens to be freed), a process may keep
    returning the activations' memory to the OS and zero-filling it again at the next step. train.py, resnet18
    on digits, 4 epochs, 1 worker, 2 CPU cores: 658k-697k page faults and 2.8-3.3 s of system time without,
    266k-284k and 2.1-2.6 s with (3 alternating pairs; up to 1.2M and 1.9M faults seen in other runs of ours and
    of timm's train.py). Which state a run got depended on its history; now it is the same every time. Data
    workers forked afterwards inherit it. Nothing is changed when the allocator is not glibc's, when another
    one is preloaded, or when MALLOC_* / GLIBC_TUNABLES are set: the user's choice wins. For the entry point of
    a script only (a process-wide setting); returns whether it was applied.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in OTHER_ALLOCATORS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl also has mallopt, as a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def cuda_settings() -> bool:
    """What timm's train.py and validate.py set on a machine with CUDA: TF32 matrix multiplies
    (`torch.backends.cuda.matmul.allow_tf32`; convolutions run in TF32 by torch's own default) and cuDNN's
    autotuner (`cudnn.benchmark`: the fastest convolution algorithm per input shape, timed at its first use).

    Neither reaches the weight-evolution step (norms, sorts and element-wise arithmetic: no matmul, no
    convolution) nor a CPU run; as with timm, runs on GPUs are then not bit-reproducible. Returns whether set.
    """
    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return True


def loader_config() -> DataLoaderConfiguration:
    """How Accelerate places batches on the device: with CUDA, by non-blocking copies, as timm's prefetcher. From
    pinned memory (`--pin-mem`, the default with CUDA) the host then queues the next step's work without waiting
    for the copy, nor for the step before it (a blocking copy waits for the whole queue). Blocking elsewhere:
    Accelerate drops the host batch right after starting the copy, which a non-blocking copy from unpinned
    memory to Apple's MPS may still be reading; on a CUDA machine run on CPU it changes nothing."""
    return DataLoaderConfiguration(non_blocking=torch.cuda.is_available())


def mixed_precision(amp: bool, amp_dtype: str | None) -> str | None:
    """Accelerate's `mixed_precision` for `--amp --amp-dtype` (None without --amp: the accelerate config decides)."""
    return PRECISIONS[amp_dtype] if amp else None


def check_backend(acc: Accelerator, args: argparse.Namespace) -> None:
    """Refuse what this Accelerate setup cannot do, before anything is built or written.

    DeepSpeed keeps the fp32 master weights inside its optimizer: WE would edit copies that do not train.
    FSDP runs as version 2 (`fully_shard`, DTensor parameters: what WE, the checkpoint gather of `shards` and
    the rank check read); version 1's flat parameters are refused. Under FSDP the EMA (an unsharded copy
    timm updates from the parameters) and `--clip-mode value` / `agc` are refused too (Accelerate has no
    clip_grad_value_ for FSDP; timm's AGC clamps a DTensor norm in place, which DTensor refuses).
    SyncBatchNorm runs on CUDA devices only.
    """
    if acc.distributed_type == DistributedType.FSDP:
        version = int(getattr(acc.state.fsdp_plugin, "fsdp_version", 1) or 1)
        if version != 2:
            raise ValueError(f"train.py runs FSDP version 2 only, this is version {version}: set fsdp_version: 2 "
                             "in the accelerate config (or accelerate launch --fsdp_version 2)")
        if args.model_ema:
            raise ValueError("--model-ema does not run under FSDP (the EMA would be an unsharded copy of sharded "
                             "parameters): train without it, or use DDP")
        if args.clip_grad is not None and args.clip_mode != "norm":  # value: Accelerate refuses; agc: timm's
            raise ValueError(f"--clip-mode {args.clip_mode} does not run under FSDP (sharded gradients): "
                             "use --clip-mode norm")  # in-place clamp of a DTensor norm fails
    if args.weight_evolution and acc.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("--weight-evolution does not run under DeepSpeed: its fp32 master weights live in the "
                         "DeepSpeed optimizer, where WE cannot edit them; use DDP or FSDP (accelerate config)")
    if args.sync_bn and acc.device.type != "cuda":
        raise ValueError(f"--sync-bn needs CUDA devices (torch SyncBatchNorm), this run is on {acc.device.type}")


def bind_evolution(acc: Accelerator, model: nn.Module, we: WeightEvolution | None) -> WeightEvolution | None:
    """`we` (config and state) re-bound to the parameters of the prepared `model`: the ones that train.

    Under FSDP, `prepare` replaces the parameters WE was built on by sharded ones; under DDP they are the
    same objects, and re-binding changes nothing.
    """
    if we is None:
        return None
    bound = WeightEvolution(acc.unwrap_model(model), we.config)
    bound.load_state_dict(we.state_dict())
    return bound


def check_precision(accelerator: Accelerator) -> None:
    """Accelerate runs float16 autocast on a CPU as fp32 while reporting fp16: refuse it instead."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("mixed precision float16 (--amp --amp-dtype float16, or the accelerate config) needs a "
                         "GPU; on CPU use --amp-dtype bfloat16, or leave out --amp")


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


# ----------------------------------------------------------------------------- weight evolution


def checksums(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor hashing its exact bits (position-weighted sum of the raw words)."""
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    for p in tensors:
        flat = p.detach().contiguous().view(-1)
        bits = flat.view(words.get(flat.element_size(), torch.uint8)).long()
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        sums.append((bits * weights).sum())
    return torch.stack(sums)


def synced_tensors(t: Trainer) -> list[tuple[str, torch.Tensor]]:
    """What every rank holds bit-identically after a WE step: the parameters, the EMA's parameters, and with
    --dist-bn the BN running statistics of both (timm's distribute_bn syncs exactly those).

    Parameters sharded by FSDP2 (DTensor) are left out: each element has one owner rank, so there is nothing
    for ranks to disagree on (WE computes the whole value on every rank and each keeps its own slice);
    BN statistics stay unsharded buffers and are compared."""
    models = [("", t.raw_model)] + ([("ema.", t.model_ema.module)] if t.model_ema is not None else [])
    items = []
    for prefix, model in models:
        items += [(prefix + n, p) for n, p in model.named_parameters() if not is_dtensor(p)]
        if t.args.dist_bn:
            items += [(prefix + n, b) for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    return items


def check_ranks_agree(t: Trainer, epoch: int) -> None:
    """All-gather checksums of `synced_tensors`; RankMismatchError naming the tensors if ranks differ."""
    acc = t.accelerator
    items = synced_tensors(t)
    if not items:  # every parameter sharded and no --dist-bn: nothing is replicated
        _logger.info(f"WE step {epoch}: parameters sharded over {acc.num_processes} ranks, nothing replicated to "
                     "compare")
        return
    gathered = acc.gather(checksums(v for _, v in items)[None]).view(acc.num_processes, -1)
    differs = (gathered != gathered[0]).any(0).tolist()
    if any(differs):
        names = [n for (n, _), d in zip(items, differs) if d]
        raise RankMismatchError(
            f"after the weight-evolution step of epoch {epoch}, ranks hold different values "
            f"({len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        )
    sharded = " (sharded parameters excepted)" if is_sharded(t.raw_model) else ""
    _logger.info(f"WE step {epoch}: parameters{', BN statistics' if t.args.dist_bn else ''}"
                 f"{' and EMA' if t.model_ema is not None else ''} identical on {acc.num_processes} ranks{sharded}")


def zero_changed_state(optimizer: Any, before: dict[nn.Parameter, torch.Tensor]) -> int:
    """Zero the optimizer state (SGD momentum, Adam moments: per-element tensors shaped like the parameter) of
    every element whose value differs from `before`; returns the number of elements reset.

    FSDP2 shards (DTensor) are compared and zeroed shard by shard on each rank (parameter, `before` and the
    state share the placement); the count is then summed over the shards' ranks (a collective)."""
    state = getattr(optimizer, "optimizer", optimizer).state
    reset, mesh = torch.zeros((), dtype=torch.int64), None
    for p, old in before.items():
        if is_dtensor(p):
            mesh = p.device_mesh
        changed = _local(p.detach()) != _local(old)
        buffers = [_local(v) for v in state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
        for v in buffers:
            v[changed] = 0
        reset += changed.sum().cpu() if buffers else 0
    if mesh is not None:  # over the shard dimension (the last): one replica's whole count
        reset = reset.to(mesh.device_type)
        torch.distributed.all_reduce(reset, group=mesh.get_group(mesh.ndim - 1))
    return int(reset)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or `t`."""
    return t.to_local() if is_dtensor(t) else t


def evolve(t: Trainer, epoch: int) -> None:
    """`we.step(epoch)` on the unwrapped fp32 parameters (and the EMA's with --we-ema evolve; the optimizer state
    of changed values zeroed with --we-reset-opt-state); stats go to the epoch's summary row and we_stats.jsonl."""
    start = time.perf_counter()
    before = {u.param: u.param.detach().clone() for u in t.we.units} if t.args.we_reset_opt_state else None
    stats = t.we.step(epoch)
    extra = {}
    if t.we_ema is not None:
        extra["we_ema_changed"] = t.we_ema.step(epoch).changed
    if before is not None:
        extra["we_opt_state_reset"] = zero_changed_state(t.optimizer, before)
    seconds = time.perf_counter() - start
    if t.accelerator.num_processes > 1:
        check_ranks_agree(t, epoch)
    row = {**stats.to_dict(), **extra, "we_time_s": seconds}
    rows = [r for r in t.history if r["epoch"] == epoch]
    (rows[-1] if rows else t.history.append(OrderedDict(epoch=epoch)) or t.history[-1]).update(row)
    t.we_records.append({"epoch": epoch, **row, "inferior": dict(stats.inferior), "skipped": list(stats.skipped)})
    _logger.info(
        f"WE step {epoch}: {row['we_inferior']} inferior filters evolved, {row['we_changed']} values changed "
        f"(rate conv {row.get('we_rate_conv', 0.0):.4f}) in {seconds * 1000:.1f} ms"
    )
