"""`WeightEvolution`: the epoch-end plug-in that evolves inferior filters."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import official, ops
from .config import WEConfig
from .discovery import Unit, count_conv2d, discover, unwrap_model
from .plan import PoolPlan, UnitPlan, WEPlan
from .schedule import selection_rate

_log = logging.getLogger(__name__)

STATE_VERSION = 1


def full_value(p: Tensor) -> Tensor:
    """The parameter's whole value, detached. A DTensor (a shard of torch FSDP2's `fully_shard`) is gathered:
    a collective, which every rank reaches in the same order (units are visited in one fixed order)."""
    p = p.detach()
    return p.full_tensor() if is_dtensor(p) else p


def is_dtensor(p: Tensor) -> bool:
    return callable(getattr(p, "full_tensor", None)) and hasattr(p, "device_mesh")


def write_shard(p: Tensor, full: Tensor) -> None:
    """Store a full value into a DTensor parameter: every rank keeps its own slice (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    p.detach().to_local().copy_(local)


class Member(NamedTuple):
    """A unit at step start: its float32 (n, S, K) weights and filter importances."""

    unit: Unit
    w: Tensor
    l1: Tensor  # ||W_j||_1
    imp: Tensor  # average L1, Eq. (1)


@dataclass
class WEStats:
    """What one `step` did."""

    epoch: int
    rates: dict[str, float] = field(default_factory=dict)  # selection rate used per pool
    selected: dict[str, int] = field(default_factory=dict)  # inferior filters evolved per pool
    inferior: dict[str, int] = field(default_factory=dict)  # param name -> inferior filters evolved
    changed: int = 0  # parameter elements whose value changed
    changed_by_pool: dict[str, int] = field(default_factory=dict)  # the same, per pool
    abs_change_sum: float = 0.0
    skipped: list[str] = field(default_factory=list)  # params skipped for non-finite values

    @property
    def mean_abs_change(self) -> float:
        """Mean |new - old| over the changed elements (0 when none changed)."""
        return self.abs_change_sum / self.changed if self.changed else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Flat scalars for `summary.csv` / logging."""
        d: dict[str, Any] = {}
        for pool, r in self.rates.items():
            d[f"we_rate_{pool}"] = r
        for pool, n in self.selected.items():
            d[f"we_selected_{pool}"] = n
        d["we_inferior"] = sum(self.inferior.values())
        d["we_changed"] = self.changed
        for pool, n in self.changed_by_pool.items():
            d[f"we_changed_{pool}"] = n
        d["we_mean_abs_change"] = self.mean_abs_change
        return d


class WeightEvolution:
    """Evolves inferior conv / norm (/ linear) filters of `model` after each epoch.

    Usage: ``we = WeightEvolution(model, WEConfig(...)); stats = we.step(epoch)``.
    `model` may be wrapped by DDP, `torch.compile` or Accelerate: the wrapped
    module is unwrapped and its parameters are edited in place under
    `torch.no_grad()`, in float32, identically on every rank. Parameters sharded
    by torch FSDP2 (`fully_shard`, DTensor) are gathered whole, evolved
    identically on every rank, and written back to each rank's shard; `step`
    is then a collective that every rank must call.
    """

    def __init__(self, model: nn.Module, config: WEConfig | None = None):
        self.config = config or WEConfig()
        self.model = unwrap_model(model)
        self.units: list[Unit] = discover(self.model, self.config)
        self.pools = ("conv", "norm", "bias") if self.config.variant == "official" else ("conv", "linear", "norm", "bias")
        self.counters = {pool: 0 for pool in self.pools}  # official variant's per-pool counters
        self.ln_per = count_conv2d(self.model) / self.config.ln_c
        self.last_epoch: int | None = None
        self.num_steps = 0
        self._layouts: dict[tuple[int, ...], ops.RowLayout] = {}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "counters": dict(self.counters),
            "last_epoch": -1 if self.last_epoch is None else self.last_epoch,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = WEConfig.from_dict(state["config"])
        if saved.variant != self.config.variant:
            raise ValueError(f"WE state is for variant {saved.variant!r}, this run uses {self.config.variant!r}")
        if saved != self.config:
            _log.warning("WE config differs from the checkpoint's: %s vs %s", self.config, saved)
        self.counters = {pool: int(state["counters"].get(pool, 0)) for pool in self.pools}
        last = int(state["last_epoch"])
        self.last_epoch = None if last < 0 else last
        self.num_steps = int(state["num_steps"])

    # ------------------------------------------------------------------ step
    def rates(self, epoch: int) -> dict[str, float]:
        """Selection rate of each pool at `epoch` (Eq. 2)."""
        return {pool: selection_rate(epoch, self.config, pool) for pool in self.pools}

    @torch.no_grad()
    def plan(self, epoch: int) -> WEPlan:
        """Dry run of `step(epoch)`: what it would select, pair and change, per parameter and per pool.

        Reads the weights only: neither the model nor the official variant's
        counters change (the plan holds the counters' next values; `step`
        commits them). `step` is `plan` + writing the planned values.
        """
        plan = WEPlan(epoch, self.config.variant, counters=dict(self.counters))
        rates = self.rates(epoch)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            by_pool, units = self._members()
            plan_pool = self._official_pool if self.config.variant == "official" else self._paper_pool
            staged: list[tuple[UnitPlan, Tensor, Tensor]] = []  # (unit, changed count, |change| sum), read at once
            for pool in self.pools:
                plan.pools[pool] = PoolPlan(pool, rates[pool])
                if by_pool[pool]:
                    plan_pool(plan.pools[pool], by_pool[pool], units, plan.counters, staged)
            if staged:
                counts = torch.stack([c for _, c, _ in staged]).tolist()  # one device sync for all units
                sums = torch.stack([a for _, _, a in staged]).tolist()
                for (up, _, _), n, a in zip(staged, counts, sums):
                    up.changed, up.abs_change = int(n), float(a)
        plan.units = [units[id(u)] for u in self.units]
        for up in plan.units:
            if not up.skipped:
                pp = plan.pools[up.pool]
                pp.filters += up.filters
                pp.selected_global += up.selected_global
                pp.paired += up.paired
                pp.changed += up.changed
        return plan

    @torch.no_grad()
    def step(self, epoch: int) -> WEStats:
        """Evolve the model once, after 0-based `epoch` finished; returns what changed."""
        plan = self.plan(epoch)
        for up in plan.units:
            if up.index is not None:
                self._write(up.unit, up.index, up.values)
        self.counters = dict(plan.counters)
        self.last_epoch = epoch
        self.num_steps += 1
        return self._stats(plan)

    @staticmethod
    def _stats(plan: WEPlan) -> WEStats:
        stats = WEStats(epoch=plan.epoch, rates={pool: p.rate for pool, p in plan.pools.items()},
                        selected={pool: p.paired for pool, p in plan.pools.items()}, skipped=plan.skipped,
                        changed_by_pool={pool: p.changed for pool, p in plan.pools.items()})
        for up in plan.units:
            if up.paired:
                stats.inferior[up.name] = up.paired
            stats.changed += up.changed
            stats.abs_change_sum += up.abs_change
        return stats

    def _members(self) -> tuple[dict[str, list[Member]], dict[int, UnitPlan]]:
        """Each pool's units with step-start weights, and an empty plan per unit; layers holding NaN/inf are
        skipped whole."""
        read, finite = [], []
        for unit in self.units:
            w = full_value(unit.param).float().reshape(unit.shape3)
            l1 = ops.l1_norms(w)
            finite.append(torch.isfinite(l1).all())  # any NaN/inf element makes its filter's norm non-finite
            read.append(Member(unit, w, l1, l1 / w.shape[1]))  # Eq. (1): average L1
        finite = torch.stack(finite).tolist() if finite else []  # one device sync for all units
        bad_layers = {m.unit.layer for m, ok in zip(read, finite) if not ok}
        by_pool: dict[str, list[Member]] = {pool: [] for pool in self.pools}
        units: dict[int, UnitPlan] = {}
        for m in read:
            skipped = m.unit.layer in bad_layers
            units[id(m.unit)] = UnitPlan(m.unit, m.w.shape[0], m.unit.groups, skipped=skipped,
                                         importance=None if skipped else m.imp)
            if not skipped:
                by_pool[m.unit.pool].append(m)
        skipped = [m.unit.name for m in read if m.unit.layer in bad_layers]
        if skipped:
            names = ", ".join(skipped[:4]) + (", ..." if len(skipped) > 4 else "")
            _log.warning("weight evolution: skipped %d parameters whose layers hold non-finite values (%s)",
                         len(skipped), names)
        return by_pool, units

    def _paper_pool(self, pp: PoolPlan, members: list[Member], units: dict[int, UnitPlan],
                    counters: dict[str, int], staged: list) -> None:
        cfg = self.config
        layout = self._layout(members)
        imp = torch.cat([m.imp for m in members])
        selected = ops.global_select(imp, pp.rate)  # also with selection="local": a diagnostic there
        l1 = layout.pad(torch.cat([m.l1 for m in members]))
        tbd = None if cfg.selection == "local" else layout.pad(selected, False)
        mask = ops.inferior_rows(l1, layout.valid, tbd, None if cfg.selection == "global" else cfg.gamma)
        below = mask if cfg.selection == "local" else ops.inferior_rows(l1, layout.valid, None, cfg.gamma)
        rows, inf_col, dom_col = ops.match_rows(
            layout.pad(imp), layout.valid, mask, layout.half, reverse=cfg.matching == "reverse"
        )
        inf_flat, dom_flat = layout.flat_index[rows, inf_col], layout.flat_index[rows, dom_col]
        dom_by_unit = dict(layout.split(dom_flat))
        for u, inf in layout.split(inf_flat):
            unit, w, _, _ = members[u]
            dom = dom_by_unit[u]
            if cfg.level == "filter" or w.shape[1] * w.shape[2] == 1:
                idx, new = (inf,), ops.crossover_filter(w, inf, dom, cfg.alpha)
            else:
                r, s, q, new = ops.crossover_element(w, inf, dom, cfg.alpha)
                idx = (r, s, q)
            self._stage(units[id(unit)], int(inf.numel()), w[idx], idx, new, staged)
        threshold = torch.where(selected, imp, torch.full_like(imp, -math.inf)).amax()  # -inf: none selected
        counts = [ops.unit_counts(x, layout) for x in (selected, below[layout.valid], mask[layout.valid])]
        self._diagnose(pp, members, units, ops.unit_spread(imp, layout), counts, threshold)

    def _official_pool(self, pp: PoolPlan, members: list[Member], units: dict[int, UnitPlan],
                       counters: dict[str, int], staged: list) -> None:
        cfg = self.config
        th = official.threshold([m.imp for m in members], pp.rate)
        inferior = []
        for unit, w, _, imp in members:
            c, counters[pp.pool] = official.layer_count(imp, th, cfg.gamma, counters[pp.pool], self.ln_per)
            inferior.append(max(c, 0))
            if c <= 0:
                continue
            inf, dom = official.pairs(imp, c)
            if inf.numel() == 0:
                continue
            wi, wd = w[inf], w[dom]
            whole = pp.pool != "conv" or unit.one_by_one
            new = official.crossover_whole(wi, wd) if whole else official.crossover_slices(wi, wd)
            self._stage(units[id(unit)], int(inf.numel()), wi, (inf,), new, staged)
        layout = self._layout(members)
        imp = torch.cat([m.imp for m in members])
        spread = ops.unit_spread(imp, layout)
        below = imp <= spread[2][layout.unit_of] * cfg.gamma
        counts = [ops.unit_counts(x, layout) for x in (imp < th, below)] + [imp.new_tensor(inferior).long()]
        self._diagnose(pp, members, units, spread, counts, imp.new_tensor(th))

    @staticmethod
    def _diagnose(pp: PoolPlan, members: list[Member], units: dict[int, UnitPlan], spread: Tensor,
                  counts: list[Tensor], threshold: Tensor) -> None:
        """Per-unit importance spread and selection counts, and the pool threshold (one device sync)."""
        table = torch.cat([spread.double(), torch.stack(counts).double(),
                           threshold.double().reshape(1, 1).expand(1, len(members))]).cpu().tolist()
        for k, m in enumerate(members):
            up = units[id(m.unit)]
            up.imp_min, up.imp_median, up.imp_max = table[0][k], table[1][k], table[2][k]
            up.selected_global, up.below_gamma, up.inferior = int(table[3][k]), int(table[4][k]), int(table[5][k])
        pp.threshold = table[6][0] if table[6][0] != -math.inf else math.nan

    # --------------------------------------------------------------- helpers
    def _layout(self, members: list[Member]) -> ops.RowLayout:
        """Row layout of a pool's members, cached while the same units take part."""
        key = tuple(id(m.unit) for m in members)
        if key not in self._layouts:
            sizes = [(m.w.shape[0], m.unit.groups) for m in members]
            self._layouts[key] = ops.RowLayout(sizes, device=members[0].w.device)
        return self._layouts[key]

    @staticmethod
    def _stage(up: UnitPlan, paired: int, old: Tensor, idx: tuple[Tensor, ...], vals: Tensor, staged: list) -> None:
        """Plan writing float32 `vals` at `idx` of the unit's (n, S, K) view, cast to the param's dtype.

        `old` holds the step-start float32 values at `idx`; the changed count and
        |change| sum stay on the device until the plan reads them all at once.
        """
        dtype = up.unit.param.dtype
        new = vals.to(dtype)
        diff = new != old.to(dtype)
        up.index, up.values, up.paired = idx, new, paired
        staged.append((up, diff.sum(), torch.where(diff, (new.float() - old).abs(), 0.0).sum()))

    @staticmethod
    def _write(unit: Unit, idx: tuple[Tensor, ...], new: Tensor) -> None:
        """Store `new` (in the param's dtype) at `idx` of the unit's (n, S, K) view."""
        p = unit.param.detach()
        if is_dtensor(p):  # an FSDP2 shard: edit the whole value, keep this rank's slice
            buf = full_value(p).reshape(unit.shape3).clone()
            buf[idx] = new
            write_shard(p, buf.view(p.shape))
        elif p.is_contiguous():
            p.view(unit.shape3)[idx] = new
        else:  # e.g. channels_last conv weights: edit a copy, write back through the strides
            buf = p.reshape(unit.shape3).clone()
            buf[idx] = new
            p.copy_(buf.view(p.shape))
