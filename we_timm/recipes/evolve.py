"""The weight-evolution step of a training run: `evolve` runs WE (and its EMA / optimizer-state options) on the
unwrapped fp32 parameters after an epoch, records its stats, and under DDP checks that every rank holds the
same values afterwards. Nothing here writes files: the stats go to the Trainer's history.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ..evolution import is_dtensor
from .errors import RankMismatchError
from .shards import is_sharded

if TYPE_CHECKING:
    from .engine import Trainer

_logger = logging.getLogger(__name__)


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


def synced_tensors(t: Trainer) -> list[tuple[str, torch.Tensor]]:
    """What every rank holds bit-identically after a WE step: the parameters, the EMA's parameters, and with
    --dist-bn the BN running statistics of both (timm's distribute_bn syncs exactly those).

    Parameters sharded by FSDP2 (DTensor) are left out: each element has one owner rank, so there is nothing
    for ranks to disagree on (WE computes the whole value on every rank and each keeps its own slice);
    BN statistics stay unsharded buffers and are compared."""
    models = [("", t.raw_model)] + ([("ema.", t.model_ema.module)] if t.model_ema is not None else [])
    items = []
    for prefix, model in models:
        items += [(prefix + n, p) for n, p in model.named_parameters() if not is_dtensor(p)]
        if t.args.dist_bn:
            items += [(prefix + n, b) for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    return items


def check_ranks_agree(t: Trainer, epoch: int) -> None:
    """All-gather checksums of `synced_tensors`; RankMismatchError naming the tensors if ranks differ."""
    acc = t.accelerator
    items = synced_tensors(t)
    if not items:  # every parameter sharded and no --dist-bn: nothing is replicated
        _logger.info(f"WE step {epoch}: parameters sharded over {acc.num_processes} ranks, nothing replicated to "
                     "compare")
        return
    gathered = acc.gather(checksums(v for _, v in items)[None]).view(acc.num_processes, -1)
    differs = (gathered != gathered[0]).any(0).tolist()
    if any(differs):
        names = [n for (n, _), d in zip(items, differs) if d]
        raise RankMismatchError(
            f"after the weight-evolution step of epoch {epoch}, ranks hold different values "
            f"({len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        )
    sharded = " (sharded parameters excepted)" if is_sharded(t.raw_model) else ""
    _logger.info(f"WE step {epoch}: parameters{', BN statistics' if t.args.dist_bn else ''}"
                 f"{' and EMA' if t.model_ema is not None else ''} identical on {acc.num_processes} ranks{sharded}")


def zero_changed_state(optimizer: Any, before: dict[nn.Parameter, torch.Tensor]) -> int:
    """Zero the optimizer state (SGD momentum, Adam moments: per-element tensors shaped like the parameter) of
    every element whose value differs from `before`; returns the number of elements reset.

    FSDP2 shards (DTensor) are compared and zeroed shard by shard on each rank (parameter, `before` and the
    state share the placement); the count is then summed over the shards' ranks (a collective)."""
    state = getattr(optimizer, "optimizer", optimizer).state
    reset, mesh = torch.zeros((), dtype=torch.int64), None
    for p, old in before.items():
        if is_dtensor(p):
            mesh = p.device_mesh
        changed = _local(p.detach()) != _local(old)
        buffers = [_local(v) for v in state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
        for v in buffers:
            v[changed] = 0
        reset += changed.sum().cpu() if buffers else 0
    if mesh is not None:  # over the shard dimension (the last): one replica's whole count
        reset = reset.to(mesh.device_type)
        torch.distributed.all_reduce(reset, group=mesh.get_group(mesh.ndim - 1))
    return int(reset)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or `t`."""
    return t.to_local() if is_dtensor(t) else t


def evolve(t: Trainer, epoch: int) -> None:
    """`we.step(epoch)` on the unwrapped fp32 parameters (and the EMA's with --we-ema evolve; the optimizer state
    of changed values zeroed with --we-reset-opt-state); stats go to the epoch's summary row and we_stats.jsonl."""
    start = time.perf_counter()
    before = {u.param: u.param.detach().clone() for u in t.we.units} if t.args.we_reset_opt_state else None
    stats = t.we.step(epoch)
    extra = {}
    if t.we_ema is not None:
        extra["we_ema_changed"] = t.we_ema.step(epoch).changed
    if before is not None:
        extra["we_opt_state_reset"] = zero_changed_state(t.optimizer, before)
    seconds = time.perf_counter() - start
    if t.accelerator.num_processes > 1:
        check_ranks_agree(t, epoch)
    row = {**stats.to_dict(), **extra, "we_time_s": seconds}
    rows = [r for r in t.history if r["epoch"] == epoch]
    (rows[-1] if rows else t.history.append(OrderedDict(epoch=epoch)) or t.history[-1]).update(row)
    t.we_records.append({"epoch": epoch, **row, "inferior": dict(stats.inferior), "skipped": list(stats.skipped)})
    _logger.info(
        f"WE step {epoch}: {row['we_inferior']} inferior filters evolved, {row['we_changed']} values changed "
        f"(rate conv {row.get('we_rate_conv', 0.0):.4f}) in {seconds * 1000:.1f} ms"
    )
