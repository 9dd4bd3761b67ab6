"""At home with timm's run files: timm's args.yaml through -c, our checkpoints through timm's loader, a timm
checkpoint through --resume."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2

import train
from test_train import DIGITS, TINY, digits_run, read_csv, run_train  # noqa: F401  (digits_run: fixture)
from we_timm.recipes import resuming
from we_timm.recipes.checkpoint import load_weights
from we_timm.recipes.resuming import load_state

TIMM_ARGS = Path(__file__).parent / "fixtures" / "timm_args.yaml"  # written by timm 1.0.29's train.py


def test_timm_args_yaml_is_a_config(tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING):
        args = train.parse_args(["-c", str(TIMM_ARGS), "--data-dir", str(tmp_path)])
    assert (args.model, args.batch_size, args.img_size, args.sched, args.model_ema) == ("test_resnet", 8, 32,
                                                                                         "cosine", True)
    warnings = [r.getMessage() for r in caplog.records if "timm's train.py" in r.getMessage()]
    assert len(warnings) == 1 and "kd_model_name" in warnings[0] and "aug_repeats" not in warnings[0]
    assert (args.aug_repeats, args.aug_splits, args.jsd_loss, args.split_bn) == (0, 0, False, False)  # now ours
    bad = tmp_path / "bad.yaml"
    bad.write_text(TIMM_ARGS.read_text() + "batch_sise: 8\n")  # a typo neither timm nor we know
    with pytest.raises(ValueError, match="unknown key.*batch_sise"):
        train.parse_args(["-c", str(bad), "--data-dir", str(tmp_path)])


@pytest.mark.parametrize("use_ema", [False, True])
def test_model_best_pth_tar_loads_with_timms_loader(digits_run: Path, use_ema: bool):  # noqa: F811
    """model_best.pth.tar is timm's layout (state_dict, state_dict_ema, arch, epoch): timm's own
    `load_checkpoint` (what its validate.py --checkpoint [--use-ema] calls) reads it."""
    path = digits_run / "model_best.pth.tar"
    model = timm.create_model("test_resnet", num_classes=10)
    load_checkpoint(model, str(path), use_ema=use_ema)
    expected, meta = load_weights(digits_run / ("model_best_ema.safetensors" if use_ema else "model_best.safetensors"))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "test_resnet" and ckpt["epoch"] == meta["epoch"] and ckpt["version"] == 2


def test_resume_a_timm_checkpoint(tmp_path: Path):
    """A checkpoint written by timm's own CheckpointSaver: model, optimizer, EMA and epoch are resumed; WE starts
    with a warning."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=2e-5, momentum=0.9)  # as timm's train.py
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    timm_args = argparse.Namespace(**{**yaml.safe_load(TIMM_ARGS.read_text()), "num_classes": 10, "epochs": 3,
                                      "data_dir": str(tmp_path)})  # the fixture's /tmp/tf/data exists nowhere else
    (tmp_path / "timm").mkdir()
    saver = CheckpointSaver(model, optimizer, args=timm_args, model_ema=ModelEmaV3(model),
                            checkpoint_dir=str(tmp_path / "timm"), recovery_dir=str(tmp_path / "timm"))
    saver.save_checkpoint(epoch=0, metric=10.0)
    ckpt = tmp_path / "timm" / "last.pth.tar"
    state = load_state(str(ckpt))
    assert state["timm"] and state["epoch"] == 0 and state["args"]["model"] == "test_resnet"
    out = run_train([*TINY, *DIGITS, "--resume", str(ckpt), "--weight-evolution", "--model-ema", "--epochs", "3",
                     "--output", str(tmp_path / "out"), "--experiment", "from-timm"], cwd=tmp_path)
    assert "the checkpoint has no weight-evolution state" in out and "epochs 1..2" in out
    assert "argument(s) of timm's train.py that we_timm does not implement" in out
    weights, meta = load_weights(tmp_path / "out" / "from-timm" / "last.safetensors")
    assert meta["epoch"] == 2 and meta["we_config"] is not None
    groups = torch.load(tmp_path / "out" / "from-timm" / "last.pth.tar", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)  # timm's state (fused None) resumed with this run's kernel


