"""How a script's process and Accelerate are set up before training or evaluation: glibc malloc held
steady, timm's CUDA flags, how batches reach the device, the optimizer's step kernel, the precision, the setups
refused before any work (WE under DeepSpeed, FSDP version 1, float16 on a CPU, ...), and WE re-bound to the
prepared model's parameters. Nothing here parses arguments or writes files.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType
from timm.optim import get_optimizer_info
from torch import nn

from ..evolution import WeightEvolution

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


# torch's optimizers with a fused step (one kernel per parameter) on both CPU and CUDA devices, and the setups
# where it is taken by default: one device or DDP (torch has no DTensor rule for the fused SGD step under FSDP)
FUSED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
FUSED_DEVICES = ("cpu", "cuda")
FUSED_BACKENDS = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
KERNEL_KEYS = ("fused", "foreach")  # what an optimizer's parameter groups say about the kernel of their step


def optimizer_kernel(opt: str, opt_kwargs: dict[str, Any], acc: Accelerator) -> dict[str, bool]:
    """`{"fused": True}` for `--opt` sgd / momentum / nesterov / adam / adamw (torch's own classes) on a CPU or
    CUDA device, on one device or under DDP, unless `--opt-kwargs` names the kernel (`fused`, `foreach`) or
    `differentiable`; otherwise `{}`, torch's default as in timm's train.py.

    The same update, computed in one pass over each parameter instead of torch's default (on a CPU a for-loop
    of one kernel per operation, with temporaries, a parameter; `foreach` on CUDA). An SGD step of resnet18
    (11.7M parameters) on this project's 2-core CPU: 4.9 ms instead of 11.8 ms; the values agree with the
    for-loop's to a float32 rounding (2.4e-7 at most after a step), not bit for bit. `--opt-kwargs fused=False`
    gives timm's default back.
    """
    if any(k in opt_kwargs for k in (*KERNEL_KEYS, "differentiable")):
        return {}
    if acc.device.type not in FUSED_DEVICES or acc.distributed_type not in FUSED_BACKENDS:
        return {}
    try:
        opt_class = get_optimizer_info(opt).opt_class  # lookahead_* and unknown names are not in the registry
    except ValueError:
        return {}
    return {"fused": True} if opt_class in FUSED_OPTIMIZERS else {}


def step_kernel(optimizer: Any) -> list[dict[str, Any]]:
    """The kernel flags (`KERNEL_KEYS`) of each parameter group of `optimizer` (or of the one a wrapper holds)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    return [{k: g[k] for k in KERNEL_KEYS if k in g} for g in opt.param_groups]


def keep_step_kernel(optimizer: Any, kernel: list[dict[str, Any]]) -> None:
    """Give each parameter group the kernel flags of `kernel` (`step_kernel` before a state was loaded): torch's
    `load_state_dict` takes them from the saved groups, and the kernel is this run's choice (a state of timm's
    train.py, or from before `optimizer_kernel`, resumes fused). An Adam step count moves where the new kernel
    keeps it, as torch places it: on the parameter's device as float32 when fused or capturable, else on the CPU."""
    opt = getattr(optimizer, "optimizer", optimizer)
    for group, flags in zip(opt.param_groups, kernel):
        if all(group.get(k) == v for k, v in flags.items()):
            continue
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if torch.is_tensor(step) and step.ndim == 0:
                opt.state[p]["step"] = (step.to(p.device, torch.float32) if on_device else step.cpu())


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
