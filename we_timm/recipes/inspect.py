"""What Weight Evolution would do to a checkpoint's weights: a dry run (`WeightEvolution.plan`) written as a
CSV, a PNG and a short table, without touching the checkpoint.

    python -m we_timm.inspect output/train/digits-demo-we/model_best.safetensors --output-dir inspect/
    python -m we_timm.inspect resnet18.pth --model resnet18 --output-dir inspect/ --we-gamma 0.1 --epoch 30

writes `inspect/we_inspect.csv` (one row per evolvable parameter: `we_timm.plan.ROW_FIELDS`) and
`inspect/we_inspect.png` (per pool: histogram of log10 importance with the global threshold; per layer: filters
selected globally, below gamma, and paired), and prints pool totals and the layers with the most inferior
filters. The WE config is the checkpoint's (safetensors metadata `we_config`, or a training state's WE state,
whose official-variant counters are loaded too), else `WEConfig()`; `--we-*` flags given on the command line
override single fields. `--epoch` defaults to the checkpoint's epoch (the step that would follow it), else 0.

train.py's `--we-inspect-every N` writes the same pair as `we_inspect/epoch_<E>.csv/.png` into the run folder
right before the WE step of every N-th epoch (0-based epochs N-1, 2N-1, ...; `write_before_step`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from timm import utils

from ..config import WEConfig
from ..evolution import WeightEvolution, is_dtensor
from ..plan import ROW_FIELDS, WEPlan
from .args import ArgumentParser, add_we_args
from .checkpoint import is_safetensors_file, torch_load
from .models import create_model_from_checkpoint
from .errors import run
from .files import pyplot, save_figure, write_text

_logger = logging.getLogger(__name__)

CSV_NAME = "we_inspect.csv"
PNG_NAME = "we_inspect.png"
POOL_COLORS = {"conv": "tab:blue", "linear": "tab:purple", "norm": "tab:green", "bias": "tab:orange"}


# ----------------------------------------------------------------------------- reports


def write_report(plan: WEPlan, csv_path: str, png_path: str, title: str = "") -> None:
    """The plan's per-parameter CSV and its figure, each written atomically."""
    write_text(csv_path, plan_csv(plan))
    plot_plan(plan, png_path, title)


