"""Unit tests of WE: Eq. (2), WEConfig validation, hand-computed steps, plug-in behaviour.

Hand-computed examples run on both the engine and the reference
(`impl` parameter), which also validates the reference itself.
"""
from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch
from torch import nn

from helpers import ToyNet, assert_matches_reference, changed_mask, perturb, snapshot
from reference_we import ref_rate, reference_step
from we_timm import WEConfig, WeightEvolution, selection_rate

IMPLS = ("engine", "reference")


def run(impl, model, cfg, epochs=(0,)):
    """Apply steps with the engine or the reference; returns the last stats/result."""
    out, state = None, None
    we = WeightEvolution(model, cfg) if impl == "engine" else None
    for e in epochs:
        if we is not None:
            out = we.step(e)
        else:
            out = reference_step(model, cfg, e, state)
            state = out.state
    return out


def set_(param, values):
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype).reshape(param.shape))


def close(t, values):
    torch.testing.assert_close(t.detach().flatten(), torch.tensor(values, dtype=t.dtype).flatten(), rtol=1e-6, atol=1e-7)


def mix(i, d, a=None):
    """Eq. (5)/(6): alpha*i + (1-alpha)*d with the adaptive alpha by default."""
    a = abs(i) / (abs(i) + abs(d)) if a is None else a
    return a * i + (1 - a) * d


# ------------------------------------------------------------------ Eq. (2)
def test_paper_schedule_known_points():
    cfg = WEConfig(rate=0.05, beta=2.5, eta=15, milestones=(60, 120))
    assert selection_rate(0, cfg) == pytest.approx(0.025, rel=1e-12)
    assert selection_rate(60, cfg) == pytest.approx(0.01, rel=1e-12)
    assert selection_rate(120, cfg) == pytest.approx(0.004, rel=1e-12)
    assert selection_rate(30, cfg) == pytest.approx(0.05 / (1 + math.exp(-2)), rel=1e-12)
    assert selection_rate(119, cfg) == pytest.approx(0.02 / (1 + math.exp(-59 / 15)), rel=1e-12)


@pytest.mark.parametrize("beta,divisors", [(2.5, (1, 2.5, 5, 10)), (2.0, (1, 2, 4, 8))])
def test_official_stage_divisors(beta, divisors):
    cfg = WEConfig(variant="official", rate=0.2, beta=beta, eta=8, milestones=(10, 20, 30))
    for stage_start, div in zip((0, 10, 20, 30), divisors):
        assert selection_rate(stage_start, cfg) == pytest.approx(0.2 / div * 0.5, rel=1e-12)
        assert selection_rate(stage_start + 4, cfg) == pytest.approx(0.2 / div / (1 + math.exp(-0.5)), rel=1e-12)


def test_pool_rates_and_reference_schedule_agree():
    for variant in ("paper", "official"):
        cfg = WEConfig(variant=variant, rate=0.3, rate_norm=0.1, rate_bias=0.7, beta=3, eta=4, milestones=(5, 5, 9))
        for e in range(0, 14):
            for pool in ("conv", "norm", "bias") + (("linear",) if variant == "paper" else ()):
                assert selection_rate(e, cfg, pool) == pytest.approx(ref_rate(e, cfg, pool), rel=1e-12)
        assert selection_rate(0, cfg, "norm") == pytest.approx(0.05)
        assert selection_rate(0, cfg, "bias") == pytest.approx(0.35)
    cfg = WEConfig(rate=0.4)
    assert selection_rate(0, cfg, "norm") == selection_rate(0, cfg, "bias") == selection_rate(0, cfg, "linear") == 0.2


