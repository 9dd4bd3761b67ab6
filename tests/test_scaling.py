"""Issue 11, scaling out on CPU: WE on FSDP2 shards, two "nodes" on loopback, SyncBN / DeepSpeed refusals, WE bound
after `prepare`, and the shipped ImageNet recipe end to end on an ImageNet-shaped folder with 2 DDP processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from accelerate.utils import DistributedType
from torch import nn

import train
from helpers import perturb
from test_reliability import DIGITS_RUN_ARGS, run_fault
from test_train import DIGITS, ROOT, TINY, _free_port, digits_run, no_time, read_csv, run_train, subprocess_env  # noqa: F401
from we_timm import WEConfig, WeightEvolution
from we_timm.recipes import runtime
from we_timm.recipes.checkpoint import atomic_save, load_weights
from we_timm.recipes.resuming import load_state, newest_state

FAULT_RUNNER = str(ROOT / "tests" / "fault_runner.py")


def test_fsdp2_shards_evolve_like_the_whole_model(tmp_path: Path):
    """torchrun, 2 processes, gloo, `fully_shard` over a CPU mesh: two WE steps on the shards equal the
    unsharded model's, bit for bit, with the same stats; the sharded forward then sees the evolved values."""
    out = tmp_path / "fsdp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "tests" / "fsdp2_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report) == {"resnet18/paper", "resnet18/official", "odd_net/paper", "odd_net/official"}
    for case, r in report.items():
        assert r["sharded_params"] == r["params"] > 0, (case, r)  # every parameter really is split over 2 ranks
        assert r["bitwise_equal"] == r["params"] and r["max_abs_diff"] == 0.0, (case, r)
        assert r["stats_equal"] and r["same_output"] and r["changed"] > 0, (case, r)


def test_bind_evolution_follows_replaced_parameters():
    """FSDP's `prepare` replaces the parameters: WE is re-bound to the new ones, keeping config and state."""
    model = perturb(timm.create_model("test_resnet", num_classes=3), seed=0)
    we = WeightEvolution(model, WEConfig(variant="official", rate=0.3, gamma=0.3))
    we.step(0)
    prepared = nn.Module()
    prepared.module = perturb(timm.create_model("test_resnet", num_classes=3), seed=1)  # new parameter objects
    acc = SimpleNamespace(unwrap_model=lambda m: m.module)
    bound = runtime.bind_evolution(acc, prepared, we)
    new_params = {id(p) for p in prepared.module.parameters()}
    assert bound.units and all(id(u.param) in new_params for u in bound.units)
    assert bound.state_dict() == we.state_dict() and bound.config == we.config
    assert runtime.bind_evolution(acc, prepared, None) is None


@pytest.mark.parametrize("argv, message", [
    (["--sync-bn"], "error: --sync-bn needs CUDA devices (torch SyncBatchNorm), this run is on cpu"),
    (["--recovery-interval", "-1"], "error: --recovery-interval must be >= 0, got -1"),
])
def test_backend_refusals_are_one_line(tmp_path: Path, argv, message):
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, *DIGITS, "--epochs", "1", *argv, "--output", str(tmp_path / "out")])
    assert str(e.value.code) == message
    assert not (tmp_path / "out").exists()


def test_deepspeed_refuses_weight_evolution_and_fsdp_runs_version_2_only():
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, device=torch.device("cuda"))
    plain = dict(weight_evolution=True, sync_bn=False, model_ema=False, clip_grad=None, clip_mode="norm")
    with pytest.raises(ValueError, match="--weight-evolution does not run under DeepSpeed"):
        runtime.check_backend(acc, SimpleNamespace(**plain))
    runtime.check_backend(acc, SimpleNamespace(**{**plain, "weight_evolution": False, "sync_bn": True}))  # baseline
    acc.distributed_type = DistributedType.FSDP
    acc.state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))
    runtime.check_backend(acc, SimpleNamespace(**plain))  # FSDP2 + WE: the path tests/fsdp2_worker.py checks
    runtime.check_backend(acc, SimpleNamespace(**{**plain, "clip_grad": 1.0}))
    for change, message in (({"model_ema": True}, "--model-ema does not run under FSDP"),
                            ({"clip_grad": 1.0, "clip_mode": "agc"}, "--clip-mode agc does not run under FSDP")):
        with pytest.raises(ValueError, match=message):
            runtime.check_backend(acc, SimpleNamespace(**{**plain, **change}))
    acc.state.fsdp_plugin.fsdp_version = 1
    with pytest.raises(ValueError, match="FSDP version 2 only, this is version 1"):
        runtime.check_backend(acc, SimpleNamespace(**plain))


