"""Slow, literal reference implementation of `WE_SPEC.md` (tests only).

Written from the spec alone, independently of the vectorised engine in
`we_timm/`, so that the equivalence tests can catch the engine's bugs. Every
rule is a Python loop over layers, groups, filters, slices and elements, with
the spec sentence it implements quoted beside it. Importances are summed in
float64; every value written is computed in float32 ("always computing in
float32") and cast back to the parameter's dtype.

Entry point: `reference_step(model, cfg, epoch, state=None) -> RefResult`; the
official variant's persistent counters travel in `RefResult.state`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

F32 = np.float32
log = logging.getLogger(__name__)


# --------------------------------------------------------------- Eq. (2)
def ref_rate(epoch: int, cfg, pool: str) -> float:
    """Eq. (2) with the spec's stage rule and the official divisor."""
    base = {"conv": cfg.rate, "linear": cfg.rate,
            "norm": cfg.rate if cfg.rate_norm is None else cfg.rate_norm,
            "bias": cfg.rate if cfg.rate_bias is None else cfg.rate_bias}[pool]
    # "Stage t (1-based) of epoch e = 1 + number of milestones m with m <= e;
    #  e0 = the last such milestone (0 in stage 1)."
    passed = [m for m in sorted(cfg.milestones) if m <= epoch]
    t = 1 + len(passed)
    e0 = passed[-1] if passed else 0
    if cfg.variant == "paper":  # r̂ / beta**(t-1)
        div = cfg.beta ** (t - 1)
    else:  # "the divisor is 1 in stage 1 and beta * 2**(t-2) from stage 2 on"
        div = 1.0 if t == 1 else cfg.beta * 2.0 ** (t - 2)
    sigmoid = 1.0 / (1.0 + math.exp(-(epoch - e0) / cfg.eta))
    return base / div * sigmoid


# --------------------------------------------------------------- discovery
@dataclass
class Unit:
    """One evolvable Parameter: its filters, pool and local-selection groups."""

    name: str  # as in model.named_parameters()
    param: nn.Parameter
    module: nn.Module
    kind: str  # "conv" | "linear" | "norm"
    pool: str  # "conv" | "linear" | "norm" | "bias"
    n: int  # number of filters
    slices: int  # S: slices per filter
    per_slice: int  # K: elements per slice
    groups: list = field(default_factory=list)  # lists of filter indices


def layer_kind(module: nn.Module, variant: str):
    """The layer kind of a module, or None when it is not an evolvable layer."""
    if variant == "official":
        # "Only nn.Conv2d and nn.BatchNorm2d (subclasses included) are evolved"
        if isinstance(module, nn.Conv2d):
            return "conv"
        if isinstance(module, nn.BatchNorm2d):
            return "norm"
        return None
    # "conv": every nn.Conv1d/2d/3d (subclasses included)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    # "linear": every nn.Linear
    if isinstance(module, nn.Linear):
        return "linear"
    # "norm": affine BatchNorm* (incl. SyncBatchNorm, BatchNormAct2d), GroupNorm, LayerNorm
    if isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
        return "norm"
    return None


def _groups(module: nn.Module, kind: str, n: int, variant: str) -> list:
    """"The group is the whole layer, except for a grouped conv with
    1 < groups < out_channels, where each conv group is a group of its own."
    (Applied to the conv's bias too: bias j belongs to output channel j.)
    The official variant has "No grouping by conv groups"."""
    g = getattr(module, "groups", 1) if kind == "conv" else 1
    if variant == "paper" and 1 < g < module.out_channels:
        size = module.out_channels // g
        return [list(range(k * size, (k + 1) * size)) for k in range(g)]
    return [list(range(n))]