def test_fused_step_kernel_unless_the_run_names_one(digits_run: Path, fresh_accelerate_state):  # noqa: F811
    """torch's fused step for sgd / momentum / nesterov / adam / adamw on a CPU or CUDA device, on one device or
    under DDP; an --opt-kwargs that names the kernel, other optimizers and other setups keep torch's default (as
    timm's train.py). The update is the default kernel's to a float32 rounding; a loaded state keeps this run's
    kernel (an Adam step count where the kernel reads it)."""
    import copy

    from accelerate.utils import DistributedType

    from we_timm.recipes.runtime import keep_step_kernel, optimizer_kernel, step_kernel

    def acc(device="cpu", backend=DistributedType.NO):
        return SimpleNamespace(device=torch.device(device), distributed_type=backend)

    for opt in ("sgd", "momentum", "nesterov", "adam", "adamw"):
        assert optimizer_kernel(opt, {}, acc()) == {"fused": True}, opt
    for backend, device in ((DistributedType.MULTI_CPU, "cpu"), (DistributedType.MULTI_GPU, "cuda")):
        assert optimizer_kernel("sgd", {}, acc(device, backend)) == {"fused": True}
    for opt, kwargs, where in (
        ("lamb", {}, acc()), ("adagrad", {}, acc()), ("lookahead_sgd", {}, acc()), ("no_such_opt", {}, acc()),
        ("sgd", {"fused": False}, acc()), ("sgd", {"foreach": True}, acc()), ("adam", {"differentiable": True}, acc()),
        ("sgd", {}, acc("mps")), ("sgd", {}, acc("cuda", DistributedType.FSDP)),
        ("adamw", {}, acc("cuda", DistributedType.DEEPSPEED)),
    ):
        assert optimizer_kernel(opt, kwargs, where) == {}, (opt, kwargs, where)

    torch.manual_seed(0)
    model, x = timm.create_model("test_resnet", num_classes=10), torch.randn(4, 3, 32, 32)
    for opt in ("sgd", "adamw"):
        models = [copy.deepcopy(model) for _ in range(2)]
        optimizers = [create_optimizer_v2(m, opt, lr=0.05, weight_decay=2e-5, **kw)
                      for m, kw in zip(models, ({}, {"fused": True}))]
        for _ in range(2):  # the same gradients for both kernels; then the same values again
            models[0](x).square().mean().backward()
            for a, b in zip(*(m.parameters() for m in models)):
                b.grad = a.grad.clone()
            for o in optimizers:
                o.step()
                o.zero_grad()
            for a, b in zip(*(m.parameters() for m in models)):
                assert torch.allclose(a, b, rtol=0, atol=1e-6), opt
                b.data.copy_(a)

    saved = optimizers[0].state_dict()  # adamw, torch's default kernel: step counts as float32 on the CPU
    resumed = create_optimizer_v2(copy.deepcopy(models[0]), "adamw", lr=0.05, weight_decay=2e-5, fused=True)
    kernel = step_kernel(resumed)
    resumed.load_state_dict(saved)
    assert not any(g["fused"] for g in resumed.param_groups)  # torch takes the saved groups' flags
    keep_step_kernel(resumed, kernel)
    assert all(g["fused"] for g in resumed.param_groups) and step_kernel(resumed) == kernel
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 2 for s in resumed.state.values())
    unfused = create_optimizer_v2(copy.deepcopy(models[0]), "adamw", lr=0.05, weight_decay=2e-5, fused=False)
    kernel = step_kernel(unfused)
    unfused.load_state_dict(resumed.state_dict())
    keep_step_kernel(unfused, kernel)
    assert not any(g["fused"] for g in unfused.param_groups)

    groups = torch.load(digits_run / "last.pth.tar", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)  # train.py's default --opt sgd on this CPU
    args = train.parse_args([*TINY, *DIGITS, "--opt-kwargs", "fused=False"])
    t, _ = train.setup(args, train.build_accelerator(args))
    assert not any(g["fused"] for g in t.optimizer.param_groups)  # timm's default kernel, asked for


class _Stop(Exception):
    pass


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(4))


def _stop(*_args, **_kwargs):
    raise _Stop


