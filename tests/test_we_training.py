"""What a WE step touches besides the model: the EMA (--we-ema) and the optimizer state (--we-reset-opt-state)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

import train
from helpers import perturb
from test_reliability import DIGITS_RUN_ARGS
from test_train import TINY, digits_run, read_csv, run_train  # noqa: F401  (digits_run: fixture)
from we_timm import WEConfig, WeightEvolution
from we_timm.recipes import evolve
from we_timm.recipes.checkpoint import load_weights
from we_timm.recipes.resuming import load_state


def test_zero_changed_state_resets_only_changed_elements():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    before = {p: p.detach().clone() for p in model.parameters()}
    momentum = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    with torch.no_grad():
        model.weight[1, 2] += 1.0
    assert evolve.zero_changed_state(SimpleNamespace(optimizer=opt), before) == 1
    expected = momentum[model.weight].clone()
    expected[1, 2] = 0
    assert torch.equal(opt.state[model.weight]["momentum_buffer"], expected)
    assert torch.equal(opt.state[model.bias]["momentum_buffer"], momentum[model.bias])


def test_evolve_with_ema_and_optimizer_reset():
    """--we-ema evolve: the EMA gets its own step; --we-reset-opt-state: Adam moments of changed values are 0."""
    model = perturb(timm.create_model("test_resnet", num_classes=3), seed=0)
    ema = perturb(timm.create_model("test_resnet", num_classes=3), seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    cfg = WEConfig(rate=0.3, gamma=0.5)
    ema_before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    t = SimpleNamespace(args=SimpleNamespace(we_reset_opt_state=True), we=WeightEvolution(model, cfg),
                        we_ema=WeightEvolution(ema, cfg), optimizer=opt, accelerator=SimpleNamespace(num_processes=1),
                        history=[], we_records=[])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evolve.evolve(t, 0)
    row = t.history[-1]
    assert row["we_changed"] > 0 and row["we_ema_changed"] > 0 and row["we_opt_state_reset"] == row["we_changed"]
    assert any(not torch.equal(p, ema_before[n]) for n, p in ema.named_parameters())
    for n, p in model.named_parameters():
        changed = p.detach() != before[n]
        if changed.any():
            assert (opt.state[p]["exp_avg"][changed] == 0).all() and (opt.state[p]["exp_avg_sq"][changed] == 0).all()


def test_we_ema_evolve_run_keeps_the_model_and_resumes(digits_run: Path, tmp_path: Path):  # noqa: F811
    """The model's trajectory does not depend on --we-ema (bit for bit); the EMA does; its WE state is saved."""
    run_train([*DIGITS_RUN_ARGS, "--we-ema", "evolve", "--output", str(tmp_path), "--experiment", "ev"], cwd=tmp_path)
    a, _ = load_weights(digits_run / "last.safetensors")
    b, _ = load_weights(tmp_path / "ev" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, _ = load_weights(digits_run / "last_ema.safetensors")
    b, _ = load_weights(tmp_path / "ev" / "last_ema.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert int(read_csv(tmp_path / "ev" / "summary.csv")[0]["we_ema_changed"]) > 0
    assert load_state(str(tmp_path / "ev" / "last.pth.tar"))["we_ema"]["num_steps"] == 2


def test_we_ema_evolve_needs_an_ema(tmp_path: Path):
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", "--weight-evolution", "--we-ema", "evolve", "--output", str(tmp_path / "o")])
    assert str(e.value.code) == "error: --we-ema evolve needs --model-ema"
