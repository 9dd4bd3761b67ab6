"""Training state, checkpoints kept timm's way, and resume.

A training state (`last.pth.tar`, `checkpoint-<epoch>.pth.tar`) holds everything `--resume` needs: model,
EMA, optimizer, loss scaler, WE state, epoch and update counters, the checkpoint ranking, the summary rows and
the arguments; it loads with `torch.load(weights_only=True)`. A recovery state (`recovery.pth.tar`, every
--recovery-interval updates) is the same taken mid-epoch, plus how far the epoch got and each rank's loss sums.
No RNG state is kept: every sample is augmented with RNGs seeded from (seed, epoch, index)
(`sampling.SeededSamples`) and every training batch re-seeds from (seed, epoch, batch, rank) (`engine.seed_step`),
so a resumed run draws the same numbers as the uninterrupted one, wherever it stopped.

`CheckpointKeeper` decides which epochs are kept (timm's `CheckpointSaver` policy) and writes their files.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from accelerate.utils import DistributedType, gather_object

from .checkpoint import (SPLIT_BN, atomic_save, is_safetensors_file, load_into_model, read_metadata,
                         save_safetensors, state_token, torch_load)
from .errors import CheckpointError, one_line
from .files import json_safe, link_or_copy, remove
from .shards import full_model_state, full_optimizer_state, is_sharded, load_full_optimizer_state

if TYPE_CHECKING:
    from .engine import Trainer

_logger = logging.getLogger(__name__)

RECOVERY = "recovery"  # recovery.pth.tar: the newest --recovery-interval state of the epoch in progress
STATE_FORMAT = "we_timm.train_state"
STATE_VERSION = 2  # 2: timm's layout (state_dict, state_dict_ema, arch; epoch = the last complete one)
WEIGHTS_EXT = ".safetensors"
STATE_EXT = ".pth.tar"
# what rebuilds the model without train.py's flags, and the WE config: the Trainer's `meta`, kept in each state
MODEL_KEYS = ("architecture", "num_classes", "model_kwargs", "data_config", "we_config")
# what a release file's metadata takes from its training state (beside format, epoch, metrics, ema, token)
RELEASE_KEYS = (*MODEL_KEYS, "args")
# arguments that may differ on resume without a warning: where and how verbosely, not what, is trained
QUIET_ARGS = {"resume", "output", "experiment", "start_epoch", "config", "log_interval", "workers", "debug",
              "log_tensorboard", "pin_mem", "checkpoint_hist", "recovery_interval", "we_inspect_every"}


@dataclass
class ResumePoint:
    """How far a recovery state (--recovery-interval) got into its epoch."""

    updates: int  # optimizer updates done in the epoch
    sums: list[float]  # this rank's loss sums so far (see engine.train_one_epoch)


# ----------------------------------------------------------------------------- reading states and resume


def check_state(state: Any, path: str) -> dict[str, Any]:
    """The training state in `state` (as loaded from `path`), or ValueError saying why not.

    A timm train.py checkpoint (`state_dict`, `optimizer`, `epoch`) is accepted as a state with model,
    optimizer, EMA and epoch only (key "timm": True).
    """
    if isinstance(state, Mapping) and "format" not in state and {"state_dict", "optimizer", "epoch"} <= set(state):
        return from_timm(state)
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path} is not a we_timm training state (last.pth.tar / checkpoint-N.pth.tar); "
            "use --initial-checkpoint to start from model weights"
        )
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ValueError(f"{path} has training-state version {state['version']}, this train.py reads <= {STATE_VERSION}")
    return dict(state)


def from_timm(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A timm train.py checkpoint as a training state: model, EMA, optimizer, epoch and arguments."""
    args = ckpt.get("args")
    epoch = int(ckpt["epoch"]) - (int(ckpt.get("version", 1)) < 2)  # timm's version 1 saved epoch + 1
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "timm": True, "epoch": epoch,
            "state_dict": ckpt["state_dict"], "state_dict_ema": ckpt.get("state_dict_ema"),
            "optimizer": ckpt["optimizer"], "args": dict(vars(args) if hasattr(args, "__dict__") else args or {})}


