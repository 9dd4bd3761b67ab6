"""Real runs of train.py on tiny data (digits, a synthetic ImageFolder), plus its pure helpers.

Runs are subprocesses, shared by module fixtures: a 3-epoch digits run with WE
and EMA is checked for outputs and resumed from its epoch-1 checkpoint
(bitwise identical end weights); a 2-process DDP run with WE; a bf16 autocast
run and a WE-off run on an ImageFolder.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import train
from we_timm import WEConfig
from we_timm.recipes import engine, errors, evolve, files, resuming, state
from we_timm.recipes.checkpoint import load_weights
from we_timm.recipes.evolve import checksums
from we_timm.recipes.keeper import CheckpointKeeper

ROOT = Path(__file__).resolve().parents[1]
TIMM_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
# test_resnet at 32 px: ~0.4M params; multistep milestone 2 = LR decay from epoch 1 (timm), i.e. two WE stages
TINY = [
    "--model", "test_resnet", "--img-size", "32", "-b", "32", "--sched", "multistep", "--decay-milestones", "2",
    "--warmup-epochs", "0", "--lr", "0.05", "--log-interval", "2", "--workers", "0",
]
DIGITS = ["--dataset", "digits", "--train-num-samples", "128", "--val-num-samples", "64"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of every train.py subprocess. One intra-op thread each: runs that are compared bitwise
    (uninterrupted vs killed + resumed) must use the same thread count, as reduction order depends on it."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **extra}


def run_train(args: list[str], cwd: Path, launcher: list[str] | None = None, env: dict | None = None) -> str:
    """Run train.py (optionally under `accelerate launch`), assert success, return its combined output."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args]
    env = subprocess_env(**(env or {}))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def no_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """summary.csv rows without the one column that is measured time (`we_time_s`)."""
    return [{k: v for k, v in r.items() if k != "we_time_s"} for r in rows]