def discover(model: nn.Module, cfg) -> list:
    """Evolvable parameters in traversal order ("Modules are visited in
    model.modules() order"), weight before bias within a layer."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen, units = set(), []
    for module in model.modules():
        kind = layer_kind(module, cfg.variant)
        if kind is None or kind not in cfg.layers:
            continue
        attrs = ("weight",) if (cfg.variant == "official" and kind == "conv") else ("weight", "bias")
        params = []
        for attr in attrs:
            p = getattr(module, attr, None)
            # "parameters with requires_grad=False are skipped";
            # "a Parameter shared by several modules is evolved once"
            if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in seen:
                params.append((attr, p))
        # "layers with non-finite weights are skipped" (with a warning)
        if any(not torch.isfinite(p.detach()).all() for _, p in params):
            log.warning("reference: skipping %s, non-finite values", type(module).__name__)
            continue
        for attr, p in params:
            seen.add(id(p))
            if attr == "weight" and kind in ("conv", "linear"):
                # conv: filter j = weight[j], I slices of prod(k) elements;
                # linear: "treated as I slices of 1 element"
                n, s = p.shape[0], p.shape[1]
                k = int(np.prod(p.shape[2:])) if p.dim() > 2 else 1
            else:  # norm scale element or bias: "a scalar filter"
                n, s, k = p.numel(), 1, 1
            pool = kind if attr == "weight" else "bias"
            units.append(Unit(names[id(p)], p, module, kind, pool, n, s, k,
                              _groups(module, kind, n, cfg.variant)))
    return units


def _importances(u: Unit, w: np.ndarray) -> list:
    """Eq. (1): average L1 norm sum(|W_j|) / I; for a scalar filter |x| (float64)."""
    rows = w.reshape(u.n, u.slices * u.per_slice).astype(np.float64)
    return [float(np.abs(rows[j]).sum()) / u.slices for j in range(u.n)]


def _first_argmax_abs(v) -> int:
    """argmax_k |v[k]|, "first index on ties" (max() returns the first maximal item)."""
    mags = [abs(x) for x in v]
    return max(range(len(v)), key=mags.__getitem__)


def _first_argmin_abs(v) -> int:
    """argmin_k |v[k]|, first index on ties (min() returns the first minimal item)."""
    mags = [abs(x) for x in v]
    return min(range(len(v)), key=mags.__getitem__)


@dataclass
class RefResult:
    """What a reference step did (mirrors the engine's stats) plus its state."""

    rates: dict
    selected: dict
    inferior: dict
    state: dict


# --------------------------------------------------------------- paper variant
def _paper_crossover(cfg, u: Unit, old: np.ndarray, new: np.ndarray, i: int, d: int) -> None:
    """Step 4: crossover of inferior filter i with dominant filter d (reads `old`)."""
    inf = old.reshape(u.n, u.slices, u.per_slice)[i]
    dom = old.reshape(u.n, u.slices, u.per_slice)[d]
    out = new.reshape(u.n, u.slices, u.per_slice)[i]
    adaptive = cfg.alpha == "adaptive"
    if cfg.level == "filter":
        # "alpha = ||inf||_1 / (||inf||_1 + ||dom||_1) and the whole filter
        #  becomes alpha*inf + (1-alpha)*dom"
        li = float(np.abs(inf.astype(np.float64)).sum())
        ld = float(np.abs(dom.astype(np.float64)).sum())
        if li == 0 and ld == 0:
            return
        a = F32(li / (li + ld)) if adaptive else F32(cfg.alpha)
        out[...] = a * inf + (F32(1) - a) * dom
        return
    inf_rows, dom_rows = inf.tolist(), dom.tolist()
    for s in range(u.slices):  # "for each pair (inf, dom) and each slice s"
        p = _first_argmax_abs(dom_rows[s])  # p = argmax_k |dom[s,k]|
        q = _first_argmin_abs(inf_rows[s])  # q = argmin_k |inf[s,k]|
        wi, wd = F32(inf_rows[s][q]), F32(dom_rows[s][p])
        if wi == 0 and wd == 0:  # "When both magnitudes are 0 the element is left unchanged."
            continue
        a = abs(wi) / (abs(wi) + abs(wd)) if adaptive else F32(cfg.alpha)
        out[s, q] = a * wi + (F32(1) - a) * wd  # inf[s,q] <- alpha*inf[s,q] + (1-alpha)*dom[s,p]


def _paper_step(model, cfg, epoch, units, old, new) -> RefResult:
    imps = [_importances(u, o) for u, o in zip(units, old)]
    pools = [p for p in ("conv", "linear", "norm", "bias") if any(u.pool == p for u in units)]
    rates = {p: ref_rate(epoch, cfg, p) for p in pools}
    # 1. Global selection: "the floor(r * n) filters of smallest importance
    #    form the set tbd (ties: earlier in traversal order first)"
    tbd = set()
    if cfg.selection != "local":
        for pool in pools:
            entries = []
            for ui, u in enumerate(units):
                if u.pool == pool:
                    for j in range(u.n):
                        entries.append((imps[ui][j], len(entries), ui, j))
            entries.sort(key=lambda e: (e[0], e[1]))
            k = math.floor(rates[pool] * len(entries))
            tbd.update((ui, j) for _, _, ui, j in entries[:k])
    selected = {p: 0 for p in pools}
    inferior = {}
    for ui, u in enumerate(units):
        for group in u.groups:
            l1 = {j: imps[ui][j] * u.slices for j in group}  # ||W_j||_1
            top = max(l1.values())
            inf_set = []
            for j in group:
                in_tbd = (ui, j) in tbd
                # 2. "RI = ||W_j||_1 / max_i ||W_i||_1" (a zero group has no RI < gamma)
                small = top > 0 and l1[j] / top < cfg.gamma
                keep = {"global": in_tbd, "local": small, "global_local": in_tbd and small}[cfg.selection]
                if keep:
                    inf_set.append(j)
            # 3. "Inferior filters sorted ascending by importance"; "capped at
            #    floor(n_group / 2) by dropping the least inferior ones"
            inf_set.sort(key=lambda j: (l1[j], j))
            inf_set = inf_set[: len(group) // 2]
            c = len(inf_set)
            if c == 0:
                continue
            # "the c most important filters of the same group, sorted ascending"
            dom = sorted(group, key=lambda j: (-l1[j], j))[:c]
            dom.sort(key=lambda j: (l1[j], j))
            if cfg.matching == "reverse":
                dom = dom[::-1]
            for k in range(c):  # k-th smallest inferior with the k-th dominant
                _paper_crossover(cfg, u, old[ui], new[ui], inf_set[k], dom[k])
            selected[u.pool] += c
            inferior[u.name] = inferior.get(u.name, 0) + c
    return RefResult(rates, selected, inferior, {})


# --------------------------------------------------------------- official variant
def _official_crossover(u: Unit, old: np.ndarray, new: np.ndarray, i: int, d: int) -> None:
    """Release crossover of inferior filter i with dominant filter d (reads `old`)."""
    inf = old.reshape(u.n, u.slices, u.per_slice)[i]
    dom = old.reshape(u.n, u.slices, u.per_slice)[d]
    out = new.reshape(u.n, u.slices, u.per_slice)[i]
    if u.pool != "conv":
        # BN: "x_inf <- x_inf*a + x_dom*(1-a), a = |x_inf| / (|x_inf| + |x_dom|)"
        xi, xd = F32(inf[0, 0]), F32(dom[0, 0])
        if xi == 0 and xd == 0:  # "both magnitudes are 0 is left unchanged"
            return
        a = abs(xi) / (abs(xi) + abs(xd))
        out[0, 0] = xi * a + xd * (F32(1) - a)
        return
    if u.param.shape[2] == 1:
        # "Conv whose kernel height is 1: the whole inferior filter becomes
        #  inf*a + dom*(1-a), a = ||inf||_1 / (||inf||_1 + ||dom||_1)"
        li = float(np.abs(inf.astype(np.float64)).sum())
        ld = float(np.abs(dom.astype(np.float64)).sum())
        if li == 0 and ld == 0:
            return
        a = F32(li / (li + ld))
        out[...] = inf * a + dom * (F32(1) - a)
        return
    inf_rows, dom_rows = inf.tolist(), dom.tolist()
    for s_idx in range(u.slices):
        # "s = the signed inferior element of smallest |.|, l = the signed
        #  dominant element of largest |.| (first on ties)"
        s = F32(inf_rows[s_idx][_first_argmin_abs(inf_rows[s_idx])])
        l_ = F32(dom_rows[s_idx][_first_argmax_abs(dom_rows[s_idx])])
        if s + l_ == 0:  # "If s + l == 0 the slice is left unchanged"
            continue
        a = s / (s + l_)  # signed
        value = l_ * a + s * (F32(1) - a)
        for k in range(u.per_slice):  # "every element of the inferior slice equal to s"
            if F32(inf_rows[s_idx][k]) == s:
                out[s_idx, k] = value


def _official_step(model, cfg, epoch, units, old, new, state) -> RefResult:
    counters = dict(state.get("counters", {"conv": 0, "norm": 0, "bias": 0}))
    # "ln_per = (number of Conv2d modules) / ln_c"
    ln_per = sum(isinstance(m, nn.Conv2d) for m in model.modules()) / cfg.ln_c
    imps = [_importances(u, o) for u, o in zip(units, old)]
    pools = [p for p in ("conv", "norm", "bias") if any(u.pool == p for u in units)]
    rates = {p: ref_rate(epoch, cfg, p) for p in pools}
    th = {}
    for pool in pools:  # "th = sorted(importances)[int(n * r)]"
        everything = sorted(v for u, imp in zip(units, imps) if u.pool == pool for v in imp)
        th[pool] = everything[min(int(len(everything) * rates[pool]), len(everything) - 1)]
    selected = {p: 0 for p in pools}
    inferior = {}
    for ui, u in enumerate(units):  # "Per layer, in modules() order"
        imp, n, pool = imps[ui], u.n, u.pool
        high = sum(1 for v in imp if v >= th[pool])  # "high = #(importance >= th)"
        if high == n:
            continue
        top = max(imp)
        c = sum(1 for v in imp if v <= top * cfg.gamma)  # "c = #(importance <= max_importance * gamma)"
        if c == 0:  # "a counter of the pool is incremented and, when it reaches ln_per,
            counters[pool] += 1  # c is forced to 1 and the counter reset"
            if counters[pool] >= ln_per:
                c, counters[pool] = 1, 0
        else:  # "if c > 0 the counter is reset"
            counters[pool] = 0
        c = min(c, n - high)
        idx = sorted(range(n), key=lambda j: -imp[j])  # "indices sorted by importance descending"
        hi, lo = idx[: n - c], idx[n - c:]
        pairs = [(hi[k], lo[k]) for k in range(min(n - c, c))]  # "(hi[k], lo[k]) for k < min(N-c, c)"
        for d, i in pairs:
            _official_crossover(u, old[ui], new[ui], i, d)
        if pairs:
            selected[pool] += len(pairs)
            inferior[u.name] = len(pairs)
    return RefResult(rates, selected, inferior, {"counters": counters})


# --------------------------------------------------------------- entry point
@torch.no_grad()
def reference_step(model: nn.Module, cfg, epoch: int, state: dict | None = None) -> RefResult:
    """Apply one WE step to `model` in place, literally as the spec says.

    `state` is the previous step's `RefResult.state` (official counters).
    "All reads of a step see the weights as they were when the step began":
    every read goes to the float32 snapshot `old`, every write to `new`.
    """
    units = discover(model, cfg)
    old = [u.param.detach().to(torch.float32).cpu().numpy().copy() for u in units]
    new = [o.copy() for o in old]
    if cfg.variant == "paper":
        res = _paper_step(model, cfg, epoch, units, old, new)
    else:
        res = _official_step(model, cfg, epoch, units, old, new, state or {})
    for u, arr in zip(units, new):  # "cast back if a parameter is stored in bf16/fp16"
        u.param.copy_(torch.from_numpy(arr).to(u.param.dtype))
    return res


def evolvable_names(model: nn.Module, cfg) -> set:
    """Names of the parameters a step may change under `cfg`."""
    return {u.name for u in discover(model, cfg)}