def model_weights(state: Mapping[str, Any], ema: bool = False) -> Mapping[str, torch.Tensor] | None:
    """The model's (or the EMA's) weights of a training state (version 1 named them model / model_ema)."""
    new, old = ("state_dict_ema", "model_ema") if ema else ("state_dict", "model")
    return state[new] if state.get(new) is not None else state.get(old)


def load_state(path: str, mmap: bool = False) -> dict[str, Any]:
    """A training state written by `save_checkpoint`, or a timm checkpoint (ValueError for anything else)."""
    if is_safetensors_file(path):
        raise ValueError(
            f"--resume {path} holds model weights only; resume from last.pth.tar or checkpoint-N.pth.tar, "
            "or start from these weights with --initial-checkpoint"
        )
    try:
        state = torch_load(path, mmap=mmap)
    except Exception as e:  # corrupt, truncated or foreign pickles
        raise ValueError(f"cannot read training state {path}: {one_line(e)[:200]}") from None
    return check_state(state, path)


def position(state: Mapping[str, Any]) -> tuple[int, int]:
    """How far training had got: (last complete epoch, updates into the next one), ordered like time."""
    recovery = state.get("recovery")
    return int(state["epoch"]), int(recovery["updates"]) if recovery else 0


def newest_state(folder: str) -> str | None:
    """The training state of `folder` furthest into training (`position`: a recovery state mid-epoch is newer
    than the epoch state before it; last.pth.tar on ties); None if it holds none.

    Files that cannot be read as a training state are skipped with a warning; ValueError if there are
    some and none is readable (starting over would overwrite a run that only needs repair).
    """
    if not os.path.isdir(folder):
        return None
    names = ["last" + STATE_EXT, RECOVERY + STATE_EXT] + sorted(
        n for n in os.listdir(folder) if n.startswith("checkpoint-") and n.endswith(STATE_EXT))
    best, best_position, unreadable = None, (-2, 0), []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            where = position(load_state(path, mmap=True))
        except ValueError as e:  # unreadable: truncated by a crash outside our atomic writes, or foreign
            _logger.warning(f"skipping {path}: {one_line(e)[:200]}")
            unreadable.append(name)
            continue
        if where > best_position:
            best, best_position = path, where
    if best is None and unreadable:
        raise ValueError(f"{folder} holds training states but none is readable ({', '.join(unreadable)}); "
                         "resume one explicitly with --resume PATH, or start a new --experiment")
    return best


def resolve_resume(resume: str, output: str, experiment: str) -> str:
    """`--resume` as a file: "auto" and a run folder become the folder's newest complete training state.

    "auto" resumes `<output>/<experiment>` and stays "auto" (start the run) while there is no state yet;
    a folder without one is an error. A file path is returned as it is.
    """
    if resume != "auto" and not os.path.isdir(resume):
        return resume
    if resume == "auto" and not experiment:
        raise ValueError("--resume auto needs --experiment: it resumes the run folder <--output>/<--experiment>")
    folder = os.path.join(output or "./output/train", experiment) if resume == "auto" else resume
    path = newest_state(folder)
    if path is None and resume != "auto":
        raise ValueError(f"--resume {folder}: no last.pth.tar or checkpoint-N.pth.tar in this folder; nothing to "
                         "continue: run the command without --resume (or with --resume auto)")
    if path is None:
        _logger.warning(f"--resume auto: no training state in {folder} yet; starting the run")
    return path or "auto"


def check_run_folder_free(folder: str, resume: str) -> None:
    """A new run may use `folder` unless it holds checkpoints: a run that failed before its first checkpoint
    (args.yaml, perhaps summary.csv) does not block the corrected command."""
    if resume or not os.path.isdir(folder):
        return
    saved = sorted(n for n in os.listdir(folder) if n.endswith((STATE_EXT, WEIGHTS_EXT)))
    if saved:
        raise ValueError(f"{folder} already holds a run ({', '.join(saved[:3])}); pass a new --experiment, "
                         f"or --resume {folder} to continue it")


