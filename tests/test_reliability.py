"""Issue 5, reliability: malformed invocations fail cleanly, and a SIGKILLed run resumes bitwise-identically.

Bad inputs run in-process (`train.cli`, `validate.main`): each must end with one `error: ...` line naming the
problem, no traceback, and no new run folder / results file. Cases already covered in test_train.py
(`test_cli_errors_are_one_line_and_write_nothing`) and test_validate.py (`BAD_CASES`) are not repeated.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

import train
import validate
from test_train import DIGITS, ROOT, TINY, _free_port, digits_run, make_image_folder, no_time, read_csv, run_train, subprocess_env  # noqa: F401  (digits_run: fixture)
from test_validate import _args, _model, image_dir, run_dir  # noqa: F401  (fixtures)
from we_timm.recipes import args_checks
from we_timm.recipes import export
from we_timm.recipes import errors as we_cli
from we_timm.recipes import resuming
from we_timm.recipes.checkpoint import atomic_save, load_weights, save_safetensors
from we_timm.recipes.resuming import STATE_FORMAT


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _resnet_state(tmp: Path) -> str:
    """A well-formed training state of test_resnet (3 classes), as far as --resume reads it before the model."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    path = tmp / "resnet_state.pth.tar"
    atomic_save({"format": STATE_FORMAT, "version": 1, "epoch": 0, "model": model.state_dict(), "args": {}}, path)
    return str(path)


def _data(tmp: Path, **kw) -> str:
    return str(make_image_folder(tmp / "data", **kw))


