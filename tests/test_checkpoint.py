"""`we_timm.recipes.checkpoint`: atomic safetensors with JSON metadata, timm .pth reads, one-line errors."""
from __future__ import annotations

import argparse
import os

import pytest
import timm
import torch

from we_timm.recipes.checkpoint import (
    CheckpointError,
    atomic_save,
    ema_sibling,
    is_safetensors_file,
    load_weights,
    read_metadata,
    save_safetensors,
)
from we_timm.recipes.models import load_into_model

META = {
    "format": "we_timm",
    "architecture": "test_resnet",
    "num_classes": 10,
    "data_config": {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0, "crop_mode": "center"},
    "model_kwargs": {},
    "we_config": None,
    "epoch": 1,
    "metrics": {"top1": 12.5, "top5": 50.0, "loss": 2.25},
    "args": {"lr": 0.1, "milestones": [1, 2]},
    "ema": False,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).eval()


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_safetensors_round_trip_with_metadata(tmp_path, model):
    path = tmp_path / "model_best.safetensors"
    save_safetensors(path, model.state_dict(), META)
    sd, meta = load_weights(path)
    _same(sd, model.state_dict())
    assert meta == META  # nested dicts, lists, None, bools, floats survive the str->str header
    assert read_metadata(path) == META
    assert os.listdir(tmp_path) == ["model_best.safetensors"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_save_dealiases_tied_and_noncontiguous(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "view": base[1], "t": base.t()}
    save_safetensors(tmp_path / "x.safetensors", sd, {})
    out, meta = load_weights(tmp_path / "x.safetensors")
    assert meta == {}
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    assert out["a"].data_ptr() != out["tied"].data_ptr()


def test_save_overwrites_atomically_and_needs_parent(tmp_path, model):
    path = tmp_path / "last.safetensors"
    save_safetensors(path, {"w": torch.zeros(2)}, {"epoch": 0})
    save_safetensors(path, {"w": torch.ones(2)}, {"epoch": 1})
    sd, meta = load_weights(path)
    assert meta["epoch"] == 1 and torch.equal(sd["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="does not exist"):
        save_safetensors(tmp_path / "missing" / "x.safetensors", {"w": torch.zeros(1)}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_safetensors(path, {"w": torch.zeros(1)}, {"bad": object()})
    assert load_weights(path)[1]["epoch"] == 1  # a failed save leaves the old file intact
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors"]


def test_training_states_skip_the_zip_checksums_torch_load_never_reads(tmp_path, model):
    # torch.save's CRC32 of every record costs about a quarter of the save; torch.load does not check them, and
    # a truncated file is refused either way. The process-wide option is left as it was.
    import zipfile

    if not hasattr(torch.serialization, "get_crc32_options"):
        pytest.skip("torch < 2.6 always writes the checksums")
    state = {"state_dict": model.state_dict(), "epoch": 3}
    atomic_save(state, tmp_path / "last.pth.tar")
    with zipfile.ZipFile(tmp_path / "last.pth.tar") as archive:
        tensors = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 0]
        assert tensors and all(i.CRC == 0 for i in tensors)
    assert torch.serialization.get_crc32_options() is True
    loaded = torch.load(tmp_path / "last.pth.tar", weights_only=True)
    assert loaded["epoch"] == 3
    _same(loaded["state_dict"], state["state_dict"])
    blob = (tmp_path / "last.pth.tar").read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(tmp_path / "cut.pth.tar")


@pytest.mark.parametrize("key,use_ema,expect", [
    ("state_dict", False, "plain"),
    ("state_dict", True, "ema"),
    ("model", False, "plain"),
    ("", False, "plain"),
])
def test_timm_pth_unwrapping(tmp_path, model, key, use_ema, expect):
    plain = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP prefix is stripped
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if key == "state_dict":  # timm train.py layout
        ckpt = {"epoch": 3, "arch": "test_resnet", "state_dict": plain, "state_dict_ema": ema,
                "args": argparse.Namespace(num_classes=10, lr=0.1), "optimizer": {"state": {}}}
    elif key == "model":
        ckpt = {"model": plain}
    else:
        ckpt = plain
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save(ckpt, path)
    sd, meta = load_weights(path, use_ema=use_ema)
    _same(sd, ema if expect == "ema" else model.state_dict())
    if key == "state_dict":
        assert meta["architecture"] == "test_resnet" and meta["num_classes"] == 10 and meta["epoch"] == 3
        assert meta["ema"] is use_ema


def test_safetensors_detected_by_content(tmp_path):
    path = tmp_path / "weights.bin"
    save_safetensors(path, {"w": torch.ones(3)}, {"epoch": 2})
    assert is_safetensors_file(path)
    assert load_weights(path)[1] == {"epoch": 2}


class _Opaque:  # an arbitrary pickled object: weights_only=True must refuse it
    pass


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "text", "truncated_st", "truncated_pth", "garbage_st", "list", "no_tensors", "unsafe"])
def test_bad_files_raise_one_line(tmp_path, model, case):
    good_st = tmp_path / "good.safetensors"
    save_safetensors(good_st, model.state_dict(), META)
    good_pth = tmp_path / "good.pth"
    atomic_save({"state_dict": model.state_dict()}, good_pth)
    path = {
        "missing": lambda: tmp_path / "nope.safetensors",
        "directory": lambda: tmp_path,
        "empty": lambda: _write(tmp_path / "e.pth", b""),
        "text": lambda: _write(tmp_path / "t.pth", b"hello, I am a README\n" * 10),
        "truncated_st": lambda: _write(tmp_path / "t.safetensors", good_st.read_bytes()[: good_st.stat().st_size // 2]),
        "truncated_pth": lambda: _write(tmp_path / "t.pth.tar", good_pth.read_bytes()[: good_pth.stat().st_size // 2]),
        "garbage_st": lambda: _write(tmp_path / "g.safetensors", os.urandom(4096)),
        "list": lambda: (atomic_save([1, 2, 3], tmp_path / "l.pth"), tmp_path / "l.pth")[1],
        "unsafe": lambda: (torch.save({"state_dict": _Opaque()}, tmp_path / "u.pth"), tmp_path / "u.pth")[1],
        "no_tensors": lambda: (atomic_save({"epoch": 1, "lr": 0.1}, tmp_path / "n.pth"), tmp_path / "n.pth")[1],
    }[case]()
    with pytest.raises(CheckpointError) as info:
        load_weights(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and len(msg) < 400, msg


def test_load_into_model_names_mismatches(model):
    sd = model.state_dict()
    other_classes = timm.create_model("test_resnet", num_classes=7)
    with pytest.raises(CheckpointError, match=r"does not match model test_resnet: shape mismatch .*fc\.weight \(10, \d+\) vs \(7, \d+\)"):
        load_into_model(other_classes, sd)
    other_arch = timm.create_model("test_efficientnet", num_classes=10)
    with pytest.raises(CheckpointError) as info:
        load_into_model(other_arch, sd)
    msg = str(info.value)
    assert "test_efficientnet" in msg and "missing keys [" in msg and "unexpected [" in msg and "more)" in msg
    assert "\n" not in msg
    partial = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    with pytest.raises(CheckpointError, match=r"missing keys \[fc\.weight, fc\.bias\]"):
        load_into_model(timm.create_model("test_resnet", num_classes=10), partial)
    fresh = timm.create_model("test_resnet", num_classes=10)
    load_into_model(fresh, partial, strict=False)
    load_into_model(fresh, sd)
    _same(fresh.state_dict(), sd)


def test_ema_sibling():
    assert ema_sibling("run/model_best.safetensors") == os.path.join("run", "model_best_ema.safetensors")
