"""WE and train.py's checkpoint functions on torch FSDP2 shards vs the unsharded model, one process of
`torchrun --nproc_per_node 2` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py OUT.json [we|state]

Every rank builds the same perturbed models, shards one copy with `fully_shard` over a CPU device mesh and
keeps one whole. "we" (the default): two WE steps on each, then the gathered parameters are compared with the
unsharded ones. "state": train.py's save / resume functions (`state.full_state`, `state.restore_optimizer`,
`evolve.zero_changed_state`, `evolve.check_ranks_agree`) around training steps, against the unsharded model
trained identically (`state_report`). Rank 0 writes the comparison to OUT.json.
"""
from __future__ import annotations

import copy
import json
import os
import sys

from types import SimpleNamespace

import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.utils import adaptive_clip_grad, distribute_bn
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import perturb  # noqa: E402

from we_timm import WEConfig, WeightEvolution  # noqa: E402
from we_timm.recipes import engine, evolve, state  # noqa: E402
from we_timm.recipes.checkpoint import atomic_save, torch_load  # noqa: E402
from we_timm.recipes.models import load_into_model  # noqa: E402
from we_timm.recipes.errors import exit_process  # noqa: E402

CONFIGS = {
    "paper": WEConfig(rate=0.3, gamma=0.5, layers=("conv", "norm", "linear")),
    "official": WEConfig(variant="official", rate=0.3, rate_norm=0.3, rate_bias=0.3, gamma=0.3),
}


def odd_net() -> nn.Module:
    """Filter counts that 2 ranks cannot split evenly (7, 5, 3)."""
    return nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 5, 1), nn.BatchNorm2d(5),
                         nn.Conv2d(5, 5, 3, groups=5), nn.Flatten(), nn.LazyLinear(3))


def build(name: str) -> nn.Module:
    if name == "odd_net":
        model = odd_net()
        model(torch.zeros(1, 3, 8, 8))  # materialise the lazy linear
        return model
    return timm.create_model(name, num_classes=10)


def shard(model: nn.Module, mesh) -> nn.Module:
    for child in model.children():  # FSDP2's usual pattern: each block, then the root
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def we_report(mesh) -> dict:
    report = {}
    for name in ("resnet18", "odd_net"):
        for variant, cfg in CONFIGS.items():
            torch.manual_seed(0)
            whole = perturb(build(name), seed=0)
            sharded = shard(copy.deepcopy(whole), mesh)
            we_whole, we_sharded = WeightEvolution(whole, cfg), WeightEvolution(sharded, cfg)
            stats, changed = [], 0
            for epoch in (0, 1):
                a, b = we_whole.step(epoch), we_sharded.step(epoch)
                stats.append(a.to_dict() == b.to_dict() and a.inferior == b.inferior)
                changed += b.changed
            ref = dict(whole.named_parameters())
            diffs, equal, total, split = [], 0, 0, 0
            with torch.no_grad():
                for n, p in sharded.named_parameters():
                    full = p.full_tensor()
                    diffs.append(float((full - ref[n]).abs().max()))
                    equal += int(torch.equal(full, ref[n]))
                    total += 1
                    split += int(p.to_local().shape != p.shape)
                size = 8 if name == "odd_net" else 32
                x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
                # the forward all-gathers the shards FSDP2 trains: it must see the evolved values
                same_output = torch.equal(whole.eval()(x), sharded.eval()(x))
            report[f"{name}/{variant}"] = {
                "params": total, "bitwise_equal": equal, "max_abs_diff": max(diffs), "stats_equal": all(stats),
                "sharded_params": split, "changed": changed, "same_output": same_output,
            }
    return report


# ----------------------------------------------------------------------------- "state": train.py's save / resume

OPTIMIZERS = {  # timm's factory, as train.py builds them (two parameter groups: with and without weight decay)
    "test_resnet": dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
    "odd_net": dict(opt="adamw", lr=1e-2, weight_decay=0.05),
}