def make_image_folder(root: Path, classes: int = 3, train: int = 16, val: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("validation", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (20, 24, 3)) + 90 * c  # class = brightness band
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """3 epochs on digits with WE, EMA, mixup, random erasing and drop-path; all checkpoints kept."""
    work = tmp_path_factory.mktemp("digits")
    run_train([*TINY, *DIGITS, "--epochs", "3", "--weight-evolution", "--model-ema", "--model-ema-decay", "0.9",
               "--mixup", "0.2", "--reprob", "0.2", "--drop-path", "0.05", "--checkpoint-hist", "3",
               "--plot-summary", "--output", str(work / "out"), "--experiment", "full"], cwd=work)
    return work / "out" / "full"


def test_run_outputs(digits_run: Path):
    for name in ("args.yaml", "summary.csv", "we_stats.jsonl", "summary.png", "last.safetensors", "last_ema.safetensors",
                 "last.pth.tar", "model_best.safetensors", "model_best_ema.safetensors"):
        assert (digits_run / name).is_file(), name
    for epoch in range(3):  # per epoch, timm's files only: the training state and its kept copies
        assert (digits_run / f"checkpoint-{epoch}.pth.tar").is_file()
    assert sorted(p.name for p in digits_run.glob("*.safetensors")) == [
        "last.safetensors", "last_ema.safetensors", "model_best.safetensors", "model_best_ema.safetensors"]
    assert (digits_run / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in digits_run.iterdir() if p.name.endswith(".tmp")]


def test_release_files_hold_their_training_states(digits_run: Path):
    """`last*` / `model_best*.safetensors`, written when the run ends, are the weights of `last.pth.tar` /
    `model_best.pth.tar`, with that epoch's evaluation and the state's token in their metadata."""
    for stem in ("last", "model_best"):
        saved = resuming.load_state(str(digits_run / f"{stem}.pth.tar"))
        assert saved["metrics"]["model"].keys() == saved["metrics"]["ema"].keys() == {"loss", "top1", "top5"}
        for kind, suffix in (("model", ""), ("ema", "_ema")):
            weights, meta = load_weights(digits_run / f"{stem}{suffix}.safetensors")
            expected = resuming.model_weights(saved, ema=kind == "ema")
            assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
            assert (meta["epoch"], meta["token"], meta["ema"]) == (saved["epoch"], saved["token"], kind == "ema")
            assert meta["metrics"] == saved["metrics"][kind]
    best = read_csv(digits_run / "summary.csv")[resuming.load_state(str(digits_run / "model_best.pth.tar"))["epoch"]]
    assert load_weights(digits_run / "model_best_ema.safetensors")[1]["metrics"]["top1"] == float(best["eval_top1"])


def test_summary_and_we_stats(digits_run: Path):
    rows = read_csv(digits_run / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert list(rows[0])[:6] == TIMM_COLUMNS
    assert {"we_rate_conv", "we_rate_norm", "we_selected_norm", "we_inferior", "we_time_s"} <= set(rows[0])
    assert float(rows[0]["we_rate_conv"]) > float(rows[1]["we_rate_conv"]) > 0  # stage 2 after the LR decay at 1
    assert rows[2]["we_rate_conv"] == ""  # no step after the last epoch
    records = [json.loads(line) for line in (digits_run / "we_stats.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert sum(records[0]["inferior"].values()) == records[0]["we_inferior"]


def test_checkpoints_load(digits_run: Path):
    state_dict, meta = load_weights(digits_run / "last.safetensors")
    assert meta["format"] == "we_timm" and meta["architecture"] == "test_resnet" and meta["num_classes"] == 10
    assert meta["epoch"] == 2 and meta["ema"] is False and set(meta["metrics"]) == {"top1", "top5", "loss"}
    assert meta["data_config"]["input_size"] == [3, 32, 32] and meta["we_config"]["milestones"] == [1]
    assert meta["args"]["model"] == "test_resnet"
    model = timm.create_model(meta["architecture"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    model.load_state_dict(state_dict)  # timm-compatible keys, strict
    _, ema_meta = load_weights(digits_run / "last_ema.safetensors")
    assert ema_meta["ema"] is True
    state = torch.load(digits_run / "last.pth.tar", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["we"]["last_epoch"] == 1
    assert {"state_dict", "state_dict_ema", "optimizer", "scheduler", "scaler", "checkpoints", "args", "arch"} <= set(state)
    assert "rng" not in state  # every epoch re-seeds from (seed, epoch, rank): no RNG state to keep


def test_args_yaml_round_trip(digits_run: Path):
    args = train.parse_args(["-c", str(digits_run / "args.yaml")])
    saved = load_weights(digits_run / "last.safetensors")[1]["args"]
    for key, value in saved.items():
        if key not in ("config",):
            assert files.json_safe(getattr(args, key)) == value, key


def test_resume_is_bitwise_identical(digits_run: Path, tmp_path: Path):
    # no -c: the settings come from the training state itself
    out = run_train(["--resume", str(digits_run / "checkpoint-1.pth.tar"), "--output", str(tmp_path),
                     "--experiment", "resumed"], cwd=tmp_path)
    assert "WE step 1" in out  # the step pending in the epoch-1 checkpoint is applied first
    resumed = tmp_path / "resumed"
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, _ = load_weights(digits_run / name)
        b, _ = load_weights(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert no_time(read_csv(resumed / "summary.csv")) == no_time(read_csv(digits_run / "summary.csv"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_with_we(tmp_path: Path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    out = run_train([*TINY, *DIGITS, "-b", "16", "--epochs", "3", "--weight-evolution", "--model-ema",
                     "--output", str(tmp_path), "--experiment", "ddp"], cwd=tmp_path, launcher=launcher,
                    env={"ACCELERATE_USE_CPU": "1"})
    assert "2 process(es)" in out
    # checked after epochs 0 and 1 (not after the last): --dist-bn reduce (default) syncs BN stats of model and EMA
    assert out.count("parameters, BN statistics and EMA identical on 2 ranks") == 2
    rows = read_csv(tmp_path / "ddp" / "summary.csv")
    assert len(rows) == 3 and rows[0]["we_inferior"] != ""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder") / "data")


def test_bf16_autocast_with_we(image_folder: Path, tmp_path: Path):
    out = run_train([*TINY, "--data-dir", str(image_folder), "-b", "8", "--epochs", "2", "--weight-evolution",
                     "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--output", str(tmp_path), "--experiment", "bf16"],
                    cwd=tmp_path)
    assert "mixed precision bf16" in out
    state_dict, meta = load_weights(tmp_path / "bf16" / "last.safetensors")
    assert meta["num_classes"] == 3  # from the folder's classes
    assert all(v.dtype == torch.float32 for k, v in state_dict.items() if v.is_floating_point())
    assert read_csv(tmp_path / "bf16" / "summary.csv")[0]["we_changed"] != ""


def test_we_off_grad_accum_clip_adamw_tensorboard(image_folder: Path, tmp_path: Path):
    run_train([*TINY, "--data-dir", str(image_folder), "-b", "8", "--epochs", "2", "--opt", "adamw", "--lr", "1e-3",
               "--grad-accum-steps", "2", "--clip-grad", "1.0", "--sched", "cosine", "--smoothing", "0",
               "--log-tensorboard", "--output", str(tmp_path), "--experiment", "plain"], cwd=tmp_path)
    run = tmp_path / "plain"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not [c for c in read_csv(run / "summary.csv")[0] if c.startswith("we_")]
    assert not (run / "we_stats.jsonl").exists()
    assert not (run / "summary.png").exists()  # drawn only with --plot-summary
    assert load_weights(run / "last.safetensors")[1]["we_config"] is None


# ----------------------------------------------------------------------------- in-process: arguments and helpers


def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: test_resnet\nbatch_sise: 8\n")
    cases = [["-c", str(bad)], ["--model", "no_such_model"], ["--data-dir", str(tmp_path / "missing")],
             ["--weight-evolution", "--we-gamma", "0"], ["--resume", str(tmp_path / "missing.pth.tar")]]
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            train.cli([*argv, "--output", str(tmp_path / "out")])
        assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code), argv
    assert not (tmp_path / "out").exists()


def test_yaml_values_are_typed_and_cli_wins(tmp_path: Path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 1e-4\nweight-decay: 5e-4\nepochs: 7\nwe_alpha: 0.3\nmodel_kwargs: {zero_init_last: false}\n")
    args = train.parse_args(["-c", str(cfg), "--epochs", "9"])
    assert args.lr == 1e-4 and args.weight_decay == 5e-4 and args.epochs == 9 and args.we_alpha == 0.3
    assert args.model_kwargs == {"zero_init_last": False} and args.dataset == "digits"
    cfg.write_text("weight_evolution: true\n")
    assert train.parse_args(["-c", str(cfg)]).weight_evolution
    assert not train.parse_args(["-c", str(cfg), "--no-weight-evolution"]).weight_evolution  # baseline from a WE config
    cfg.write_text("epochs: 2.5\n")
    with pytest.raises(ValueError, match="epochs"):
        train.parse_args(["-c", str(cfg)])


def test_every_weconfig_field_has_a_flag():
    dests = {a.dest for a in train.get_args_parser()._actions}
    assert {f"we_{f.name}" for f in dataclasses.fields(WEConfig)} <= dests


@pytest.mark.parametrize("argv, milestones", [
    (["--sched", "step", "--decay-epochs", "30", "--epochs", "90", "--warmup-epochs", "0"], (30, 60)),
    (["--sched", "multistep", "--decay-milestones", "61", "121", "--epochs", "200", "--warmup-epochs", "0"], (60, 120)),
    (["--sched", "cosine", "--epochs", "20"], ()),
    (["--sched", "step", "--we-milestones", "5", "9"], (5, 9)),
])
def test_we_milestones_follow_lr_decay(argv, milestones):
    cfg = train.we_config_from_args(train.parse_args(["--weight-evolution", *argv]))
    assert cfg.milestones == milestones


def test_param_checksums_see_one_ulp():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Conv2d(3, 2, 1))
    before = checksums(model.parameters())
    with torch.no_grad():
        w = model[1].weight.view(-1)
        w[3] = torch.nextafter(w[3], torch.tensor(float("inf")))
    after = checksums(model.parameters())
    assert (before != after).tolist() == [False, False, True, False]


@pytest.mark.parametrize("dist_bn, ema", [("reduce", True), ("", False)])
def test_rank_mismatch_is_reported(dist_bn: str, ema: bool):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    t = SimpleNamespace(raw_model=model, args=SimpleNamespace(dist_bn=dist_bn),
                        model_ema=SimpleNamespace(module=copy.deepcopy(model)) if ema else None)
    names = [n for n, _ in evolve.synced_tensors(t)]
    expected = ["0.weight", "0.bias", "1.weight", "1.bias"]
    expected += ["1.running_mean", "1.running_var"] if dist_bn else []
    assert names == expected + [f"ema.{n}" for n in expected if ema]
    for bad in range(len(names)):
        other = checksums(v for _, v in evolve.synced_tensors(t)).clone()
        other[bad] += 1
        t.accelerator = SimpleNamespace(gather=lambda x: torch.cat([x, other[None]]), num_processes=2)
        with pytest.raises(errors.RankMismatchError, match=re.escape(names[bad])):
            evolve.check_ranks_agree(t, epoch=3)


def test_checkpoint_keeper_keeps_top_k(tmp_path: Path):
    keeper = CheckpointKeeper(str(tmp_path), max_history=2, decreasing=False)
    assert keeper.rank(0, 10.0) == (True, [], True)
    assert keeper.rank(1, 30.0) == (True, [], True)
    assert keeper.rank(2, 20.0) == (True, [0], False)
    assert keeper.rank(3, 5.0) == (False, [3], False)
    assert keeper.kept == [(30.0, 1), (20.0, 2)] and keeper.best == (30.0, 1)


def _epoch_state(epoch: int, token: str | None, ema: bool, kept: list, best: list) -> dict:
    weights = {"w": torch.full((2,), float(epoch))}
    return {"format": resuming.STATE_FORMAT, "version": resuming.STATE_VERSION, "epoch": epoch, "token": token,
            "metrics": {"model": {"top1": float(epoch)}, "ema": {"top1": -float(epoch)}}, "state_dict": weights,
            "state_dict_ema": {"w": -weights["w"]} if ema else None, "checkpoints": {"kept": kept, "best": best},
            "architecture": "test_resnet", "num_classes": 2}


def test_release_files_follow_the_states_on_disk(tmp_path: Path):
    """`write_release_files` mends the links from last.pth.tar's ranking, writes each release file from its
    state once (model_best of the same state: a link), rewrites what another state left, removes an EMA file
    a state without EMA would leave stale, and rewrites nothing on a second call; bulk validation lists each
    set of weights once, without recovery.pth.tar."""
    from we_timm.recipes.checkpoint import atomic_save, read_metadata
    from we_timm.recipes.models import checkpoint_files

    t = SimpleNamespace(out_dir=str(tmp_path), keeper=CheckpointKeeper(str(tmp_path), max_history=2))
    names = lambda paths: sorted(os.path.basename(p) for p in paths)  # noqa: E731
    # a stop right after epoch 0's state: its links were not made yet
    atomic_save(_epoch_state(0, "a", True, [[1.0, 0]], [1.0, 0]), tmp_path / "last.pth.tar")
    assert names(state.write_release_files(t)) == [
        "checkpoint-0.pth.tar", "last.safetensors", "last_ema.safetensors", "model_best.pth.tar",
        "model_best.safetensors", "model_best_ema.safetensors"]
    assert os.path.samefile(tmp_path / "model_best.safetensors", tmp_path / "last.safetensors")
    weights, meta = load_weights(tmp_path / "last_ema.safetensors")
    assert torch.equal(weights["w"], torch.zeros(2)) and (meta["token"], meta["epoch"], meta["ema"]) == ("a", 0, True)
    assert meta["metrics"] == {"top1": -0.0} and meta["architecture"] == "test_resnet" and meta["format"] == "we_timm"
    assert state.write_release_files(t) == []
    # epoch 1, not the best, resumed without EMA: last* follow it, model_best* stay epoch 0's
    atomic_save(_epoch_state(1, "b", False, [[1.0, 0], [0.5, 1]], [1.0, 0]), tmp_path / "last.pth.tar")
    assert names(state.write_release_files(t)) == ["checkpoint-1.pth.tar", "last.safetensors", "last_ema.safetensors"]
    assert not (tmp_path / "last_ema.safetensors").exists()
    assert read_metadata(tmp_path / "last.safetensors")["token"] == "b"
    assert [read_metadata(tmp_path / f"model_best{k}.safetensors")["token"] for k in ("", "_ema")] == ["a", "a"]
    atomic_save(_epoch_state(1, "c", False, [], None), tmp_path / "recovery.pth.tar")
    assert names(checkpoint_files(tmp_path)) == ["last.safetensors", "model_best.safetensors"]
    for p in tmp_path.glob("*.safetensors"):
        p.unlink()  # a run in progress: its states, each once
    assert names(checkpoint_files(tmp_path)) == ["checkpoint-0.pth.tar", "checkpoint-1.pth.tar"]
    # a state from before tokens: named by its file, so a second call writes nothing either
    atomic_save(_epoch_state(1, None, False, [[1.0, 0], [0.5, 1]], [1.0, 0]), tmp_path / "last.pth.tar")
    assert "last.safetensors" in names(state.write_release_files(t)) and state.write_release_files(t) == []


@pytest.mark.parametrize("flag", ["--initial-checkpoint", "--pretrained-path"])
def test_start_from_local_weights(digits_run: Path, flag: str):
    args = train.parse_args([*TINY, *DIGITS, flag, str(digits_run / "last.safetensors")])
    model, _ = train.build_model(args, num_classes=10)
    saved, _ = load_weights(digits_run / "last.safetensors")
    loaded = model.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], saved["conv1.0.weight"])
    head_equal = torch.equal(loaded["fc.weight"], saved["fc.weight"])
    assert head_equal == (flag == "--initial-checkpoint")  # timm's --pretrained-path re-initialises the head


def test_optimizer_step_through_a_loss_scaler():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    t = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt),
                        accelerator=SimpleNamespace(scaler=scaler, distributed_type="NO"))
    before = model.weight.detach().clone()
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    engine.optimizer_step(t)
    assert torch.allclose(model.weight, before - 0.1 * 2.0)  # unscaled gradient of the sum is 2 per weight
    assert model.weight.grad is None
