"""Pure tensor operations of Weight Evolution, paper variant (spec "One evolution step").

Filters are given as float32 tensors of shape (n, S, K): n filters of S slices
of K elements. Nothing here touches modules; everything is vectorised over
filters and slices.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def l1_norms(w: Tensor) -> Tensor:
    """||W_j||_1 of each filter of a (n, S, K) tensor (one fused pass, no |W| temporary)."""
    return torch.linalg.vector_norm(w, ord=1, dim=(1, 2))


def global_select(importance: Tensor, rate: float) -> Tensor:
    """Mask of the floor(rate * n) least important filters of a pool (step 1).

    `importance` is the pool's flat vector in traversal order; ties go to the
    filter earlier in traversal order (stable sort).
    """
    k = math.floor(rate * importance.numel())
    mask = torch.zeros_like(importance, dtype=torch.bool)
    if k > 0:
        mask[torch.sort(importance, stable=True).indices[:k]] = True
    return mask


class RowLayout:
    """Filters of several units laid out as rows of one padded (R, M) matrix.

    Each local-selection group (a whole layer, or one conv group) is a row, so
    selection and matching for a whole pool run as a few batched ops. Built
    once per pool from the units' (filters, groups) sizes.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu"):
        row_len, row_unit = [], []
        for u, (n, groups) in enumerate(sizes):
            row_len += [n // groups] * groups
            row_unit += [u] * groups
        self.num_units = len(sizes)
        self.unit_sizes = [n for n, _ in sizes]
        self.offsets = torch.tensor([0] + self.unit_sizes, device=device).cumsum(0)
        lens = torch.tensor(row_len, device=device)
        width = int(lens.max())
        self.valid = torch.arange(width, device=device)[None, :] < lens[:, None]  # (R, M)
        self.half = lens // 2  # matching cap floor(n_group / 2)
        self.flat_index = torch.full(self.valid.shape, -1, dtype=torch.long, device=device)
        self.flat_index[self.valid] = torch.arange(sum(self.unit_sizes), device=device)
        self.unit_of = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(self.unit_sizes, device=device)
        )

    def pad(self, flat: Tensor, fill: float | bool = 0) -> Tensor:
        """Scatter a flat per-filter vector of the pool into the (R, M) matrix."""
        out = torch.full(self.valid.shape, fill, dtype=flat.dtype, device=flat.device)
        out[self.valid] = flat
        return out

    def split(self, flat_idx: Tensor) -> list[tuple[int, Tensor]]:
        """Group pool-level filter indices (sorted by unit) into (unit, local indices)."""
        counts = torch.bincount(self.unit_of[flat_idx], minlength=self.num_units).tolist()
        out, start = [], 0
        for u, c in enumerate(counts):
            if c:
                out.append((u, flat_idx[start:start + c] - self.offsets[u]))
                start += c
        return out


