"""Helpers of train.py: YAML configs, checkpoints kept timm's way, training state, summaries, plots.

Nothing here imports argparse or Accelerate; train.py passes its parser and plain values.

Layout of a run folder (timm's, with safetensors weights):

    args.yaml                      resolved arguments, loadable with `-c`
    summary.csv                    timm's columns (epoch, train_loss, eval_*, lr) + we_* columns
    we_stats.jsonl                 one JSON line per WE step, with inferior filters per parameter
    summary.png                    training curves beside WE selection rates / inferior counts
    last.safetensors               model weights after the latest epoch (`_ema` sibling: EMA weights)
    last.pth.tar                   full training state of the latest epoch, for --resume
    checkpoint-<epoch>.*           the --checkpoint-hist best epochs by eval metric (weights + state)
    model_best.safetensors         weights of the best epoch (`_ema` sibling with --model-ema)

Every file is written to a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint; kept copies are hard links when the
filesystem allows.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import shutil
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import yaml

from .checkpoint import _atomic_write, atomic_save, ema_sibling, save_safetensors

_logger = logging.getLogger(__name__)

STATE_FORMAT = "we_timm.train_state"
STATE_VERSION = 1
WEIGHTS_EXT = ".safetensors"
STATE_EXT = ".pth.tar"


# ----------------------------------------------------------------------------- small helpers


def json_safe(value: Any) -> Any:
    """`value` with tuples as lists and anything JSON cannot hold as its `str`."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_text(path: str, text: str) -> None:
    """Atomically replace `path` with `text`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def _link_or_copy(src: str, dst: str) -> None:
    """Atomically make `dst` a copy of `src` (a hard link where possible)."""
    def write(tmp: str) -> None:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    _atomic_write(dst, write)


def _restem(path: str, stem: str) -> str:
    """`run/last_ema.safetensors` -> `run/<stem>_ema.safetensors`."""
    folder, name = os.path.split(path)
    assert name.startswith("last"), name
    return os.path.join(folder, stem + name[len("last"):])


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- YAML config (-c)


def _coerce(action: "argparse.Action", key: str, value: Any) -> Any:
    """A YAML value as argparse would have produced it from the command line (ValueError if it cannot)."""
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(action.default, dict):  # key=value actions such as timm ParseKwargs
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"{key}: expected {action.nargs} values, got {value!r}")
        return [_coerce_one(action, key, v) for v in items]
    return _coerce_one(action, key, value)


def _coerce_one(action: "argparse.Action", key: str, value: Any) -> Any:
    kind = action.type
    if kind is not None and not (kind is int and isinstance(value, bool)):
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: invalid {getattr(kind, '__name__', 'value')} {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{key}: {value!r} is not one of {list(action.choices)}")
    return value


def load_config(parser: "argparse.ArgumentParser", path: str) -> dict[str, Any]:
    """YAML file -> validated parser defaults; unknown keys and ill-typed values raise ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping of argument names to values")
    return config_defaults(parser, cfg, f"config {path}")


def config_defaults(parser: "argparse.ArgumentParser", cfg: Mapping[str, Any], source: str,
                    strict: bool = True) -> dict[str, Any]:
    """`{dest: value}` for `parser.set_defaults`, values typed as on the command line.

    Unknown keys raise ValueError naming `source` (with `strict=False` they are
    logged and skipped, e.g. arguments saved by an older train.py).
    """
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    keys = {str(k): str(k).replace("-", "_") for k in cfg}
    unknown = sorted(k for k, dest in keys.items() if dest not in actions)
    if unknown and strict:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} (keys are the argument names, e.g. batch_size)")
    if unknown:
        _logger.warning("%s: ignoring unknown argument(s) %s", source, ", ".join(unknown))
    try:
        return {keys[str(k)]: _coerce(actions[keys[str(k)]], str(k), v) for k, v in cfg.items() if str(k) not in unknown}
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- data-parallel integrity