def saved_args(path: str) -> dict[str, Any]:
    """The arguments a training state was trained with, set to continue in the folder the state is in
    (even if it was moved): the defaults of a resumed run, below the CLI and YAML."""
    saved = {k: v for k, v in load_state(path, mmap=True).get("args", {}).items()
             if k not in ("resume", "config", "start_epoch", "pin_mem")}  # pin_mem: the machine's, not the run's
    folder = os.path.dirname(os.path.abspath(path))
    saved.update(output=os.path.dirname(folder), experiment=os.path.basename(folder))
    return saved


def check_resumable(args: Any, saved: dict[str, Any], path: str) -> None:
    """Refuse a resume whose settings contradict the checkpoint's in a way training cannot continue from."""
    refuse = [("model", "--model")]
    if args.weight_evolution and saved.get("weight_evolution"):
        refuse.append(("we_variant", "--we-variant"))  # one variant's counters and schedule mean nothing to the other
    for key, flag in refuse:
        if key in saved and getattr(args, key) != saved[key]:
            raise ValueError(f"cannot resume {path}: it was trained with {flag} {saved[key]}, "
                             f"not {getattr(args, key)}; start a new run (--initial-checkpoint to start from its weights)")


def warn_changed_args(args: Any, saved: dict[str, Any]) -> None:
    """torchtune-style: say which settings differ from the checkpointed run's."""
    now = json_safe(vars(args))
    changed = sorted(k for k in now if k not in QUIET_ARGS and k in saved and now[k] != saved[k])
    if changed:
        _logger.warning("resuming with settings that differ from the checkpoint's: "
                        + ", ".join(f"{k}={now[k]!r} (was {saved[k]!r})" for k in changed))


def check_same_start(num_processes: int, resume: str, state: dict[str, Any] | None) -> None:
    """Every process must resume the same state (each picks it: `--resume auto` reads the run folder)."""
    if num_processes < 2:
        return
    mine = (os.path.abspath(resume) if resume and resume != "auto" else "", None if state is None else state["epoch"])
    every = gather_object([mine])
    if any(other != every[0] for other in every):
        starts = ", ".join(f"process {i}: {path or 'a new run'} (epoch {epoch})"
                           for i, (path, epoch) in enumerate(every))
        raise ValueError(f"the processes would start from different states ({starts}); the run folder must be on "
                         "a filesystem every process sees, unchanged while the run starts")


# ----------------------------------------------------------------------------- saving and restoring a Trainer


def full_state(t: Trainer) -> tuple[dict, dict] | None:
    """(model state_dict, optimizer state_dict) as checkpoints hold them, on the process that writes; None on
    the others. Collective under FSDP2 (every rank must call it): the sharded parameters and optimizer state
    are gathered whole (`shards`); otherwise the module's and the optimizer's own `state_dict()`."""
    if t.out_dir is None and not is_sharded(t.raw_model):
        return None
    model = full_model_state(t.raw_model)
    optimizer = full_optimizer_state(t.raw_model, t.optimizer)
    return None if t.out_dir is None else (model, optimizer)


