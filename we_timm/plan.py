"""`WEPlan`: what one Weight Evolution step would do, computed without touching the model.

`WeightEvolution.plan(epoch)` returns it; `WeightEvolution.step(epoch)` is
`plan` followed by `apply`, so a dry run and a real step cannot disagree.
Besides the writes a step makes, a plan holds the diagnostics of every
evolvable parameter (importance spread, how many filters each selection stage
picks) and of every pool (rate, global threshold).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .discovery import Unit

# CSV / table columns of `WEPlan.rows()`, in order
ROW_FIELDS = ("name", "pool", "filters", "groups", "imp_min", "imp_median", "imp_max", "selected_global",
              "below_gamma", "inferior", "paired", "changed", "skipped")


@dataclass
class UnitPlan:
    """One evolvable parameter: its diagnostics, and the writes a step makes to it."""

    unit: Unit = field(repr=False)
    filters: int
    groups: int
    imp_min: float = math.nan  # importance (Eq. 1, average L1) over the parameter's filters
    imp_median: float = math.nan  # lower median, as torch.median
    imp_max: float = math.nan
    selected_global: int = 0  # filters in the pool's global selection (tbd; official: importance < th)
    below_gamma: int = 0  # filters whose relative importance in their group is < gamma (official: <= max * gamma)
    inferior: int = 0  # inferior set before the floor(n/2) cap (official: c after the counter rule)
    paired: int = 0  # inferior filters paired with a dominant one: what WEStats.inferior counts
    changed: int = 0  # elements whose value the step changes
    abs_change: float = 0.0  # sum of |new - old| over them
    skipped: bool = False  # the layer holds NaN/inf: not evolved
    importance: Tensor | None = field(default=None, repr=False)  # float32 importance of each filter (not skipped)
    index: tuple[Tensor, ...] | None = field(default=None, repr=False)  # where to write, in the (n, S, K) view
    values: Tensor | None = field(default=None, repr=False)  # what to write there, in the parameter's dtype

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def pool(self) -> str:
        return self.unit.pool

    def row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ROW_FIELDS}


@dataclass
class PoolPlan:
    """One global pool: its rate, size and threshold."""

    pool: str
    rate: float  # selection rate r(e), Eq. (2)
    filters: int = 0  # filters of the pool taking part (skipped layers excluded)
    selected_global: int = 0  # floor(r * n) (paper) or #(importance < th) (official)
    # paper: the largest importance among the globally selected (NaN when none is); official: the release's th
    threshold: float = math.nan
    paired: int = 0
    changed: int = 0


@dataclass
class WEPlan:
    """A dry run of one step: `pools` by name, `units` in discovery (modules()) order."""

    epoch: int
    variant: str
    pools: dict[str, PoolPlan] = field(default_factory=dict)
    units: list[UnitPlan] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)  # official variant: the counters after the step

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per evolvable parameter (`ROW_FIELDS`), for CSV files and tables."""
        return [u.row() for u in self.units]

    @property
    def skipped(self) -> list[str]:
        return [u.name for u in self.units if u.skipped]