def _train_case(tmp: Path, case: str) -> tuple[list[str], str]:
    """argv for train.py (without --output) and a regex the error line must match."""
    if case == "yaml_wrong_type":
        return ["-c", _write(tmp / "c.yaml", "epochs: many\n")], "epochs"
    if case == "yaml_not_mapping":
        return ["-c", _write(tmp / "c.yaml", "- model\n- test_resnet\n")], "mapping"
    if case == "yaml_syntax":
        return ["-c", _write(tmp / "c.yaml", "model: [test_resnet\n")], "not valid YAML"
    if case == "yaml_missing":
        return ["-c", str(tmp / "nope.yaml")], "cannot read config"
    if case == "we_rate_2":
        return ["--weight-evolution", "--we-rate", "2"], "^error: --we-rate must be"
    if case == "we_beta_half":
        return ["--weight-evolution", "--we-beta", "0.5"], "beta"
    if case == "we_eta_0":
        return ["--weight-evolution", "--we-eta", "0"], "eta"
    if case == "we_milestones_negative":
        return ["--weight-evolution", "--we-milestones", "-1"], "milestones"
    if case == "yaml_we_gamma_2":
        return ["--weight-evolution", "-c", _write(tmp / "c.yaml", "we_gamma: 2\n")], "gamma"
    if case == "epochs_0":
        return ["--epochs", "0"], "--epochs"
    if case == "batch_size_0":
        return ["-b", "0"], "--batch-size"
    if case == "mixup_odd_batch":
        return ["--mixup", "0.2", "-b", "7"], "even --batch-size"
    if case == "dataset_without_dir":
        return ["--dataset", "torch/cifar10"], "needs --data-dir"
    if case == "data_dir_is_file":
        return ["--data-dir", _write(tmp / "data.txt", "x")], "not a directory"
    if case == "class_map_missing":
        return ["--data-dir", _data(tmp), "--class-map", str(tmp / "map.txt")], "class-map .*no such file"
    if case == "batch_larger_than_dataset":  # 3 classes x 2 images, batch 64: no full batch (drop_last) -> error
        return ["--data-dir", _data(tmp, train=2, val=2), "-b", "64"], "make no batch of 64"
    if case == "empty_train_split":
        data = Path(_data(tmp))
        for f in (data / "train").rglob("*.png"):
            f.unlink()
        return ["--data-dir", str(data)], "(empty|no images|Found 0)"
    if case == "resume_text_file":
        return ["--resume", _write(tmp / "notes.pth.tar", "just some text\n" * 20)], "cannot read training state|not a we_timm training state"
    if case == "resume_foreign_pickle":
        atomic_save({"state_dict": {"w": torch.zeros(1)}}, tmp / "foreign.pth.tar")
        return ["--resume", str(tmp / "foreign.pth.tar")], "not a we_timm training state"
    if case == "resume_safetensors":
        save_safetensors(tmp / "w.safetensors", {"w": torch.zeros(1)}, {})
        return ["--resume", str(tmp / "w.safetensors")], "model weights only"
    if case == "resume_other_model":
        return ["--resume", _resnet_state(tmp), "--model", "test_efficientnet", "--data-dir", _data(tmp)], \
            "does not match model test_efficientnet"
    if case == "resume_truncated":
        blob = Path(_resnet_state(tmp)).read_bytes()
        (tmp / "cut.pth.tar").write_bytes(blob[: len(blob) // 2])
        return ["--resume", str(tmp / "cut.pth.tar")], "cannot read training state"
    if case == "resume_auto_without_experiment":
        return ["--resume", "auto"], "--resume auto needs --experiment"
    if case == "resume_folder_without_state":
        (tmp / "run").mkdir()
        return ["--resume", str(tmp / "run")], "no last.pth.tar or checkpoint-N.pth.tar in this folder"
    if case == "resume_auto_unreadable_states":  # never start over a run whose states only need repair
        (tmp / "out" / "run").mkdir(parents=True)
        (tmp / "out" / "run" / "last.pth.tar").write_text("half a file")
        (tmp / "out" / "run" / "checkpoint-3.pth.tar").write_bytes(b"PK\x03\x04")
        return ["--resume", "auto", "--experiment", "run"], \
            "holds training states but none is readable \\(last.pth.tar, checkpoint-3.pth.tar\\)"
    if case == "dist_timeout_0":
        return ["--dist-timeout", "0"], "--dist-timeout must be > 0"
    if case == "initial_checkpoint_text":
        return ["--initial-checkpoint", _write(tmp / "w.pth", "not weights\n")], "w.pth"
    return _new_train_case(tmp, case)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)


def _new_train_case(tmp: Path, case: str) -> tuple[list[str], str]:
    """Issue 12: silent wrong data, tracebacks, ignored values, folders in the way, escapes."""
    if case.startswith(("folder_", "class_map_", "num_classes_below")):
        data = Path(_data(tmp, train=4, val=2))
        if case == "folder_no_validation":  # timm would validate on the training images
            shutil.rmtree(data / "validation")
            return ["--data-dir", str(data)], r"no 'validation' split folder .*--val-split NAME"
        if case == "folder_class_names_differ":  # same count, other names: silently mismatched labels
            _move(data / "validation" / "class2", data / "validation" / "cat")
            return ["--data-dir", str(data)], r"class folders of splits 'train' and 'validation' differ: only in 'train': class2; only in 'validation': cat"
        if case == "folder_val_subset":
            shutil.rmtree(data / "validation" / "class2")
            return ["--data-dir", str(data)], r"only in 'train': class2 \(a validation split with fewer classes needs --class-map"
        if case == "folder_images_in_split":  # no class subfolders: a 1-class problem at 100 %
            for f in list((data / "train").rglob("*.png")):
                _move(f, data / "train" / f"{f.parent.name}_{f.name}")
            for c in (data / "train").iterdir():
                if c.is_dir():
                    c.rmdir()
            return ["--data-dir", str(data)], r"image\(s\) sit directly in the split folder .*train"
        if case == "folder_loose_image_in_val":
            shutil.copy(data / "validation" / "class0" / "0.png", data / "validation" / "stray.png")
            return ["--data-dir", str(data)], r"1 image\(s\) sit directly in the split folder .*validation \(e.g. stray.png\)"
        if case == "folder_is_a_split":  # --data-dir pointed at train/ itself
            return ["--data-dir", str(data / "train")], r"has no 'train' split folder"
        if case == "folder_val_split_misspelt":
            return ["--data-dir", str(data), "--val-split", "vaildation"], r"no 'vaildation' split folder"
        if case == "class_map_extra_class":  # a class with no folder: an empty class
            return ["--data-dir", str(data), "--class-map", _write(tmp / "m.txt", "class0\nclass1\nclass2\nclass3\n")], \
                r"does not match .*named in the map but without a folder class3"
        if case == "class_map_missing_class":  # a folder not in the map: its images silently dropped
            return ["--data-dir", str(data), "--class-map", _write(tmp / "m.txt", "class0\nclass1\n")], \
                r"folders not in the map \(their images would be dropped\) class2"
        if case == "class_map_bad_extension":
            return ["--data-dir", str(data), "--class-map", _write(tmp / "m.json", "{}")], r"--class-map .*cannot be read"
        if case == "num_classes_below_data":
            return ["--data-dir", str(data), "--num-classes", "2"], r"--num-classes 2 is less than the 3 classes"
    if case == "experiment_taken":  # the pre-existing run (see the test) is never touched
        return ["--experiment", "prev"], r"already holds a run .*--resume"
    simple = {
        "yaml_null_value": (["-c", _write(tmp / "null.yaml", "epochs: null\n")], r"epochs: null is not a value"),
        "yaml_null_flag": (["-c", _write(tmp / "flag.yaml", "model_ema: null\n")], r"model_ema: null is not a value"),
        "yaml_duplicate_key": (["-c", _write(tmp / "dup.yaml", "epochs: 2\nlr: 0.1\nepochs: 3\n")], r"duplicate key 'epochs'"),
        "mean_wrong_length": (["--mean", "0.5", "0.5"], r"--mean takes 1 or 3 value"),
        "std_wrong_length": (["--std", "0.2", "0.2", "0.2", "0.2"], r"--std takes 1 or 3 value"),
        "std_zero": (["--std", "0"], r"--std must be > 0"),
        "smoothing_1": (["--smoothing", "1"], r"--smoothing must be in \[0, 1\)"),
        "smoothing_negative": (["--smoothing", "-0.1"], r"--smoothing"),
        "in_chans_1": (["--in-chans", "1"], r"--in-chans/--input-size give 1 channel.*RGB"),
        "input_size_zero": (["--input-size", "3", "0", "32"], r"--input-size must be >= 1"),
        "img_size_0": (["--img-size", "0"], r"--img-size must be >= 1"),
        "train_num_samples_0": (["--train-num-samples", "0"], r"--train-num-samples must be >= 1"),
        "num_classes_0": (["--num-classes", "0"], r"--num-classes must be >= 1"),
        "vb_0": (["-vb", "0"], r"--validation-batch-size \(-vb\) must be >= 1"),
        "drop_path_1": (["--drop-path", "1"], r"--drop-path must be in \[0, 1\)"),
        "mixup_prob_2": (["--mixup", "0.2", "--mixup-prob", "2"], r"--mixup-prob must be in \[0, 1\]"),
        "scale_three_values": (["--scale", "0.1", "0.5", "1"], r"--scale takes 2 value"),
        "crop_pct_0": (["--crop-pct", "0"], r"--crop-pct must be > 0"),
        "we_rate_norm_flag_named": (["--weight-evolution", "--we-rate-norm", "1.5"], r"^error: --we-rate-norm must be"),
        "amp_fp16_on_cpu": (["--amp", "--amp-dtype", "float16"], r"float16 .*needs a GPU"),
        "experiment_escape": (["--experiment", "../x"], r"--experiment '../x' must be a plain folder name"),
        "experiment_nested": (["--experiment", "a/b"], r"--experiment 'a/b' must be a plain folder name"),
        "experiment_dot": (["--experiment", "."], r"must be a plain folder name"),
        "output_is_a_file": (["--experiment", "e"], r"--output .*out is not a directory"),  # out: see the test
        "val_split_is_train": (["--dataset", "digits", "--val-split", "train"], r"name the same split: .*validate on the training"),
        "aa_unknown": (["--dataset", "digits", "--aa", "garbage"], r"cannot build the data transforms .*Unknown AA policy garbage"),
        "interpolation_unknown": (["--interpolation", "cubic"], r"argument --interpolation: invalid choice: 'cubic'"),
        "opt_kwargs_unknown": (["--dataset", "digits", "--opt-kwargs", "foo=1"], r"cannot create optimizer sgd .*'foo'"),
        "clip_grad_negative": (["--clip-grad", "-1"], r"--clip-grad must be > 0"),
        "cooldown_negative": (["--cooldown-epochs", "-1"], r"--cooldown-epochs must be >= 0"),
    }
    if case in simple:
        return simple[case]
    raise AssertionError(case)


TRAIN_CASES = ["yaml_wrong_type", "yaml_not_mapping", "yaml_syntax", "yaml_missing", "we_rate_2", "we_beta_half",
               "we_eta_0", "we_milestones_negative", "yaml_we_gamma_2", "epochs_0", "batch_size_0", "mixup_odd_batch",
               "dataset_without_dir", "data_dir_is_file", "class_map_missing", "batch_larger_than_dataset",
               "empty_train_split", "resume_text_file", "resume_foreign_pickle", "resume_safetensors",
               "resume_other_model", "resume_truncated", "initial_checkpoint_text", "resume_auto_without_experiment",
               "resume_folder_without_state", "resume_auto_unreadable_states", "dist_timeout_0",
               # issue 12: silent wrong data
               "folder_no_validation", "folder_class_names_differ", "folder_val_subset", "folder_images_in_split",
               "folder_loose_image_in_val", "folder_is_a_split", "folder_val_split_misspelt", "class_map_extra_class",
               "class_map_missing_class", "class_map_bad_extension", "num_classes_below_data",
               # tracebacks before, values silently ignored before
               "yaml_null_value", "yaml_null_flag", "yaml_duplicate_key", "mean_wrong_length", "std_wrong_length",
               "std_zero", "smoothing_1", "smoothing_negative", "in_chans_1", "input_size_zero", "img_size_0",
               "train_num_samples_0", "num_classes_0", "vb_0", "drop_path_1", "mixup_prob_2", "scale_three_values",
               "crop_pct_0", "we_rate_norm_flag_named", "amp_fp16_on_cpu",
               # folders in the way, escapes
               "experiment_taken", "experiment_escape", "experiment_nested", "experiment_dot", "output_is_a_file",
               "val_split_is_train", "aa_unknown", "interpolation_unknown", "opt_kwargs_unknown", "clip_grad_negative",
               "cooldown_negative"]


def _previous_run(tmp: Path) -> Path:
    """A run that exists before the bad command (its bytes must stay the same)."""
    run = tmp / "out" / "prev"
    run.mkdir(parents=True)
    (run / "args.yaml").write_text("model: test_resnet\n")
    (run / "last.pth.tar").write_bytes(b"PK\x03\x04 an earlier run's state")
    (run / "last.safetensors").write_bytes(b"an earlier run's weights")
    return run


def _snapshot(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(tmp.rglob("*"))}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_input_one_line_error(tmp_path: Path, capsys, case: str):
    if case == "amp_fp16_on_cpu" and torch.cuda.is_available():
        pytest.skip("float16 autocast is refused on CPU only")
    if case == "output_is_a_file":
        (tmp_path / "out").write_text("not a folder")
    elif not case.startswith("resume_auto"):
        _previous_run(tmp_path)
    argv, pattern = _train_case(tmp_path, case)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", *argv, "--output", str(tmp_path / "out")])  # argv's own --epochs wins
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    assert "Traceback" not in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # no run folder, no file written, the earlier run unchanged


def test_train_all_images_unreadable_is_one_line_error(tmp_path: Path, capsys):
    """timm skips a few bad files, then raises RuntimeError mid-epoch: train.py probes a sample before writing."""
    data = Path(_data(tmp_path, train=2, val=2))
    for f in (data / "train").rglob("*.png"):
        f.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", "--data-dir", str(data), "-b", "2", "--output", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and re.search("cannot read split 'train'.*class0/0.png", msg), msg
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_cli_process_exit_status_and_stderr(tmp_path: Path):
    """The real process: exit status 1, stderr ends with the one `error:` line, no traceback (--debug: the exception)."""
    argv, _ = _train_case(tmp_path, "resume_other_model")
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--epochs", "1", *argv, "--output", str(tmp_path / "out")]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint does not match model test_efficientnet")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="does not match model test_efficientnet") as e:  # --debug: the exception itself
        train.cli([*cmd[2:], "--debug"])
    assert not isinstance(e.value, SystemExit)


