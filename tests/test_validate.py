"""validate.py and `python -m we_timm.export` on checkpoints shaped like train.py's releases."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

import validate
from we_timm.recipes import export, resuming
from we_timm.recipes.checkpoint import atomic_save, read_metadata, save_safetensors
from we_timm.recipes.models import create_model_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "test_resnet"
NUM_CLASSES = 3
PER_CLASS = 7  # 21 images: not a multiple of 2 processes x batch 4
DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0, "crop_mode": "center"}


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A timm ImageFolder: <root>/validation/c<k>/<i>.png with random 20x20 images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        os.makedirs(root / "validation" / f"c{c}")
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "validation" / f"c{c}" / f"{i}.png")
    return root


def _metadata(**over):
    meta = {
        "format": "we_timm", "architecture": ARCH, "num_classes": NUM_CLASSES, "data_config": DATA_CONFIG,
        "model_kwargs": {}, "we_config": None, "epoch": 1, "metrics": {"top1": 0.0, "top5": 0.0, "loss": 0.0},
        "args": {}, "ema": False,
    }
    meta.update(over)
    return meta


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """model_best.safetensors (+ its _ema sibling) as train.py writes them."""
    run = tmp_path_factory.mktemp("run")
    save_safetensors(run / "model_best.safetensors", _model(0).state_dict(), _metadata())
    save_safetensors(run / "model_best_ema.safetensors", _model(1).state_dict(), _metadata(ema=True))
    return run


@torch.no_grad()
def _reference(model, image_dir) -> dict:
    """Literal per-image evaluation with the checkpoint's eval transform."""
    transform = create_transform(**DATA_CONFIG, is_training=False)
    correct = total = 0
    loss = 0.0
    for label, cls in enumerate(sorted(os.listdir(image_dir / "validation"))):
        for name in sorted(os.listdir(image_dir / "validation" / cls)):
            x = transform(Image.open(image_dir / "validation" / cls / name).convert("RGB"))[None]
            out = model(x)
            correct += int(out.argmax(-1).item() == label)
            loss += torch.nn.functional.cross_entropy(out, torch.tensor([label])).item()
            total += 1
    return {"top1": 100 * correct / total, "loss": loss / total, "num_samples": total}


def _args(*argv):
    return validate.get_args_parser().parse_args(["--workers", "0", "--batch-size", "4", "--no-progress", *argv])