def checksums(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor hashing its exact bits (position-weighted sum of the raw words)."""
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    for p in tensors:
        flat = p.detach().contiguous().view(-1)
        bits = flat.view(words.get(flat.element_size(), torch.uint8)).long()
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        sums.append((bits * weights).sum())
    return torch.stack(sums)


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states as `torch.load(weights_only=True)`-safe values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints


class CheckpointKeeper:
    """timm `CheckpointSaver`'s policy: `last`, the `max_history` best epochs, and `model_best`.

    Bookkeeping (`kept`, `best`) is part of the training state so a resumed run
    keeps ranking against the checkpoints already on disk.
    """

    def __init__(self, out_dir: str, max_history: int = 10, decreasing: bool = False):
        self.out_dir = out_dir
        self.max_history = max(0, int(max_history))
        self.decreasing = decreasing
        self.kept: list[tuple[float, int]] = []  # (metric, epoch), best first
        self.best: tuple[float, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"kept": [list(k) for k in self.kept], "best": None if self.best is None else list(self.best)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kept = [(float(m), int(e)) for m, e in state.get("kept", [])]
        best = state.get("best")
        self.best = None if best is None else (float(best[0]), int(best[1]))

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def rank(self, epoch: int, metric: float) -> tuple[bool, list[int], bool]:
        """Update bookkeeping for a new epoch: (keep it, epochs evicted, is new best)."""
        is_best = self.best is None or self._better(metric, self.best[0])
        if is_best:
            self.best = (metric, epoch)
        kept = [k for k in self.kept if k[1] != epoch] + [(metric, epoch)]
        kept.sort(key=lambda k: k[0], reverse=not self.decreasing)  # stable: earlier epoch first on ties
        evicted = [e for _, e in kept[self.max_history:]]
        self.kept = kept[: self.max_history]
        keep = epoch not in evicted and self.max_history > 0
        return keep, evicted, is_best

    def path(self, stem: str, ext: str = WEIGHTS_EXT) -> str:
        return os.path.join(self.out_dir, stem + ext)

    def save(
        self,
        epoch: int,
        metric: float,
        weights: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
        make_state: Callable[[], dict[str, Any]],
    ) -> bool:
        """Write `last.*`, then keep copies as `checkpoint-<epoch>.*` / `model_best.*`; returns is-best.

        `weights` maps "model" (and "ema") to `(state_dict, metadata)`;
        `make_state()` builds the training state after the bookkeeping is updated.
        """
        keep, evicted, is_best = self.rank(epoch, metric)
        files = self._write_last(weights, make_state())
        if keep:
            for src in files:
                _link_or_copy(src, _restem(src, f"checkpoint-{epoch}"))
        if is_best:
            for src in files:
                if src.endswith(WEIGHTS_EXT):
                    _link_or_copy(src, _restem(src, "model_best"))
        for old in evicted:
            if old != epoch:
                for src in files:
                    _remove(_restem(src, f"checkpoint-{old}"))
        return is_best

    def _write_last(self, weights: Mapping[str, tuple[Any, Any]], state: dict[str, Any]) -> list[str]:
        files = []
        for kind, (sd, meta) in weights.items():
            path = self.path("last")
            path = ema_sibling(path) if kind == "ema" else path
            save_safetensors(path, sd, meta)
            files.append(path)
        state_path = self.path("last", STATE_EXT)
        atomic_save(state, state_path)
        files.append(state_path)
        return files


def newest_state(folder: str) -> str | None:
    """The training state of `folder` with the highest epoch (last.pth.tar on ties); None if it holds none.

    Files that cannot be read as a training state are skipped with a warning; ValueError if there are
    some and none is readable (starting over would overwrite a run that only needs repair).
    """
    if not os.path.isdir(folder):
        return None
    names = ["last" + STATE_EXT] + sorted(n for n in os.listdir(folder)
                                         if n.startswith("checkpoint-") and n.endswith(STATE_EXT))
    best, best_epoch, unreadable = None, -1, []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            epoch = int(check_state(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)["epoch"])
        except Exception as e:  # unreadable: truncated by a crash outside our atomic writes, or foreign
            _logger.warning(f"skipping {path}: {' '.join(str(e).split())[:200]}")
            unreadable.append(name)
            continue
        if epoch > best_epoch:
            best, best_epoch = path, epoch
    if best is None and unreadable:
        raise ValueError(f"{folder} holds training states but none is readable ({', '.join(unreadable)}); "
                         "resume one explicitly with --resume PATH, or start a new --experiment")
    return best


def check_state(state: Any, path: str) -> dict[str, Any]:
    """The training state in `state` (as loaded from `path`), or ValueError saying why not."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path} is not a we_timm training state (last.pth.tar / checkpoint-N.pth.tar); "
            "use --initial-checkpoint to start from model weights"
        )
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ValueError(f"{path} has training-state version {state['version']}, this train.py reads <= {STATE_VERSION}")
    return dict(state)


# ----------------------------------------------------------------------------- summaries and plots


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def write_summary(path: str, rows: list[Mapping[str, Any]]) -> None:
    """All epochs' rows as CSV (timm's `update_summary` columns first, we_* after); rewritten whole."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_jsonl(path: str, records: list[Mapping[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(json_safe(r), sort_keys=True) + "\n" for r in records))


def plot_summary(path: str, rows: list[Mapping[str, Any]]) -> None:
    """Loss, accuracy and LR per epoch; with WE, its selection rates and inferior filters per pool beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", ["train_loss", "eval_loss"]),
        ("accuracy (%)", ["eval_top1", "eval_top5"]),
        ("learning rate", ["lr"]),
    ]
    cols = _columns(rows)
    rates = [c for c in cols if c.startswith("we_rate_")]
    if rates:
        panels.append(("WE selection rate", rates))
        panels.append(("WE inferior filters", [c for c in cols if c.startswith("we_selected_")]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())

    _atomic_write(path, write)