def test_fsdp2_checkpoints_hold_the_whole_state_and_resume_anywhere(tmp_path: Path):
    """torchrun, 2 processes, `fully_shard` over a CPU mesh, train.py's own save / resume functions: the gathered
    model and optimizer states equal the unsharded model's trained identically (bitwise, in the unsharded
    layout: SGD momentum and AdamW moments, two parameter groups), only the writing process gets them; resumed
    into a fresh sharded model and into a single-process one, both keep training bit-identically (also a state
    whose groups say fused, as a single-process run saves it: FSDP's own kernel steps it); evaluation,
    --we-reset-opt-state, --dist-bn and the rank check work on shards."""
    out = tmp_path / "state.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "tests" / "fsdp2_worker.py"), str(out), "state"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report) == {"test_resnet", "odd_net"}
    for case, r in report.items():
        assert r["sharded_params"] == r["params"] > 0 and r["buffers_plain"] and r["writer_only"], (case, r)
        assert r["fused_state_kernel"] == [None, None], (case, r)  # a fused state resumes with FSDP's kernel
        for key in ("saved_model", "saved_optimizer", "resumed_params", "resumed_plain_params", "fused_state_params",
                    "resumed_plain_optimizer", "dist_bn_buffers", "after_we_params", "after_we_optimizer"):
            assert r[key]["keys_equal"] and r[key]["bitwise_equal"] and r[key]["max_abs_diff"] == 0.0, (case, key)
        for key in ("saved_optimizer", "resumed_plain_optimizer", "after_we_optimizer"):
            assert r[key]["groups_equal"] and r[key]["params"] == r["params"], (case, key)
        ulps = r["clip_norm_rel_diff"] / torch.finfo(torch.float32).eps  # summation order: a few float32 ulps
        assert r["eval_output_equal"] and ulps <= 4, (case, r)
        assert r["we_opt_state_reset"][0] == r["we_opt_state_reset"][1] > 0, (case, r)  # same count as unsharded
        assert r["rank_check"] == "agree (0 compared)" and r["rank_check_dist_bn"].startswith("agree ("), (case, r)
        assert r["rank_check_dist_bn_broken"].startswith("RankMismatchError"), (case, r)
        assert "in-place operations" in r["agc"]  # why --clip-mode agc is refused under FSDP


def test_sync_bn_conversion_keeps_the_evolved_units():
    """timm's convert_sync_batchnorm (what --sync-bn does) swaps BN modules; WE finds the same units in them."""
    from timm.layers import convert_sync_batchnorm

    model = timm.create_model("resnet18", num_classes=10)
    before = [(u.name, u.pool, u.groups) for u in WeightEvolution(model).units]
    synced = convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert [(u.name, u.pool, u.groups) for u in WeightEvolution(synced).units] == before


# ----------------------------------------------------------------------------- recovery states (--recovery-interval)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_recovery_state_resumes_mid_epoch_bitwise(digits_run: Path, tmp_path: Path, workers: str):  # noqa: F811
    """Killed after update 2 of epoch 1 with a recovery state every update: `--resume auto` continues from the
    recovery state of update 1 and ends bit-identical to the uninterrupted run (which wrote no recovery state and
    read with no workers): same data order, augmentation, mixup, drop-path and WE step at the epoch's end."""
    argv = [*DIGITS_RUN_ARGS, "--recovery-interval", "1", "--workers", workers,
            "--output", str(tmp_path / "out"), "--experiment", "run"]
    assert run_fault("kill:train:1", argv, cwd=tmp_path).returncode == -signal.SIGKILL
    run = tmp_path / "out" / "run"
    newest = newest_state(str(run))
    assert newest == str(run / "recovery.pth.tar")
    recovery = load_state(newest)
    assert recovery["epoch"] == 0 and recovery["recovery"]["epoch"] == 1 and recovery["recovery"]["updates"] == 1
    assert recovery["we"]["last_epoch"] == 0  # taken after epoch 0's WE step: it is not redone
    run_train([*argv, "--resume", "auto"], cwd=tmp_path)
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, _ = load_weights(digits_run / name)
        b, meta = load_weights(run / name)
        assert meta["epoch"] == 2 and all(torch.equal(a[k], b[k]) for k in a), name
    assert no_time(read_csv(run / "summary.csv")) == no_time(read_csv(digits_run / "summary.csv"))
    assert not (run / "recovery.pth.tar").exists()  # an epoch state newer than it replaced it