# ------------------------------------------------------------------ WEConfig validation
INVALID = [
    ("rate", -0.1), ("rate", 1.5), ("rate_norm", -0.01), ("rate_norm", 2.0), ("rate_bias", 1.01),
    ("beta", 0.5), ("eta", 0.0), ("eta", -1.0), ("gamma", 0.0), ("gamma", 1.5), ("gamma", -0.1),
    ("variant", "paperish"), ("selection", "globally"), ("matching", "backward"), ("level", "slice"),
    ("layers", ("conv", "bn")), ("alpha", -0.1), ("alpha", 1.1), ("alpha", "fixed"),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        WEConfig(**{field: value})


def test_boundary_config_values_accepted():
    WEConfig(rate=0.0, rate_norm=1.0, rate_bias=0.0, beta=1.0, gamma=1.0, alpha=0.0)
    WEConfig(alpha=1.0, layers=("linear",), selection="local", matching="reverse", level="filter")


# ------------------------------------------------------------------ paper variant, by hand
@pytest.mark.parametrize("impl", IMPLS)
def test_paper_four_filter_conv(impl):
    """Local selection: f0 (RI 0.01) is inferior, f3 (largest L1) dominant; Eq. (5)/(6) per slice."""
    conv = nn.Conv2d(2, 4, (1, 2), bias=False)
    f = [[0.01, -0.02, 0.03, 0.005], [1.0, -2.0, 0.5, 0.25], [0.2, 0.1, -0.3, 0.4], [-3.0, 1.0, 2.0, -0.5]]
    set_(conv.weight, f)
    stats = run(impl, conv, WEConfig(selection="local", gamma=0.05))
    # slice 0: q = 0 (0.01), p = 0 (-3.0); slice 1: q = 1 (0.005), p = 0 (2.0)
    close(conv.weight[0], [mix(0.01, -3.0), -0.02, 0.03, mix(0.005, 2.0)])
    close(conv.weight[1:], f[1:])
    assert mix(0.01, -3.0) == pytest.approx(-2.99)
    assert stats.inferior == {"weight": 1} and stats.selected["conv"] == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("matching", ("forward", "reverse"))
def test_paper_matching_order(impl, matching):
    ln = nn.LayerNorm(6, bias=False)
    set_(ln.weight, [0.01, 5.0, 0.02, 3.0, 4.0, 1.0])
    run(impl, ln, WEConfig(selection="local", gamma=0.05, matching=matching))
    # inferior ascending [0.01, 0.02]; dominant ascending [4, 5]
    pairs = ((0.01, 4.0), (0.02, 5.0)) if matching == "forward" else ((0.01, 5.0), (0.02, 4.0))
    close(ln.weight, [mix(*pairs[0]), 5.0, mix(*pairs[1]), 3.0, 4.0, 1.0])


@pytest.mark.parametrize("impl", IMPLS)
def test_paper_cap_drops_least_inferior(impl):
    """3 inferior in a group of 4: capped at 2, the dominant set is the top 2 (incl. 0.03)."""
    ln = nn.LayerNorm(4, bias=False)
    set_(ln.weight, [0.01, 0.02, 0.03, 5.0])
    stats = run(impl, ln, WEConfig(selection="local", gamma=0.05))
    close(ln.weight, [mix(0.01, 0.03), mix(0.02, 5.0), 0.03, 5.0])
    assert stats.selected["norm"] == 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rate,n_tbd", [(0.25, 1), (0.75, 3)])
def test_paper_global_ties_earlier_first(impl, rate, n_tbd):
    """floor(r*n) smallest of the pool, ties broken earlier-in-traversal first."""
    m = nn.Sequential(nn.LayerNorm(4, bias=False), nn.LayerNorm(4, bias=False))
    for layer in m:
        set_(layer.weight, [1.0, 2.0, 3.0, 4.0])
    stats = run(impl, m, WEConfig(selection="global", rate=0.05, rate_norm=rate))  # r = rate/2 at epoch 0
    assert math.floor(stats.rates["norm"] * 8) == n_tbd
    if n_tbd == 1:
        close(m[0].weight, [mix(1.0, 4.0), 2, 3, 4])
        close(m[1].weight, [1, 2, 3, 4])
    else:  # tbd = m0[0], m1[0], m0[1]
        close(m[0].weight, [mix(1.0, 3.0), mix(2.0, 4.0), 3, 4])
        close(m[1].weight, [mix(1.0, 4.0), 2, 3, 4])


@pytest.mark.parametrize("impl", IMPLS)
def test_paper_first_index_on_ties_and_zero_pair(impl):
    conv = nn.Conv2d(3, 2, (1, 2), bias=False)
    inf = [0.01, -0.01, 0.0, 0.5, 0.01, 0.02]  # slices: tie in argmin; zero; plain
    dom = [2.0, -2.0, 0.0, 0.0, 3.0, 4.0]  # slices: tie in argmax; all zero; plain
    set_(conv.weight, [inf, dom])
    run(impl, conv, WEConfig(selection="local", gamma=0.5))
    close(conv.weight[0], [mix(0.01, 2.0), -0.01, 0.0, 0.5, mix(0.01, 4.0), 0.02])
    close(conv.weight[1], dom)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level,alpha", [("filter", "adaptive"), ("filter", 0.25), ("element", 0.25)])
def test_paper_filter_level_and_fixed_alpha(impl, level, alpha):
    conv = nn.Conv2d(2, 2, (1, 2), bias=False)
    inf, dom = [0.1, -0.2, 0.05, 0.3], [-1.0, 2.0, 3.0, -0.5]
    set_(conv.weight, [inf, dom])
    run(impl, conv, WEConfig(selection="local", gamma=0.5, level=level, alpha=alpha))
    if level == "filter":
        a = 0.65 / (0.65 + 6.5) if alpha == "adaptive" else alpha
        close(conv.weight[0], [a * i + (1 - a) * d for i, d in zip(inf, dom)])
    else:  # slice 0: q=0, p=1; slice 1: q=0, p=0
        close(conv.weight[0], [mix(0.1, 2.0, 0.25), -0.2, mix(0.05, 3.0, 0.25), 0.3])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups,expected", [(2, [0.5, 1.0, mix(0.02, 0.6), 0.6]), (4, [0.5, 1.0, mix(0.02, 1.0), 0.6])])
def test_paper_conv_groups(impl, groups, expected):
    """groups=2 < out: each conv group is a group; groups == out (depthwise): one group."""
    conv = nn.Conv2d(4, 4, 1, groups=groups, bias=False)
    vals = [0.5, 1.0, 0.02, 0.6]  # slice 0 holds the value, other slices are 0 (both-zero: unchanged)
    set_(conv.weight, [[v] + [0.0] * (conv.weight.shape[1] - 1) for v in vals])
    run(impl, conv, WEConfig(selection="local", gamma=0.05))
    close(conv.weight[:, 0], expected)
    close(conv.weight[:, 1:], [0.0] * (4 * (conv.weight.shape[1] - 1)))


@pytest.mark.parametrize("impl", IMPLS)
def test_paper_relative_importance_strictly_below_gamma(impl):
    ln = nn.LayerNorm(4, bias=False)
    set_(ln.weight, [0.5, 1.0, 0.25, 0.9])  # RI 0.5 == gamma is not inferior, RI 0.25 is
    run(impl, ln, WEConfig(selection="local", gamma=0.5))
    close(ln.weight, [0.5, 1.0, mix(0.25, 1.0), 0.9])


@pytest.mark.parametrize("impl", IMPLS)
def test_paper_frozen_weight_trainable_bias(impl):
    """requires_grad=False skips the parameter only; the layer's trainable bias still evolves."""
    conv = nn.Conv2d(1, 4, 1)
    set_(conv.weight, [0.01, 1.0, 0.5, 0.6])
    set_(conv.bias, [0.5, 1.0, 0.02, 0.6])
    conv.weight.requires_grad_(False)
    run(impl, conv, WEConfig(selection="local", gamma=0.05))
    close(conv.weight, [0.01, 1.0, 0.5, 0.6])
    close(conv.bias, [0.5, 1.0, mix(0.02, 1.0), 0.6])


# ------------------------------------------------------------------ official variant, by hand
def _counter_net():
    """4 1x1 convs (ln_per = 4 / ln_c = 2); only the first has filters below th, none <= gamma*max."""
    m = nn.Sequential(*[nn.Conv2d(2, 4, 1, bias=False) for _ in range(4)])
    set_(m[0].weight, [[v, v] for v in (1.0, 1.1, 1.2, 1.3)])
    for k in (1, 2, 3):
        set_(m[k].weight, [[10.0 + k + j] * 2 for j in range(4)])
    return m


OFFICIAL_COUNTER = dict(variant="official", rate=0.25, gamma=0.1, ln_c=2)  # th = 3rd smallest of 16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ln_c,steps", [(2, 2), (3, 2), (1, 4)])  # ln_per = 2, 1.33, 4
def test_official_counter_forces_one_pair(impl, ln_c, steps):
    cfg = WEConfig(**{**OFFICIAL_COUNTER, "ln_c": ln_c})
    m = _counter_net()
    run(impl, m, cfg, epochs=range(steps - 1))
    close(m[0].weight[:, 0], [1.0, 1.1, 1.2, 1.3])  # c == 0 each step: counter < ln_per, no change
    m = _counter_net()
    stats = run(impl, m, cfg, epochs=range(steps))  # counter reaches ln_per: c = 1, pair (most, least)
    a = 2.0 / (2.0 + 2.6)  # whole-filter branch (1x1): a = ||inf||_1 / (||inf||_1 + ||dom||_1)
    close(m[0].weight[:, 0], [1.0 * a + 1.3 * (1 - a), 1.1, 1.2, 1.3])
    close(m[0].weight[:, 1], [1.0 * a + 1.3 * (1 - a), 1.1, 1.2, 1.3])
    assert stats.inferior == {"0.weight": 1}


def test_official_counters_in_state_dict():
    cfg = WEConfig(**OFFICIAL_COUNTER)
    a, b, c = _counter_net(), _counter_net(), _counter_net()
    we_a = WeightEvolution(a, cfg)
    we_a.step(0)
    buf = io.BytesIO()
    torch.save(we_a.state_dict(), buf)
    buf.seek(0)
    we_b = WeightEvolution(b, cfg)
    we_b.load_state_dict(torch.load(buf))  # default torch.load (weights_only) must work
    we_c = WeightEvolution(c, cfg)  # fresh counters: no forced pair at the next step
    we_a.step(1), we_b.step(1), we_c.step(1)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, _counter_net()[0].weight)
    assert torch.equal(c[0].weight, _counter_net()[0].weight)


