#!/usr/bin/env python3
"""train.py against timm's own train.py on the same job: whole-process wall time and per-epoch time.

    python bench/vs_timm.py /path/to/pytorch-image-models/train.py [--pairs 3] [--epochs 6]

Builds an ImageFolder of scikit-learn's digits (1437 train / 360 validation PNGs at 32 px), then runs both
scripts with identical flags (resnet18, `-b 64 --opt sgd --lr 0.1 --sched cosine --warmup-epochs 0 -j 1
--num-classes 10`), alternating ours / timm's, for `--pairs` pairs at `--epochs` epochs and at 1 epoch.
Per-epoch time, two ways: the median time between the moments epochs 1..N-1 reach each run's summary.csv
(a full epoch: training, evaluation, checkpoint; polled every 5 ms), and (wall at N epochs - wall at 1 epoch)
/ (N - 1), what an extra epoch costs, start-up excluded (the difference of two noisy walls: the noisier one).
Prints the median, min and max ratio ours / timm of each, with a 95% bootstrap interval of the median (an
interval that holds 1.00 means no difference this run could tell from noise). timm's script is passed as an
argument and never copied here. Run it on an otherwise idle machine: both sides slow down when other jobs
share the cores.
"""
from __future__ import annotations

import argparse
import os
import random
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


def run(script: str, data: Path, out: Path, epochs: int, tag: str, timm: bool) -> tuple[float, list[float]]:
    """Wall seconds of one whole process, and the seconds since its start at which each epoch's row reached
    its summary.csv (both scripts add one row per epoch; the run folder is polled every 5 ms)."""
    cmd = [sys.executable, script, "--data-dir", str(data), *FLAGS, "--epochs", str(epochs),
           "--output", str(out), "--experiment", tag]
    if timm:
        cmd += ["--device", "cpu"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    summary = out / tag / "summary.csv"
    rows: list[float] = []
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        seen = None
        while proc.poll() is None:
            time.sleep(0.005)
            try:
                stamp = summary.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if stamp != seen:
                seen = stamp
                now = time.perf_counter() - start
                lines = len(summary.read_text().splitlines()) - 1  # a header, then a row per epoch
                rows += [now] * max(0, lines - len(rows))
        seconds = time.perf_counter() - start
        if proc.returncode:
            log.seek(0)
            raise SystemExit(f"error: {' '.join(cmd[:2])} failed:\n{log.read()[-2000:]}")
    if len(rows) != epochs:
        raise SystemExit(f"error: saw {len(rows)} of {epochs} epochs reach {summary}")
    return seconds, rows


def median_interval(ratios: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median ratio (pairs resampled with replacement): whether a
    median off 1.00 is a difference or the machine's noise (one step of the same process varies by 25% here)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("timm_train", help="timm's train.py (from a pytorch-image-models checkout)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    opts = p.parse_args()
    if opts.epochs < 3:
        p.error("--epochs must be at least 3 (epochs 1.. are timed between epoch ends)")
    ours_script = str(ROOT / "train.py")
    n = opts.epochs
    walls: dict[tuple[str, int], list[float]] = {(side, e): [] for side in ("ours", "timm") for e in (1, n)}
    epoch_times: dict[str, list[float]] = {"ours": [], "timm": []}  # per run: median time between epoch ends
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = digits_folder(tmp / "digits")
        for i in range(opts.pairs):
            for epochs in (n, 1):
                for side in (("ours", "timm") if i % 2 == 0 else ("timm", "ours")):  # alternate who goes first
                    script = ours_script if side == "ours" else opts.timm_train
                    wall, ends = run(script, data, tmp / "out", epochs, f"{side}-{i}-{epochs}", side == "timm")
                    walls[side, epochs].append(wall)
                    note = ""
                    if epochs == n:  # epoch 0 also holds the first batches' warm-up: epochs 1.. are timed
                        epoch_times[side].append(statistics.median(b - a for a, b in zip(ends[:-1], ends[1:])))
                        note = f", epochs 1-{n - 1}: median {epoch_times[side][-1]:.2f} s each"
                    print(f"pair {i} {side:4s} {epochs} epoch(s): {wall:.1f} s{note}", flush=True)
    for name, ratios in (
        (f"whole process, {n} epochs", [o / t for o, t in zip(walls["ours", n], walls["timm", n])]),
        ("whole process, 1 epoch", [o / t for o, t in zip(walls["ours", 1], walls["timm", 1])]),
        (f"per epoch (between epoch ends, epochs 1-{n - 1})",
         [o / t for o, t in zip(epoch_times["ours"], epoch_times["timm"])]),
        (f"per epoch (wall at {n} minus wall at 1, / {n - 1})",
         [(o6 - o1) / (t6 - t1) for o6, o1, t6, t1 in
          zip(walls["ours", n], walls["ours", 1], walls["timm", n], walls["timm", 1])]),
    ):
        low, high = median_interval(ratios)
        print(f"ours/timm {name}: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
              f"max {max(ratios):.3f} ({len(ratios)} pairs; 95% bootstrap interval of the median {low:.3f}-{high:.3f})")
    for side in ("ours", "timm"):
        print(f"{side}: {n} epochs median {statistics.median(walls[side, n]):.1f} s, "
              f"1 epoch median {statistics.median(walls[side, 1]):.1f} s, "
              f"an epoch median {statistics.median(epoch_times[side]):.2f} s")


if __name__ == "__main__":
    main()
