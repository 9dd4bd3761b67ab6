"""Whole model and optimizer states of a model whose parameters torch FSDP2 shards (`fully_shard`, DTensor), in
the layout of an unsharded one, and back.

Checkpoints keep one layout whatever trained them: timm's `state_dict` (plain parameter names, full tensors)
and a torch `optimizer.state_dict()` (state keyed by parameter index), so a state saved under FSDP resumes in
one process or under DDP, and the other way round. For a model without DTensor parameters these functions
return the module's and the optimizer's own `state_dict()` (the files stay exactly what they were); for a
sharded one they go through torch's `torch.distributed.checkpoint.state_dict` API: collectives, which every
rank must call, with the whole state on CPU on rank 0 only (`cpu_offload`: the others get `{}`).

FSDP version 1 (FlatParameter) is not handled: train.py refuses it (`runtime.check_backend`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..evolution import is_dtensor

_STATE, _GROUPS, _PARAMS = "state", "param_groups", "params"


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (torch FSDP2)."""
    return any(is_dtensor(p) for p in model.parameters())


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's `AcceleratedOptimizer` (or `optimizer` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()`; for a sharded model the gathered one (collective; `{}` on ranks other than 0)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """`optimizer.state_dict()`; for a sharded model the gathered one, re-keyed by parameter index like an
    unsharded optimizer's (collective; `{}` on ranks other than 0)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_options(cpu_offload=True))
    return indexed(named) if named else {}


def load_full_optimizer_state(model: nn.Module, optimizer: Any, saved: Mapping[str, Any]) -> None:
    """Load an unsharded optimizer state (as saved by `full_optimizer_state`, or by any plain optimizer) into
    the optimizer of the prepared `model`: for a sharded model every rank passes the whole state and keeps its
    shards (collective). ValueError if the parameter groups do not match."""
    if not is_sharded(model):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    opt = _torch_optimizer(optimizer)
    set_optimizer_state_dict(model, opt, named(saved, param_names(model, opt)), options=_options())
    for group, loaded in zip(opt.param_groups, saved[_GROUPS]):  # as loaded (torch's API makes tuples lists)
        group.update({k: v for k, v in loaded.items() if k != _PARAMS})


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The name in `model` of every parameter of each group of `optimizer`."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group[_PARAMS]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def indexed(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state keyed by parameter name (torch.distributed.checkpoint's layout) keyed by index instead, numbered
    through the groups in order like `torch.optim.Optimizer.state_dict`."""
    index: dict[str, int] = {}
    groups = []
    for group in state[_GROUPS]:
        ids = [index.setdefault(name, len(index)) for name in group[_PARAMS]]
        groups.append({**group, _PARAMS: ids})
    return {_STATE: {index[name]: value for name, value in state[_STATE].items()}, _GROUPS: groups}


def named(state: Mapping[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """An index-keyed optimizer state keyed by the parameter names `names` (per group) instead; ValueError
    (torch's wording) if the groups differ in number or size."""
    groups = state[_GROUPS]
    if len(groups) != len(names):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g[_PARAMS]) != len(n) for g, n in zip(groups, names)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                         "optimizer's group")
    by_index = {i: name for g, n in zip(groups, names) for i, name in zip(g[_PARAMS], n)}
    return {_STATE: {by_index[int(i)]: value for i, value in state[_STATE].items()},
            _GROUPS: [{**g, _PARAMS: list(n)} for g, n in zip(groups, names)]}