def test_cuda_runs_get_timms_settings_and_non_blocking_pinned_copies(monkeypatch, fresh_accelerate_state,
                                                                     digits_run: Path):  # noqa: F811
    """With CUDA, train.py and validate.py set what timm's scripts set (TF32 matmuls, cudnn.benchmark) before
    anything else; batches are pinned by default on a CUDA device and copied to it without blocking (blocking
    elsewhere: MPS). No GPU here: CUDA is faked for the settings, the device is named for the pinning, and the
    scripts' loader config is swapped for the CUDA one (a no-op on CPU) to see it reach their loaders."""
    import validate
    from accelerate.utils import DataLoaderConfiguration
    from torch.backends import cuda, cudnn

    from we_timm.recipes import data, runtime

    before = cuda.matmul.allow_tf32, cudnn.benchmark
    try:
        cuda.matmul.allow_tf32, cudnn.benchmark = False, False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert not runtime.cuda_settings() and (cuda.matmul.allow_tf32, cudnn.benchmark) == (False, False)
        assert not runtime.loader_config().non_blocking
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert runtime.cuda_settings() and (cuda.matmul.allow_tf32, cudnn.benchmark) == (True, True)
        assert runtime.loader_config().non_blocking
    finally:
        cuda.matmul.allow_tf32, cudnn.benchmark = before
    monkeypatch.undo()
    for script, first in ((train, "build_accelerator"), (validate, "check_args")):  # the settings come first
        calls = []
        monkeypatch.setattr(script, "cuda_settings", lambda calls=calls: calls.append(1))
        monkeypatch.setattr(script, first, _stop)
        with pytest.raises(_Stop):
            script.main(argparse.Namespace(debug=True))
        assert calls == [1], script.__name__
    monkeypatch.undo()

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert (data.pin_memory(None, gpu), data.pin_memory(None, cpu)) == (True, False)
    assert (data.pin_memory(False, gpu), data.pin_memory(True, cpu)) == (False, True)  # --no-pin-mem / --pin-mem
    for script in (train, validate):
        monkeypatch.setattr(script, "loader_config", lambda: DataLoaderConfiguration(non_blocking=True))
    args = train.parse_args([*TINY, *DIGITS])
    acc = train.build_accelerator(args)
    t, _ = train.setup(args, acc)
    assert acc.non_blocking and t.loader_train._non_blocking and t.loader_eval._non_blocking
    on_cuda = acc.device.type == "cuda"  # not here; on a GPU machine the default pins
    assert t.loader_train.pin_memory == on_cuda and t.loader_eval.pin_memory == on_cuda
    assert args.pin_mem is None  # the device decides in each run: args.yaml does not carry this machine's choice
    args = train.parse_args([*TINY, *DIGITS, "--pin-mem"])
    t, _ = train.setup(args, train.build_accelerator(args))
    assert t.loader_train.pin_memory and t.loader_eval.pin_memory
    assert "pin_mem" not in resuming.saved_args(str(digits_run / "last.pth.tar"))  # resumed: this machine's default
    stream = torch.utils.data.DataLoader(_Stream(), batch_size=2)  # a streaming set: placed, not sharded, by us
    assert data.prepare_loader(SimpleNamespace(device=cpu, non_blocking=True), stream)._non_blocking
    pinned = []
    monkeypatch.setattr(validate, "pin_memory", lambda flag, device: pinned.append((flag, device.type)) or False)
    vargs = validate.get_args_parser().parse_args(["--checkpoint", str(digits_run / "model_best.safetensors"),
                                                   "--workers", "0", "--no-progress", "--num-samples", "8",
                                                   "--pin-mem"])
    assert validate._accelerator(vargs).non_blocking
    validate.main(vargs)
    assert pinned == [(True, "cpu")]


# ----------------------------------------------------------------------------- timm's flags, same meaning


def test_model_flags_head_init_and_fast_norm():
    from timm.layers import is_fast_norm, set_fast_norm

    args = train.parse_args([*TINY, *DIGITS, "--head-init-scale", "0", "--head-init-bias", "0.5", "--fast-norm"])
    try:
        model, _ = train.build_model(args, num_classes=10)
        assert is_fast_norm()
    finally:
        set_fast_norm(False)
    assert (model.get_classifier().weight == 0).all() and (model.get_classifier().bias == 0.5).all()


def test_bce_sum_and_pos_weight():
    args = train.parse_args([*TINY, *DIGITS, "--bce-loss", "--bce-sum", "--bce-pos-weight", "2"])
    loss_fn, _ = train.build_loss(args, 10)
    assert loss_fn.sum_classes and float(loss_fn.pos_weight) == 2.0
    plain, _ = train.build_loss(train.parse_args([*TINY, *DIGITS, "--bce-loss"]), 10)
    assert not plain.sum_classes and plain.pos_weight is None