def test_newest_state_orders_recovery_between_epochs(tmp_path: Path):
    def state(name: str, epoch: int, updates: int | None = None) -> None:
        s = {"format": "we_timm.train_state", "version": 1, "epoch": epoch, "args": {}}
        if updates is not None:
            s["recovery"] = {"epoch": epoch + 1, "updates": updates, "sums": [[0.0, 0.0, 0.0]]}
        atomic_save(s, tmp_path / name)

    state("checkpoint-0.pth.tar", 0)
    state("last.pth.tar", 1)
    state("recovery.pth.tar", 0, updates=5)  # mid-epoch 1: older than last.pth.tar (epoch 1 complete)
    assert newest_state(str(tmp_path)) == str(tmp_path / "last.pth.tar")
    state("recovery.pth.tar", 1, updates=1)  # mid-epoch 2
    assert newest_state(str(tmp_path)) == str(tmp_path / "recovery.pth.tar")


# ----------------------------------------------------------------------------- two nodes on the loopback address

NODE_ARGS = [*TINY, *DIGITS, "-b", "16", "--epochs", "3", "--weight-evolution", "--model-ema"]


def _two_nodes(script: list[str], argv: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Two `accelerate launch` "machines" (one CPU process each) meeting at 127.0.0.1."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", *script, *argv]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=subprocess_env(ACCELERATE_USE_CPU="1")))
    deadline = time.monotonic() + 300
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return results


def test_two_nodes_with_we_and_resume_after_kill(tmp_path: Path):
    """`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`: WE steps leave both ranks identical;
    both killed mid-epoch 1, `--resume auto` on both ends bit-identical to the uninterrupted two-node run."""
    where = ["--output", str(tmp_path / "out")]
    full = _two_nodes([str(ROOT / "train.py")], [*NODE_ARGS, *where, "--experiment", "full"], tmp_path)
    assert [p.returncode for p in full] == [0, 0], full[0].stdout[-3000:] + full[1].stdout[-3000:]
    assert "2 process(es)" in full[0].stdout
    assert full[0].stdout.count("parameters, BN statistics and EMA identical on 2 ranks") == 2  # after epochs 0, 1

    killed = _two_nodes([FAULT_RUNNER, "--fault", "kill:train:1"], [*NODE_ARGS, *where, "--experiment", "run"],
                        tmp_path)
    assert all(p.returncode != 0 for p in killed)
    assert load_state(str(tmp_path / "out" / "run" / "last.pth.tar"))["epoch"] == 0
    resumed = _two_nodes([str(ROOT / "train.py")], [*NODE_ARGS, *where, "--experiment", "run", "--resume", "auto"],
                         tmp_path)
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stdout[-3000:] + resumed[1].stdout[-3000:]
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, _ = load_weights(tmp_path / "out" / "full" / name)
        b, meta = load_weights(tmp_path / "out" / "run" / name)
        assert meta["epoch"] == 2 and all(torch.equal(a[k], b[k]) for k in a), name
    rows = read_csv(tmp_path / "out" / "run" / "summary.csv")
    assert no_time(rows) == no_time(read_csv(tmp_path / "out" / "full" / "summary.csv"))


# ----------------------------------------------------------------------------- ImageNet dress rehearsal


