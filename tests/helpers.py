"""Test helpers: perturbation, toy models, and the engine-vs-reference comparator."""
from __future__ import annotations

import copy
import math

import timm
import timm.layers
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from reference_we import reference_step

NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, low: float = 1e-3, high: float = 1.0) -> nn.Module:
    """Randomise conv/linear/norm parameters so that WE selection is non-trivial.

    Conv and linear filters get fresh Gaussian weights whose importance (average
    L1, Eq. 1) is proportional to a per-filter factor in [low, high]: the factors
    of a layer are a random permutation of a geometric grid, each jittered by up
    to half a grid step, so importances within a layer are far apart (engine
    float32 and reference float64 sums cannot reorder them), relative
    importances are continuous random values (never on a gamma boundary), and
    the spread is log-uniform. Biases and
    norm weights become N(0, 1) draws whose magnitudes are distinct within each
    tensor (no zero-init ties, no BN weights all equal to 1). Returns the model.
    """
    g = torch.Generator().manual_seed(seed)

    def distinct_normal(p, scale):
        for _ in range(100):
            x = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)  # distinct in p's dtype
            if torch.unique(x.abs()).numel() == x.numel() and bool((x != 0).all()):
                return x
        raise RuntimeError("could not draw distinct magnitudes")

    for m in model.modules():
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(m, (_ConvNd, nn.Linear)) and isinstance(w, nn.Parameter):
            n, lo, hi = w.shape[0], math.log(low), math.log(high)
            step = (hi - lo) / n
            grid = torch.linspace(lo, hi - step, n, dtype=torch.float64)
            jitter = torch.rand(n, generator=g, dtype=torch.float64) * (0.5 * step)
            factor = torch.exp(grid[torch.randperm(n, generator=g)] + jitter)
            gauss = torch.randn(w.shape, generator=g, dtype=torch.float64).reshape(n, -1)
            gauss = gauss / gauss.abs().mean(1, keepdim=True) * math.sqrt(2 / math.pi)
            fan_in = gauss.shape[1]
            w.copy_((gauss * (factor[:, None] / math.sqrt(fan_in))).reshape(w.shape))
        elif isinstance(m, NORMS) and isinstance(w, nn.Parameter):
            w.copy_(distinct_normal(w, 1.0))
        else:
            continue
        if isinstance(b, nn.Parameter):
            b.copy_(distinct_normal(b, 0.5))
    return model


def snapshot(model: nn.Module) -> dict:
    """Clones of all parameters and buffers, keyed by name."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({"buffer:" + n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def changed_mask(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Elements whose value changed (NaN positions that stay NaN count as unchanged)."""
    both_nan = torch.isnan(new) & torch.isnan(old)
    return (new != old) & ~both_nan


# ------------------------------------------------------------------ toy models
class ToyNet(nn.Module):
    """Every layer kind of the paper variant; a shared and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 11, 5)  # odd sizes exercise the floor(n/2) cap
        self.c2 = nn.Conv2d(12, 16, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(15, 21, 3, groups=3)  # 3 local groups of 7 filters
        self.mult = nn.Conv2d(8, 16, 3, groups=8)  # 8 groups of 2 (1 < groups < out)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)  # depthwise: one group
        self.pw = nn.Conv2d(16, 32, 1)
        self.c3 = nn.Conv3d(4, 9, (1, 3, 3))
        self.bn3 = nn.BatchNorm3d(9)
        self.gn = nn.GroupNorm(4, 32)
        self.fc1 = nn.Linear(32, 20)
        self.ln = nn.LayerNorm(20)
        self.bn1 = nn.BatchNorm1d(20)
        self.fc2 = nn.Linear(20, 9, bias=False)
        self.ln2 = nn.LayerNorm((3, 5))
        self.shared = nn.Conv2d(12, 16, 3)  # weight shared with c2: evolved once
        self.shared.weight = self.c2.weight
        self.frozen = nn.Conv2d(16, 16, 3)  # frozen weight, trainable bias
        self.frozen.weight.requires_grad_(False)
        self.frozen_bn = nn.BatchNorm2d(16).requires_grad_(False)
        self.plain_bn = nn.BatchNorm2d(8, affine=False)


class TimmLayersNet(nn.Module):
    """timm layer subclasses that the spec names (and SyncBatchNorm)."""

    def __init__(self):
        super().__init__()
        self.std = timm.layers.StdConv2d(3, 16, 3)
        self.bnact = timm.layers.BatchNormAct2d(16)
        self.same = timm.layers.Conv2dSame(16, 24, 3, stride=2)
        self.ln2d = timm.layers.LayerNorm2d(24)
        self.sstd = timm.layers.ScaledStdConv2d(24, 32, 3)  # its `gain` is not evolved
        self.gnact = timm.layers.GroupNormAct(32, num_groups=8)
        self.sync = nn.SyncBatchNorm(32)
        self.head = timm.layers.Linear(32, 12)


class OfficialNet(nn.Module):
    """Conv2d / BatchNorm2d shapes the official variant distinguishes, plus layers it ignores."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)  # 1x1: whole-filter branch
        self.bn2 = timm.layers.BatchNormAct2d(24)
        self.k13 = nn.Conv2d(24, 12, (1, 3))  # kernel height 1: whole-filter branch
        self.k31 = nn.Conv2d(12, 12, (3, 1))  # kernel width 1: per-slice branch
        self.dw = nn.Conv2d(12, 12, 3, groups=12)  # depthwise: per-slice, one slice
        self.grouped = nn.Conv2d(12, 20, 3, groups=4)  # no grouping in the official variant
        self.bn3 = nn.BatchNorm2d(20)
        self.std = timm.layers.StdConv2d(20, 16, 3)
        self.c1d = nn.Conv1d(4, 8, 3)  # not Conv2d: ignored
        self.bn1d = nn.BatchNorm1d(8)  # not BatchNorm2d: ignored
        self.gn = nn.GroupNorm(2, 8)  # ignored
        self.fc = nn.Linear(16, 10)  # ignored


