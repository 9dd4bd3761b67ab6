"""Reading training states, and where a run resumes from.

A training state (`last.pth.tar`, `checkpoint-<epoch>.pth.tar`, `recovery.pth.tar`) is checked on load (a timm
train.py checkpoint is accepted as one); `--resume auto` or a run folder becomes the folder's newest state;
its saved arguments become the resumed run's defaults, and a resume whose settings contradict the state's is
refused before any work.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from accelerate.utils import gather_object

from .checkpoint import is_safetensors_file, torch_load
from .errors import one_line
from .files import json_safe

_logger = logging.getLogger(__name__)

RECOVERY = "recovery"  # recovery.pth.tar: the newest --recovery-interval state of the epoch in progress
STATE_FORMAT = "we_timm.train_state"
STATE_VERSION = 2  # 2: timm's layout (state_dict, state_dict_ema, arch; epoch = the last complete one)
WEIGHTS_EXT = ".safetensors"
STATE_EXT = ".pth.tar"
# arguments that may differ on resume without a warning: where and how verbosely, not what, is trained
QUIET_ARGS = {"resume", "output", "experiment", "start_epoch", "config", "log_interval", "workers", "debug",
              "log_tensorboard", "pin_mem", "checkpoint_hist", "recovery_interval", "we_inspect_every"}


@dataclass
class ResumePoint:
    """How far a recovery state (--recovery-interval) got into its epoch."""

    updates: int  # optimizer updates done in the epoch
    sums: list[float]  # this rank's loss sums so far (see engine.train_one_epoch)


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