def test_metadata_checkpoint_needs_no_model_or_size(run_dir, image_dir, tmp_path):
    results_file = tmp_path / "results.json"
    res = validate.main(_args("--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(image_dir),
                              "--results-file", str(results_file), "--results-format", "json"))
    ref = _reference(_model(0), image_dir)
    assert res["model"] == ARCH and res["img_size"] == 32 and res["interpolation"] == "bilinear"
    assert res["num_samples"] == ref["num_samples"] == NUM_CLASSES * PER_CLASS
    assert res["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert res["top5"] == 100.0  # 3 classes: top-k is capped at the class count
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert res["param_count"] == pytest.approx(sum(p.numel() for p in _model(0).parameters()) / 1e6, abs=1e-4)
    assert res["images_per_sec"] > 0 and res["epoch"] == 1 and res["ema"] is False and res["bad_images"] == 0
    assert json.loads(results_file.read_text()) == res


def test_cli_data_flags_override_checkpoint_config(run_dir, image_dir):
    """timm precedence: CLI > checkpoint data config > model pretrained_cfg."""
    res = validate.main(_args("--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(image_dir),
                              "--img-size", "24", "--interpolation", "bicubic", "--crop-pct", "0.875"))
    assert (res["img_size"], res["interpolation"], res["crop_pct"]) == (24, "bicubic", 0.875)
    res = validate.main(_args("--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(image_dir), "--input-size", "3", "40", "40"))
    assert res["img_size"] == 40 and res["crop_pct"] == 1.0


def test_use_ema_picks_the_ema_sibling(run_dir, image_dir, tmp_path):
    res = validate.main(_args("--checkpoint", str(run_dir / "model_best.safetensors"), "--use-ema", "--data-dir", str(image_dir)))
    ref = _reference(_model(1), image_dir)
    assert res["ema"] is True and res["checkpoint"].endswith("model_best_ema.safetensors")
    assert res["top1"] == pytest.approx(ref["top1"], abs=1e-9) and res["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_timm_pth_with_ema_and_csv_results(image_dir, tmp_path):
    """A timm train.py checkpoint: arch from `arch`, class count from the head, EMA from `state_dict_ema`."""
    ckpt = {"arch": ARCH, "epoch": 4, "state_dict": {f"module.{k}": v for k, v in _model(0).state_dict().items()},
            "state_dict_ema": _model(1).state_dict()}
    atomic_save(ckpt, tmp_path / "checkpoint.pth.tar")
    csv_file = tmp_path / "results.csv"
    common = ("--img-size", "32", "--interpolation", "bilinear", "--crop-pct", "1.0",
              "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--data-dir", str(image_dir),
              "--results-file", str(csv_file))
    plain = validate.main(_args("--checkpoint", str(tmp_path / "checkpoint.pth.tar"), *common))
    ema = validate.main(_args("--checkpoint", str(tmp_path / "checkpoint.pth.tar"), "--use-ema", *common))
    assert plain["top1"] == pytest.approx(_reference(_model(0), image_dir)["top1"], abs=1e-9)
    assert ema["top1"] == pytest.approx(_reference(_model(1), image_dir)["top1"], abs=1e-9)
    lines = csv_file.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("model,checkpoint,epoch,ema,top1")


def test_amp_and_channels_last_run(run_dir, image_dir):
    res = validate.main(_args("--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(image_dir),
                              "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--cpu"))
    assert res["num_samples"] == NUM_CLASSES * PER_CLASS


def test_export_loads_through_timm_with_identical_logits(run_dir, tmp_path):
    out = tmp_path / "release"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(run_dir / "model_best.safetensors"), "--output-dir", str(out)]))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == NUM_CLASSES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == DATA_CONFIG["input_size"] and cfg["mean"] == DATA_CONFIG["mean"] and cfg["crop_pct"] == 1.0
    x = torch.randn(2, 3, 32, 32)
    expected = _model(0)(x)
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    by_file = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=NUM_CLASSES)).eval()
    with torch.no_grad():
        assert torch.equal(by_dir(x), expected) and torch.equal(by_file(x), expected)
    assert timm.data.resolve_data_config(model=by_dir)["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("case", ["missing", "other_arch", "output_is_file"])
def test_export_bad_inputs(run_dir, tmp_path, case):
    argv = {
        "missing": ["--checkpoint", str(tmp_path / "nope.safetensors"), "--output-dir", str(tmp_path / "out")],
        "other_arch": ["--checkpoint", str(run_dir / "model_best.safetensors"), "--model", "test_efficientnet", "--output-dir", str(tmp_path / "out")],
        "output_is_file": ["--checkpoint", str(run_dir / "model_best.safetensors"), "--output-dir", str(run_dir / "model_best.safetensors")],
    }[case]
    with pytest.raises(SystemExit) as info:
        export.main(export.get_args_parser().parse_args(argv))
    msg = str(info.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def _bad(tmp_path, run_dir, image_dir, case):
    good = str(run_dir / "model_best.safetensors")
    data = ("--data-dir", str(image_dir))
    if case == "missing_file":
        return ("--checkpoint", str(tmp_path / "nope.safetensors"), *data), "checkpoint not found"
    if case == "not_a_checkpoint":
        (tmp_path / "notes.pth").write_text("just some text\n" * 20)
        return ("--checkpoint", str(tmp_path / "notes.pth"), *data), "not a checkpoint"
    if case == "truncated":
        blob = (run_dir / "model_best.safetensors").read_bytes()
        (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) * 2 // 3])
        return ("--checkpoint", str(tmp_path / "cut.safetensors"), *data), "truncated"
    if case == "other_architecture":
        return ("--checkpoint", good, "--model", "test_efficientnet", *data), "does not match model test_efficientnet: missing keys \\[conv_stem.weight"
    if case == "other_class_count":
        return ("--checkpoint", good, "--num-classes", "5", *data), "shape mismatch .*fc.bias \\(3,\\) vs \\(5,\\)"
    if case == "missing_data_dir":
        return ("--checkpoint", good, "--data-dir", str(tmp_path / "no_such_dir")), "data dir not found"
    if case == "empty_dataset":
        os.makedirs(tmp_path / "empty" / "validation" / "c0")
        return ("--checkpoint", good, "--data-dir", str(tmp_path / "empty")), "(empty|no images|Found 0)"
    if case == "no_ema":
        save_safetensors(tmp_path / "solo.safetensors", _model(0).state_dict(), _metadata())
        return ("--checkpoint", str(tmp_path / "solo.safetensors"), "--use-ema", *data), "no EMA weights"
    if case == "no_architecture":
        save_safetensors(tmp_path / "bare.safetensors", _model(0).state_dict(), {})
        return ("--checkpoint", str(tmp_path / "bare.safetensors"), *data), "pass the model name"
    raise AssertionError(case)


BAD_CASES = ["missing_file", "not_a_checkpoint", "truncated", "other_architecture", "other_class_count",
             "missing_data_dir", "empty_dataset", "no_ema", "no_architecture"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_one_line_error(tmp_path, run_dir, image_dir, case):
    argv, pattern = _bad(tmp_path, run_dir, image_dir, case)
    with pytest.raises(SystemExit) as info:
        validate.main(_args(*argv))
    msg = str(info.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_images_are_named_counted_and_limited(tmp_path, run_dir, image_dir, caplog, workers):
    """timm's dataset reads the next image in the place of an unreadable one: the file is named, the result
    counts it (`bad_images`) and says the metrics hold a duplicate; beyond --max-bad-images the evaluation
    stops with one line and writes no results."""
    data = tmp_path / "data"
    for cls in range(NUM_CLASSES):  # a copy of the image folder with one corrupt file
        os.makedirs(data / "validation" / f"c{cls}")
        for i in range(PER_CLASS):
            name = f"c{cls}/{i}.png"
            blob = b"\x89PNG truncated" if name == "c1/3.png" else (image_dir / "validation" / name).read_bytes()
            (data / "validation" / name).write_bytes(blob)
    common = ("--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(data), "--workers", workers)
    res = validate.main(_args(*common))
    assert res["bad_images"] == 1 and res["num_samples"] == NUM_CLASSES * PER_CLASS
    if workers == "0":  # the warnings of a worker process do not reach caplog
        assert f"unreadable validation image skipped: {data / 'validation' / 'c1' / '3.png'}" in caplog.text
    assert "1 unreadable validation image(s) skipped (named above): timm's dataset read the next image in the " \
           "place of each, so these metrics count 1 image(s) twice" in caplog.text
    results = tmp_path / "results.csv"
    with pytest.raises(SystemExit) as info:
        validate.main(_args(*common, "--max-bad-images", "0", "--results-file", str(results)))
    assert str(info.value.code) == ("error: more than 0 unreadable validation images in this evaluation (named in "
                                    "the warnings above); fix or remove them, or raise --max-bad-images")
    assert not results.exists()
    with pytest.raises(SystemExit, match="--max-bad-images must be >= 0, got -1"):
        validate.main(_args(*common, "--max-bad-images", "-1"))


def test_cli_exit_code_and_debug(tmp_path, run_dir, image_dir):
    argv, _ = _bad(tmp_path, run_dir, image_dir, "truncated")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "validate.py"), *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    with pytest.raises(Exception, match="truncated"):
        validate.main(_args(*argv, "--debug"))


def test_two_processes_count_every_sample_once(run_dir, image_dir):
    """21 images, 2 processes x batch 4: the padded duplicates of the last step are not counted."""
    single = validate.main(_args("--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(image_dir), "--cpu"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "validate.py"),
           "--checkpoint", str(run_dir / "model_best.safetensors"), "--data-dir", str(image_dir),
           "--batch-size", "4", "--workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[:6000]
    multi = json.loads(proc.stdout.split("--result", 1)[1])
    assert multi["num_processes"] == 2
    assert multi["num_samples"] == single["num_samples"] == NUM_CLASSES * PER_CLASS
    assert multi["top1"] == pytest.approx(single["top1"], abs=1e-9) and multi["top5"] == single["top5"]
    assert multi["loss"] == pytest.approx(single["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- train.py -> validate.py / export


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """2 epochs of train.py (WE + EMA) on 512 digits at 32 px; 50 validation images (not a multiple of the batch)."""
    from accelerate.state import AcceleratorState

    import train

    out = tmp_path_factory.mktemp("train")
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(train.parse_args([
        "--dataset", "digits", "--model", ARCH, "--img-size", "32", "--train-num-samples", "512",
        "--val-num-samples", "50", "--epochs", "2", "--batch-size", "32", "--opt", "adamw", "--lr", "0.1",
        "--sched", "step", "--decay-epochs", "1", "--warmup-epochs", "0", "--smoothing", "0", "--no-aug",
        "--model-ema", "--model-ema-decay", "0.9", "--weight-evolution", "--workers", "0",
        "--output", str(out), "--experiment", "run",
    ]))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out / "run"


def _summary_row(run, epoch):
    import csv

    with open(run / "summary.csv") as f:
        return next(r for r in csv.DictReader(f) if int(r["epoch"]) == epoch)


@pytest.mark.parametrize("use_ema", [False, True])
def test_validate_reproduces_train_metrics_exactly(trained_run, use_ema):
    """No --model, --img-size or --batch-size: the checkpoint's metadata reproduces train.py's evaluation bit for bit."""
    best = trained_run / "model_best.safetensors"
    weights = trained_run / ("model_best_ema.safetensors" if use_ema else "model_best.safetensors")
    meta = read_metadata(weights)
    argv = ["--checkpoint", str(best), "--dataset", "digits", "--num-samples", "50", "--workers", "0", "--no-progress"]
    res = validate.main(validate.get_args_parser().parse_args(argv + (["--use-ema"] if use_ema else [])))
    assert res["ema"] is use_ema and res["epoch"] == meta["epoch"] and res["num_samples"] == 50
    assert (res["top1"], res["top5"], res["loss"]) == (meta["metrics"]["top1"], meta["metrics"]["top5"], meta["metrics"]["loss"])
    if use_ema:  # with --model-ema, train.py reports (summary.csv) the EMA's numbers
        row = _summary_row(trained_run, meta["epoch"])
        assert (res["top1"], res["top5"]) == (float(row["eval_top1"]), float(row["eval_top5"]))


def test_validate_training_state_pth(trained_run):
    """last.pth.tar (train.py's resume state): architecture, classes and data config from its args."""
    argv = ["--checkpoint", str(trained_run / "last.pth.tar"), "--use-ema", "--num-samples", "50", "--workers", "0", "--no-progress"]
    res = validate.main(validate.get_args_parser().parse_args(argv))  # no --dataset: the run's own data
    meta = read_metadata(trained_run / "last_ema.safetensors")
    assert res["img_size"] == 32 and res["num_samples"] == 50
    assert (res["top1"], res["top5"], res["loss"]) == (meta["metrics"]["top1"], meta["metrics"]["top5"], meta["metrics"]["loss"])


def test_export_trained_ema_checkpoint(trained_run, tmp_path):
    out = tmp_path / "release"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(trained_run / "model_best.safetensors"), "--use-ema", "--output-dir", str(out)]))
    model, _, _ = create_model_from_checkpoint(trained_run / "model_best_ema.safetensors")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    config = json.loads((out / "config.json").read_text())
    assert config["we_timm"]["ema"] is True and config["we_timm"]["we_config"]["variant"] == "paper"


def test_bulk_validation_of_a_run_folder(trained_run, tmp_path):
    """timm's bulk mode: --checkpoint FOLDER evaluates each checkpoint of it, one results CSV row each, and each
    row reproduces the numbers train.py recorded in that checkpoint."""
    import csv

    results = tmp_path / "bulk.csv"
    argv = ["--checkpoint", str(trained_run), "--dataset", "digits", "--num-samples", "50", "--workers", "0",
            "--no-progress", "--results-file", str(results)]
    rows = validate.main(validate.get_args_parser().parse_args(argv))
    # each set of weights once: the release files, and the kept epochs' states that no release file holds
    best, last = (resuming.load_state(str(trained_run / f"{s}.pth.tar"))["epoch"] for s in ("model_best", "last"))
    releases = [trained_run / "last.safetensors", *([trained_run / "model_best.safetensors"] if best != last else [])]
    expected = sorted([*releases, *(trained_run / f"checkpoint-{e}.pth.tar" for e in range(last) if e != best)])
    assert len(expected) == last + 1 == 2  # a model_best of the last epoch is a link to last: listed once
    assert [r["checkpoint"] for r in rows] == [str(p) for p in expected]
    with open(results) as f:
        written = list(csv.DictReader(f))
    assert [w["checkpoint"] for w in written] == [str(p) for p in expected]
    for row, path in zip(rows, expected):
        metrics = (read_metadata(path)["metrics"] if path.suffix == ".safetensors"
                   else resuming.load_state(str(path))["metrics"]["model"])
        assert row["top1"] == metrics["top1"], path


def test_bulk_model_list_and_wildcard(monkeypatch):
    """--model a,b / a wildcard: the named models, and the wildcard's models whose weights are cached."""
    from we_timm.recipes import models

    cached = {"resnet18.a1_in1k", "resnet34.a1_in1k"}
    monkeypatch.setattr(models, "weights_cached", lambda name: name in cached)
    assert models.local_models("resnet1*,test_resnet") == ["resnet18.a1_in1k", "test_resnet"]
    assert models.local_models("resnet*") == ["resnet18.a1_in1k", "resnet34.a1_in1k"]
    with pytest.raises(SystemExit) as e:
        validate.main(_args("--model", "vit_*"))
    assert str(e.value.code) == "error: --model vit_*: no such model has its pretrained weights on this machine"

