"""WE over a zoo of timm architectures (pretrained=False, perturbed).

For each model: the paper variant with local selection and gamma=1 must change
exactly the evolvable parameters (conv/norm weights and biases, per the spec's
discovery rules, computed by the reference) that hold a group of >= 2 filters,
and nothing else (no linear weights, no buffers); the official variant with
high rates must change only Conv2d weights and BatchNorm2d weights/biases.
Both must raise nothing and create no non-finite value.
"""
from __future__ import annotations

import pytest
import timm
import torch

from helpers import changed_mask, perturb, snapshot
from reference_we import discover
from we_timm import WEConfig, WeightEvolution

ZOO = [
    "resnet18", "resnet50d", "mobilenetv2_050", "mobilenetv3_small_050", "efficientnet_b0",
    "convnext_atto", "resnext26ts", "regnetx_002", "ghostnet_050", "mnasnet_050", "densenet121",
    "dla34", "dpn68", "hrnet_w18_small", "tf_efficientnet_lite0", "levit_128s",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224",
    "poolformer_s12", "efficientformer_l1", "mobilevit_xxs", "edgenext_xx_small", "repvgg_a0",
    "rexnet_100", "lcnet_050", "tinynet_e", "fbnetc_100", "cspresnet50", "selecsls42b",
    "hardcorenas_a", "gernet_s", "eca_nfnet_l0", "seresnext26d_32x4d", "regnety_002",
    "mobileone_s0", "fastvit_t8", "efficientvit_b0", "xcit_nano_12_p16_224", "res2net50_26w_4s",
    "ese_vovnet19b_dw", "mobilenetv4_conv_small", "coatnet_nano_rw_224",
]
AVAILABLE = [n for n in ZOO if timm.list_models(n)]

PAPER = WEConfig(selection="local", gamma=1.0, layers=("conv", "norm"))
OFFICIAL = WEConfig(variant="official", rate=0.5, rate_norm=0.5, rate_bias=0.5, gamma=0.3)


def test_zoo_is_large_enough():
    assert len(AVAILABLE) >= 30, sorted(set(ZOO) - set(AVAILABLE))


def _changed(model, before) -> set:
    for name, b in model.named_buffers():
        assert torch.equal(b, before["buffer:" + name]), f"buffer {name} changed"
    out = set()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} has non-finite values"
        if changed_mask(p.detach(), before[name]).any():
            out.add(name)
    return out


@pytest.mark.parametrize("name", AVAILABLE)
def test_zoo_model(name):
    model = perturb(timm.create_model(name, pretrained=False, num_classes=10), seed=0)
    units = discover(model, PAPER)
    # every evolvable parameter with a local group of >= 2 filters has a pair under gamma = 1
    expected = {u.name for u in units if max(len(g) for g in u.groups) >= 2}
    before = snapshot(model)
    stats = WeightEvolution(model, PAPER).step(0)
    changed = _changed(model, before)
    assert changed == expected, (f"changed but not evolvable: {sorted(changed - expected)[:5]}; "
                                 f"evolvable but unchanged: {sorted(expected - changed)[:5]}")
    assert set(stats.inferior) == expected
    assert stats.changed > 0

    allowed = {u.name for u in discover(model, OFFICIAL)}
    if not allowed:  # no Conv2d / BatchNorm2d at all (e.g. a pure transformer)
        return
    perturb(model, seed=1)
    before = snapshot(model)
    we = WeightEvolution(model, OFFICIAL)
    for epoch in range(2):
        stats = we.step(epoch)
        assert set(stats.inferior) <= allowed
    changed = _changed(model, before)
    assert changed and changed <= allowed, sorted(changed - allowed)[:5]
