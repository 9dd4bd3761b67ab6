"""Every shipped hparams/*.yaml: starts with its command, parses with train.py's parser, and builds.

The paper's settings (Sec. 4.1.2) are pinned for the experiment configs.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import yaml

import train
from we_timm import WeightEvolution

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "hparams").glob("*.yaml"))

IMAGENET = dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=90, sched="step", decay_epochs=30, decay_rate=0.1)
IMAGENET_WE = dict(variant="paper", rate=0.05, beta=2.0, eta=8.0, gamma=0.05, milestones=(30, 60))
CIFAR = dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=200, batch_size=128, decay_rate=0.1)
CIFAR_WE = dict(variant="paper", rate=0.05, beta=2.5, eta=15.0, gamma=0.05, milestones=(60, 120))
PINNED = {  # file -> (args, WEConfig fields)
    "imagenet_resnet34_we.yaml": ({**IMAGENET, "model": "resnet34", "img_size": 224}, IMAGENET_WE),
    "imagenet_mobilenetv2_050_128_we.yaml": ({**IMAGENET, "model": "mobilenetv2_050", "img_size": 128}, IMAGENET_WE),
    "cifar10_resnet56like_we.yaml": ({**CIFAR, "dataset": "torch/cifar10", "num_classes": 10}, CIFAR_WE),
    "cifar100_mobilenetv2_we.yaml": ({**CIFAR, "dataset": "torch/cifar100", "model": "mobilenetv2_100"}, CIFAR_WE),
    "cifar10_official_we.yaml": (
        {**CIFAR, "dataset": "torch/cifar10"},
        dict(variant="official", rate=0.2, rate_norm=0.05, rate_bias=0.05, gamma=0.1, beta=2.5, milestones=(60, 120)),
    ),
    "digits_demo.yaml": ({"dataset": "digits"}, dict(variant="paper", rate=0.05)),
}


def parse(path: Path, tmp_path: Path):
    argv = ["-c", str(path)]
    if yaml.safe_load(path.read_text()).get("dataset") != "digits":
        argv += ["--data-dir", str(tmp_path)]  # any existing folder: nothing is read
    return train.parse_args(argv)


def test_all_pinned_configs_ship():
    assert {p.name for p in CONFIGS} >= set(PINNED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_starts_with_its_command(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"train.py -c hparams/{path.name}" in first


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds(path: Path, tmp_path: Path):
    args = parse(path, tmp_path)
    cfg = train.we_config_from_args(args)
    assert cfg is not None, "experiment configs run with weight evolution"
    model = timm.create_model(args.model, num_classes=args.num_classes or 10, **args.model_kwargs)
    assert WeightEvolution(model, cfg).units


@pytest.mark.parametrize("name", sorted(PINNED))
def test_paper_settings(name: str, tmp_path: Path):
    expected_args, expected_we = PINNED[name]
    args = parse(ROOT / "hparams" / name, tmp_path)
    for key, value in expected_args.items():
        assert getattr(args, key) == value, key
    cfg = train.we_config_from_args(args)
    for key, value in expected_we.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("name", ["imagenet_resnet34_we.yaml", "imagenet_mobilenetv2_050_128_we.yaml"])
def test_imagenet_global_batch_is_256(name: str, tmp_path: Path):
    path = ROOT / "hparams" / name
    processes = int(re.search(r"--num_processes (\d+)", path.read_text().splitlines()[0]).group(1))
    assert parse(path, tmp_path).batch_size * processes == 256