def test_augmentation_probabilities_and_train_crop_mode():
    from we_timm.recipes.data import build_train_loaders, load_train_data

    args = train.parse_args([*TINY, *DIGITS, "--grayscale-prob", "1.0", "--gaussian-blur-prob", "0.5",
                             "--color-jitter-prob", "0.3", "--train-crop-mode", "rkrc"])
    train_set, val_set, _ = load_train_data(args)
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
              "crop_pct": 1.0, "crop_mode": "center"}
    loader, _ = build_train_loaders(args, config, train_set, val_set)
    text = repr(loader.dataset.transform)
    assert "RandomGrayscale(p=1.0)" in text and "GaussianBlur" in text and "p=0.3" in text
    assert "ResizeKeepRatio" in text or "RandomResizedCropAndInterpolation" not in text  # rkrc: timm's keep-ratio crop


def test_torchcompile_mode_reaches_torch_compile(tmp_path: Path, monkeypatch):
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(train.torch, "compile", fake_compile)
    train.main(train.parse_args([*TINY, *DIGITS, "--epochs", "1", "--torchcompile", "--torchcompile-mode",
                                 "max-autotune", "--output", str(tmp_path), "--experiment", "c"]))
    assert seen == {"backend": "inductor", "mode": "max-autotune"}


def test_validate_flags_reparam_test_pool_train_size_model_kwargs(digits_run: Path, monkeypatch):  # noqa: F811
    import validate

    calls = {}
    monkeypatch.setattr(validate, "reparameterize_model", lambda m: calls.setdefault("reparam", m))
    monkeypatch.setattr(validate, "apply_test_time_pool", lambda m, cfg: calls.setdefault("pool", (m, False)))
    argv = ["--checkpoint", str(digits_run / "model_best.safetensors"), "--workers", "0", "--no-progress",
            "--num-samples", "16", "--reparam", "--test-pool", "--use-train-size", "--model-kwargs", "drop_rate=0.3"]
    validate.main(validate.get_args_parser().parse_args(argv))
    assert "reparam" in calls and "pool" in calls
    assert calls["reparam"].drop_rate == 0.3  # --model-kwargs reached create_model


def test_validate_use_train_size():
    import validate

    model = timm.create_model("resnet50.a1_in1k", pretrained=False)  # train 224 px, test 288 px
    args = validate.get_args_parser().parse_args([])
    assert validate.resolve_eval_config(args, model, {})["input_size"] == (3, 288, 288)
    args = validate.get_args_parser().parse_args(["--use-train-size"])
    assert validate.resolve_eval_config(args, model, {})["input_size"] == (3, 224, 224)
    saved = {"data_config": {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bilinear",
                             "mean": [0.5] * 3, "std": [0.5] * 3, "crop_mode": "center"}}
    args = validate.get_args_parser().parse_args([])  # a checkpoint's own evaluation config beats the test size
    config = validate.resolve_eval_config(args, model, saved)
    assert tuple(config["input_size"]) == (3, 224, 224) and config["crop_pct"] == 0.875  # not test_crop_pct 1.0


def test_model_dtype_bfloat16_run_with_we(tmp_path: Path):
    """--model-dtype bfloat16: parameters stored in bf16 (WE computes in fp32 and casts back), inputs cast."""
    run_train([*TINY, *DIGITS, "--epochs", "2", "--weight-evolution", "--model-dtype", "bfloat16",
               "--output", str(tmp_path), "--experiment", "bf16"], cwd=tmp_path)
    weights, _ = load_weights(tmp_path / "bf16" / "last.safetensors")
    assert weights["conv1.0.weight"].dtype == torch.bfloat16
    assert read_csv(tmp_path / "bf16" / "summary.csv")[0]["we_changed"] != ""
    with pytest.raises(ValueError, match="--amp needs --model-dtype float32"):
        train.parse_args([*TINY, "--amp", "--model-dtype", "bfloat16"])


# ----------------------------------------------------------------------------- --aug-repeats, --aug-splits, --jsd-loss


def _draw_index(keys, n: int) -> list[tuple[int, int]]:
    return [divmod(int(k), n) for k in keys]