USAGE_CASES = [  # argparse's own errors: one line (not usage + message), exit status 1
    ("train.py", ["--epochs", "many"], r"^error: argument --epochs: invalid int value: 'many' \(see train.py --help\)$"),
    ("train.py", ["--no-such-flag"], r"^error: unrecognized arguments: --no-such-flag"),
    ("train.py", ["--we-variant", "fancy"], r"^error: argument --we-variant: invalid choice: 'fancy'"),
    ("train.py", ["-c"], r"^error: argument -c/--config: expected one argument"),
    ("validate.py", ["--checkpoint", "x.safetensors", "--batch-size", "big"], r"^error: argument --batch-size/-b: invalid int"),
    ("validate.py", [], r"^error: nothing to evaluate: give --checkpoint"),
    ("-m we_timm.export", ["--checkpoint", "x.safetensors"], r"^error: the following arguments are required: --output-dir"),
]


@pytest.mark.parametrize("script, argv, pattern", USAGE_CASES)
def test_usage_errors_are_one_line(tmp_path: Path, script: str, argv: list[str], pattern: str):
    target = ["-m", "we_timm.export"] if script.startswith("-m") else [str(ROOT / script)]
    proc = subprocess.run([sys.executable, *target, *argv, "--output", str(tmp_path / "out")] if script == "train.py"
                          else [sys.executable, *target, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_train_tensorboard_missing_is_one_line_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(args_checks, "is_tensorboard_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", "--log-tensorboard", "--output", str(tmp_path / "out")])
    assert str(e.value.code) == "error: --log-tensorboard needs tensorboard: pip install 'we_timm[tensorboard]'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_train_unreadable_data_mid_run_is_one_line_error(tmp_path: Path, capsys, workers: str):
    """The first image is fine (the up-front probe passes); the rest are not: timm skips 50 in a row, then raises."""
    data = Path(_data(tmp_path, train=25, val=2))
    for f in sorted((data / "train").rglob("*.png"))[1:]:
        f.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", "--data-dir", str(data), "-b", "4", "--output", str(tmp_path / "out"),
                   "--experiment", "x", "--workers", workers])
    msg = str(e.value.code)
    assert re.match(r"error: reading the training data failed: (RuntimeError: )?Failed to load \d+ consecutive samples \(the warnings "
                    r"above name the unreadable files\)$", msg), msg
    assert "Traceback" not in capsys.readouterr().err
    assert not list((tmp_path / "out" / "x").glob("*.pth.tar"))


