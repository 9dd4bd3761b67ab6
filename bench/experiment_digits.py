#!/usr/bin/env python3
"""Experiment: baseline vs Weight Evolution on scikit-learn's digits, several seeds, plus the paper's ablations.

    python bench/experiment_digits.py    # full run: 57 runs, 34.5 min on a shared 2-core CPU; results in bench/results/
    python bench/experiment_digits.py --quick --out /tmp/we_quick   # smoke test: 2 epochs, 1-2 seeds (~1 min)

Every run is a real `train.py` run (its `parse_args` + `main`, imported once per
worker process), independent and seeded: `main` seeds the model init from
`--seed` and every epoch from (seed, epoch), so a run's result does not depend
on which runs shared its process (checked: same numbers as a fresh
`python train.py`). Workers run with one torch thread each (`--jobs` processes,
default: the number of cores, at most 2): on a shared 2-core machine, torch's
default of one OpenMP thread per core oversubscribes the CPU and is several
times slower.

The recipe is fixed here, chosen before any result was seen, and must not be
changed on the strength of WE's validation numbers (digits has no test split:
the "validation" split is the only held-out data, so tuning on it would be
reporting a tuned number as a held-out one). It is `hparams/digits_demo.yaml`
(SGD 0.1, momentum 0.9, wd 5e-4, batch 64, label smoothing 0.1, 1 warm-up epoch,
15 epochs with two x0.1 LR steps, before epochs 8 and 12 (0-based), as the
paper's two-milestone step decay; WE r-hat 0.05, beta 2.5, eta 2, gamma 0.05),
with `--checkpoint-hist 0` (only last/best weights written), and two models:

- `resnet20like`: the demo's timm `resnet18` with CIFAR ResNet-20-sized stages
  (3 x 3 basic blocks, 16/32/64 channels, 0.27M params), 32 px;
- `mobilenetv2_050`: timm's MobileNetV2-0.5 (the paper's ImageNet lightweight model), 32 px, started
  from its seeded timm init with the classifier zeroed (`ZERO_HEAD`): timm sizes the MobileNetV2 head init
  for 1000 classes, with 10 classes the initial loss is ~9 and no baseline run left chance level in a first
  attempt (a WE-independent fix, decided on the baseline alone; the LR-0.1 recipe still spikes in epoch 1).

Methods: `baseline` (no WE), `we_paper` (WE_SPEC paper variant, defaults
above), `we_official` (the authors' release: variant "official" with the
release's rates 0.2 / 0.05 / 0.05 and gamma 0.1, as hparams/cifar10_official_we.yaml),
on both models with 5 seeds; ablations on `resnet20like` with 3 seeds: WE-G,
WE-L (Table 5), WE-RM (Table 6), fixed alpha 0 / 0.5 / 0.9 (Fig. 6),
filter-level-GL (Table 7), WE without BN / without conv (Table 8).

Outputs in --out (default bench/results/):
    digits_results.csv   one row per run: model, method, seed, final/best top-1, wall and CPU time, values WE changed
    digits_curves.csv    eval top-1 per epoch of every run
    digits_summary.md    mean +- std tables (n runs) with Welch's t-test against the baseline
    digits_curves.png    eval top-1 per epoch, mean over seeds (band: +-1 std), per method
Run folders (train.py's summary.csv, args.yaml, we_stats.jsonl, plus result.json) go to --runs-dir
(default output/digits_experiment[_quick]/, git-ignored). A run whose result.json holds the same train.py
arguments is not run again, so an interrupted experiment continues where it stopped and re-running the
command only rebuilds the reports (delete the runs folder for a fresh experiment).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"

# ----------------------------------------------------------------------------- the fixed recipe

RECIPE = ["-c", str(ROOT / "hparams" / "digits_demo.yaml"), "--checkpoint-hist", "0", "--log-interval", "1000000",
          "--workers", "0"]
QUICK = ["--epochs", "2", "--decay-milestones", "2", "3", "--train-num-samples", "320", "--val-num-samples", "180"]
MODELS = {
    "resnet20like": ["--model", "resnet18", "--model-kwargs", "layers=[3,3,3,0]", "channels=[16,32,64,64]",
                     "stem_width=16", "--img-size", "32"],
    "mobilenetv2_050": ["--model", "mobilenetv2_050", "--model-kwargs", "--img-size", "32"],
}
# Models started from a seeded timm init whose classifier is zeroed (see zero_head_init): timm initialises the
# MobileNetV2 head as U(+-1/sqrt(num_classes)), sized for 1000 classes; with 10 classes the initial logits have
# std ~5 (loss ~9) and the baseline never left chance level (5 of 5 seeds) with the SGD-0.1 recipe.
ZERO_HEAD = {"mobilenetv2_050": ("mobilenetv2_050", {})}
WE = ["--weight-evolution"]
OFFICIAL = [*WE, "--we-variant", "official", "--we-rate", "0.2", "--we-rate-norm", "0.05", "--we-rate-bias", "0.05",
            "--we-gamma", "0.1", "--we-ln-c", "2"]
MAIN_METHODS = {
    "baseline": ["--no-weight-evolution"],
    "we_paper": [*WE, "--we-variant", "paper"],
    "we_official": OFFICIAL,
}
ABLATIONS = {  # paper variant with one thing changed; paper Sec. 4.3
    "we_g": [*WE, "--we-selection", "global"],  # Table 5: global selection only
    "we_l": [*WE, "--we-selection", "local"],  # Table 5: local selection only
    "we_rm": [*WE, "--we-matching", "reverse"],  # Table 6: reverse matching
    "alpha_0": [*WE, "--we-alpha", "0"],  # Fig. 6: inferior value replaced by the dominant one
    "alpha_0.5": [*WE, "--we-alpha", "0.5"],
    "alpha_0.9": [*WE, "--we-alpha", "0.9"],
    "filter_gl": [*WE, "--we-level", "filter"],  # Table 7: filter-level-GL
    "no_bn": [*WE, "--we-layers", "conv"],  # Table 8: WE without BN
    "no_conv": [*WE, "--we-layers", "norm"],  # Table 8: WE without conv
}
ABLATION_MODEL = "resnet20like"
LABELS = {
    "baseline": "Baseline", "we_paper": "WE (paper variant)", "we_official": "WE (official variant)",
    "we_g": "WE-G (global only)", "we_l": "WE-L (local only)", "we_rm": "WE-RM (reverse matching)",
    "alpha_0": "fixed alpha = 0", "alpha_0.5": "fixed alpha = 0.5", "alpha_0.9": "fixed alpha = 0.9",
    "filter_gl": "filter-level-GL", "no_bn": "WE without BN", "no_conv": "WE without conv",
}


def plan(quick: bool, main_seeds: int, ablation_seeds: int, ablations: bool) -> list[dict]:
    """All runs, as {model, method, group, seed}; main runs on every model, ablations on ABLATION_MODEL."""
    runs = [dict(model=m, method=k, group="main", seed=s)
            for m in MODELS for k in MAIN_METHODS for s in range(main_seeds)]
    if ablations:
        runs += [dict(model=ABLATION_MODEL, method=k, group="ablation", seed=s)
                 for k in ABLATIONS for s in range(ablation_seeds)]
    for r in runs:
        r["tag"] = f"{r['model']}-{r['method']}-s{r['seed']}"
        r["argv"] = [*RECIPE, *(QUICK if quick else []), *MODELS[r["model"]],
                     *{**MAIN_METHODS, **ABLATIONS}[r["method"]], "--seed", str(r["seed"])]
        if r["model"] in ZERO_HEAD:  # written by the worker (zero_head_init); {runs} = the runs folder
            r["argv"] += ["--initial-checkpoint", f"{{runs}}/_init/{r['model']}-s{r['seed']}.safetensors"]
    return runs


# ----------------------------------------------------------------------------- one run (in a worker process)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # train.py's INFO lines off
    sys.path.insert(0, str(ROOT))


def run_one(run: dict, runs_dir: str) -> dict:
    """train.py on `run['argv']` in its own folder; returns the run's result (also written to result.json)."""
    import train

    out_dir = os.path.join(runs_dir, run["tag"])
    shutil.rmtree(out_dir, ignore_errors=True)  # a run interrupted earlier (or with other arguments) starts afresh
    if run["model"] in ZERO_HEAD:
        zero_head_init(run["model"], run["seed"], runs_dir)
    argv = [a.replace("{runs}", runs_dir) for a in run["argv"]]
    args = train.parse_args([*argv, "--output", runs_dir, "--experiment", run["tag"]])
    start, cpu = time.perf_counter(), time.process_time()
    train.main(args)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {**{k: run[k] for k in ("model", "method", "group", "seed", "tag", "argv")}, "wall_s": wall, "cpu_s": cpu,
              **read_summary(os.path.join(out_dir, "summary.csv"))}
    for name in os.listdir(out_dir):  # weights are not needed for the report; keep the folder small
        if name.endswith((".safetensors", ".pth.tar")):
            os.remove(os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def zero_head_init(model: str, seed: int, runs_dir: str) -> str:
    """The seeded timm init of `model` (10 classes) with a zero classifier, as a safetensors file; its path."""
    import timm
    import torch
    from safetensors.torch import save_file

    path = os.path.join(runs_dir, "_init", f"{model}-s{seed}.safetensors")
    if not os.path.exists(path):
        name, kwargs = ZERO_HEAD[model]
        timm.utils.random_seed(seed, 0)
        net = timm.create_model(name, num_classes=10, **kwargs)
        with torch.no_grad():
            for p in net.get_classifier().parameters():
                p.zero_()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def read_summary(path: str) -> dict:
    """Final / best eval top-1, the top-1 curve and what WE changed, from train.py's summary.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    top1 = [float(r["eval_top1"]) for r in rows]
    loss = [float(r["eval_loss"]) for r in rows]
    def total(col: str) -> int:
        return sum(int(float(r[col])) for r in rows if r.get(col))
    best = max(range(len(top1)), key=lambda i: (top1[i], -i))
    return {
        "epochs": len(rows), "final_top1": top1[-1], "best_top1": top1[best], "best_epoch": best, "curve": top1,
        "loss_curve": loss,
        "we_changed": total("we_changed"), "we_evolved_conv": total("we_selected_conv"),
        "we_evolved_norm": total("we_selected_norm"), "we_evolved_bias": total("we_selected_bias"),
    }


def _run_star(job: tuple[dict, str]) -> dict:
    return run_one(*job)


# ----------------------------------------------------------------------------- statistics


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def welch(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """mean(b) - mean(a), its standard error, Welch's t and two-sided p (nan where undefined)."""
    nan = float("nan")
    if len(a) < 2 or len(b) < 2:
        return statistics.fmean(b) - statistics.fmean(a), nan, nan, nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.fmean(b) - statistics.fmean(a), math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0, nan, (1.0 if diff == 0 else 0.0)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    from scipy.stats import t as student_t

    t = diff / se
    return diff, se, t, float(2 * student_t.sf(abs(t), dof))


# ----------------------------------------------------------------------------- reports


def write_results_csv(results: list[dict], out: Path) -> None:
    cols = ["model", "method", "group", "seed", "epochs", "final_top1", "best_top1", "best_epoch", "wall_s", "cpu_s",
            "we_changed", "we_evolved_conv", "we_evolved_norm", "we_evolved_bias"]
    with open(out / "digits_results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in results:
            w.writerow({**r, "final_top1": f"{r['final_top1']:.4f}", "best_top1": f"{r['best_top1']:.4f}",
                        "wall_s": f"{r['wall_s']:.1f}", "cpu_s": f"{r['cpu_s']:.1f}" if "cpu_s" in r else ""})
    with open(out / "digits_curves.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["model", "method", "seed", "epoch", "eval_top1", "eval_loss"])
        for r in results:
            w.writerows([r["model"], r["method"], r["seed"], e, f"{v:.4f}", f"{l:.6f}"]
                        for e, (v, l) in enumerate(zip(r["curve"], r["loss_curve"])))


def by_method(results: list[dict], model: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        if r["model"] == model:
            groups.setdefault(r["method"], []).append(r)
    return groups


def same_as(groups: dict[str, list[dict]], method: str) -> str:
    """The reference method ("baseline" / "we_paper") whose runs this method reproduces exactly (eval top-1 and
    loss of every epoch, values changed by WE) on every shared seed, or "" (e.g. an ablation that, in this
    setting, evolves nothing or the same values)."""
    def key(r: dict) -> tuple:
        return tuple(r["curve"]), tuple(r.get("loss_curve", ())), r["we_changed"]

    mine = {r["seed"]: key(r) for r in groups.get(method, [])}
    for ref in ("baseline", "we_paper"):
        theirs = {r["seed"]: key(r) for r in groups.get(ref, [])}
        shared = sorted(set(mine) & set(theirs))
        if ref != method and shared and all(mine[k] == theirs[k] for k in shared):
            return ref
    return ""


def _pm(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}"


def _num(x: float, fmt: str) -> str:
    return "–" if math.isnan(x) else format(x, fmt)


def table(results: list[dict], model: str, methods: list[str]) -> list[str]:
    """Markdown rows: final and best top-1 mean ± std, and final top-1 vs the baseline (Welch)."""
    groups = by_method(results, model)
    base = [r["final_top1"] for r in groups.get("baseline", [])]
    lines = ["| method | n | final top-1 (%) | best-epoch top-1 (%) | Δ final vs baseline ± SE | Welch t | p | "
             "values changed by WE per run | identical run-for-run to |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        rs = groups.get(method, [])
        if not rs:
            continue
        final = [r["final_top1"] for r in rs]
        if method == "baseline" or not base:
            delta = t = p = "–"
        else:
            d, se, tv, pv = welch(base, final)
            delta, t, p = f"{d:+.2f} ± {_num(se, '.2f')}", _num(tv, "+.2f"), _num(pv, ".3f")
        changed = statistics.fmean(r["we_changed"] for r in rs)
        same = same_as(groups, method)
        lines.append(f"| {LABELS[method]} | {len(rs)} | {_pm(final)} | {_pm([r['best_top1'] for r in rs])} | "
                     f"{delta} | {t} | {p} | {changed:.0f} | {LABELS[same] if same else '–'} |")
    return lines


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores (nproc), {cpu}, torch {torch.__version__}, Python {platform.python_version()}"


def write_summary(results: list[dict], out: Path, header: dict) -> str:
    import timm

    lines = [f"# Weight Evolution on digits ({header['date']})", "",
             f"- command: {header['command']}",
             f"- machine: {header['machine']}, timm {timm.__version__}; {header['jobs']} worker process(es) x "
             f"{header['threads']} torch thread(s); load average {header['load']} when it started (other users' jobs count)",
             f"- wall time: {header['wall_min']:.1f} min for {len(results)} runs (the invocation(s) that trained them; "
             f"{header['ran']} trained by this one)",
             f"- recipe: {header['recipe']}",
             "- final = top-1 after the last epoch (the number reported); best-epoch = max over epochs "
             f"(optimistic: picked on the same split). {header['n_val']} validation images: one image = "
             f"{100 / header['n_val']:.2f} points. "
             "Δ, SE, Welch t and two-sided p compare final top-1 with the baseline's.", ""]
    for model in MODELS:
        lines += [f"## Main comparison: {model}", "", *table(results, model, list(MAIN_METHODS)), ""]
    if any(r["group"] == "ablation" for r in results):
        lines += [f"## Ablations (paper Sec. 4.3): {ABLATION_MODEL}", "",
                  *table(results, ABLATION_MODEL, [*MAIN_METHODS][:2] + list(ABLATIONS)), ""]
    text = "\n".join(lines)
    (out / "digits_summary.md").write_text(text)
    return text


def plot_curves(results: list[dict], out: Path, milestones: list[int]) -> None:
    """Mean eval top-1 per epoch (band: ±1 std): full curves on top, the stages after the first LR drop below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, list(MAIN_METHODS), f"{m}: main") for m in MODELS]
    if any(r["group"] == "ablation" for r in results):
        panels.append((ABLATION_MODEL, ["baseline", "we_paper", *ABLATIONS], f"{ABLATION_MODEL}: ablations"))
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
               "tab:olive", "tab:cyan", "gold"]
    colors = dict(zip([m for m in {**MAIN_METHODS, **ABLATIONS} if m != "baseline"], palette))
    for col, (model, methods, title) in enumerate(panels):
        groups = by_method(results, model)
        for method in methods:
            curves = [r["curve"] for r in groups.get(method, [])]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[e] for c in curves) for e in range(n)]
            std = [statistics.pstdev([c[e] for c in curves]) for e in range(n)]
            color = colors.get(method, "black")
            same = same_as(groups, method)
            label = f"{LABELS[method]} (n={len(curves)})" + (f" = {LABELS[same]} run for run" if same else "")
            for row in (0, 1):
                ax = axes[row][col]
                ax.plot(range(n), mean, label=label, color=color,
                        lw=2 if method in MAIN_METHODS else 1.2, ls="--" if method == "baseline" else "-")
                ax.fill_between(range(n), [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.12 if len(methods) <= 3 else 0.05)
        _style(axes, col, title, milestones, groups)
    fig.tight_layout()
    fig.savefig(out / "digits_curves.png", dpi=110)
    plt.close(fig)


def _style(axes, col: int, title: str, milestones: list[int], groups: dict) -> None:
    top, zoom = axes[0][col], axes[1][col]
    top.set_title(f"{title}: eval top-1, mean ± std over seeds")
    top.legend(fontsize=7, loc="lower right")
    first = milestones[0] if milestones else 0
    n = max((len(r["curve"]) for rs in groups.values() for r in rs), default=1)
    zoom.set_xlim(first - 0.5, n - 0.5)
    tail = [v for rs in groups.values() for r in rs for v in r["curve"][first:]]
    if tail:
        zoom.set_ylim(min(tail) - 0.5, min(100.0, max(tail) + 0.5))
    zoom.set_title(f"{title}: after the first LR drop (zoom)")
    for ax in (top, zoom):
        ax.set_xlabel("epoch (0-based)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        for m in milestones:
            ax.axvline(m - 0.5, color="grey", lw=0.8, ls=":")


# ----------------------------------------------------------------------------- driver


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs on 320 images, 2 main seeds, 1 ablation seed")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: bench/results)")
    p.add_argument("--runs-dir", default=None, help="train.py run folders (default: output/digits_experiment[_quick])")
    p.add_argument("--seeds", type=int, default=None, help="seeds per main row (default 5; quick 2)")
    p.add_argument("--ablation-seeds", type=int, default=None, help="seeds per ablation row (default 3; quick 1)")
    p.add_argument("--no-ablations", action="store_true", help="main comparison only")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default: cores, max 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    return p.parse_args(argv)


def milestones_of(argv: list[str]) -> list[int]:
    """The 0-based epochs from which the LR is lowered, as train.py derives them (WE's stage boundaries)."""
    sys.path.insert(0, str(ROOT))
    import train

    from we_timm.recipes.args_checks import lr_decay_epochs

    return lr_decay_epochs(train.parse_args(argv))


def execute(runs: list[dict], runs_dir: Path, jobs: int, threads: int) -> tuple[list[dict], int]:
    """Run what has no result.json yet (slowest model first, for load balance); returns all results, number run."""
    results, todo = [], []
    for r in runs:
        done = runs_dir / r["tag"] / "result.json"
        saved = json.loads(done.read_text()) if done.exists() else {}
        if saved:  # numbers from the run's summary.csv (the source), in case this script reads more of it now
            saved.update(read_summary(str(runs_dir / r["tag"] / "summary.csv")))
        (results if saved.get("argv") == r["argv"] else todo).append(saved or r)
    todo.sort(key=lambda r: r["model"] != "mobilenetv2_050")
    print(f"{len(runs)} runs, {len(results)} already done, {len(todo)} to run on {jobs} worker(s)", flush=True)
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(threads,)) as pool:
        for i, res in enumerate(pool.imap_unordered(_run_star, [(r, str(runs_dir)) for r in todo]), 1):
            results.append(res)
            with open(runs_dir / "_log.jsonl", "a") as log:
                log.write(json.dumps({k: v for k, v in res.items() if k not in ("curve", "argv")}) + "\n")
            print(f"[{i}/{len(todo)} {time.perf_counter() - start:6.0f}s] {res['tag']:<32} final {res['final_top1']:6.2f} "
                  f"best {res['best_top1']:6.2f}  WE changed {res['we_changed']:5d} values  ({res['wall_s']:.0f}s)",
                  flush=True)
        pool.close()  # let workers exit normally (no leaked semaphores from a terminated pool)
        pool.join()
    key = {tag: i for i, tag in enumerate(r["tag"] for r in runs)}
    return sorted(results, key=lambda r: key.get(r["tag"], len(key))), len(todo)


def record_invocation(runs_dir: Path, this: dict) -> dict:
    """Append this invocation to runs_dir/_invocations.jsonl; returns the date, load and wall time of the
    invocations that trained runs (this one's when none did), for the report header."""
    path = runs_dir / "_invocations.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(this) + "\n")
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    trained = [h for h in history if h["ran"]] or [this]
    return {"date": trained[0]["date"] + (f" .. {trained[-1]['date']}" if len(trained) > 1 else ""),
            "load": trained[0]["load"], "wall_min": sum(h["wall_s"] for h in trained) / 60,
            "commands": sorted({h["command"] for h in trained})}


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    seeds = opts.seeds or (2 if opts.quick else 5)
    ablation_seeds = opts.ablation_seeds or (1 if opts.quick else 3)
    out = Path(opts.out)
    runs_dir = Path(opts.runs_dir or ROOT / "output" / ("digits_experiment_quick" if opts.quick else "digits_experiment"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(opts.quick, seeds, ablation_seeds, not opts.no_ablations)
    command = " ".join(["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    results, ran = execute(runs, runs_dir, opts.jobs, opts.threads)
    wall = time.perf_counter() - start
    trained = record_invocation(runs_dir, dict(date=started, command=command, ran=ran, wall_s=wall, load=load))
    recipe = (f"hparams/digits_demo.yaml{' + quick overrides' if opts.quick else ''} "
              f"(train.py args: {' '.join(a for a in RECIPE[2:])}{' ' + ' '.join(QUICK) if opts.quick else ''}); "
              f"{', '.join(ZERO_HEAD)} from the seeded timm init with a zeroed classifier; "
              "models and methods as in bench/experiment_digits.py's docstring")
    header = dict(date=trained["date"], command=" ; ".join(f"`{c}`" for c in trained["commands"]), machine=machine(),
                  jobs=opts.jobs, threads=opts.threads, wall_min=trained["wall_min"], ran=ran, recipe=recipe,
                  load=trained["load"], n_val=180 if opts.quick else 360)
    write_results_csv(results, out)
    print(write_summary(results, out, header))
    plot_curves(results, out, milestones_of([*RECIPE, *(QUICK if opts.quick else [])]))
    print(f"wrote {out}/digits_results.csv, digits_curves.csv, digits_summary.md, digits_curves.png "
          f"(this invocation: {wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
