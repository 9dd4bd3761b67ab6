#!/usr/bin/env python3
"""Experiment: baseline vs WE vs "WE without conv" on digits with a longer schedule, where WE's conv mechanism engages.

    python bench/experiment_long.py                                   # the experiment; results in bench/results/
    python bench/experiment_long.py --quick --out /tmp/we_long_quick  # smoke test: 3 epochs, 1 seed (~1 min)

Why: in bench/experiment_digits.py (15 epochs) no conv filter was ever evolved, so "WE without conv" was
identical run for run to WE.
The schedule is longer, with the paper's milestone proportions (LR x0.1 at 30 % and 60 % of the epochs, like
60/120 of 200) and weight decay 5e-4, and every WE run writes train.py's `--we-inspect-every` report, so the
conv pool's selections can be read off at several epochs.

How the recipe was chosen (fixed before the comparison ran; from `we_inspect` output only, probe seed 100,
not a comparison seed; no accuracy was looked at):

1. Schedule first. A 40-epoch probe (digits_demo recipe, LR x0.1 from epochs 12 and 24, wd 5e-4, paper-variant
   WE with its defaults, eta 3, `--we-inspect-every 5`) paired no conv filter at any inspected epoch (4, 9, ...,
   34): no conv filter had a relative importance (RI) below gamma = 0.05; the smallest RI of any conv filter
   stayed at 0.10-0.11 (all in the 7x7 stem, `conv1`) from epoch 4 on, and at >= 0.45 elsewhere. Weight decay
   cannot change that within this budget: a filter left without gradient shrinks by (1 - lr * wd) per update,
   5e-5 at lr 0.1, i.e. by 4 % over the probe's 880 updates (the paper's 200 CIFAR epochs make ~78k updates).
2. Why raising gamma alone does not help: the global selection (importance = average L1 per input channel,
   Eq. 1) picks the conv pool's weakest filters across layers, and those are the 1x1 downsample convs (fewest
   elements per slice), whose filters are all within 2x of each other (RI >= 0.5); the low-RI stem filters are
   among the pool's strongest. `python -m we_timm.inspect` on the probe's epoch-20 weights: global+local with
   gamma 0.1, 0.15, 0.2: 0 conv filters paired; the official variant with the release's settings: 0 (its counter
   rule forces pairs only every ln_per layers); local selection only (WE-L, paper Table 5) with gamma 0.12: 1
   conv pair, with gamma 0.15: 9 conv pairs (stem filters).
3. Recipe: RECIPE_NOTE below (30 epochs instead of 40 to fit 15 runs in about 45 min of one worker process).
   The comparison that isolates the conv mechanism is WE-L vs WE-L without conv (`--we-layers norm`), both
   against the baseline; the paper's default global+local WE does not touch conv filters on this net (above).

One worker process with one torch thread runs every run in turn (train.py's parse_args + main, as
experiment_digits.py; runs already done are reused). Outputs in --out:

    long_results.csv     one row per run: final/best top-1, wall time, values WE changed (total and per pool)
    long_summary.md      mean ± std table with Welch's t-test, conv values changed per run, the inspect reports
                         per epoch (conv pool: filters below gamma, inferior, paired, values changed)
    long_inspect.png     the first inspect report (epoch 4) of the WE-L run that changed the most conv values
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import experiment_digits as ed  # noqa: E402

ROOT = ed.ROOT
MODEL = "resnet20like"
EPOCHS = 30
MILESTONES = [10, 19]  # timm multistep: milestone m lowers the LR from 0-based epoch m-1, i.e. epochs 9 and 18
ETA = 2.25  # the paper's eta 15 for 200 epochs, scaled to 30
GAMMA = 0.15  # the smallest gamma of the probe's that paired conv filters (see the docstring)
INSPECT_EVERY = 5
RECIPE = [*ed.RECIPE, "--epochs", str(EPOCHS), "--decay-milestones", *map(str, MILESTONES), "--we-eta", str(ETA),
          "--we-inspect-every", str(INSPECT_EVERY)]
QUICK = ["--epochs", "3", "--decay-milestones", "2", "3", "--train-num-samples", "320", "--val-num-samples", "180",
         "--we-inspect-every", "1"]
RECIPE_NOTE = (f"hparams/digits_demo.yaml (SGD lr 0.1, momentum 0.9, wd 5e-4, batch 64, label smoothing 0.1, 1 warm-up "
               f"epoch) with {EPOCHS} epochs, LR x0.1 from epochs {MILESTONES[0] - 1} and {MILESTONES[1] - 1} "
               f"(30 % / 60 %); WE paper variant with local selection only (WE-L), gamma {GAMMA:g}, r-hat 0.05, "
               f"beta 2.5, eta {ETA:g}; inspect report every {INSPECT_EVERY} epochs")
WE_L = ["--weight-evolution", "--we-variant", "paper", "--we-selection", "local", "--we-gamma", str(GAMMA)]
METHODS = {
    "baseline": ["--no-weight-evolution"],
    "we_l": WE_L,
    "we_l_no_conv": [*WE_L, "--we-layers", "norm"],
}
ed.LABELS.update(we_l=f"WE-L, gamma {GAMMA:g}", we_l_no_conv=f"WE-L, gamma {GAMMA:g}, without conv")
POOLS = ("conv", "norm", "bias")


def plan(quick: bool, seeds: int) -> list[dict]:
    """The runs, seed by seed (a partial experiment stays balanced)."""
    runs = []
    for seed in range(seeds):
        for method, flags in METHODS.items():
            argv = [*RECIPE, *(QUICK if quick else []), *ed.MODELS[MODEL], *flags, "--seed", str(seed)]
            runs.append(dict(model=MODEL, method=method, group="main", seed=seed, tag=f"long-{method}-s{seed}",
                             argv=argv))
    return runs


def we_columns(run_dir: Path) -> dict:
    """Values WE changed in the run, in total and per pool (summary.csv's we_changed_<pool> columns)."""
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for pool in POOLS:
        out[f"we_changed_{pool}"] = sum(int(float(r[f"we_changed_{pool}"])) for r in rows if r.get(f"we_changed_{pool}"))
    return out


def inspect_rows(run_dir: Path) -> list[dict]:
    """Per inspected epoch, pool totals of the run's we_inspect/epoch_<E>.csv."""
    folder = run_dir / "we_inspect"
    out = []
    if not folder.is_dir():
        return out
    for name in sorted(os.listdir(folder), key=lambda n: int(n.split("_")[1].split(".")[0]) if n.endswith(".csv") else 0):
        if not name.endswith(".csv"):
            continue
        with open(folder / name, newline="") as f:
            rows = list(csv.DictReader(f))
        for pool in POOLS:
            rs = [r for r in rows if r["pool"] == pool]
            if rs:
                out.append({"epoch": int(rs[0]["epoch"]), "pool": pool,
                            **{k: sum(int(r[k]) for r in rs) for k in
                               ("filters", "selected_global", "below_gamma", "inferior", "paired", "changed")},
                            "min_ri": min(float(r["imp_min"]) / float(r["imp_max"]) for r in rs if float(r["imp_max"]) > 0)})
    return out


def write_csv(results: list[dict], out: Path) -> None:
    cols = ["model", "method", "seed", "epochs", "final_top1", "best_top1", "best_epoch", "wall_s", "we_changed",
            *[f"we_changed_{p}" for p in POOLS], "we_evolved_conv", "we_evolved_norm", "we_evolved_bias"]
    with open(out / "long_results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in results:
            w.writerow({**r, "final_top1": f"{r['final_top1']:.4f}", "best_top1": f"{r['best_top1']:.4f}",
                        "wall_s": f"{r['wall_s']:.1f}"})


def inspect_table(results: list[dict], runs_dir: Path) -> list[str]:
    """Conv (and norm) pool of the inspect reports, mean over the seeds of each WE method, per epoch."""
    lines = ["| method | epoch | pool | filters | globally selected | RI < gamma | inferior | paired | values changed "
             "| min RI of a filter |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method in ("we_l", "we_l_no_conv"):
        per = {}
        for r in results:
            if r["method"] == method:
                for row in inspect_rows(runs_dir / r["tag"]):
                    per.setdefault((row["epoch"], row["pool"]), []).append(row)
        for (epoch, pool), rows in sorted(per.items(), key=lambda kv: (kv[0][0], POOLS.index(kv[0][1]))):
            if pool == "bias":
                continue
            mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k not in ("epoch", "pool")}
            lines.append(f"| {ed.LABELS[method]} | {epoch} | {pool} | {mean['filters']:.0f} | "
                         f"{mean['selected_global']:.1f} | {mean['below_gamma']:.1f} | {mean['inferior']:.1f} | "
                         f"{mean['paired']:.1f} | {mean['changed']:.1f} | {min(r['min_ri'] for r in rows):.3g} |")
    return lines


def conv_table(results: list[dict]) -> list[str]:
    lines = ["| method | values changed by WE per run (each seed) | conv values changed per run (each seed) | "
             "mean conv values changed |", "|---|---|---|---|"]
    for method in METHODS:
        rs = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if rs:
            lines.append(f"| {ed.LABELS[method]} | {', '.join(str(r['we_changed']) for r in rs)} | "
                         f"{', '.join(str(r['we_changed_conv']) for r in rs)} | "
                         f"{statistics.fmean(r['we_changed_conv'] for r in rs):.0f} |")
    return lines


def conv_by_epoch(results: list[dict], runs_dir: Path) -> list[str]:
    """The WE steps that changed conv values (summary.csv's we_changed_conv), per method: mean over seeds."""
    lines = ["| method | WE step after epoch | conv values changed (mean over seeds) | seeds with conv changes |",
             "|---|---|---|---|"]
    for method in METHODS:
        per: dict[int, list[int]] = {}
        rs = [r for r in results if r["method"] == method]
        for r in rs:
            with open(runs_dir / r["tag"] / "summary.csv", newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("we_changed_conv"):
                        per.setdefault(int(row["epoch"]), []).append(int(float(row["we_changed_conv"])))
        for epoch, values in sorted(per.items()):
            if any(values):
                lines.append(f"| {ed.LABELS[method]} | {epoch} | {statistics.fmean(values):.1f} | "
                             f"{sum(v > 0 for v in values)} of {len(rs)} |")
    return lines


def write_summary(results: list[dict], runs_dir: Path, out: Path, header: dict) -> str:
    import timm

    lines = [f"# Weight Evolution on digits, long schedule ({header['date']})", "",
             f"- command: {header['command']}",
             f"- machine: {header['machine']}, timm {timm.__version__}; 1 worker process x 1 torch thread, under "
             f"nice; load average {header['load']} when it started (other users' jobs share the 2 cores)",
             f"- wall time: {header['wall_min']:.1f} min for {len(results)} runs",
             f"- recipe: {RECIPE_NOTE}; model {MODEL} (experiment_digits.py); train.py args: "
             f"`{' '.join(header['argv'])}`",
             "- final = top-1 after the last epoch (the number reported); best-epoch = max over epochs (optimistic). "
             f"{header['n_val']} validation images: one image = {100 / header['n_val']:.2f} points. Δ, SE, Welch t "
             "and two-sided p compare final top-1 with the baseline's.", "",
             "## Comparison", "", *ed.table(results, MODEL, list(METHODS)), "",
             "## Values changed by WE", "", *conv_table(results), "",
             "Steps in which conv values changed:", "", *conv_by_epoch(results, runs_dir), "",
             "## Inspect reports (train.py --we-inspect-every), mean over seeds", "",
             "Before the WE step of the epoch (0-based). RI = relative importance ||W_j||_1 / max_i ||W_i||_1 in the "
             "filter's group. With local selection (these runs) inferior = RI < gamma (before the floor(n/2) cap); "
             "\"globally selected\" is the global selection the default WE would use, shown for reference only. "
             "Paired = evolved. \"min RI\" is the smallest ratio of a filter's importance to its layer's largest, "
             "over all layers of the pool and all seeds.", "", *inspect_table(results, runs_dir), ""]
    text = "\n".join(lines)
    (out / "long_summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 3 epochs on 320 images, 1 seed")
    p.add_argument("--out", default=str(ed.DEFAULT_OUT), help="output folder (default: bench/results)")
    p.add_argument("--runs-dir", default=None, help="train.py run folders (default: output/long_experiment[_quick])")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; quick 1)")
    opts = p.parse_args(argv)
    seeds = opts.seeds or (1 if opts.quick else 5)
    out = Path(opts.out)
    runs_dir = Path(opts.runs_dir or ROOT / "output" / ("long_experiment_quick" if opts.quick else "long_experiment"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(opts.quick, seeds)
    command = " ".join(["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    results, ran = ed.execute(runs, runs_dir, jobs=1, threads=1)
    wall = time.perf_counter() - start
    trained = ed.record_invocation(runs_dir, dict(date=started, command=command, ran=ran, wall_s=wall, load=load))
    for r in results:
        r.update(we_columns(runs_dir / r["tag"]))
    header = dict(date=trained["date"], command=" ; ".join(f"`{c}`" for c in trained["commands"]),
                  machine=ed.machine(), wall_min=trained["wall_min"], load=trained["load"],
                  n_val=180 if opts.quick else 360, argv=[*RECIPE[2:], *(QUICK if opts.quick else [])])
    write_csv(results, out)
    print(write_summary(results, runs_dir, out, header))
    we_runs = [r for r in results if r["method"] == "we_l"]
    most = max(we_runs, key=lambda r: (r["we_changed_conv"], -r["seed"]), default=None)
    reports = sorted((runs_dir / most["tag"] / "we_inspect").glob("epoch_*.png"),
                     key=lambda q: int(q.stem.split("_")[1])) if most else []
    if reports:  # its first report: conv filters are paired early, while the stem still has RI < gamma
        shutil.copyfile(reports[0], out / "long_inspect.png")
    with open(runs_dir / "_summary.json", "w") as f:
        json.dump({"wall_s": wall, "ran": ran}, f)
    print(f"wrote {out}/long_results.csv, long_summary.md, long_inspect.png (this invocation: {wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