# ------------------------------------------------------------------ comparator
def _mask_report(name, old, new, ref, m_eng, m_ref) -> str:
    diff = (m_eng != m_ref).nonzero()[:5].tolist()
    rows = [f"{tuple(i)}: old={old[tuple(i)].item():.9g} engine={new[tuple(i)].item():.9g} "
            f"reference={ref[tuple(i)].item():.9g}" for i in diff]
    return (f"{name}: changed-element masks differ (engine {int(m_eng.sum())}, reference "
            f"{int(m_ref.sum())}, {int((m_eng != m_ref).sum())} disagree); e.g.\n  " + "\n  ".join(rows))


def compare_models(before: dict, model: nn.Module, ref: nn.Module, rtol=1e-5, atol=1e-6):
    """Assert engine and reference changed the same elements to the same values.

    Returns (number of changed parameter elements, sum of |new - old| over them).
    """
    refp = dict(ref.named_parameters())
    total, abs_sum = 0, 0.0
    for name, p in model.named_parameters():
        old, new, r = before[name], p.detach(), refp[name].detach()
        assert new.dtype == old.dtype, f"{name}: dtype changed to {new.dtype}"
        m_eng, m_ref = changed_mask(new, old), changed_mask(r, old)
        assert torch.equal(m_eng, m_ref), _mask_report(name, old, new, r, m_eng, m_ref)
        torch.testing.assert_close(new.float(), r.float(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
        total += int(m_eng.sum())
        abs_sum += float((new.double() - old.double())[m_eng].abs().sum())
    for name, b in model.named_buffers():
        assert torch.equal(b, before["buffer:" + name]), f"buffer {name} changed"
    return total, abs_sum


def compare_stats(stats, res, changed: int, abs_sum: float) -> None:
    """Assert the engine's stats agree with the reference's record of the step."""
    assert stats.changed == changed, f"stats.changed={stats.changed}, counted {changed}"
    mean = abs_sum / changed if changed else 0.0
    assert math.isclose(stats.mean_abs_change, mean, rel_tol=1e-4, abs_tol=1e-12), (
        f"mean_abs_change={stats.mean_abs_change}, measured {mean}")
    flat = stats.to_dict()
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values()), flat
    assert dict(stats.inferior) == res.inferior, f"inferior: engine {stats.inferior} != reference {res.inferior}"
    for pool in set(stats.selected) | set(res.selected):
        assert stats.selected.get(pool, 0) == res.selected.get(pool, 0), (
            f"selected[{pool}]: engine {stats.selected} != reference {res.selected}")
    for pool, r in res.rates.items():
        assert math.isclose(stats.rates[pool], r, rel_tol=1e-12, abs_tol=0), (
            f"rates[{pool}]: engine {stats.rates[pool]} != reference {r}")
    assert sum(stats.selected.values()) == sum(stats.inferior.values())


def assert_matches_reference(model: nn.Module, cfg, epochs, wrap=None, reperturb=None,
                             rtol=1e-5, atol=1e-6) -> int:
    """Step the engine on `model` and the reference on a copy for each epoch in
    turn, comparing after every step; before each step the reference copy is
    synced to the engine's values, so every step starts from identical weights.

    `reperturb(model, i)`, when given, re-randomises the model before every
    step after the first: evolved filters are mixtures of dominant ones, so on
    large layers a later step can meet importances equal to ~1e-7 relative,
    whose order float32 (engine) and float64 (reference) sums may disagree on.
    State (official counters) still carries over. `wrap(model)` is what the
    engine is given (e.g. torch.compile). Returns the total changed elements.
    """
    from we_timm import WeightEvolution

    ref = copy.deepcopy(model)
    we = WeightEvolution(model if wrap is None else wrap(model), cfg)
    state, total = None, 0
    for i, epoch in enumerate(epochs):
        if reperturb is not None and i > 0:
            reperturb(model, i)
        with torch.no_grad():  # identical starting weights for both
            for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                q.copy_(p)
        before = snapshot(model)
        stats = we.step(epoch)
        res = reference_step(ref, cfg, epoch, state)
        state = res.state
        changed, abs_sum = compare_models(before, model, ref, rtol=rtol, atol=atol)
        compare_stats(stats, res, changed, abs_sum)
        total += changed
    return total