def make_imagenet_like(root: Path, classes: int = 20, train: int = 3, val: int = 1) -> Path:
    """train/ and validation/ folders of real JPEGs at ImageNet's typical sizes, WordNet-style class ids."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(500, 375), (500, 333), (375, 500), (640, 480), (400, 400)]
    for split, n in (("train", train), ("validation", val)):
        for c in range(classes):
            folder = root / split / f"n{1440764 + 97 * c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(c + i) % len(sizes)]
                base = rng.integers(0, 256, 3)
                pixels = np.clip(base + rng.normal(0, 40, (h // 8, w // 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(folder / f"img_{i}.JPEG", quality=85)
    return root


def test_imagenet_recipe_dress_rehearsal(tmp_path: Path):
    """hparams/imagenet_resnet34_we.yaml, unchanged but for epochs, samples, batch size and workers, on 2 DDP
    processes: its transforms (224 px crops of JPEGs), step schedule, WE and checkpoints run end to end, and
    validate.py reads the result back with no extra flags."""
    data = make_imagenet_like(tmp_path / "imagenet")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    cmd = [*launcher, str(ROOT / "train.py"), "-c", str(ROOT / "hparams" / "imagenet_resnet34_we.yaml"),
           "--data-dir", str(data), "--output", str(tmp_path / "out"),
           "--epochs", "2", "--train-num-samples", "60", "-b", "4", "-vb", "4", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=subprocess_env(ACCELERATE_USE_CPU="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = tmp_path / "out" / "imagenet-resnet34-we"
    rows = read_csv(run / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[0]["we_changed"] != "" and rows[1]["we_changed"] == ""
    weights, meta = load_weights(run / "model_best.safetensors")
    assert meta["architecture"] == "resnet34" and meta["num_classes"] == 1000
    assert meta["data_config"]["input_size"] == [3, 224, 224] and meta["data_config"]["crop_pct"] == 0.875
    assert meta["we_config"]["beta"] == 2.0 and meta["we_config"]["eta"] == 8.0 and meta["args"]["lr"] == 0.1
    assert "parameters, BN statistics identical on 2 ranks" in proc.stdout + proc.stderr
    val = subprocess.run([sys.executable, str(ROOT / "validate.py"), "--checkpoint", str(run / "model_best.safetensors"),
                          "--workers", "0", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=subprocess_env())
    assert val.returncode == 0, val.stderr[-3000:]
    result = json.loads(val.stdout.split("--result", 1)[1])
    assert result["num_samples"] == 20 and result["img_size"] == 224
    assert result["top1"] == pytest.approx(meta["metrics"]["top1"])


# ----------------------------------------------------------------------------- streaming datasets (wds/, hfds/, hfids/)


def make_wds(root: Path, shards: int = 2, n_train: int = 96, n_val: int = 40) -> Path:
    """webdataset tar shards of digits (`<key>.png` + `<key>.cls`) with timm's `_info.json` split table."""
    import io
    import tarfile

    from we_timm.recipes.dataset import DigitsDataset

    root.mkdir(parents=True)
    info = {"name": "digits", "splits": {}}
    for split, n in (("train", n_train), ("validation", n_val)):
        ds = DigitsDataset(split)
        names, lengths = [], []
        for s in range(shards):
            names.append(f"{split}-{s:06d}.tar")
            lengths.append(len(range(s, n, shards)))
            with tarfile.open(root / names[-1], "w") as tar:
                for i in range(s, n, shards):
                    img, label = ds[i]
                    png = io.BytesIO()
                    img.save(png, format="PNG")
                    for ext, data in (("png", png.getvalue()), ("cls", str(label).encode())):
                        member = tarfile.TarInfo(f"{split}_{i:05d}.{ext}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
        info["splits"][split] = {"name": split, "num_samples": n, "filenames": names, "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def make_hf_folder(folder: Path, n_train: int = 96, n_val: int = 40) -> Path:
    """A local Hugging Face `datasets` folder: one parquet file per split, image + ClassLabel columns."""
    import datasets

    from we_timm.recipes.dataset import DigitsDataset

    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(c) for c in range(10)])})
    for split, n in (("train", n_train), ("validation", n_val)):
        ds = DigitsDataset(split)
        rows = {"image": [ds[i][0] for i in range(n)], "label": [ds[i][1] for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


STREAM_ARGS = ["--model", "test_resnet", "--img-size", "32", "-b", "16", "--epochs", "2", "--workers", "0",
               "--lr", "0.05", "--warmup-epochs", "0", "--weight-evolution", "--log-interval", "1",
               "--train-num-samples", "64"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _ddp_train(argv: list[str], cwd: Path, **env: str) -> str:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    return run_train(argv, cwd=cwd, launcher=launcher, env={"ACCELERATE_USE_CPU": "1", **env})


def _validate(checkpoint: Path, cwd: Path, **env: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "validate.py"), "--checkpoint", str(checkpoint), "--workers",
                           "0", "--no-progress"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("--result", 1)[1])


def test_webdataset_shards_per_rank(tmp_path: Path):
    """`--dataset wds/...` on 2 processes: each rank reads its own shards; --train-num-samples 64 is timm's epoch
    length over all ranks (2 updates of 16 per rank); evaluation counts each of the 40 samples once."""
    data = make_wds(tmp_path / "wds")
    out = _ddp_train([*STREAM_ARGS, "--dataset", "wds/digits", "--data-dir", str(data), "--num-classes", "10",
                      "--output", str(tmp_path / "out"), "--experiment", "wds"], tmp_path)
    assert out.count("Train: 1 [   1/2 (100%)]") == 1 and "Train: 1 [   2/" not in out
    assert "WE step 0: parameters, BN statistics identical on 2 ranks" in out
    run = tmp_path / "out" / "wds"
    last = read_csv(run / "summary.csv")[-1]
    result = _validate(run / "last.safetensors", tmp_path)  # one process reads every shard
    assert result["num_samples"] == 40 and result["top1"] == pytest.approx(float(last["eval_top1"]))


def test_hugging_face_datasets_from_a_local_folder(tmp_path: Path):
    """`hfds/` (map-style: a fixed random subset of 64) on one process, `hfids/` (streaming, split by node) on
    two; offline, from a local parquet folder; classes from the ClassLabel feature."""
    make_hf_folder(tmp_path / "digits")
    (tmp_path / "cache").mkdir()
    common = [*STREAM_ARGS, "--data-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")]
    out = run_train([*common, "--dataset", "hfds/digits", "--experiment", "hfds"], cwd=tmp_path, env=OFFLINE)
    assert "Train: 1 [   3/4 (100%)]" in out
    assert load_weights(tmp_path / "out" / "hfds" / "last.safetensors")[1]["num_classes"] == 10
    out = _ddp_train([*common, "--dataset", "hfids/digits", "--val-num-samples", "40", "--num-classes", "10",
                      "--experiment", "hfids"], tmp_path, **OFFLINE)
    assert out.count("Train: 1 [   1/2 (100%)]") == 1
    assert len(read_csv(tmp_path / "out" / "hfids" / "summary.csv")) == 2


def test_streaming_dataset_without_its_package(tmp_path: Path, monkeypatch):
    from we_timm.recipes import dataset

    monkeypatch.setitem(dataset.PACKAGES, "wds", "no_such_webdataset_package")
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--epochs", "1", "--dataset", "wds/digits", "--data-dir", str(tmp_path),
                   "--output", str(tmp_path / "out")])
    assert str(e.value.code) == ("error: --dataset wds/digits needs the no_such_webdataset_package package: "
                                 "pip install 'we_timm[streaming]'")
    assert not (tmp_path / "out").exists()


def test_num_samples_of_a_class_sorted_folder_keeps_every_class():
    """--train-num-samples on a map-style set: a fixed random subset, not the first N (= the first classes)."""
    from we_timm.recipes.dataset import FixedSubset

    labels = [c for c in range(10) for _ in range(50)]  # class-sorted, like an ImageFolder
    subset = FixedSubset(labels, 60)
    picked = [subset[i] for i in range(len(subset))]
    assert len(picked) == 60 and len(set(picked)) == 10 and picked == sorted(picked)
    assert subset.indices == FixedSubset(labels, 60).indices  # the same in every run and process
