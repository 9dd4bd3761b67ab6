"""Benchmark: WE step time of the vectorised engine vs the literal loop reference.

Usage: python bench/we_step.py [--models resnet18 resnet34 ...] [--threads 2]

Both run in this process on the same perturbed model (copies), CPU, with the
paper variant and default WEConfig at a mid-stage epoch. Prints absolute ms per
step for both and their ratio. The literal implementation is the one the tests
check the engine against (tests/reference_we.py): Python loops over layers,
filters, slices and elements.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from reference_we import reference_step  # noqa: E402

from we_timm import WEConfig, WeightEvolution  # noqa: E402


def perturbed(name: str, seed: int = 0, **create_kwargs) -> torch.nn.Module:
    """A timm model whose filter norms spread over 3 decades, so selection is non-trivial."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **create_kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(torch.exp(torch.empty(m.weight.shape[0], 1, 1, 1).uniform_(-6.9, 0.0)))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
    return model


def time_engine(model: torch.nn.Module, cfg: WEConfig, epoch: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # first run builds the cached layouts: not counted
        m = copy.deepcopy(model)
        we = WeightEvolution(m, cfg)
        t0 = time.perf_counter()
        we.step(epoch)
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            t0 = time.perf_counter()
            we.step(epoch)
            times[0] = time.perf_counter() - t0
    return statistics.median(times) * 1000


def time_reference(model: torch.nn.Module, cfg: WEConfig, epoch: int) -> float:
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    reference_step(m, cfg, epoch)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet34", "mobilenetv2_050", "resnet50"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--epoch", type=int, default=10, help="epoch passed to step (rate 0.05*sigmoid(10/15))")
    ap.add_argument("--repeats", type=int, default=5, help="engine runs per model (median reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = WEConfig(milestones=(60, 120))
    print(f"torch {torch.__version__}, {args.threads} threads, WEConfig paper defaults, epoch {args.epoch}")
    print(f"{'model':<18}{'params':>10}{'engine ms':>12}{'literal ms':>14}{'speed-up':>11}")
    for name in args.models:
        model = perturbed(name)
        n = sum(p.numel() for p in model.parameters())
        fast = time_engine(model, cfg, args.epoch, args.repeats)
        slow = time_reference(model, cfg, args.epoch)
        print(f"{name:<18}{n / 1e6:>9.1f}M{fast:>12.1f}{slow:>14.0f}{slow / fast:>10.0f}x", flush=True)


if __name__ == "__main__":
    main()
