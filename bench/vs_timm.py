#!/usr/bin/env python3
"""train.py against timm's own train.py on the same job: whole-process wall time and per-epoch time.

    python bench/vs_timm.py /path/to/pytorch-image-models/train.py [--pairs 3] [--epochs 6]

Builds an ImageFolder of scikit-learn's digits (1437 train / 360 validation PNGs at 32 px), then runs both
scripts with identical flags (resnet18, `-b 64 --opt sgd --lr 0.1 --sched cosine --warmup-epochs 0 -j 1
--num-classes 10`), alternating ours / timm's, for `--pairs` pairs at `--epochs` epochs and at 1 epoch.
Per-epoch time = (wall at N epochs - wall at 1 epoch) / (N - 1): what an extra epoch costs, start-up excluded.
Prints the median, min and max ratio ours / timm of both. timm's script is passed as an argument and never
copied here. Run it on an otherwise idle machine: both sides slow down when other jobs share the cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "resnet18", "-b", "64", "--opt", "sgd", "--lr", "0.1", "--sched", "cosine", "--warmup-epochs",
         "0", "-j", "1", "--num-classes", "10", "--img-size", "32"]


def digits_folder(root: Path) -> Path:
    """train/ and validation/ class folders of digits PNGs (the split of we_timm's built-in `digits`)."""
    sys.path.insert(0, str(ROOT))
    from we_timm.recipes.data import DigitsDataset

    for split in ("train", "validation"):
        data = DigitsDataset(split)
        for i in range(len(data)):
            image, label = data[i]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:05d}.png")
    return root


def run(script: str, data: Path, out: Path, epochs: int, tag: str, timm: bool) -> float:
    """Wall seconds of one whole process."""
    cmd = [sys.executable, script, "--data-dir", str(data), *FLAGS, "--epochs", str(epochs),
           "--output", str(out), "--experiment", tag]
    if timm:
        cmd += ["--device", "cpu"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("timm_train", help="timm's train.py (from a pytorch-image-models checkout)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    opts = p.parse_args()
    ours_script = str(ROOT / "train.py")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = digits_folder(tmp / "digits")
        walls = {(side, e): [] for side in ("ours", "timm") for e in (1, opts.epochs)}
        for i in range(opts.pairs):
            for epochs in (opts.epochs, 1):
                for side in (("ours", "timm") if i % 2 == 0 else ("timm", "ours")):  # alternate who goes first
                    script = ours_script if side == "ours" else opts.timm_train
                    walls[side, epochs].append(run(script, data, tmp / "out", epochs, f"{side}-{i}-{epochs}",
                                                   side == "timm"))
                    print(f"pair {i} {side:4s} {epochs} epoch(s): {walls[side, epochs][-1]:.1f} s", flush=True)
    n = opts.epochs
    for name, ratios in (
        (f"whole process, {n} epochs", [o / t for o, t in zip(walls["ours", n], walls["timm", n])]),
        ("whole process, 1 epoch", [o / t for o, t in zip(walls["ours", 1], walls["timm", 1])]),
        ("per epoch (start-up excluded)", [(o6 - o1) / (t6 - t1) for o6, o1, t6, t1 in
                                           zip(walls["ours", n], walls["ours", 1], walls["timm", n], walls["timm", 1])]),
    ):
        print(f"ours/timm {name}: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
              f"max {max(ratios):.3f} ({len(ratios)} pairs)")
    for side in ("ours", "timm"):
        print(f"{side}: {n} epochs median {statistics.median(walls[side, n]):.1f} s, "
              f"1 epoch median {statistics.median(walls[side, 1]):.1f} s")


if __name__ == "__main__":
    main()