def batch(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank: FSDP's averaged gradient then equals the single model's exactly."""
    g = torch.Generator().manual_seed(seed)
    size = 8 if name == "odd_net" else 32
    return torch.randn(4, 3, size, size, generator=g), torch.randint(0, 3, (4,), generator=g)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()


def step(opt: torch.optim.Optimizer) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


def whole_of(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare_tensors(a: dict, b: dict) -> dict:
    """Same keys in the same order, bitwise equal values, and the largest difference."""
    same = list(a) == list(b)
    pairs = [(whole_of(a[k]), whole_of(b[k])) for k in a if k in b]
    return {"keys_equal": same, "bitwise_equal": same and all(torch.equal(x, y) for x, y in pairs),
            "max_abs_diff": max(float((x.double() - y.double()).abs().max()) for x, y in pairs if x.numel())}


def compare_optimizer(a: dict, b: dict) -> dict:
    """An optimizer state_dict against the unsharded optimizer's: the groups, and the state per parameter."""
    flat = {(i, k): v for i, s in a["state"].items() for k, v in s.items()}
    ref = {(i, k): v for i, s in b["state"].items() for k, v in s.items()}
    groups = a["param_groups"] == b["param_groups"]
    if not groups:
        print("groups differ:", a["param_groups"], b["param_groups"], file=sys.stderr)
    return {"groups_equal": groups, "params": len(b["state"]),
            **compare_tensors(flat, ref)}


def params_vs(model: nn.Module, ref: nn.Module) -> dict:
    return compare_tensors(dict(model.named_parameters()), dict(ref.named_parameters()))


def resume_args(path: str, opt: str) -> SimpleNamespace:
    return SimpleNamespace(no_resume_opt=False, resume=path, opt=opt)


class Gloo:
    """What `evolve.check_ranks_agree` uses of the Accelerator."""

    num_processes = 2

    @staticmethod
    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts)


def rank_check(model: nn.Module, dist_bn: str | None) -> str:
    """`evolve.check_ranks_agree` on the sharded model: which tensors it compares, and what it says."""
    t = SimpleNamespace(raw_model=model, model_ema=None, args=SimpleNamespace(dist_bn=dist_bn), accelerator=Gloo())
    try:
        evolve.check_ranks_agree(t, 0)
        return f"agree ({len(evolve.synced_tensors(t))} compared)"
    except Exception as e:  # noqa: BLE001 - reported
        return f"{type(e).__name__}: {e}"