def training_state(t: Trainer, epoch: int, metric: float | None, full: tuple[dict, dict],
                   metrics: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Everything --resume needs, loadable with `torch.load(weights_only=True)`, in timm's checkpoint layout
    (`state_dict`, `state_dict_ema`, `optimizer`, `epoch`, `arch`, `metric`, version 2): timm's own
    `load_checkpoint` / validate.py read it. `full`: what `full_state` returned; `metrics`: the epoch's
    evaluation of "model" (and "ema"), which its `.safetensors` release files carry (`write_release_files`).
    `token` names this one state, so a release file can tell whether it holds these very weights."""
    scaler = t.accelerator.scaler
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "epoch": epoch,
        "arch": t.args.model,
        "metric": metric,
        "metrics": json_safe(metrics),
        "token": secrets.token_hex(8),
        "num_updates": t.num_updates,
        "state_dict": full[0],
        "state_dict_ema": None if t.model_ema is None else t.model_ema.module.state_dict(),
        "optimizer": full[1],
        "scheduler": json_safe(t.scheduler.state_dict()),  # informative: rebuilt from args on resume
        "scaler": None if scaler is None else scaler.state_dict(),
        "we": None if t.we is None else t.we.state_dict(),
        "we_ema": None if t.we_ema is None else t.we_ema.state_dict(),
        "checkpoints": t.keeper.state_dict(),
        "history": json_safe(t.history),
        "we_records": json_safe(t.we_records),
        "args": json_safe(vars(t.args)),
        # what rebuilds the model without train.py's flags (validate.py and export read a state like a .safetensors)
        **{k: t.meta[k] for k in MODEL_KEYS},
    }


def save_checkpoint(t: Trainer, epoch: int, metrics: dict[str, dict]) -> None:
    """The main process writes `last.pth.tar` and the kept copies (timm's per-epoch files); the others write
    nothing. Collective under FSDP2 (`full_state`). The `.safetensors` release files are written when the
    run stops (`write_release_files`): written every epoch they would add half again the bytes."""
    full = full_state(t)
    if full is None:
        return
    metric = metrics["ema" if t.model_ema is not None else "model"][t.args.eval_metric]
    if t.keeper.save(epoch, metric, lambda: training_state(t, epoch, metric, full, metrics)):
        _logger.info(f"New best {t.args.eval_metric} {metric:.4f} at epoch {epoch}")
    recovery = t.keeper.path(RECOVERY, STATE_EXT)
    if os.path.exists(recovery):  # older than the epoch state now on disk
        remove(recovery)


def write_release_files(t: Trainer) -> list[str]:
    """`last` and `model_best` (+ `_ema`) `.safetensors` from the training states of the same names: the
    weights without `--split-bn`'s training-only BatchNorms, with the metadata validate.py, export and inspect
    read (`release_metadata`). First the folder's links are made to match `last.pth.tar`'s ranking (a stop
    may have come between the state and its links). A file that already holds its state's weights (the same
    `token`) is left alone, so a finished run resumed with nothing to do rewrites nothing; `model_best*` of
    the last epoch are links to `last*`; an `_ema` file of another state, where the state has no EMA, is
    removed. Main process only; reads the states from disk (no collective). Returns the paths changed."""
    if t.out_dir is None or not os.path.isfile(t.keeper.path("last", STATE_EXT)):
        return []
    last = load_state(t.keeper.path("last", STATE_EXT), mmap=True)
    ranking = CheckpointKeeper(t.out_dir, t.keeper.max_history, t.keeper.decreasing)
    ranking.load_state_dict(last.get("checkpoints", {}))
    changed = ranking.reconcile(int(last["epoch"]))
    holders: dict[tuple[str, str], str] = {}  # (token, kind) -> the release file just checked for that state
    for stem in ("last", "model_best"):
        src = t.keeper.path(stem, STATE_EXT)
        if not os.path.isfile(src):
            continue
        saved = last if stem == "last" else load_state(src, mmap=True)
        token = saved.get("token") or _file_token(src)
        for kind in ("model", "ema"):
            sd = model_weights(saved, ema=kind == "ema")
            dst = t.keeper.path(stem + ("_ema" if kind == "ema" else ""))
            current = state_token(dst)
            if sd is None:  # a state without EMA: an EMA file beside it would be another state's
                if current not in (None, token):
                    remove(dst)
                    changed.append(dst)
                continue
            if current != token:
                if (token, kind) in holders:
                    link_or_copy(holders[token, kind], dst)
                else:
                    weights = {k: v for k, v in sd.items() if SPLIT_BN not in k}  # training-only
                    save_safetensors(dst, weights, release_metadata(saved, kind, token))
                changed.append(dst)
            holders[token, kind] = dst
    return changed


def release_metadata(saved: Mapping[str, Any], kind: str, token: str) -> dict[str, Any]:
    """The `.safetensors` metadata of a training state's "model" or "ema" weights: what rebuilds the model
    (architecture, num_classes, model_kwargs, data_config), the WE config, train.py's args, the epoch, the
    epoch's evaluation of those weights, and the state's token."""
    metrics = (saved.get("metrics") or {}).get(kind)
    return {"format": "we_timm", **{k: saved.get(k) for k in RELEASE_KEYS}, "epoch": int(saved["epoch"]),
            "metrics": metrics, "ema": kind == "ema", "token": token}


def _file_token(path: str) -> str:
    """A token for a training state written before states had one: its file's identity (hard links share it)."""
    st = os.stat(path)
    return f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def save_recovery(t: Trainer, epoch: int, updates: int, sums: torch.Tensor) -> None:
    """Collective: the training state `updates` updates into `epoch`, as `recovery.pth.tar` (replacing the
    previous one atomically), written by the main process; timm's --recovery-interval."""
    every = gather_object([sums.tolist()]) if t.accelerator.num_processes > 1 else [sums.tolist()]
    full = full_state(t)
    if full is None:
        return
    recovery = training_state(t, epoch - 1, None, full)
    recovery["recovery"] = {"epoch": epoch, "updates": updates, "sums": every}
    atomic_save(recovery, t.keeper.path(RECOVERY, STATE_EXT))


def restore_state(t: Trainer, state: dict[str, Any]) -> int:
    """Load a training state (model weights already in) into the unprepared objects; returns the next epoch.
    Under FSDP the optimizer state is left for `restore_optimizer` after `prepare`."""
    if t.model_ema is not None and model_weights(state, ema=True) is not None:
        load_into_model(t.model_ema.module, model_weights(state, ema=True))
    elif t.model_ema is not None:
        _logger.warning("the checkpoint has no EMA weights; EMA starts from the resumed model weights")
    if not optimizer_after_prepare(t.accelerator):
        restore_optimizer(t, state)
    if t.we is not None and state.get("we") is not None:
        t.we.load_state_dict(state["we"])
    elif t.we is not None:
        _logger.warning("the checkpoint has no weight-evolution state (a timm checkpoint, or a run without WE): "
                        "weight evolution starts now, with fresh counters")
    if t.we_ema is not None and state.get("we_ema") is not None:
        t.we_ema.load_state_dict(state["we_ema"])
    t.keeper.load_state_dict(state.get("checkpoints", {}))
    t.num_updates = int(state.get("num_updates", (int(state["epoch"]) + 1) * t.updates_per_epoch))
    recovery = state.get("recovery")
    stepped = int(state["epoch"]) + (recovery is not None)  # a recovery state is taken after its WE step
    t.history = [dict(r) for r in state.get("history", []) if r.get("epoch", -1) <= state["epoch"]]
    t.we_records = [dict(r) for r in state.get("we_records", []) if r.get("epoch", -1) < stepped]
    if recovery is not None:
        ranks, acc = recovery["sums"], t.accelerator
        if len(ranks) != acc.num_processes:
            raise ValueError(f"the recovery state was written by {len(ranks)} process(es), this run has "
                             f"{acc.num_processes}: resume the epoch state instead (--resume .../last.pth.tar)")
        t.resume_point = ResumePoint(int(recovery["updates"]), list(ranks[acc.process_index]))
    warn_changed_args(t.args, state.get("args", {}))
    return int(state["epoch"]) + 1


def optimizer_after_prepare(acc: Any) -> bool:
    """Under FSDP the optimizer state is loaded after `prepare`: it replaces the parameters by sharded ones
    (the optimizer's included) and would leave state keyed by the old ones behind. Elsewhere it is loaded
    before, as it always was (a bad state is refused before the run folder is touched)."""
    return acc.distributed_type == DistributedType.FSDP


def restore_optimizer(t: Trainer, state: Mapping[str, Any]) -> None:
    """The optimizer state of `state` (unless --no-resume-opt), one layout whatever saved it (`shards`):
    into sharded parameters every rank loads the whole state and keeps its shards (collective)."""
    if t.args.no_resume_opt:
        return
    try:
        load_full_optimizer_state(t.raw_model, t.optimizer, state["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot restore the optimizer state of {t.args.resume} into --opt {t.args.opt}: "
                         f"{one_line(e)}; pass --no-resume-opt to start the optimizer afresh") from None


# ----------------------------------------------------------------------------- which checkpoints are kept


class CheckpointKeeper:
    """timm `CheckpointSaver`'s policy: `last`, the `max_history` best epochs, and `model_best`.

    Bookkeeping (`kept`, `best`) is part of the training state so a resumed run
    keeps ranking against the checkpoints already on disk.
    """

    def __init__(self, out_dir: str | None, max_history: int = 10, decreasing: bool = False):
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

    def save(self, epoch: int, metric: float, make_state: Callable[[], dict[str, Any]]) -> bool:
        """Write `last.pth.tar`, then keep copies as `checkpoint-<epoch>.pth.tar` / `model_best.pth.tar` and
        remove evicted epochs, as timm's `CheckpointSaver` does; returns is-best. `make_state()` builds the
        training state after the bookkeeping is updated."""
        keep, evicted, is_best = self.rank(epoch, metric)
        last = self.path("last", STATE_EXT)
        atomic_save(make_state(), last)
        if keep:
            link_or_copy(last, self.path(f"checkpoint-{epoch}", STATE_EXT))
        if is_best:  # timm's model_best.pth.tar
            link_or_copy(last, self.path("model_best", STATE_EXT))
        for old in evicted:
            if old != epoch:
                remove(self.path(f"checkpoint-{old}", STATE_EXT))
                for kind in ("", "_ema"):  # the weights earlier versions kept beside each state
                    if os.path.exists(self.path(f"checkpoint-{old}{kind}")):
                        remove(self.path(f"checkpoint-{old}{kind}"))
        return is_best

    def reconcile(self, epoch: int) -> list[str]:
        """Make the folder match the ranking of the resumed state of `epoch`; returns the paths changed.

        `save` writes `last.pth.tar` (whose state already holds the new ranking) before it links
        `checkpoint-<epoch>.pth.tar` and `model_best.pth.tar` and removes evicted epochs: a kill in between
        leaves links missing, a stale `model_best` and orphan files. Links are made only from a file that holds
        the right epoch.
        """
        changed: list[str] = []
        kept = {e for _, e in self.kept}
        wanted = [(f"checkpoint-{e}", e) for e in sorted(kept)]
        if self.best is not None:
            wanted.append(("model_best", self.best[1]))  # timm's model_best.pth.tar
        for stem, e in wanted:
            dst = self.path(stem, STATE_EXT)
            if _epoch_of(dst) == e:
                continue
            src = next((p for p in (self.path("last", STATE_EXT), self.path(f"checkpoint-{e}", STATE_EXT))
                        if _epoch_of(p) == e), None)
            if src is not None:
                link_or_copy(src, dst)
                changed.append(dst)
        for name in sorted(os.listdir(self.out_dir)):  # evicted epochs whose files were not removed yet
            m = re.fullmatch(r"checkpoint-(\d+)(_ema)?(\.safetensors|\.pth\.tar)", name)
            if m and int(m.group(1)) <= epoch and int(m.group(1)) not in kept:
                remove(os.path.join(self.out_dir, name))
                changed.append(os.path.join(self.out_dir, name))
        return changed


def _epoch_of(path: str) -> int | None:
    """The epoch a weights file or training state was saved at (None: missing or unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        if path.endswith(WEIGHTS_EXT):
            return read_metadata(path).get("epoch")
        return int(load_state(path, mmap=True)["epoch"])
    except (CheckpointError, ValueError):
        return None
