"""`WEConfig`: the validated, frozen configuration of Weight Evolution.

Field names and defaults follow `WE_SPEC.md` ("Public API"); they are part of
the public API and of the checkpoint format.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

VARIANTS = ("paper", "official")
LAYER_KINDS = ("conv", "norm", "linear")
SELECTIONS = ("global_local", "global", "local")
MATCHINGS = ("forward", "reverse")
LEVELS = ("element", "filter")


def _rate(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"WEConfig.{name} must be a number in [0, 1], got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"WEConfig.{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class WEConfig:
    """Hyper-parameters of Weight Evolution (paper Sec. 3, spec "Public API").

    Defaults are the paper's CIFAR settings; ImageNet uses beta=2, eta=8.
    """

    variant: str = "paper"  # "paper" (equations) or "official" (authors' release)
    rate: float = 0.05  # r-hat of the conv (and linear) pool
    rate_norm: float | None = None  # r-hat of the norm-scale pool; None = rate
    rate_bias: float | None = None  # r-hat of the bias pool; None = rate
    beta: float = 2.5  # stage decay of the rate, Eq. (2)
    eta: float = 15.0  # sigmoid temperature, Eq. (2)
    gamma: float = 0.05  # local relative-importance threshold, Eq. (4)
    milestones: tuple[int, ...] = ()  # LR-decay epochs delimiting stages
    layers: tuple[str, ...] = ("conv", "norm")  # kinds evolved
    selection: str = "global_local"  # or "global" (WE-G) / "local" (WE-L)
    matching: str = "forward"  # or "reverse" (WE-RM)
    alpha: str | float = "adaptive"  # or a fixed float in [0, 1]
    level: str = "element"  # or "filter" (filter-level-GL)
    ln_c: float = 2  # official variant: the release's ln_c

    def __post_init__(self) -> None:
        # Normalise sequences given as lists (YAML, argparse) to tuples.
        object.__setattr__(self, "milestones", tuple(self._milestones(self.milestones)))
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        self.validate()

    @staticmethod
    def _milestones(ms: Any) -> list[int]:
        if isinstance(ms, (int, float)) and not isinstance(ms, bool):
            ms = [ms]
        try:
            out = [int(m) for m in ms]
            ok = all(float(m) == int(m) for m in ms)
        except (TypeError, ValueError):
            ok = False
        if not ok or any(m < 0 for m in out):
            raise ValueError(f"WEConfig.milestones must be non-negative integers, got {ms!r}")
        return sorted(out)

    def validate(self) -> None:
        _choice("variant", self.variant, VARIANTS)
        _rate("rate", self.rate)
        for name in ("rate_norm", "rate_bias"):
            if getattr(self, name) is not None:
                _rate(name, getattr(self, name))
        for name in ("beta", "eta", "gamma", "ln_c"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"WEConfig.{name} must be a finite number, got {v!r}")
        if self.beta < 1:
            raise ValueError(f"WEConfig.beta must be >= 1, got {self.beta!r}")
        if self.eta <= 0:
            raise ValueError(f"WEConfig.eta must be > 0, got {self.eta!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"WEConfig.gamma must be in (0, 1], got {self.gamma!r}")
        if self.ln_c <= 0:
            raise ValueError(f"WEConfig.ln_c must be > 0, got {self.ln_c!r}")
        if not self.layers or any(k not in LAYER_KINDS for k in self.layers):
            raise ValueError(f"WEConfig.layers must be a non-empty subset of {list(LAYER_KINDS)}, got {self.layers!r}")
        _choice("selection", self.selection, SELECTIONS)
        _choice("matching", self.matching, MATCHINGS)
        _choice("level", self.level, LEVELS)
        if isinstance(self.alpha, str):
            _choice("alpha", self.alpha, ("adaptive",))
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"WEConfig.alpha must be 'adaptive' or a number in [0, 1], got {self.alpha!r}")

    @property
    def pool_rates(self) -> dict[str, float]:
        """Base rate r-hat of each pool."""
        norm = self.rate if self.rate_norm is None else self.rate_norm
        bias = self.rate if self.rate_bias is None else self.rate_bias
        return {"conv": self.rate, "linear": self.rate, "norm": norm, "bias": bias}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WEConfig field(s): {', '.join(unknown)}")
        return cls(**dict(d))