def test_train_skips_a_single_corrupt_image(tmp_path: Path, caplog):
    """One unreadable file in an ImageFolder is skipped with a warning naming it (timm skips it); the epoch ends
    with the count; the run completes."""
    data = Path(_data(tmp_path, train=4, val=2))
    (data / "train" / "class1" / "2.png").write_bytes(b"not a png")
    assert train.cli([*TINY, "--epochs", "1", "--data-dir", str(data), "-b", "4", "--output", str(tmp_path / "out"),
                      "--experiment", "x"]) == 0
    assert "Skipped sample" in caplog.text
    assert f"unreadable training image skipped: {data / 'train' / 'class1' / '2.png'}" in caplog.text
    assert "epoch 0: 1 unreadable training image(s) skipped" in caplog.text
    assert (tmp_path / "out" / "x" / "last.safetensors").is_file()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_more_bad_images_than_allowed_stop_the_run(tmp_path: Path, capsys, workers: str):
    """Scattered corrupt files (never 10 in a row, so timm goes on): beyond --max-bad-images the run stops."""
    data = Path(_data(tmp_path, train=8, val=2))
    for f in sorted((data / "train").rglob("*.png"))[1::3]:
        f.write_bytes(b"\x89PNG truncated")
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", "--data-dir", str(data), "-b", "4", "--output", str(tmp_path / "out"),
                   "--experiment", "x", "--workers", workers, "--max-bad-images", "3"])
    assert str(e.value.code) == ("error: more than 3 unreadable training images in one epoch (named in the warnings "
                                 "above); fix or remove them, or raise --max-bad-images"), e.value.code
    assert "Traceback" not in capsys.readouterr().err
    assert not list((tmp_path / "out" / "x").glob("*.pth.tar"))


# ----------------------------------------------------------------------------- validate.py (beyond test_validate.py)


