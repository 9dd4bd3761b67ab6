"""Layer discovery: which parameters Weight Evolution evolves, in which pool.

A *unit* is one evolvable parameter seen as `n` filters of `S` slices of `K`
elements, split into `G` equal groups of consecutive filters for local
selection (spec "Units, layers and pools").
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from .config import WEConfig

_log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Unit:
    """One evolvable parameter and how its filters are laid out."""

    name: str  # parameter name, as in the (unwrapped) model's named_parameters()
    param: nn.Parameter
    pool: str  # "conv" | "linear" | "norm" | "bias"
    groups: int  # local-selection groups (consecutive filters)
    layer: int  # index of the owning module in modules() order: a layer is skipped as a whole
    one_by_one: bool = False  # official variant: kernel height 1 -> whole-filter crossover

    @property
    def shape3(self) -> tuple[int, int, int]:
        """(filters, slices, elements per slice)."""
        p = self.param
        if self.pool in ("conv", "linear"):
            return p.shape[0], p.shape[1], math.prod(p.shape[2:])  # from the shape: a sharded DTensor too
        return p.numel(), 1, 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile / Accelerate wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel") and hasattr(model, "module")
        ):
            model = model.module
        else:
            return model


def _module_kind(m: nn.Module, variant: str) -> str | None:
    if variant == "official":
        if isinstance(m, nn.Conv2d):
            return "conv"
        if isinstance(m, nn.BatchNorm2d):
            return "norm"
        return None
    if isinstance(m, CONV_TYPES):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, NORM_TYPES):
        return "norm"
    return None


def _conv_groups(m: nn.Module) -> int:
    g = getattr(m, "groups", 1)
    out = m.weight.shape[0]
    return g if 1 < g < out else 1


def discover(model: nn.Module, cfg: WEConfig) -> list[Unit]:
    """Evolvable units of `model` in `modules()` order (shared params once, frozen skipped)."""
    names = {id(p): n for n, p in model.named_parameters()}  # first name of a shared param
    seen: set[int] = set()
    units: list[Unit] = []
    for index, m in enumerate(model.modules()):
        kind = _module_kind(m, cfg.variant)
        if kind is None or kind not in cfg.layers:
            continue
        groups = _conv_groups(m) if kind == "conv" and cfg.variant == "paper" else 1
        weight_pool = kind
        entries = [("weight", weight_pool)]
        # Official release: conv biases are not evolved; BN biases form their own pool.
        if cfg.variant == "paper" or kind == "norm":
            entries.append(("bias", "bias"))
        for attr, pool in entries:
            p = getattr(m, attr, None)
            if not isinstance(p, nn.Parameter) or not p.requires_grad or id(p) in seen:
                continue
            if p.numel() == 0:
                continue
            seen.add(id(p))
            one = kind == "conv" and attr == "weight" and p.dim() > 2 and p.shape[2] == 1
            units.append(Unit(names.get(id(p), attr), p, pool, groups, index, one))
    return units


def count_conv2d(model: nn.Module) -> int:
    """Number of `nn.Conv2d` modules (the release's `ln_per` numerator)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())
