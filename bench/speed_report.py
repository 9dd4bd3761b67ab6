#!/usr/bin/env python3
"""Speed report: weight evolution's cost, as ratios measured in one run on this machine.

    python bench/speed_report.py                  # ~10 min on 2 CPU cores; writes bench/results/speed_report.md
    python bench/speed_report.py --quick --out /tmp/speed    # smoke test (~1 min)

Three measurements, each a ratio of two timings taken in this process, on the
same device and thread count, interleaved where they are repeated:

1. WE step: the vectorised engine (`WeightEvolution.step`) against the literal
   loop implementation of WE_SPEC (tests/reference_we.py, the one the tests
   check the engine against), paper and official variants, on timm models whose
   filter norms are spread over three decades (so that selection is
   non-trivial; as bench/we_step.py): the two digits models and ImageNet-sized
   resnet18 / mobilenetv2_050.
2. Trainer throughput: train.py's `train_one_epoch` (Accelerate-prepared model,
   optimizer and loader) against a plain timm + torch loop on the same model,
   batches and optimizer (bench/throughput.py's harness: in-memory digits
   batches, so data loading is not timed), epochs alternating.
3. WE share of an epoch: the median `we.step` time over the median train.py
   epoch time on digits, and projected onto a CIFAR-sized epoch (50k images)
   at the measured per-step speed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import throughput  # noqa: E402  (bench/throughput.py: train.py vs plain loop harness)
import we_step  # noqa: E402  (bench/we_step.py: engine / literal timers)
from we_timm import WEConfig  # noqa: E402

RESNET20LIKE = dict(layers=[3, 3, 3, 0], channels=[16, 32, 64, 64], stem_width=16)
STEP_MODELS = {  # name -> (timm name, kwargs, classes)
    "resnet20like (digits)": ("resnet18", RESNET20LIKE, 10),
    "mobilenetv2_050 (digits)": ("mobilenetv2_050", {}, 10),
    "resnet18 (ImageNet)": ("resnet18", {}, 1000),
    "mobilenetv2_050 (ImageNet)": ("mobilenetv2_050", {}, 1000),
}
TRAIN_MODELS = {
    "resnet20like": ["--model", "resnet18", "--model-kwargs", "layers=[3,3,3,0]", "channels=[16,32,64,64]",
                     "stem_width=16"],
    "mobilenetv2_050": ["--model", "mobilenetv2_050"],
}
TRAIN_COMMON = ["--img-size", "32", "-b", "64", "--lr", "0.1", "--sched", "step", "--warmup-epochs", "0"]
CONFIGS = {
    "paper": WEConfig(milestones=(60, 120)),
    "official": WEConfig(variant="official", rate=0.2, rate_norm=0.05, rate_bias=0.05, gamma=0.1, milestones=(60, 120)),
}


def step_rows(models: list[str], repeats: int, epoch: int) -> list[str]:
    rows = ["| model | params | variant | engine ms (median) | literal ms | literal / engine |", "|---|---|---|---|---|---|"]
    for label in models:
        name, kwargs, classes = STEP_MODELS[label]
        model = we_step.perturbed(name, num_classes=classes, **kwargs)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for variant, cfg in CONFIGS.items():
            fast = we_step.time_engine(model, cfg, epoch, repeats)
            slow = we_step.time_reference(model, cfg, epoch)
            rows.append(f"| {label} | {params:.2f}M | {variant} | {fast:.2f} | {slow:.0f} | {slow / fast:.0f}x |")
            print(rows[-1], flush=True)
    return rows


def train_rows(models: list[str], repeats: int, we_repeats: int) -> list[str]:
    rows = ["| model | steps/epoch | plain loop img/s | train.py img/s | train.py / plain throughput "
            "(median wall; best wall; median CPU time) | "
            "WE step ms | WE / digits epoch | WE / CIFAR-sized epoch (projected) |", "|---|---|---|---|---|---|---|---|"]
    for label in models:
        args, t, loader, (plain_model, plain_opt, plain_loader) = throughput.build([*TRAIN_MODELS[label], *TRAIN_COMMON])
        device, loss_fn = t.accelerator.device, torch.nn.CrossEntropyLoss()
        plain, ours = [], []  # (wall s, process CPU s) per epoch
        for epoch in range(repeats + 1):  # epoch 0 warms both loops up; then alternate
            p = timed(throughput.plain_epoch, plain_model, plain_opt, loss_fn, plain_loader, device)
            o = timed(throughput.ours_epoch, t, loader, epoch)
            if epoch:
                plain.append(p)
                ours.append(o)
        we_times = []
        for i in range(we_repeats):
            start = time.perf_counter()
            t.we.step(10 + i)
            we_times.append(time.perf_counter() - start)
        p, o = (statistics.median(x[0] for x in xs) for xs in (plain, ours))
        cpu_ratio = statistics.median(x[1] for x in plain) / statistics.median(x[1] for x in ours)
        best = min(x[0] for x in plain) / min(x[0] for x in ours)
        w = statistics.median(we_times)
        steps, images = len(loader), len(loader) * args.batch_size
        cifar = throughput.CIFAR_IMAGES // args.batch_size * (o / steps)
        rows.append(f"| {label} | {steps} | {images / p:.0f} | {images / o:.0f} | {p / o:.3f}; {best:.3f}; {cpu_ratio:.3f} "
                    f"| {w * 1e3:.1f} | {100 * w / o:.2f}% | {100 * w / (w + cifar):.3f}% |")
        print(rows[-1], flush=True)
    return rows


def timed(fn, *args) -> tuple[float, float]:
    """(wall, process CPU) seconds of `fn(*args)`; process CPU time is robust to other load on the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    return (f"{os.cpu_count()} cores (nproc), {cpu}, torch {torch.__version__}, timm {timm.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), CPU")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for speed_report.md")
    p.add_argument("--quick", action="store_true", help="smoke test: digits models only, few repeats")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: no oversubscription on a shared CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per loop (default 6; quick 1)")
    p.add_argument("--we-repeats", type=int, default=20, help="timed WE steps on the trained digits model")
    p.add_argument("--epoch", type=int, default=10, help="epoch passed to the timed steps (rate 0.05*sigmoid(10/15))")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    repeats = opts.repeats or (1 if opts.quick else 6)
    step_models = list(STEP_MODELS)[:2] if opts.quick else list(STEP_MODELS)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    start = time.perf_counter()
    steps = step_rows(step_models, 1 if opts.quick else 5, opts.epoch)
    trains = train_rows(list(TRAIN_MODELS), repeats, 3 if opts.quick else opts.we_repeats)
    command = " ".join(["python", "bench/speed_report.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        f"# Speed report ({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC})", "",
        f"- command: `{command}`", f"- machine: {machine()}; load average {load} at start (other users' jobs count)",
        f"- wall time: {(time.perf_counter() - start) / 60:.1f} min", "",
        f"## WE step: vectorised engine vs literal loops (tests/reference_we.py), epoch {opts.epoch}, "
        "spread filter norms", "", *steps, "",
        f"## train.py vs a plain timm loop, and WE's share of an epoch (digits at 32 px, batch 64, {repeats} "
        "alternating timed epochs each, in-memory batches)", "", *trains, "",
    ])
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    (Path(opts.out) / "speed_report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