@pytest.mark.parametrize("impl", IMPLS)
def test_official_slice_ties_all_change(impl):
    conv = nn.Conv2d(2, 2, 3, bias=False)
    inf = [[0.1, -0.1, 0.1, 0.2, 0.3, 0.3, 0.4, 0.5, 0.6], [0.5, 0.7, 0.5, 0.8, 0.9, 1, 1, 1, 1]]
    dom = [[-20, 20, 10, 10, 10, 10, 10, 10, 10], [-0.5, 0.5] + [0.1] * 7]
    set_(conv.weight, [inf, dom])
    run(impl, conv, WEConfig(variant="official", rate=1.0, gamma=0.1))
    s, l_ = 0.1, -20.0  # slice 0: every element equal to s (signed) becomes l*a + s*(1-a), a = s/(s+l)
    new = l_ * (s / (s + l_)) + s * (1 - s / (s + l_))
    close(conv.weight[0, 0], [new, -0.1, new] + inf[0][3:])
    close(conv.weight[0, 1], inf[1])  # slice 1: s + l == 0 -> unchanged
    close(conv.weight[1], dom)


@pytest.mark.parametrize("impl", IMPLS)
def test_official_bn_pairs(impl):
    bn = nn.BatchNorm2d(4)
    set_(bn.weight, [0.01, 5.0, 0.02, 3.0])
    set_(bn.bias, [0.0, 0.0, 0.0, 0.0])
    run(impl, bn, WEConfig(variant="official", rate=0.2, rate_norm=1.0, gamma=0.1))
    # th = 3, high = 2, c = 2; idx desc [1, 3, 2, 0]: pairs (1 -> 2), (3 -> 0)
    close(bn.weight, [mix(0.01, 3.0), 5.0, mix(0.02, 5.0), 3.0])
    close(bn.bias, [0.0] * 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_official_inclusive_comparisons(impl):
    """high counts importance >= th (th itself); c counts importance <= max * gamma (inclusive)."""
    bn = nn.BatchNorm2d(4)
    set_(bn.weight, [0.1, 0.2, 3.0, 4.0])
    set_(bn.bias, [0.0] * 4)
    run(impl, bn, WEConfig(variant="official", rate_norm=0.5, gamma=0.5))  # int(4 * 0.25) = 1: th = 0.2
    close(bn.weight, [mix(0.1, 4.0), 0.2, 3.0, 4.0])  # high = 3, c = min(2, 1) = 1
    bn = nn.BatchNorm2d(4)
    set_(bn.weight, [1.0, 2.0, 3.0, 4.0])
    set_(bn.bias, [0.0] * 4)
    run(impl, bn, WEConfig(variant="official", rate_norm=1.0, gamma=0.25))  # th = 3; 1.0 <= 4 * 0.25
    close(bn.weight, [mix(1.0, 4.0), 2.0, 3.0, 4.0])


# ------------------------------------------------------------------ plug-in behaviour
@pytest.mark.parametrize("variant", ("paper", "official"))
def test_state_dict_round_trip_bitwise(variant):
    cfg = WEConfig(variant=variant, rate=0.5, rate_norm=0.5, rate_bias=0.5, gamma=0.3, milestones=(3,))
    a = perturb(ToyNet(), 5, low=0.3)
    we_a = WeightEvolution(a, cfg)
    we_a.step(0)
    b = copy.deepcopy(a)
    we_b = WeightEvolution(b, cfg)
    we_b.load_state_dict(copy.deepcopy(we_a.state_dict()))
    for e in range(1, 6):
        we_a.step(e), we_b.step(e)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), f"{n} differs after epoch {e}"
    assert str(we_a.state_dict()) == str(we_b.state_dict())


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision_params(dtype):
    model = perturb(ToyNet().to(dtype), 6)
    cfg = WEConfig(rate=0.5, gamma=0.5, layers=("conv", "norm", "linear"))
    assert assert_matches_reference(model, cfg, (0, 1), reperturb=lambda m, i: perturb(m, 60 + i),
                                    rtol=1e-2, atol=1e-3) > 0
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ("paper", "official"))
def test_non_finite_layer_skipped(variant, caplog):
    model = perturb(ToyNet() if variant == "paper" else nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), 7)
    bad = model.fc2 if variant == "paper" else model[0]  # fc2 has no bias
    with torch.no_grad():
        bad.weight.view(bad.weight.shape[0], -1)[0, 0] = float("nan")
        bad.weight.view(bad.weight.shape[0], -1)[1, 0] = float("inf")
    name = [n for n, p in model.named_parameters() if p is bad.weight][0]
    cfg = WEConfig(variant=variant, rate=0.5, rate_norm=0.5, rate_bias=0.5, gamma=0.5, layers=("conv", "norm", "linear"))
    engine_copy = copy.deepcopy(model)
    before = snapshot(engine_copy)
    with caplog.at_level(logging.WARNING):
        WeightEvolution(engine_copy, cfg).step(0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("we_timm")]
    assert len(warnings) == 1 and name in warnings[0].getMessage()  # one summary line per step, naming the layer
    assert not changed_mask(dict(engine_copy.named_parameters())[name], before[name]).any()
    assert all(torch.isfinite(p).all() for n, p in engine_copy.named_parameters() if n != name)
    assert assert_matches_reference(model, cfg, (0, 1)) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_weight_skips_its_whole_layer(impl):
    """"Layers with non-finite weights are skipped": the layer's finite bias is left alone too."""
    conv = nn.Conv2d(1, 4, 1)
    set_(conv.weight, [float("nan"), 1.0, 0.5, 0.6])
    set_(conv.bias, [0.5, 1.0, 0.02, 0.6])
    run(impl, conv, WEConfig(selection="local", gamma=0.05))
    close(conv.bias, [0.5, 1.0, 0.02, 0.6])
    assert torch.isnan(conv.weight[0]).all() and torch.isfinite(conv.weight[1:]).all()