def test_aug_repeats_sampler_spreads_seeded_copies_over_ranks():
    from we_timm.recipes.sampling import EpochShuffle, repeat_selection

    n = 600
    ranks = [EpochShuffle(n, seed=3, repeats=3, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    per_rank = [list(s) for s in ranks]
    assert [len(k) for k in per_rank] == [len(s) for s in ranks] == [256, 256]  # timm: 600 // 256 * 256 / 2
    assert repeat_selection(100, 2) == 50 and repeat_selection(100, 1) == 100  # small sets: about n per epoch
    everything = ranks[0].repeated_keys(torch.randperm(n))
    assert len(everything) == 3 * n and len(set(everything.tolist())) == 3 * n  # every copy its own draw
    pairs = _draw_index(everything, n)
    copies = {}
    for draw, index in pairs:
        copies.setdefault(index, set()).add(draw)
    assert all(len(d) == 3 and all(4 * 6 <= x < 5 * 6 for x in d) for d in copies.values())  # epoch 4's draws
    # the copies of an image sit in a row and are dealt out in turn: every image of rank 0's first 30 is also on rank 1
    first = {i for _, i in _draw_index(per_rank[0][:30], n)}
    assert first <= {i for _, i in _draw_index(per_rank[1][:40], n)}
    assert per_rank == [list(s) for s in ranks]  # from (seed, epoch) alone
    ranks[0].set_epoch(5)
    assert list(ranks[0]) != per_rank[0]
    frac = EpochShuffle(10, seed=0, repeats=1.5).repeated_keys(torch.arange(10))
    counts = torch.bincount(frac % 10, minlength=10)
    assert len(frac) == 15 and sorted(counts.tolist()) == [1] * 5 + [2] * 5  # timm's fractional repeats
    plain = EpochShuffle(n, seed=3)
    plain.set_epoch(4)
    assert sorted(k - 4 * n for k in plain) == list(range(n))  # without repeats: unchanged keys


def test_aug_splits_batches_views_and_erases_only_augmented_splits():
    from we_timm.recipes.data import DeviceInputs, build_train_loaders, load_train_data

    args = train.parse_args([*TINY, *DIGITS, "--aug-splits", "3", "--jsd-loss", "--split-bn", "--reprob", "1.0",
                             "--resplit", "--smoothing", "0.2"])
    loss_fn, mixup_fn = train.build_loss(args, 10)
    assert type(loss_fn).__name__ == "JsdCrossEntropy" and loss_fn.num_splits == 3 and mixup_fn is None
    train_set, val_set, _ = load_train_data(args)
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
              "crop_pct": 1.0, "crop_mode": "center"}
    loader, _ = build_train_loaders(args, config, train_set, val_set)
    images, target = next(iter(loader))
    b = args.batch_size
    assert images.shape == (3 * b, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(target[:b], target[b:2 * b]) and torch.equal(target[:b], target[2 * b:])
    assert not torch.equal(images[:b], images[b:2 * b])  # the clean split and an augmented view differ
    erase = DeviceInputs(config, torch.device("cpu"), re_prob=1.0, re_mode="const", re_num_splits=3)
    plain = DeviceInputs(config, torch.device("cpu"))
    out, ref = erase(images.clone()), plain(images.clone())
    assert torch.equal(out[:b], ref[:b]) and not torch.equal(out[b:], ref[b:])  # --resplit: the clean split kept


def test_aug_splits_jsd_split_bn_run_with_we(tmp_path: Path):
    """A real run: 3 views per sample, JSD loss, split BN, random erasing of the augmented views, WE; the weights
    files hold the plain architecture (no aux BNs) and validate.py reads them; the training state keeps them."""
    from timm.layers import SplitBatchNorm2d

    import validate

    run_train([*TINY, *DIGITS, "--epochs", "2", "--aug-splits", "3", "--jsd-loss", "--split-bn", "--reprob", "0.5",
               "--resplit", "--weight-evolution", "--output", str(tmp_path), "--experiment", "splits"], cwd=tmp_path)
    run = tmp_path / "splits"
    weights, _ = load_weights(run / "last.safetensors")
    assert weights and not [k for k in weights if "aux_bn" in k]
    state = load_state(str(run / "last.pth.tar"))
    assert [k for k in state["state_dict"] if "aux_bn" in k]
    assert read_csv(run / "summary.csv")[0]["we_changed"] != ""
    model = train.build_model(train.parse_args([*TINY, *DIGITS, "--aug-splits", "3", "--split-bn"]), 10)[0]
    assert not any(isinstance(m, SplitBatchNorm2d) for m in model.modules())  # conversion happens in setup
    for path in (run / "last.safetensors", run / "last.pth.tar"):
        assert validate.cli(["--checkpoint", str(path), "--dataset", "digits"]) == 0


def test_aug_repeats_and_splits_resume_mid_epoch_bitwise(tmp_path: Path):
    """Killed after update 2 of epoch 1 with a recovery state every update; resumed, it ends bit-identical to the
    uninterrupted run: the repeated copies and the augmented views draw the same augmentations."""
    from test_reliability import run_fault
    from we_timm.recipes.checkpoint import load_weights as weights_of

    flags = [*TINY, *DIGITS, "--epochs", "2", "--aug-repeats", "2", "--aug-splits", "2", "--reprob", "0.5",
             "--resplit", "--weight-evolution", "-b", "16"]
    run_train([*flags, "--output", str(tmp_path / "a"), "--experiment", "run"], cwd=tmp_path)
    argv = [*flags, "--recovery-interval", "1", "--output", str(tmp_path / "b"), "--experiment", "run"]
    assert run_fault("kill:train:1", argv, cwd=tmp_path).returncode == -9
    run_train([*argv, "--resume", "auto"], cwd=tmp_path)
    a, _ = weights_of(tmp_path / "a" / "run" / "last.safetensors")
    b, meta = weights_of(tmp_path / "b" / "run" / "last.safetensors")
    assert meta["epoch"] == 1 and all(torch.equal(a[k], b[k]) for k in a)
    rows = [{k: v for k, v in r.items() if "time" not in k} for r in read_csv(tmp_path / "a" / "run" / "summary.csv")]
    again = [{k: v for k, v in r.items() if "time" not in k} for r in read_csv(tmp_path / "b" / "run" / "summary.csv")]
    assert rows == again


@pytest.mark.parametrize("argv, message", [
    (["--aug-splits", "1"], "--aug-splits must be 0 (off) or >= 2"),
    (["--aug-repeats", "0.5"], "--aug-repeats must be 0 (off) or >= 1, got 0.5"),
    (["--jsd-loss"], "--jsd-loss needs --aug-splits >= 2"),
    (["--aug-splits", "2", "--jsd-loss", "--bce-loss"], "--jsd-loss and --bce-loss exclude each other"),
    (["--split-bn"], "--split-bn needs --aug-splits >= 2 or --resplit"),
    (["--aug-splits", "2", "--split-bn", "--sync-bn"], "--split-bn and --sync-bn exclude each other"),
    (["--aug-splits", "2", "--mixup", "0.2"], "--aug-splits cannot be combined with --mixup/--cutmix"),
    (["--aug-splits", "2", "--no-prefetcher"], "--aug-splits needs the prefetcher path"),
])
def test_aug_flag_combinations_timm_refuses_are_one_line(tmp_path: Path, argv, message):
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, *DIGITS, "--epochs", "1", *argv, "--output", str(tmp_path / "out")])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
    assert not (tmp_path / "out").exists()


def test_aug_repeats_needs_a_map_style_dataset(tmp_path: Path):
    with pytest.raises(ValueError, match="need a map-style dataset"):
        train.parse_args([*TINY, "--dataset", "wds/x", "--data-dir", str(tmp_path), "--aug-repeats", "3"])


def test_aug_repeats_on_two_processes(tmp_path: Path):
    """Each process reads its own share of the repeated order (Accelerate does not shard it again): 128 images
    -> 64 samples per process and epoch, 4 updates of 16, as without repeats; WE stays identical on both ranks."""
    from test_train import _free_port

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    out = run_train([*TINY, *DIGITS, "-b", "16", "--epochs", "2", "--aug-repeats", "3", "--log-interval", "1",
                     "--weight-evolution", "--output", str(tmp_path), "--experiment", "rep"], cwd=tmp_path,
                    launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert "Train: 0 [   3/4 (100%)]" in out and "[   4/" not in out
    assert "parameters, BN statistics identical on 2 ranks" in out
