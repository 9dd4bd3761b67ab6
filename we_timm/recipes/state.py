"""Training states: what a run saves (per epoch, mid-epoch, release files) and restores on resume.

A training state (`last.pth.tar`, `checkpoint-<epoch>.pth.tar`) holds everything `--resume` needs: model,
EMA, optimizer, loss scaler, WE state, epoch and update counters, the checkpoint ranking, the summary rows and
the arguments; it loads with `torch.load(weights_only=True)`. A recovery state (`recovery.pth.tar`, every
--recovery-interval updates) is the same taken mid-epoch, plus how far the epoch got and each rank's loss sums.
No RNG state is kept: every sample is augmented with RNGs seeded from (seed, epoch, index)
(`sampling.SeededSamples`) and every training batch re-seeds from (seed, epoch, batch, rank) (`engine.seed_step`),
so a resumed run draws the same numbers as the uninterrupted one, wherever it stopped.

Which epochs are kept is `keeper.CheckpointKeeper`'s (timm's `CheckpointSaver` policy); reading states and
finding where a run resumes from is `resuming`'s.
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import TYPE_CHECKING, Any, Mapping

import torch
from accelerate.utils import DistributedType, gather_object

from .checkpoint import atomic_save, save_safetensors, state_token
from .errors import one_line
from .files import json_safe, link_or_copy, remove
from .keeper import CheckpointKeeper
from .models import SPLIT_BN, load_into_model
from .resuming import (RECOVERY, STATE_EXT, STATE_FORMAT, STATE_VERSION, ResumePoint, load_state, model_weights,
                       warn_changed_args)
from .runtime import keep_step_kernel, step_kernel
from .shards import full_model_state, full_optimizer_state, is_sharded, load_full_optimizer_state

if TYPE_CHECKING:
    from .engine import Trainer

_logger = logging.getLogger(__name__)

# what rebuilds the model without train.py's flags, and the WE config: the Trainer's `meta`, kept in each state
MODEL_KEYS = ("architecture", "num_classes", "model_kwargs", "data_config", "we_config")
# what a release file's metadata takes from its training state (beside format, epoch, metrics, ema, token)
RELEASE_KEYS = (*MODEL_KEYS, "args")


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
    kernel = step_kernel(t.optimizer)  # this run's, not the saved groups' (`keep_step_kernel`)
    try:
        load_full_optimizer_state(t.raw_model, t.optimizer, state["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot restore the optimizer state of {t.args.resume} into --opt {t.args.opt}: "
                         f"{one_line(e)}; pass --no-resume-opt to start the optimizer afresh") from None
    keep_step_kernel(t.optimizer, kernel)
