#!/usr/bin/env python3
"""train.py against timm's own train.py on the same job: whole-process wall time and per-epoch time.

    python bench/vs_timm.py /path/to/pytorch-image-models/train.py [--pairs 3] [--epochs 6]

Builds an ImageFolder of scikit-learn's digits (1437 train / 360 validation PNGs at 32 px), then runs both
scripts with identical flags (resnet18, `-b 64 --opt sgd --lr 0.1 --sched cosine --warmup-epochs 0 -j 1
--num-classes 10`), alternating ours / timm's, for `--pairs` pairs at `--epochs` epochs and at 1 epoch.
Per-epoch training time: from the moment the training DataLoader is iterated to the moment the next loader
(the evaluation's) is, recorded the same way in both processes by a `sitecustomize` the bench writes (it wraps
torch's `DataLoader.__iter__` once torch.utils.data is imported; nothing else of either script is touched):
the median of epochs 1..N-1 of the N-epoch runs, and the single epoch of the 1-epoch runs (warm-up
included). Per-epoch time, two more ways: the median time between the moments epochs 1..N-1 reach each run's
summary.csv (a full epoch: training, evaluation, checkpoint; polled every 5 ms), and (wall at N epochs - wall
at 1 epoch) / (N - 1), what an extra epoch costs, start-up excluded (the difference of two noisy walls).
Prints the median, min and max ratio ours / timm of each, with a 95% bootstrap interval of the median (an
interval that holds 1.00 means no difference this run could tell from noise). Ours steps SGD with torch's fused
kernel by default (`runtime.optimizer_kernel`), timm's script with torch's default for-loop on a CPU: that is
the comparison a user gets with the same command. `--same-kernel` gives timm's script `--opt-kwargs fused=True`
too, so that what is left is the rest of the loop. timm's script is passed as an
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
    from we_timm.recipes.dataset import DigitsDataset

    for split in ("train", "validation"):
        data = DigitsDataset(split)
        for i in range(len(data)):
            image, label = data[i]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:05d}.png")
    return root


# Records when each DataLoader is iterated (time, dataset length), in either script, into $VS_TIMM_PHASES: a
# finder patches torch.utils.data.dataloader right after it is first imported (one Python call per import).
SITECUSTOMIZE = """
import os, sys, time
_out = os.environ.get("VS_TIMM_PHASES")
if _out:
    import importlib.abc, importlib.machinery

    class _Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch.utils.data.dataloader":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                log, iterate = open(_out, "a", buffering=1), module.DataLoader.__iter__

                def __iter__(self):
                    try:
                        size = len(self.dataset)
                    except TypeError:
                        size = -1
                    log.write(f"{time.perf_counter():.6f} {size}\\n")
                    return iterate(self)

                module.DataLoader.__iter__ = __iter__

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Patch())
"""


def training_times(log: Path, train_size: int) -> list[float]:
    """Per epoch: from the training loader's iteration to the next loader's (the evaluation's)."""
    events = [(float(t), int(n)) for t, n in (line.split() for line in log.read_text().splitlines())]
    return [b[0] - a[0] for a, b in zip(events, events[1:]) if a[1] == train_size]


def run(script: str, data: Path, out: Path, epochs: int, tag: str, timm: bool, site: Path,
        extra: tuple[str, ...] = ()) -> tuple[float, list[float], list[float]]:
    """Wall seconds of one whole process, the seconds since its start at which each epoch's row reached its
    summary.csv (both scripts add one row per epoch; the run folder is polled every 5 ms), and each epoch's
    training time (`training_times`)."""
    cmd = [sys.executable, script, "--data-dir", str(data), *FLAGS, *extra, "--epochs", str(epochs),
           "--output", str(out), "--experiment", tag]
    if timm:
        cmd += ["--device", "cpu"]
    phases = site / f"{tag}.phases"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
           "VS_TIMM_PHASES": str(phases)}
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
    train = training_times(phases, sum(1 for p in (data / "train").rglob("*.png")))
    if len(train) != epochs:
        raise SystemExit(f"error: timed {len(train)} of {epochs} training epochs of {' '.join(cmd[:2])}")
    return seconds, rows, train


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
    p.add_argument("--same-kernel", action="store_true",
                   help="timm's script steps with torch's fused kernel too (--opt-kwargs fused=True)")
    opts = p.parse_args()
    timm_extra = ("--opt-kwargs", "fused=True") if opts.same_kernel else ()
    if opts.epochs < 3:
        p.error("--epochs must be at least 3 (epochs 1.. are timed between epoch ends)")
    ours_script = str(ROOT / "train.py")
    n = opts.epochs
    walls: dict[tuple[str, int], list[float]] = {(side, e): [] for side in ("ours", "timm") for e in (1, n)}
    trains: dict[tuple[str, int], list[float]] = {(side, e): [] for side in ("ours", "timm") for e in (1, n)}
    epoch_times: dict[str, list[float]] = {"ours": [], "timm": []}  # per run: median time between epoch ends
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = digits_folder(tmp / "digits")
        site = tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for i in range(opts.pairs):
            for epochs in (n, 1):
                for side in (("ours", "timm") if i % 2 == 0 else ("timm", "ours")):  # alternate who goes first
                    script = ours_script if side == "ours" else opts.timm_train
                    wall, ends, train = run(script, data, tmp / "out", epochs, f"{side}-{i}-{epochs}", side == "timm",
                                            site, timm_extra if side == "timm" else ())
                    walls[side, epochs].append(wall)
                    # epoch 0 also holds the first batches' warm-up: of N epochs, epochs 1.. are timed
                    trains[side, epochs].append(statistics.median(train[1:]) if epochs == n else train[0])
                    note = f", training {trains[side, epochs][-1]:.2f} s{' an epoch' if epochs == n else ''}"
                    if epochs == n:
                        epoch_times[side].append(statistics.median(b - a for a, b in zip(ends[:-1], ends[1:])))
                        note += f", epochs 1-{n - 1}: median {epoch_times[side][-1]:.2f} s each"
                    print(f"pair {i} {side:4s} {epochs} epoch(s): {wall:.1f} s{note}", flush=True)
    for name, ratios in (
        (f"whole process, {n} epochs", [o / t for o, t in zip(walls["ours", n], walls["timm", n])]),
        ("whole process, 1 epoch", [o / t for o, t in zip(walls["ours", 1], walls["timm", 1])]),
        (f"per-epoch training time, {n} epochs (epochs 1-{n - 1})",
         [o / t for o, t in zip(trains["ours", n], trains["timm", n])]),
        ("training time, 1 epoch", [o / t for o, t in zip(trains["ours", 1], trains["timm", 1])]),
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
              f"training an epoch median {statistics.median(trains[side, n]):.2f} s "
              f"({statistics.median(trains[side, 1]):.2f} s in a 1-epoch run), "
              f"an epoch median {statistics.median(epoch_times[side]):.2f} s")


if __name__ == "__main__":
    main()