def unit_spread(flat: Tensor, layout: RowLayout) -> Tensor:
    """(3, units) min, lower median (as torch.median) and max of a pool's flat per-filter vector, per unit."""
    values, order = torch.sort(flat, stable=True)
    grouped = values[torch.sort(layout.unit_of[order], stable=True).indices]  # each unit's values, ascending
    start, end = layout.offsets[:-1], layout.offsets[1:] - 1
    return torch.stack([grouped[start], grouped[start + (end - start) // 2], grouped[end]])


def unit_counts(mask: Tensor, layout: RowLayout) -> Tensor:
    """Number of True entries of a pool's flat per-filter mask, per unit."""
    out = torch.zeros(layout.num_units, dtype=torch.long, device=mask.device)
    return out.index_add_(0, layout.unit_of, mask.long())


def inferior_rows(l1: Tensor, valid: Tensor, tbd: Tensor | None, gamma: float | None) -> Tensor:
    """Inferior filters (step 2) of padded (R, M) rows, each row one group.

    `tbd` is the global-selection mask (None: local selection only) and
    `gamma` the RI threshold on ||W||_1 / max ||W||_1 (None: global only).
    """
    mask = valid.clone() if tbd is None else tbd & valid
    if gamma is not None:
        top = torch.where(valid, l1, torch.full_like(l1, -math.inf)).amax(dim=1, keepdim=True)
        mask &= l1 / top < gamma  # NaN for an all-zero group: never inferior
    return mask


def match_rows(imp: Tensor, valid: Tensor, mask: Tensor, half: Tensor, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Pair inferior and dominant filters row by row (step 3).

    Returns (row, inferior column, dominant column) of every pair; pairs come
    row by row, inferior ones in ascending order of importance. At most
    `half[row]` pairs per row: the least inferior ones are dropped.
    """
    c = torch.minimum(mask.sum(dim=1), half)
    h = int(half.max()) if half.numel() else 0
    if h == 0 or int(c.max()) == 0:
        empty = torch.empty(0, dtype=torch.long, device=imp.device)
        return empty, empty, empty
    inf_key = torch.where(mask, imp, torch.full_like(imp, math.inf))
    inf_col = torch.sort(inf_key, dim=1, stable=True).indices[:, :h]
    dom_key = torch.where(valid, imp, torch.full_like(imp, -math.inf))
    dom_desc = torch.sort(dom_key, dim=1, descending=True, stable=True).indices[:, :h]
    k = torch.arange(h, device=imp.device).expand(imp.shape[0], h)
    ok = k < c[:, None]
    # forward: k-th weakest inferior <-> k-th weakest of the c dominant ones
    dom_pos = k if reverse else (c[:, None] - 1 - k).clamp(min=0)
    dom_col = torch.gather(dom_desc, 1, dom_pos)
    rows = torch.arange(imp.shape[0], device=imp.device)[:, None].expand_as(k)
    return rows[ok], inf_col[ok], dom_col[ok]


def _mix(inf_val: Tensor, dom_val: Tensor, alpha: float | str, inf_mag: Tensor, dom_mag: Tensor) -> Tensor:
    """alpha*inf + (1-alpha)*dom with Eq. (6) alpha; pairs of zero magnitude kept."""
    denom = inf_mag + dom_mag
    if alpha == "adaptive":
        a = inf_mag / torch.where(denom > 0, denom, torch.ones_like(denom))
    else:
        a = torch.full_like(inf_mag, float(alpha))
    new = a * inf_val + (1 - a) * dom_val
    keep = (denom == 0) | ~torch.isfinite(new)
    return torch.where(keep, inf_val, new)


def crossover_element(
    w: Tensor, inf: Tensor, dom: Tensor, alpha: float | str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Element-level crossover (step 4, Eqs. 5-6) for pairs (inf[i], dom[i]).

    Returns (inf, slice, element) indices into `w` and their new values; `w` is
    not modified.
    """
    wi, wd = w[inf], w[dom]  # (P, S, K) copies: reads see the step-start weights
    p = wd.abs().argmax(dim=2, keepdim=True)
    q = wi.abs().argmin(dim=2, keepdim=True)
    dom_val = torch.gather(wd, 2, p).squeeze(2)
    inf_val = torch.gather(wi, 2, q).squeeze(2)
    new = _mix(inf_val, dom_val, alpha, inf_val.abs(), dom_val.abs())
    P, S = new.shape
    rows = inf[:, None].expand(P, S)
    slices = torch.arange(S, device=w.device).expand(P, S)
    return rows.reshape(-1), slices.reshape(-1), q.squeeze(2).reshape(-1), new.reshape(-1)


def crossover_filter(w: Tensor, inf: Tensor, dom: Tensor, alpha: float | str) -> Tensor:
    """Filter-level crossover: whole inferior filters become alpha*inf + (1-alpha)*dom."""
    wi, wd = w[inf], w[dom]
    mi = l1_norms(wi)[:, None, None]
    md = l1_norms(wd)[:, None, None]
    return _mix(wi, wd, alpha, mi.expand_as(wi), md.expand_as(wd))
