"""Engine == literal reference (`reference_we.py`) on toy and timm models.

Every test perturbs a model (so selection is non-trivial), steps the engine and
the reference on copies for several epochs (before and after milestones), and
requires the same set of changed elements (exactly) and the same values
(float32 tolerance), plus matching stats. Large rates and gammas are used so
many filters are selected.
"""
from __future__ import annotations

import itertools

import pytest

from helpers import OfficialNet, TimmLayersNet, ToyNet, assert_matches_reference, perturb
from we_timm import WEConfig

EPOCHS = (0, 1, 2, 5)  # milestones (2, 4): stage 1, 1, 2 (first epoch), 3
BASE = dict(rate=0.5, gamma=0.5, milestones=(2, 4), layers=("conv", "norm", "linear"))
ALPHAS = ("adaptive", 0.0, 0.5, 0.9)
LAYERS = [("conv",), ("norm",), ("linear",), ("conv", "norm"), ("norm", "linear"), ("conv", "norm", "linear")]


def paper(**kw) -> WEConfig:
    return WEConfig(**{**BASE, **kw})


def fresh(seed: int, low: float = 1e-3):
    """A `reperturb` callback: new random weights before each later step."""
    return lambda model, i: perturb(model, seed + 1000 * i, low=low)


# ------------------------------------------------------------------ toy, paper variant
MATRIX = list(itertools.product(("global_local", "global", "local"), ("forward", "reverse"),
                                ("element", "filter"), ALPHAS))


@pytest.mark.parametrize("selection,matching,level,alpha", MATRIX)
def test_toy_full_ablation_matrix(selection, matching, level, alpha):
    cfg = paper(selection=selection, matching=matching, level=level, alpha=alpha)
    for seed, net in enumerate((ToyNet, TimmLayersNet)):
        assert assert_matches_reference(perturb(net(), seed), cfg, EPOCHS) > 0


@pytest.mark.parametrize("layers", LAYERS, ids="+".join)
@pytest.mark.parametrize("selection", ("global_local", "global", "local"))
def test_toy_layer_kinds(layers, selection):
    cfg = paper(layers=layers, selection=selection)
    assert assert_matches_reference(perturb(ToyNet(), 3), cfg, EPOCHS) > 0


@pytest.mark.parametrize("kw", [
    dict(),  # the spec's defaults: few or no filters selected
    dict(rate=0.3, rate_norm=0.8, rate_bias=0.1, gamma=0.3),
    dict(rate=0.1, rate_norm=0.0, rate_bias=1.0, gamma=0.2, selection="global"),
    dict(rate=1.0, gamma=1.0, selection="global_local"),
    dict(rate=1.0, gamma=1.0, selection="global", matching="reverse"),
    dict(rate=0.4, gamma=0.05, beta=1.0, eta=0.5, milestones=(1, 3, 4)),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_toy_rates_and_schedules(kw):
    cfg = WEConfig(layers=("conv", "norm", "linear"), **kw)
    for seed in range(2):
        assert_matches_reference(perturb(ToyNet(), 10 + seed), cfg, EPOCHS)
        assert_matches_reference(perturb(TimmLayersNet(), 10 + seed, low=0.05), cfg, EPOCHS)


# ------------------------------------------------------------------ timm, paper variant
ONE_AT_A_TIME = [
    dict(),
    dict(selection="global"),
    dict(selection="local", gamma=0.1),
    dict(matching="reverse"),
    dict(alpha=0.0),
    dict(alpha=0.5, level="filter"),
    dict(alpha=0.9),
    dict(level="filter"),
    dict(layers=("conv", "norm", "linear"), rate=0.3),
    dict(layers=("norm",), rate_bias=0.8),
]
TIMM_BASE = dict(rate=0.4, rate_norm=0.5, rate_bias=0.5, gamma=0.3, milestones=(2,), layers=("conv", "norm"))


def _ids(kw):
    return ",".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in kw.items()) or "base"


@pytest.mark.parametrize("kw", ONE_AT_A_TIME, ids=_ids)
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_050"])
def test_timm_small_ablations(timm_model, name, kw):
    cfg = WEConfig(**{**TIMM_BASE, **kw})
    assert assert_matches_reference(timm_model(name, seed=1), cfg, (0, 2), reperturb=fresh(1)) > 0


@pytest.mark.parametrize("kw", [dict(), dict(selection="local", level="filter", matching="reverse")], ids=_ids)
@pytest.mark.parametrize("name", ["convnext_atto", "resnext26ts", "efficientnet_b0"])
def test_timm_bigger_nets(timm_model, name, kw):
    cfg = WEConfig(**{**TIMM_BASE, "rate": 0.2, **kw})
    assert assert_matches_reference(timm_model(name, seed=2), cfg, (1,)) > 0


# ------------------------------------------------------------------ official variant
OFFICIAL = [
    dict(rate=0.2, rate_norm=0.05, rate_bias=0.05, gamma=0.1),  # the release's CIFAR settings
    dict(rate=0.5, rate_norm=0.3, rate_bias=0.3, gamma=0.3),
    dict(rate=0.5, rate_norm=0.5, rate_bias=0.5, gamma=0.1, ln_c=7),  # ln_per = 1
    dict(rate=0.5, rate_norm=0.5, rate_bias=0.5, gamma=0.05, ln_c=2),  # ln_per = 3.5
    dict(rate=0.6, rate_norm=0.4, rate_bias=0.4, gamma=0.02, ln_c=3.5, beta=2.0),  # ln_per = 2
    dict(rate=1.0, rate_norm=1.0, rate_bias=1.0, gamma=1.0),
]


@pytest.mark.parametrize("low", (1e-3, 0.3), ids=("spread", "narrow"))
@pytest.mark.parametrize("kw", OFFICIAL, ids=_ids)
def test_official_toy(kw, low):
    """`narrow` perturbation makes c == 0 frequent, exercising the counters."""
    cfg = WEConfig(variant="official", milestones=(3, 6), **kw)
    for seed in range(2):
        assert_matches_reference(perturb(OfficialNet(), seed, low=low), cfg, range(8))


@pytest.mark.parametrize("kw", OFFICIAL[:3], ids=_ids)
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_050"])
def test_official_timm(timm_model, name, kw):
    cfg = WEConfig(variant="official", milestones=(2,), **kw)
    assert assert_matches_reference(timm_model(name, seed=3), cfg, (0, 1, 2, 3), reperturb=fresh(3)) > 0


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnext26ts", "convnext_atto"])
def test_official_bigger_nets(timm_model, name):
    cfg = WEConfig(variant="official", **OFFICIAL[1])
    assert_matches_reference(timm_model(name, seed=4), cfg, (0, 1), reperturb=fresh(4))


@pytest.mark.parametrize("layers", [("conv",), ("norm",), ("conv", "norm", "linear")], ids="+".join)
def test_official_layer_kinds_frozen_and_shared(layers):
    """`layers` restricts the official variant too; ToyNet adds frozen and shared parameters."""
    cfg = WEConfig(variant="official", rate=0.5, rate_norm=0.5, rate_bias=0.5, gamma=0.3, layers=layers)
    assert_matches_reference(perturb(OfficialNet(), 20), cfg, range(3))
    assert_matches_reference(perturb(ToyNet(), 21), cfg, range(3))