def _validate_case(tmp: Path, run: Path, images: Path, case: str) -> tuple[list[str], str]:
    good = str(run / "model_best.safetensors")
    data = ["--data-dir", str(images)]
    if case == "truncated_train_state":
        atomic_save({"format": STATE_FORMAT, "model": _model(0).state_dict()}, tmp / "last.pth.tar")
        blob = (tmp / "last.pth.tar").read_bytes()
        (tmp / "cut.pth.tar").write_bytes(blob[: len(blob) // 2])
        return ["--checkpoint", str(tmp / "cut.pth.tar"), "--model", "test_resnet", "--num-classes", "3", *data], "cut.pth.tar"
    if case == "empty_file":
        (tmp / "empty.safetensors").write_bytes(b"")
        return ["--checkpoint", str(tmp / "empty.safetensors"), *data], "empty.safetensors"
    if case == "checkpoint_is_dir":  # a folder is bulk mode: one without checkpoints is an error
        (tmp / "empty_run").mkdir()
        return ["--checkpoint", str(tmp / "empty_run"), *data], "no checkpoints in " + re.escape(str(tmp / "empty_run"))
    if case == "unknown_model":
        return ["--checkpoint", good, "--model", "no_such_model", *data], "no_such_model"
    if case == "batch_size_0":
        return ["--checkpoint", good, *data, "--batch-size", "0"], "--batch-size"
    if case == "all_images_unreadable":
        for c in range(3):
            (tmp / "bad" / "validation" / f"c{c}").mkdir(parents=True)
            (tmp / "bad" / "validation" / f"c{c}" / "0.png").write_bytes(b"not a png")
        return ["--checkpoint", good, "--data-dir", str(tmp / "bad")], "cannot read split .validation.*c0/0.png"
    if case == "amp_fp16_on_cpu":
        return ["--checkpoint", good, *data, "--amp", "--amp-dtype", "float16", "--cpu"], r"float16 .*needs a GPU"
    if case == "img_size_negative":
        return ["--checkpoint", good, *data, "--img-size", "-1"], r"--img-size must be >= 1, got -1"
    if case == "num_samples_0":
        return ["--checkpoint", good, *data, "--num-samples", "0"], r"--num-samples must be >= 1"
    if case == "results_file_missing_folder":  # checked before the evaluation, not after it
        return ["--checkpoint", good, *data, "--results-file", str(tmp / "no" / "r.csv")], r"--results-file .*does not exist"
    if case == "results_file_is_dir":
        return ["--checkpoint", good, *data, "--results-file", str(tmp)], r"--results-file .* is a directory"
    if case == "no_split_folder":  # timm would evaluate the whole root (the training images too)
        shutil.copytree(images / "validation", tmp / "only" / "train")
        return ["--checkpoint", good, "--data-dir", str(tmp / "only")], r"no 'validation' split folder"
    if case == "images_directly_in_split":
        (tmp / "flat" / "validation").mkdir(parents=True)
        for i, f in enumerate(sorted(images.rglob("*.png"))):
            shutil.copy(f, tmp / "flat" / "validation" / f"{i}.png")
        return ["--checkpoint", good, "--data-dir", str(tmp / "flat")], r"image\(s\) sit directly in the split folder"
    raise AssertionError(case)


VALIDATE_CASES = ["truncated_train_state", "empty_file", "checkpoint_is_dir", "unknown_model", "batch_size_0",
                  "all_images_unreadable", "img_size_negative", "num_samples_0", "results_file_missing_folder",
                  "results_file_is_dir", "no_split_folder", "images_directly_in_split", "amp_fp16_on_cpu"]


@pytest.mark.parametrize("case", VALIDATE_CASES)
def test_validate_bad_input_one_line_error(tmp_path, run_dir, image_dir, capsys, case):  # noqa: F811
    argv, pattern = _validate_case(tmp_path, run_dir, image_dir, case)
    results = tmp_path / "results.csv"
    with pytest.raises(SystemExit) as e:
        validate.main(_args("--results-file", str(results), *argv))  # a case's own --results-file wins
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    assert "Traceback" not in capsys.readouterr().err
    assert not results.exists() and not (tmp_path / "no").exists()


def test_a_folder_without_checkpoints_does_not_block_the_next_run(tmp_path: Path, capsys):
    """A run that failed after its folder was made (args.yaml only): the corrected command runs there."""
    (tmp_path / "out" / "x").mkdir(parents=True)
    (tmp_path / "out" / "x" / "args.yaml").write_text("epochs: 1\n")
    with pytest.raises(SystemExit) as e:  # nothing to continue: the message says to run without --resume
        train.cli(["--resume", str(tmp_path / "out" / "x")])
    assert "run the command without --resume (or with --resume auto)" in str(e.value.code)
    assert train.cli([*TINY, *DIGITS, "--epochs", "1", "--output", str(tmp_path / "out"), "--experiment", "x"]) == 0
    assert resuming.load_state(str(tmp_path / "out" / "x" / "last.pth.tar"))["epoch"] == 0


@pytest.mark.parametrize("script", ["train.py", "validate.py"])
@pytest.mark.parametrize("offline, message", [
    ({"HF_HUB_OFFLINE": "1"}, r"are not in the Hugging Face cache .* and HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, r"are not cached and 127.0.0.1:9 cannot be reached"),  # refused at once
])
def test_offline_pretrained_fails_fast(tmp_path: Path, script: str, offline: dict, message: str):
    """No network: weights surely not cached (an empty HF_HOME and torch hub dir) end with one line in seconds."""
    argv = ["--model", "resnet18", "--pretrained", *(["--dataset", "digits", "--epochs", "1", "--output",
                                                       str(tmp_path / "out")] if script == "train.py" else [])]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=subprocess_env(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "t"),
                                                          **offline))
    assert proc.returncode == 1 and time.monotonic() - start < 60, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --pretrained resnet18: its weights") and re.search(message, last), last
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- export, round trips, Ctrl-C

EXPORT = [sys.executable, "-m", "we_timm.export"]


def test_export_refuses_to_replace_an_export(run_dir, tmp_path: Path):  # noqa: F811
    out = tmp_path / "release"
    argv = [*EXPORT, "--checkpoint", str(run_dir / "model_best.safetensors"), "--output-dir", str(out)]
    assert subprocess.run(argv, capture_output=True, env=subprocess_env(), timeout=120).returncode == 0
    before = _snapshot(out)
    proc = subprocess.run([*argv[:4], str(run_dir / "model_best_ema.safetensors"), *argv[5:]], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --output-dir {out} already holds an export "
                                                           "(config.json, model.safetensors); pass --overwrite")
    assert _snapshot(out) == before
    proc = subprocess.run([*argv[:4], str(run_dir / "model_best_ema.safetensors"), *argv[5:], "--overwrite"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    a, _ = load_weights(out / "model.safetensors")
    b, _ = load_weights(run_dir / "model_best_ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_every_file_train_writes_reads_back_without_flags(tmp_path: Path):
    """The README demo's shape (--model-kwargs, EMA): validate.py and export read every weights and state file
    of the run folder with no other flag, and rebuild the same network."""
    kwargs = ["--model", "resnet18", "--model-kwargs", "layers=[1,1,1,0]", "channels=[8,16,16,16]", "stem_width=8"]
    run_train([*TINY, *DIGITS, *kwargs, "--epochs", "2", "--model-ema", "--output", str(tmp_path), "--experiment", "r"],
              cwd=tmp_path)
    run = tmp_path / "r"
    written = sorted(p.name for p in run.iterdir() if p.name.endswith((".safetensors", ".pth.tar")))
    assert len(written) == 8, written  # last, model_best (weights, EMA, state); the states checkpoint-0, checkpoint-1
    results = {}
    for name in written:
        results[name] = validate.main(_args("--checkpoint", str(run / name), "--num-samples", "64"))
        out = tmp_path / "export" / name
        export.main(export.get_args_parser().parse_args(["--checkpoint", str(run / name), "--output-dir", str(out)]))
        exported, _ = load_weights(out / "model.safetensors")
        weights, _ = load_weights(run / name)
        assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights), name
        timm.create_model(f"local-dir:{out}", pretrained=True)
    for state_file in ("last.pth.tar", "model_best.pth.tar"):  # a state evaluates as its model weights do
        assert results[state_file]["top1"] == results[state_file.replace(".pth.tar", ".safetensors")]["top1"]


def test_ctrl_c_exits_130_leaving_complete_files(tmp_path: Path):
    """A real process sent SIGINT mid-training: one `error:` line, exit status 130, no partial file, every
    file loadable; `--resume auto` then continues."""
    argv = [sys.executable, str(ROOT / "train.py"), *TINY, *DIGITS, "--epochs", "40", "--output", str(tmp_path),
            "--experiment", "c"]
    # SIGINT as a terminal delivers it, even where this suite runs as a background job (which ignores SIGINT)
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (tmp_path / "c" / "checkpoint-1.pth.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)") and "Traceback" not in err, err[-3000:]
    run = tmp_path / "c"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    released = load_weights(run / "last.safetensors")[1]  # the stop releases the newest epoch's weights
    assert released["token"] == resuming.load_state(str(run / "last.pth.tar"))["token"]
    for p in run.iterdir():
        if p.name.endswith(".safetensors"):
            load_weights(p)
        elif p.name.endswith(".pth.tar"):
            resuming.load_state(str(p))
    epoch = resuming.load_state(resuming.newest_state(str(run)))["epoch"]
    out = run_train([*argv[2:-6], "--epochs", str(epoch + 2), "--output", str(tmp_path), "--experiment", "c",
                     "--resume", "auto"], cwd=tmp_path)
    assert load_weights(run / "last.safetensors")[1]["epoch"] == epoch + 1, out[-2000:]


# ----------------------------------------------------------------------------- kill -9 at fixed points, then --resume

DIGITS_RUN_ARGS = [*TINY, *DIGITS, "--epochs", "3", "--weight-evolution", "--model-ema", "--model-ema-decay", "0.9",
                   "--mixup", "0.2", "--reprob", "0.2", "--drop-path", "0.05", "--checkpoint-hist", "3"]  # = digits_run
FAULT_RUNNER = str(ROOT / "tests" / "fault_runner.py")


def run_fault(fault: str, argv: list[str], cwd: Path, launcher: list[str] | None = None,
              timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """train.py under tests/fault_runner.py with one injected fault (see its docstring)."""
    cmd = [*(launcher or [sys.executable]), FAULT_RUNNER, "--fault", fault, *argv]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env))


# (fault, epoch of the newest complete training state after the kill; None: there is none yet)
KILL_POINTS = [("kill:train:1", 0), ("kill:eval:1", 0), ("kill:checkpoint:1", 0), ("kill:we:1", 1),
               ("kill:checkpoint:0", None), ("kill:eval:2", 1), ("term:train:1", 0), ("term:eval:2", 1)]


@pytest.mark.parametrize("fault, saved_epoch", KILL_POINTS, ids=[f for f, _ in KILL_POINTS])
def test_kill_then_resume_is_bitwise_identical(digits_run: Path, tmp_path: Path, fault: str, saved_epoch):  # noqa: F811
    """SIGKILL mid-epoch / mid-evaluation / mid-checkpoint-write / right after the WE step, or SIGTERM (a
    preemption: one error line, exit 1); then `--resume auto` ends with the uninterrupted run's weights, EMA
    and summary.csv, bit for bit."""
    where = ["--output", str(tmp_path / "out"), "--experiment", "run"]
    proc = run_fault(fault, [*DIGITS_RUN_ARGS, *where], cwd=tmp_path)
    if fault.startswith("term"):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: terminated by SIGTERM"), proc.stderr[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = tmp_path / "out" / "run"
    newest = resuming.newest_state(str(run))
    if saved_epoch is None:
        assert newest is None
    else:  # atomic writes: the newest complete state is loadable, whatever the kill interrupted
        assert resuming.load_state(newest)["epoch"] == saved_epoch
    partial = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert bool(partial) == fault.startswith("kill:checkpoint"), partial

    out = run_train([*DIGITS_RUN_ARGS, *where, "--resume", "auto"], cwd=tmp_path)
    assert ("removed" in out) == bool(partial) and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, _ = load_weights(digits_run / name)
        b, meta = load_weights(run / name)
        assert meta["epoch"] == 2 and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert no_time(read_csv(run / "summary.csv")) == no_time(read_csv(digits_run / "summary.csv"))


SAVE_RUN_ARGS = [*TINY, *DIGITS, "--epochs", "2", "--weight-evolution", "--model-ema", "--model-ema-decay", "0.5",
                 "--checkpoint-hist", "1", "--eval-metric", "top1"]  # epoch 1 is a new best (12.5 > 9.4) and evicts epoch 0


def _same_run_files(a: Path, b: Path) -> None:
    """Same file names; same weights, epochs and summary rows."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name.endswith(".safetensors"):
            (x, mx), (y, my) = load_weights(p), load_weights(b / p.name)
            assert mx["epoch"] == my["epoch"] and mx["metrics"] == my["metrics"], p.name
            assert all(torch.equal(x[k], y[k]) for k in x), p.name
        elif p.name.endswith(".pth.tar"):
            x, y = resuming.load_state(str(p)), resuming.load_state(str(b / p.name))
            assert x["epoch"] == y["epoch"] and x["checkpoints"] == y["checkpoints"], p.name
            wx, wy = resuming.model_weights(x), resuming.model_weights(y)
            assert all(torch.equal(wx[k], wy[k]) for k in wx), p.name
    assert no_time(read_csv(a / "summary.csv")) == no_time(read_csv(b / "summary.csv"))


def test_kill_at_every_file_operation_of_a_checkpoint_save(tmp_path: Path):
    """SIGKILL before each file operation of the last epoch's save (write last.pth.tar, link checkpoint-1 and
    model_best, remove the evicted checkpoint-0) and of the release files after it: `--resume auto` repairs
    the folder from the state's ranking, writes what the release lacks, and ends with exactly the
    uninterrupted run's files, bit for bit."""
    where = ["--output", str(tmp_path)]
    run_train([*SAVE_RUN_ARGS, *where, "--experiment", "full"], cwd=tmp_path)
    full = tmp_path / "full"
    assert load_weights(full / "model_best.safetensors")[1]["epoch"] == 1 and not (full / "checkpoint-0.pth.tar").exists()
    killed = 0
    for k in range(20):
        name = f"k{k}"
        proc = run_fault(f"kill:save@{k}:1", [*SAVE_RUN_ARGS, *where, "--experiment", name], cwd=tmp_path)
        if proc.returncode == 0:  # the save has k operations: every one was interrupted once
            _same_run_files(full, tmp_path / name)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        killed += 1
        out = run_train([*SAVE_RUN_ARGS, *where, "--experiment", name, "--resume", "auto"], cwd=tmp_path)
        assert ("repaired" in out) == (1 <= k <= 3), (k, out[-2000:])  # after last.pth.tar (op 0) the links lag it
        assert "Release files: " in out, (k, out[-2000:])  # the resumed run writes what the release lacks
        _same_run_files(full, tmp_path / name)
    # last.pth.tar, links checkpoint-1 and model_best, removal of checkpoint-0; as the run ends: last.safetensors,
    # last_ema.safetensors, and model_best(_ema).safetensors as links to them
    assert killed == 8


def test_official_variant_killed_in_we_step_resumes_exactly(tmp_path: Path):
    """The official variant's per-layer counters advance in the WE step the resumed run redoes."""
    argv = [*TINY, *DIGITS, "--epochs", "3", "--weight-evolution", "--we-variant", "official", "--output", str(tmp_path)]
    run_train([*argv, "--experiment", "full"], cwd=tmp_path)
    assert run_fault("kill:we:0", [*argv, "--experiment", "run"], cwd=tmp_path).returncode == -signal.SIGKILL
    run_train([*argv, "--experiment", "run", "--resume", "auto"], cwd=tmp_path)
    a, _ = load_weights(tmp_path / "full" / "last.safetensors")
    b, _ = load_weights(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    counters = [resuming.load_state(str(tmp_path / name / "last.pth.tar"))["we"] for name in ("full", "run")]
    assert counters[0] == counters[1] and counters[0]["counters"], counters[0]
    assert no_time(read_csv(tmp_path / "run" / "summary.csv")) == no_time(read_csv(tmp_path / "full" / "summary.csv"))


def test_resume_from_the_run_folder_alone(digits_run: Path, tmp_path: Path):  # noqa: F811
    """`--resume FOLDER`: the folder's newest state, its settings, and the folder itself (even moved)."""
    proc = run_fault("kill:we:0", [*DIGITS_RUN_ARGS, "--output", str(tmp_path / "old"), "--experiment", "run"], cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL
    os.rename(tmp_path / "old", tmp_path / "moved")
    run = tmp_path / "moved" / "run"
    run_train(["--resume", str(run)], cwd=tmp_path)
    assert not (tmp_path / "old").exists()
    a, _ = load_weights(digits_run / "last.safetensors")
    b, meta = load_weights(run / "last.safetensors")
    assert meta["epoch"] == 2 and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_target_from_yaml_and_the_state_folder(digits_run: Path, tmp_path: Path):  # noqa: F811
    """`resume:` in a YAML works like --resume; a run continues in the folder its state is in (YAML's own
    experiment name included), wherever the folder was moved; explicit --output/--experiment win."""
    moved = tmp_path / "moved"
    shutil.copytree(digits_run, moved / "full")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"resume: {moved / 'full'}\n")
    args = train.parse_args(["-c", str(cfg)])
    assert (args.resume, args.output, args.experiment) == (str(moved / "full" / "last.pth.tar"), str(moved), "full")
    assert args.epochs == 3 and args.weight_evolution  # the state's own settings
    cfg.write_text("experiment: full\nresume: auto\n")
    assert train.parse_args(["-c", str(cfg), "--output", str(moved)]).resume == str(moved / "full" / "last.pth.tar")
    cfg.write_text("experiment: full\n")
    args = train.parse_args(["-c", str(cfg), "--resume", str(moved / "full" / "checkpoint-1.pth.tar")])
    assert (args.output, args.experiment) == (str(moved), "full")
    args = train.parse_args(["--resume", str(moved / "full"), "--output", str(tmp_path / "o"), "--experiment", "e"])
    assert (args.output, args.experiment) == (str(tmp_path / "o"), "e")


def test_nan_loss_stops_with_last_good_checkpoint_intact(digits_run: Path, tmp_path: Path):  # noqa: F811
    proc = run_fault("nan:train:1", [*DIGITS_RUN_ARGS, "--output", str(tmp_path), "--experiment", "nan"], cwd=tmp_path)
    assert proc.returncode == 1
    last_line = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: the training loss became nan in epoch 1 \(by update \d+\); training stopped, "
                    r"the newest checkpoint, last.pth.tar of epoch 0, predates it and is intact", last_line), last_line
    assert "Traceback" not in proc.stderr
    run = tmp_path / "nan"
    assert resuming.load_state(str(run / "last.pth.tar"))["epoch"] == 0 and not (run / "checkpoint-1.pth.tar").exists()
    epoch0 = resuming.load_state(str(digits_run / "checkpoint-0.pth.tar"))
    for name in ("last.safetensors", "last_ema.safetensors"):  # released on the stop: the epoch-0 weights, finite
        a = resuming.model_weights(epoch0, ema="ema" in name)
        b, meta = load_weights(run / name)
        assert meta["epoch"] == 0 and all(torch.equal(a[k], b[k]) for k in a), name
    assert len(read_csv(run / "summary.csv")) == 1


def test_non_finite_weights_stop_before_the_checkpoint(tmp_path: Path):
    """NaN weights after an epoch's last update: its training loss is finite, its validation loss is not."""
    proc = run_fault("nanweight:train:1", [*TINY, *DIGITS, "--epochs", "3", "--output", str(tmp_path),
                                            "--experiment", "w"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the validation loss of the model became nan in epoch 1; training stopped before saving epoch 1")
    saved = resuming.load_state(str(tmp_path / "w" / "last.pth.tar"))
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in resuming.model_weights(saved).values())


def test_resume_with_more_epochs_warns_and_continues(digits_run: Path, tmp_path: Path):  # noqa: F811
    shutil.copytree(digits_run, tmp_path / "run")
    def checkpoints() -> dict[str, int]:
        files = [*(tmp_path / "run").glob("*.safetensors"), *(tmp_path / "run").glob("*.pth.tar")]
        return {p.name: p.stat().st_mtime_ns for p in files}

    before = checkpoints()
    out = run_train(["--resume", str(tmp_path / "run")], cwd=tmp_path)  # finished: nothing to do
    assert "the run already completed its 3 epochs; pass a larger --epochs to train longer" in out
    assert checkpoints() == before and any(n.endswith(".pth.tar") for n in before)
    out = run_train(["--resume", str(tmp_path / "run" / "last.pth.tar"), "--epochs", "4"], cwd=tmp_path)
    assert "resuming with settings that differ from the checkpoint's: epochs=4 (was 3)" in out
    assert "WE step 2" in out  # epoch 2 is no longer the last: its WE step runs before epoch 3
    assert load_weights(tmp_path / "run" / "last.safetensors")[1]["epoch"] == 3
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "summary.csv")] == ["0", "1", "2", "3"]
    assert load_weights(digits_run / "last.safetensors")[1]["epoch"] == 2  # the original folder is untouched