def test_torch_compile_wrapper_is_unwrapped():
    model = perturb(ToyNet(), 8)
    cfg = WEConfig(rate=0.5, gamma=0.5)
    assert assert_matches_reference(model, cfg, (0, 1), wrap=torch.compile) > 0


def test_ddp_wrapper_is_unwrapped(tmp_path):
    """A single-process gloo DDP wrapper: parameters of the wrapped module are edited."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("gloo process group unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = perturb(ToyNet(), 12)
        model.frozen.weight.requires_grad_(True)  # DDP needs every parameter trainable or ignored
        model.frozen_bn.requires_grad_(True)
        wrap = nn.parallel.DistributedDataParallel
        assert assert_matches_reference(model, WEConfig(rate=0.5, gamma=0.5), (0, 1), wrap=wrap) > 0
    finally:
        dist.destroy_process_group()


def test_stats_consistency_and_names():
    model = perturb(ToyNet(), 9)
    before = snapshot(model)
    stats = WeightEvolution(model, WEConfig(rate=0.5, gamma=0.5, layers=("conv", "norm", "linear"))).step(0)
    names = dict(model.named_parameters())
    changed = sum(int(changed_mask(p, before[n]).sum()) for n, p in names.items())
    assert stats.changed == changed > 0
    assert sum(stats.selected.values()) == sum(stats.inferior.values()) > 0
    assert set(stats.inferior) <= set(names) and all(v > 0 for v in stats.inferior.values())
    assert "shared.weight" not in stats.inferior and "frozen.weight" not in stats.inferior
    assert torch.equal(model.frozen.weight, before["frozen.weight"])
    assert torch.equal(model.frozen_bn.weight, before["frozen_bn.weight"])
    assert all(isinstance(v, (int, float, str, bool)) for v in stats.to_dict().values())


def test_module_types_outside_the_spec_untouched():
    """ConvTranspose, InstanceNorm, Embedding, RMSNorm, MHA in_proj: not layers of any pool."""
    model = nn.ModuleDict(dict(
        conv=nn.Conv2d(4, 8, 3), convt=nn.ConvTranspose2d(8, 8, 3), inorm=nn.InstanceNorm2d(8, affine=True),
        emb=nn.Embedding(10, 8), rms=nn.RMSNorm(8), mha=nn.MultiheadAttention(8, 2), bn=nn.BatchNorm2d(8)))
    perturb(model, 10)
    with torch.no_grad():
        for p in (model.rms.weight, model.mha.in_proj_weight, model.emb.weight):
            p.normal_()
    before = snapshot(model)
    cfg = WEConfig(rate=1.0, gamma=1.0, selection="global", layers=("conv", "norm", "linear"))
    for variant in ("paper", "official"):
        assert_matches_reference(model, WEConfig(**{**cfg.to_dict(), "variant": variant}), (0,))
    for name in ("convt.weight", "convt.bias", "inorm.weight", "inorm.bias", "emb.weight", "rms.weight",
                 "mha.in_proj_weight", "mha.in_proj_bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_zero_rate_changes_nothing():
    model = perturb(ToyNet(), 11)
    before = snapshot(model)
    stats = WeightEvolution(model, WEConfig(rate=0.0, selection="global")).step(3)
    assert stats.changed == 0 and sum(stats.selected.values()) == 0 and not stats.inferior
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