def state_case(name: str, mesh, folder: str) -> dict:
    rank, kw = dist.get_rank(), OPTIMIZERS[name]
    torch.manual_seed(0)
    whole = perturb(build(name), seed=0)
    sharded = shard(copy.deepcopy(whole), mesh)
    opt_w, opt_s = create_optimizer_v2(whole, **kw), create_optimizer_v2(sharded, **kw)
    r = {"sharded_params": sum(int(p.to_local().shape != p.shape) for p in sharded.parameters()),
         "params": sum(1 for _ in whole.parameters()),
         "buffers_plain": not any(hasattr(b, "full_tensor") for b in sharded.buffers())}
    # update 1, with the clipping train.py offers under FSDP (norm: torch's DTensor-aware clip; agc: timm's)
    x, y = batch(name, 1)
    backward(whole, x, y)
    backward(sharded, x, y)
    norms = [whole_of(torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)) for m in (whole, sharded)]
    r["clip_norm"] = float(norms[0])  # a sum over shards vs one sum: equal up to float rounding, so relative
    r["clip_norm_rel_diff"] = float((norms[0] - norms[1]).abs() / norms[0].clamp_min(1e-30))  # a norm is >= 0
    saved_grads = [p.grad.clone() for p in sharded.parameters()], [p.grad.clone() for p in whole.parameters()]
    adaptive_clip_grad(list(whole.parameters()), clip_factor=0.01)
    try:
        adaptive_clip_grad(list(sharded.parameters()), clip_factor=0.01)
        r["agc"] = compare_tensors({n: p.grad for n, p in sharded.named_parameters()},
                                   {n: p.grad for n, p in whole.named_parameters()})
    except Exception as e:  # noqa: BLE001 - reported
        r["agc"] = f"{type(e).__name__}: {str(e)[:200]}"
    for params, grads in zip((sharded.parameters(), whole.parameters()), saved_grads):
        for p, g in zip(params, grads):
            p.grad = g
    step(opt_w)
    step(opt_s)
    # save: train.py's gather (every rank calls it; the writing process gets the state, the others None)
    t = SimpleNamespace(raw_model=sharded, optimizer=opt_s, out_dir=folder if rank == 0 else None)
    full = state.full_state(t)
    nones = [None] * dist.get_world_size()
    dist.all_gather_object(nones, full is None)
    r["writer_only"] = nones == [False] + [True] * (len(nones) - 1)
    path = os.path.join(folder, f"{name}.pth.tar")
    if rank == 0:
        r["saved_model"] = compare_tensors(full[0], whole.state_dict())
        r["saved_optimizer"] = compare_optimizer(full[1], opt_w.state_dict())
        atomic_save({"state_dict": full[0], "optimizer": full[1]}, path)
    dist.barrier()
    saved = torch_load(path)
    # resume as train.py does: weights into the model before sharding (prepare), the optimizer after
    fresh = perturb(build(name), seed=1)
    load_into_model(fresh, saved["state_dict"])
    fresh = shard(fresh, mesh)
    opt_f = create_optimizer_v2(fresh, **kw)
    state.restore_optimizer(SimpleNamespace(raw_model=fresh, optimizer=opt_f, args=resume_args(path, kw["opt"])), saved)
    saved = torch_load(path)  # its own copy: optimizers keep the loaded `step` tensors, and step them in place
    plain = perturb(build(name), seed=2)  # the sharded state resumed in a single process
    load_into_model(plain, saved["state_dict"])
    opt_p = create_optimizer_v2(plain, **kw)
    state.restore_optimizer(SimpleNamespace(raw_model=plain, optimizer=opt_p, args=resume_args(path, kw["opt"])), saved)
    with engine.inference(fresh):  # train.py's evaluate (no inference tensors for FSDP2), then training goes on
        r["eval_output_equal"] = torch.equal(fresh.eval()(x), whole.eval()(x))
    x, y = batch(name, 2)
    for model, opt in ((whole, opt_w), (fresh, opt_f), (plain, opt_p)):
        backward(model, x, y)
        step(opt)
    r["resumed_params"] = params_vs(fresh, whole)
    r["resumed_plain_params"] = params_vs(plain, whole)
    # the state as a single-process train.py run saves it on a CPU (its default: torch's fused step), resumed under
    # FSDP, which keeps torch's default kernel (torch has no DTensor rule for the fused SGD step)
    single = torch_load(path)
    for group in single["optimizer"]["param_groups"]:
        group["fused"] = True
    again = perturb(build(name), seed=3)
    load_into_model(again, single["state_dict"])
    again = shard(again, mesh)
    opt_a = create_optimizer_v2(again, **kw)
    state.restore_optimizer(SimpleNamespace(raw_model=again, optimizer=opt_a, args=resume_args(path, kw["opt"])),
                            single)
    r["fused_state_kernel"] = [g["fused"] for g in opt_a.param_groups]
    backward(again, x, y)
    step(opt_a)
    r["fused_state_params"] = params_vs(again, fresh)
    r["resumed_plain_optimizer"] = compare_optimizer(opt_p.state_dict(), opt_w.state_dict())
    # a WE step with --we-reset-opt-state, --dist-bn and the rank check, as train.py's `evolve`
    cfg = WEConfig(rate=0.3, gamma=0.5, layers=("conv", "norm", "linear"))
    resets = []
    for model, opt in ((whole, opt_w), (fresh, opt_f)):
        we = WeightEvolution(model, cfg)
        before = {u.param: u.param.detach().clone() for u in we.units}
        we.step(0)
        resets.append(evolve.zero_changed_state(opt, before))
    r["we_opt_state_reset"] = resets
    distribute_bn(fresh, dist.get_world_size(), True)
    r["dist_bn_buffers"] = compare_tensors(dict(fresh.named_buffers()), dict(whole.named_buffers()))
    r["rank_check"] = rank_check(fresh, None)
    r["rank_check_dist_bn"] = rank_check(fresh, "reduce")
    bn = next(b for n, b in fresh.named_buffers() if n.endswith("running_mean"))
    if rank == 1:
        bn[0] += 1.0
    r["rank_check_dist_bn_broken"] = rank_check(fresh, "reduce")[:120]
    full = state.full_state(SimpleNamespace(raw_model=fresh, optimizer=opt_f, out_dir=folder if rank == 0 else None))
    if rank == 0:
        r["after_we_params"] = compare_tensors({k: v for k, v in full[0].items() if k in dict(whole.named_parameters())},
                                               dict(whole.named_parameters()))
        r["after_we_optimizer"] = compare_optimizer(full[1], opt_w.state_dict())
    return r


def state_report(mesh, folder: str) -> dict:
    return {name: state_case(name, mesh, folder) for name in OPTIMIZERS}


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = we_report(mesh) if mode == "we" else state_report(mesh, os.path.dirname(os.path.abspath(out)))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()  # no rank leaves while another still has a collective in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "we")
    # train.py's exit: no interpreter teardown. A gloo thread still joinable when C++ statics are destroyed
    # aborts the process ("terminate called without an active exception", SIGABRT; seen once on CI, rank 0).
    exit_process(0)
