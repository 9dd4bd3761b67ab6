"""WE on torch FSDP2 shards vs the unsharded model, one process of `torchrun --nproc_per_node 2` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py OUT.json

Every rank builds the same perturbed models, shards one copy with `fully_shard` over a CPU device mesh and
keeps one whole, runs two WE steps on each, then compares the gathered parameters with the unsharded ones.
Rank 0 writes the comparison to OUT.json.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import timm
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import perturb  # noqa: E402

from we_timm import WEConfig, WeightEvolution  # noqa: E402

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


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = {}
    for name in ("resnet18", "odd_net"):
        for variant, cfg in CONFIGS.items():
            torch.manual_seed(0)
            whole = perturb(build(name), seed=0)
            sharded = copy.deepcopy(whole)
            for child in sharded.children():  # FSDP2's usual pattern: each block, then the root
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child, mesh=mesh)
            fully_shard(sharded, mesh=mesh)
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
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
