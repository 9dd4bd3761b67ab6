"""The authors' released CIFAR code (`we.py`), spec "Official variant".

Pure tensor functions over (n, S, K) float32 filters; the plug-in in
`evolution.py` walks the layers and keeps the per-pool counters.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def threshold(importances: Sequence[Tensor], rate: float) -> float:
    """th = sorted(importances)[int(n * r)] over the whole pool (+inf past the end)."""
    flat = torch.cat([imp.reshape(-1) for imp in importances])
    k = int(flat.numel() * rate)
    if k >= flat.numel():
        return math.inf
    return float(torch.sort(flat).values[k])


def layer_count(imp: Tensor, th: float, gamma: float, counter: int, ln_per: float) -> tuple[int, int]:
    """Number c of inferior filters of one layer and the pool counter after it."""
    n = imp.numel()
    high = int((imp >= th).sum())
    if high == n:
        return 0, counter
    c = int((imp <= imp.max() * gamma).sum())
    if c == 0:
        counter += 1
        if counter >= ln_per:
            c, counter = 1, 0
    else:
        counter = 0
    return min(c, n - high), counter


def pairs(imp: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """(lo, hi) filter indices: idx sorted descending, hi = idx[:N-c], lo = idx[N-c:]."""
    n = imp.numel()
    idx = torch.sort(imp, descending=True, stable=True).indices
    k = min(n - c, c)
    return idx[n - c:][:k], idx[:k]


def _safe_ratio(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    ok = den != 0
    return num / torch.where(ok, den, torch.ones_like(den)), ok


def crossover_whole(wi: Tensor, wd: Tensor) -> Tensor:
    """1x1 conv / BN: inf*a + dom*(1-a), a = |inf|_1 / (|inf|_1 + |dom|_1)."""
    mi = wi.abs().sum(dim=(1, 2), keepdim=True)
    md = wd.abs().sum(dim=(1, 2), keepdim=True)
    a, ok = _safe_ratio(mi, mi + md)
    new = wi * a + wd * (1 - a)
    return torch.where(ok & torch.isfinite(new), new, wi)


def crossover_slices(wi: Tensor, wd: Tensor) -> Tensor:
    """Other convs, per slice: every inferior element equal to s becomes l*a + s*(1-a), a = s/(s+l)."""
    q = wi.abs().argmin(dim=2, keepdim=True)
    p = wd.abs().argmax(dim=2, keepdim=True)
    s = torch.gather(wi, 2, q)
    l = torch.gather(wd, 2, p)
    a, ok = _safe_ratio(s, s + l)
    new = l * a + s * (1 - a)
    ok = ok & torch.isfinite(new)
    return torch.where(ok & (wi == s), new.expand_as(wi), wi)