@pytest.mark.parametrize("argv, message", [
    (["--we-variant", "official"], "it was trained with --we-variant paper, not official"),
    (["--model", "test_efficientnet"], "it was trained with --model test_resnet, not test_efficientnet"),
])
def test_incompatible_resume_is_refused(digits_run: Path, tmp_path: Path, capsys, argv, message):  # noqa: F811
    shutil.copytree(digits_run, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", str(tmp_path / "run" / "last.pth.tar"), *argv])
    assert str(e.value.code).startswith("error: cannot resume ") and message in str(e.value.code), e.value.code
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


# ----------------------------------------------------------------------------- distributed: a rank dies or hangs

DDP = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no"]


def _ddp_fault(fault: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    launcher = [*DDP, "--main_process_port", str(_free_port())]
    start = time.monotonic()
    try:
        proc = run_fault(fault, [*TINY, *DIGITS, "-b", "16", "--epochs", "3", "--weight-evolution", *extra,
                                 "--output", str(tmp_path), "--experiment", "ddp"], cwd=tmp_path, launcher=launcher,
                         timeout=240, ACCELERATE_USE_CPU="1")
    finally:  # never leave a stopped rank behind
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--output {tmp_path} "], check=False)
    return proc, time.monotonic() - start


def test_ddp_rank_killed_ends_the_run(tmp_path: Path):
    """Rank 1 is SIGKILLed mid-epoch 1: the launcher stops rank 0 and fails naming the root cause; no hang.
    Rank 0 says why it stopped in one line (its collective failed, or the launcher's SIGTERM came first)."""
    proc, seconds = _ddp_fault("kill:train:1:1", tmp_path)
    assert proc.returncode != 0 and seconds < 120, seconds
    assert re.search(r"rank\s*:\s*1.*\n.*exitcode\s*:\s*-9", proc.stderr), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(r"error: (terminated by SIGTERM|process 0 of 2 stopped: a collective "
                                         r"failed)", errors[0]), proc.stderr[-3000:]
    assert resuming.load_state(str(tmp_path / "ddp" / "last.pth.tar"))["epoch"] == 0


def test_ddp_rank_hung_times_out_with_clear_error(tmp_path: Path):
    """Rank 1 stalls (SIGSTOP) mid-epoch 1: rank 0 fails after --dist-timeout with one clear error line."""
    proc, seconds = _ddp_fault("stop:train:1:1", tmp_path, "--dist-timeout", "10")
    assert proc.returncode != 0 and seconds < 150, seconds
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "process 0 of 2 stopped: a collective failed" in errors[0], proc.stderr[-3000:]
    assert resuming.load_state(str(tmp_path / "ddp" / "last.pth.tar"))["epoch"] == 0


class _FakeAccelerator:
    ended = 0

    def end_training(self):
        self.ended += 1


@pytest.mark.parametrize("error, ends", [
    (None, True), (ValueError("bad value"), True), (RuntimeError("CUDA out of memory"), True),
    (RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"), False),
    (RuntimeError("Application timeout caused pair closure"), False),
    (we_cli.Terminated("terminated by SIGTERM"), False),
])
def test_process_group_ends_unless_a_peer_is_gone(error, ends):
    """A live process group at exit aborts the process (SIGABRT); ending one whose peer died could block."""
    acc = _FakeAccelerator()
    try:
        with we_cli.process_group_ends(acc):
            if error is not None:
                raise error
    except type(error):
        pass
    assert acc.ended == int(ends)


def test_process_group_ending_never_hides_the_error(caplog):
    class Failing:
        def end_training(self):
            raise OSError("No space left on device")

    with pytest.raises(ValueError, match="the real problem"):
        with we_cli.process_group_ends(Failing()):
            raise ValueError("the real problem")
    assert "could not end the process group cleanly: No space left on device" in caplog.text


def test_processes_must_resume_the_same_state(monkeypatch, tmp_path: Path):
    """`--resume auto` is resolved by every process; a folder not shared by all would split the run."""
    acc = SimpleNamespace(num_processes=2)
    other = [("", None)]  # what the second process found: nothing, so it would start a new run
    monkeypatch.setattr(resuming, "gather_object", lambda mine: mine + other)
    with pytest.raises(ValueError, match=r"processes would start from different states \(process 0: .*last.pth.tar "
                                         r"\(epoch 4\), process 1: a new run \(epoch None\)\)"):
        resuming.check_same_start(acc.num_processes, str(tmp_path / "last.pth.tar"), {"epoch": 4})
    other[:] = [(str(tmp_path / "last.pth.tar"), 4)]
    resuming.check_same_start(acc.num_processes, str(tmp_path / "last.pth.tar"), {"epoch": 4})  # agreeing processes pass


def test_exit_process_runs_atexit_flushes_and_keeps_the_status(tmp_path: Path):
    # the scripts' fast exit: atexit handlers (loggers, trackers, worker clean-up) run, buffered output is written,
    # the status is the script's; a non-daemon thread still running keeps Python's normal (waiting) exit
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, sys, threading, time\n"
            "from we_timm.recipes.errors import exit_process\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))\n"
            "sys.stdout.write('buffered')\n"
            "if sys.argv[1] == 'thread':\n"
            "    threading.Thread(target=lambda: (time.sleep(0.5), print(' thread done'))).start()\n"
            "exit_process(3)\n")
    for mode, out in (("plain", "buffered"), ("thread", "buffered thread done")):
        marker.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60,
                              env=subprocess_env())
        assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (3, out, ""), mode
        assert marker.read_text() == "ok", mode


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_steady_malloc_keeps_freed_memory_for_the_next_step():
    # The pattern of a training step, in a fresh process: each step frees 45 MiB. With steady_malloc (mmap / trim
    # thresholds of 32 / 64 MiB) later steps reuse that memory: no page faults. With glibc's own
    # thresholds it depends on the process's history (a large block freed early slides them up); with a MALLOC_*
    # variable set, the user's choice wins: steady_malloc changes nothing, and at glibc's initial 128 KiB trim
    # threshold every step faults its 45 MiB in again.
    code = ("import resource, torch\n"
            "from we_timm.recipes.runtime import steady_malloc\n"
            "applied = steady_malloc()\n"
            "big = torch.ones(20 << 20, dtype=torch.uint8); del big\n"
            "faults = []\n"
            "for step in range(5):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    blocks = [torch.ones(15 << 20, dtype=torch.uint8) for _ in range(3)]\n"
            "    del blocks\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(applied, *faults[1:])\n")
    runs = {}
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for name, extra in (("steady", {}), ("user", {"MALLOC_TRIM_THRESHOLD_": "131072"})):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]
        applied, *faults = proc.stdout.split()
        runs[name] = applied, [int(f) for f in faults]
    page_faults_of_45_mib = (45 << 20) // resource.getpagesize()
    assert runs["steady"][0] == "True" and runs["steady"][1][-2:] == [0, 0], runs
    assert runs["user"][0] == "False" and min(runs["user"][1]) > page_faults_of_45_mib // 2, runs