def plan_csv(plan: WEPlan) -> str:
    """One row per evolvable parameter (`ROW_FIELDS`) plus epoch, pool rate and pool threshold; NaN is empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", *ROW_FIELDS, "pool_rate", "pool_threshold"],
                            lineterminator="\n")
    writer.writeheader()
    for row in plan.rows():
        pool = plan.pools[row["pool"]]
        row = {"epoch": plan.epoch, **row, "pool_rate": pool.rate, "pool_threshold": pool.threshold}
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def plot_plan(plan: WEPlan, path: str, title: str = "") -> None:
    """Top: per pool, a histogram of log10 importance, the global threshold dashed. Bottom: per parameter,
    the filters selected globally, below gamma in their group, and paired (evolved)."""
    plt = pyplot()
    pools = [p for p in plan.pools.values() if p.filters]
    fig = plt.figure(figsize=(max(8.0, 3.6 * len(pools)), 7.0))
    grid = fig.add_gridspec(2, max(1, len(pools)), height_ratios=(1, 1.15))
    for k, pool in enumerate(pools):
        ax = fig.add_subplot(grid[0, k])
        imp = torch.cat([u.importance for u in plan.units if u.pool == pool.pool and u.importance is not None])
        ax.hist(torch.log10(imp.double().clamp(min=1e-12)).cpu().numpy(), bins=40,
                color=POOL_COLORS.get(pool.pool, "gray"), alpha=0.8)
        if math.isfinite(pool.threshold) and pool.threshold > 0:
            ax.axvline(math.log10(pool.threshold), color="k", ls="--", lw=1, label="global threshold")
            ax.legend(fontsize=7)
        ax.set_title(f"{pool.pool}: {pool.filters} filters, r={pool.rate:.3g}, "
                     f"{pool.selected_global} selected, {pool.paired} paired", fontsize=8)
        ax.set_xlabel("log10 importance (Eq. 1)", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[1, :])
    units = [u for u in plan.units if not u.skipped]
    x = torch.arange(len(units)).numpy()
    for shift, key, label in ((-0.27, "selected_global", "selected globally"), (0.0, "below_gamma", "RI < gamma"),
                              (0.27, "paired", "paired (evolved)")):
        ax.bar(x + shift, [getattr(u, key) for u in units], width=0.27, label=label)
    step = max(1, len(units) // 60)
    ax.set_xticks(x[::step], [u.name for u in units][::step], rotation=90, fontsize=5)
    ax.set_ylabel("filters", fontsize=8)
    ax.set_yscale("symlog")
    ax.legend(fontsize=7)
    fig.suptitle(title or f"WE plan, epoch {plan.epoch} ({plan.variant} variant)", fontsize=10)
    fig.tight_layout()
    save_figure(path, fig)


def summary_table(plan: WEPlan, top: int = 10) -> str:
    """Pool totals, then the `top` parameters with the most paired (then below-gamma) filters."""
    lines = [f"WE plan for epoch {plan.epoch} ({plan.variant} variant)",
             f"{'pool':<7}{'rate':>9}{'filters':>9}{'selected':>10}{'threshold':>12}{'paired':>8}{'changed':>9}"]
    for p in plan.pools.values():
        if p.filters:
            lines.append(f"{p.pool:<7}{p.rate:>9.4f}{p.filters:>9}{p.selected_global:>10}{p.threshold:>12.4g}"
                         f"{p.paired:>8}{p.changed:>9}")
    units = sorted(plan.units, key=lambda u: (-u.paired, -u.below_gamma, -u.selected_global))[:top]
    lines.append(f"{'parameter':<40}{'pool':<6}{'filters':>8}{'imp min':>10}{'median':>10}{'max':>10}"
                 f"{'sel':>6}{'<gamma':>7}{'paired':>7}{'changed':>8}")
    for u in units:
        lines.append(f"{u.name[-40:]:<40}{u.pool:<6}{u.filters:>8}{u.imp_min:>10.3g}{u.imp_median:>10.3g}"
                     f"{u.imp_max:>10.3g}{u.selected_global:>6}{u.below_gamma:>7}{u.paired:>7}{u.changed:>8}")
    if plan.skipped:
        lines.append(f"skipped (non-finite values): {', '.join(plan.skipped)}")
    return "\n".join(lines)


def write_before_step(t: Any, epoch: int) -> None:
    """train.py `--we-inspect-every N`: `we_inspect/epoch_<epoch>.csv/.png` in the run folder (main process),
    for 0-based epochs N-1, 2N-1, ..., before that epoch's WE step. Reads the weights only. Under FSDP2 every
    rank plans (reading sharded parameters whole is a collective) and the main process writes."""
    every = getattr(t.args, "we_inspect_every", 0)
    if t.we is None or not every or (epoch + 1) % every:
        return
    if t.out_dir is None and not any(is_dtensor(u.param) for u in t.we.units):
        return
    plan = t.we.plan(epoch)
    if t.out_dir is None:
        return
    folder = os.path.join(t.out_dir, "we_inspect")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"epoch_{epoch}")
    write_report(plan, stem + ".csv", stem + ".png",
                 f"{t.args.model}, WE plan before the step of epoch {epoch}")


# ----------------------------------------------------------------------------- the command


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m we_timm.inspect",
                            description="Dry-run weight evolution on a checkpoint: per-parameter CSV, PNG, table")
    parser.add_argument("checkpoint", help="train.py .safetensors, its last.pth.tar training state, or a timm .pth")
    parser.add_argument("--output-dir", required=True, help=f"folder to write {CSV_NAME} and {PNG_NAME} into")
    parser.add_argument("--epoch", type=int, default=None,
                        help="0-based epoch whose step is planned (default: the checkpoint's epoch, else 0)")
    parser.add_argument("--model", default=None, help="timm architecture (required for files without metadata)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs,
                        help="extra create_model kwargs, key=value (files without metadata)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the checkpoint's)")
    parser.add_argument("--use-ema", action="store_true", help="inspect the EMA weights")
    parser.add_argument("--top", type=int, default=10, help="parameters listed on stdout (default: 10)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_we_args(parser)  # --weight-evolution is accepted and ignored: inspecting always plans a step
    return parser


def given_we_fields(argv: list[str]) -> dict[str, Any]:
    """{WEConfig field: value} for the --we-* flags present on the command line (defaults left out)."""
    parser, unset = get_args_parser(), object()  # a non-string default: argparse never converts it
    fields = [f.name for f in dataclasses.fields(WEConfig)]
    parser.set_defaults(**{f"we_{name}": unset for name in fields})
    args = parser.parse_args(argv)
    return {name: getattr(args, f"we_{name}") for name in fields if getattr(args, f"we_{name}") is not unset}


def we_state_of(path: str) -> dict[str, Any] | None:
    """The WE state (`WeightEvolution.state_dict()`) a train.py training state holds, else None."""
    if path.endswith(".safetensors") or is_safetensors_file(path):
        return None
    ckpt = torch_load(path, mmap=True)
    we = ckpt.get("we") if isinstance(ckpt, Mapping) else None
    return we if isinstance(we, Mapping) and isinstance(we.get("config"), Mapping) else None


def resolve_config(metadata: Mapping[str, Any], we_state: Mapping[str, Any] | None,
                   given: Mapping[str, Any]) -> WEConfig:
    """The checkpoint's WE config (metadata, else training state, else defaults) with `given` fields on top;
    ValueError naming the --we-* flag of a bad value."""
    base = metadata.get("we_config") or (we_state or {}).get("config") or {}
    try:
        return WEConfig.from_dict({**base, **given})
    except ValueError as e:
        flag = re.sub(r"WEConfig\.(\w+)", lambda m: "--we-" + m.group(1).replace("_", "-"), str(e))
        raise ValueError(flag) from None


def main(argv: list[str]) -> WEPlan:
    """Plan a WE step on the checkpoint's weights; write the CSV and PNG into --output-dir; print a table."""
    args = get_args_parser().parse_args(argv)
    given = given_we_fields(argv)
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir {out} exists and is not a directory")
    if args.epoch is not None and args.epoch < 0:
        raise ValueError(f"--epoch must be >= 0, got {args.epoch}")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    model, metadata, path = create_model_from_checkpoint(
        args.checkpoint, model_name=args.model, num_classes=args.num_classes, use_ema=args.use_ema,
        **args.model_kwargs)
    we_state = we_state_of(path)
    config = resolve_config(metadata, we_state, given)
    epoch = args.epoch if args.epoch is not None else int(metadata.get("epoch") or 0)
    we = WeightEvolution(model, config)
    if we_state is not None and we_state["config"].get("variant") == config.variant:
        we.load_state_dict(dict(we_state))  # the official counters the run would carry into this step
    plan = we.plan(epoch)
    os.makedirs(out, exist_ok=True)
    write_report(plan, os.path.join(out, CSV_NAME), os.path.join(out, PNG_NAME),
                 f"{os.path.basename(path)}: WE plan for epoch {epoch} ({config.variant} variant)")
    print(summary_table(plan, args.top))
    print(f"wrote {os.path.join(out, CSV_NAME)} and {os.path.join(out, PNG_NAME)}")
    return plan


def cli(argv: list[str] | None = None) -> int:
    """Entry point (`python -m we_timm.inspect`, `we-inspect`): bad input ends with one `error:` line, status 1."""
    if not logging.root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    return run(main, argv)
