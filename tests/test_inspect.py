"""`WeightEvolution.plan` (the dry run `step` is made of), `python -m we_timm.inspect` and train.py's
`--we-inspect-every`: the report equals what `step` does, the checkpoint is never touched, bad input is one line."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from helpers import snapshot
from test_train import DIGITS, TINY, run_train, subprocess_env
from we_timm import WEConfig, WeightEvolution
from we_timm.recipes import inspect
from we_timm.recipes.checkpoint import save_safetensors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# rates and gamma high enough that the conv, norm and bias pools of a perturbed test_resnet all evolve something
CONFIGS = {
    "paper": WEConfig(rate=0.3, gamma=0.5),
    "official": WEConfig(variant="official", rate=0.3, rate_norm=0.2, rate_bias=0.2, gamma=0.5),
}
EPOCH = 3


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def changed_per_param(before: dict, model: torch.nn.Module) -> dict[str, int]:
    return {n: int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_plan_is_what_step_does(timm_model, one_thread, variant):
    cfg = CONFIGS[variant]
    model = timm_model("test_resnet", seed=1)
    we = WeightEvolution(model, cfg)
    we.counters = {pool: 1 for pool in we.counters}  # non-trivial official counters
    before = snapshot(model)
    plan = we.plan(EPOCH)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "plan modified the model"
    assert we.counters == {pool: 1 for pool in we.counters} and we.num_steps == 0 and we.last_epoch is None
    stats = we.step(EPOCH)
    assert we.counters == plan.counters
    assert {pool: p.paired for pool, p in plan.pools.items()} == stats.selected
    assert all(stats.selected[pool] > 0 for pool in ("conv", "norm", "bias")), stats.selected
    assert {u.name: u.paired for u in plan.units if u.paired} == stats.inferior
    assert {u.name: u.changed for u in plan.units} == {
        n: c for n, c in changed_per_param(before, model).items() if n in {u.name for u in plan.units}}
    assert sum(u.changed for u in plan.units) == stats.changed > 0
    assert {pool: p.rate for pool, p in plan.pools.items()} == stats.rates
    for u in plan.units:
        assert u.imp_min <= u.imp_median <= u.imp_max
        assert u.paired <= u.inferior and u.paired <= u.filters // 2
    conv = plan.pools["conv"]
    if variant == "paper":  # the threshold is the largest importance among the globally selected filters
        imp = torch.cat([u.importance for u in plan.units if u.pool == "conv"])
        assert conv.selected_global == int(conv.rate * conv.filters)
        assert conv.threshold == float(torch.sort(imp).values[conv.selected_global - 1])


def write_checkpoint(model: torch.nn.Module, path: Path, cfg: WEConfig | None) -> None:
    meta = {"format": "we_timm", "architecture": "test_resnet", "num_classes": model.num_classes, "epoch": EPOCH,
            "we_config": cfg.to_dict() if cfg else None, "model_kwargs": {}}
    save_safetensors(path, model.state_dict(), meta)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_cli_report_matches_step_and_leaves_checkpoint(timm_model, one_thread, tmp_path: Path, capsys, variant):
    cfg = CONFIGS[variant]
    model = timm_model("test_resnet", seed=2, num_classes=10)
    ckpt = tmp_path / "model.safetensors"
    write_checkpoint(model, ckpt, cfg)
    data, mtime = ckpt.read_bytes(), ckpt.stat().st_mtime_ns
    assert inspect.cli([str(ckpt), "--output-dir", str(tmp_path / "out")]) == 0
    assert ckpt.read_bytes() == data and ckpt.stat().st_mtime_ns == mtime
    assert (tmp_path / "out" / inspect.PNG_NAME).read_bytes()[:8] == PNG_MAGIC
    rows = read_rows(tmp_path / "out" / inspect.CSV_NAME)
    before = snapshot(model)
    stats = WeightEvolution(model, cfg).step(EPOCH)  # the metadata's config, the metadata's epoch
    changed = changed_per_param(before, model)
    assert {r["name"]: int(r["paired"]) for r in rows if int(r["paired"])} == stats.inferior
    assert {r["name"]: int(r["changed"]) for r in rows} == {r["name"]: changed[r["name"]] for r in rows}
    assert {r["pool"] for r in rows if int(r["paired"])} == {"conv", "norm", "bias"}
    assert all(int(r["epoch"]) == EPOCH for r in rows)
    out = capsys.readouterr().out
    assert f"WE plan for epoch {EPOCH} ({variant} variant)" in out and "conv" in out


def test_cli_flags_override_the_checkpoint_config(timm_model, one_thread, tmp_path: Path, capsys):
    model = timm_model("test_resnet", seed=3, num_classes=10)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pth.tar")  # timm file, no metadata
    plan = inspect.main([str(tmp_path / "plain.pth.tar"), "--model", "test_resnet", "--output-dir",
                         str(tmp_path / "o"), "--we-rate", "0.3", "--we-gamma", "0.5", "--we-layers", "conv"])
    assert plan.epoch == 0 and plan.pools["conv"].paired > 0 and plan.pools["norm"].filters == 0
    assert plan.pools["conv"].rate == pytest.approx(0.3 * torch.sigmoid(torch.tensor(0.0)).item())
    assert inspect.given_we_fields(["x", "--output-dir", "o", "--we-gamma", "0.05"]) == {"gamma": 0.05}


def test_training_state_with_model_kwargs(one_thread, tmp_path: Path):
    """A train.py training state: architecture and create_model kwargs from its args, WE config from its WE state."""
    import timm

    kwargs = {"layers": [1, 1, 1, 0], "channels": [8, 16, 16, 16], "stem_width": 8}
    model = timm.create_model("resnet18", num_classes=10, **kwargs)
    cfg = WEConfig(variant="official", gamma=0.3, milestones=(4,))
    state = {"model": model.state_dict(), "epoch": 2, "we": WeightEvolution(model, cfg).state_dict(),
             "args": {"model": "resnet18", "num_classes": 10, "model_kwargs": kwargs, "gp": None}}
    torch.save(state, tmp_path / "last.pth.tar")
    plan = inspect.main([str(tmp_path / "last.pth.tar"), "--output-dir", str(tmp_path / "o")])
    assert plan.epoch == 2 and plan.variant == "official" and set(plan.pools) == {"conv", "norm", "bias"}
    assert {u.name for u in plan.units} >= {"conv1.weight", "layer3.0.conv2.weight"}


def _bad_cases(tmp_path: Path, model: torch.nn.Module) -> dict[str, tuple[list[str], str]]:
    good = tmp_path / "good.safetensors"
    write_checkpoint(model, good, None)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pth")
    (tmp_path / "afile").write_text("x")
    out = ["--output-dir", str(tmp_path / "o")]
    return {
        "missing file": ([str(tmp_path / "missing.safetensors"), *out], "not found"),
        "no metadata, no --model": ([str(tmp_path / "plain.pth"), *out], "--model"),
        "rate out of range": ([str(good), *out, "--we-rate", "2"], "--we-rate"),
        "bad gamma": ([str(good), *out, "--we-gamma", "0"], "--we-gamma"),
        "output dir is a file": ([str(good), "--output-dir", str(tmp_path / "afile")], "not a directory"),
        "negative epoch": ([str(good), *out, "--epoch", "-1"], "--epoch"),
    }


def test_bad_input_is_one_error_line(timm_model, one_thread, tmp_path: Path):
    for case, (argv, needle) in _bad_cases(tmp_path, timm_model("test_resnet", num_classes=10)).items():
        with pytest.raises(SystemExit) as e:
            inspect.cli(argv)
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message and needle in message, (case, message)
    assert not (tmp_path / "o").exists()


def test_bad_input_subprocess_exit_status(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "we_timm.inspect", str(tmp_path / "missing.safetensors"),
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_train_inspect_every(tmp_path: Path, capsys):
    run_train([*TINY, *DIGITS, "--epochs", "2", "--weight-evolution", "--we-inspect-every", "1", "--checkpoint-hist",
               "0", "--output", str(tmp_path), "--experiment", "insp"], cwd=tmp_path)
    folder = tmp_path / "insp" / "we_inspect"
    assert sorted(os.listdir(folder)) == ["epoch_0.csv", "epoch_0.png"]  # no step after the last epoch
    assert (folder / "epoch_0.png").read_bytes()[:8] == PNG_MAGIC
    rows = read_rows(folder / "epoch_0.csv")
    jsonl = (tmp_path / "insp" / "we_stats.jsonl").read_text()
    record = json.loads(jsonl.splitlines()[0])
    assert {r["name"]: int(r["paired"]) for r in rows if int(r["paired"])} == record["inferior"]
    assert sum(int(r["changed"]) for r in rows) == record["we_changed"]
    # the training state: WE config and epoch come from it
    plan = inspect.main([str(tmp_path / "insp" / "last.pth.tar"), "--output-dir", str(tmp_path / "state")])
    assert plan.epoch == 1 and plan.pools["conv"].rate > 0
    with pytest.raises(SystemExit, match="--we-inspect-every must be >= 0"):
        train.cli([*TINY, "--we-inspect-every", "-1", "--output", str(tmp_path / "never")])
