"""Selection-rate schedule, Eq. (2) of the paper (spec "Selection rate")."""
from __future__ import annotations

import bisect
import math

from .config import WEConfig


def stage(epoch: int, milestones) -> tuple[int, int]:
    """Return (t, e0): the 1-based stage of `epoch` and the epoch it started at."""
    ms = sorted(milestones)
    t = 1 + bisect.bisect_right(ms, epoch)
    e0 = ms[t - 2] if t > 1 else 0
    return t, e0


def divisor(t: int, cfg: WEConfig) -> float:
    """Stage divisor: beta**(t-1) (paper) or 1, beta, 2*beta, ... (official release)."""
    if cfg.variant == "official":
        return 1.0 if t == 1 else cfg.beta * 2.0 ** (t - 2)
    return cfg.beta ** (t - 1)


def selection_rate(epoch: int, cfg: WEConfig, pool: str = "conv") -> float:
    """Eq. (2): r(e) = r_hat / divisor(t) * sigmoid((e - e0) / eta)."""
    rates = cfg.pool_rates
    if pool not in rates:
        raise ValueError(f"unknown pool {pool!r}; expected one of {list(rates)}")
    t, e0 = stage(epoch, cfg.milestones)
    x = (epoch - e0) / cfg.eta
    return rates[pool] / divisor(t, cfg) / (1.0 + math.exp(-x))
