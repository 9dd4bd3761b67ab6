"""Seeded order and augmentation of the training samples: what makes persistent workers and a resume
mid-epoch draw exactly what an uninterrupted run draws (timm's --aug-repeats sampler included)."""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch.utils.data

from .dataset import DatasetView


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, index); also used per training step (index = step)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


def seed_everything(key: int, devices: bool = True) -> None:
    """Seed Python's, NumPy's and torch's global generators (what timm's transforms, mixup and dropout draw from).

    `devices=False` seeds torch's CPU generator only: 1 us instead of `torch.manual_seed`'s ~170 us (which also
    seeds every accelerator), enough for the CPU transforms of a sample.
    """
    random.seed(key)
    np.random.seed(key % 2 ** 32)
    if devices:
        torch.manual_seed(key)
    else:
        torch.default_generator.manual_seed(key)


class SeededSamples(DatasetView):
    """A training set whose sample `i` of draw `d` is read and augmented with every RNG seeded from (seed, d, i).

    Keys are `d * len + i` (what `EpochShuffle` yields; the draw is the epoch, or with --aug-repeats one per copy),
    so a sample's augmentation depends on nothing else: not on the worker that reads it, on worker persistence,
    on what was read before, or on a resume mid-epoch.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        super().__init__(dataset)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        draw, index = divmod(int(key), len(self.dataset))
        seed_everything(sample_seed(self.seed, draw, index), devices=False)
        return self.dataset[index]


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of `n` samples per epoch, drawn from (seed, epoch) alone; yields `SeededSamples` keys.

    `set_epoch` (called by Accelerate's loader) picks the epoch; the order never depends on history.

    `repeats` > 0 is timm's RepeatAugSampler (--aug-repeats): the epoch's order lists every image `repeats` times
    in a row and this process takes every `world`-th entry from `rank` on, so the copies of an image land on
    different processes (on one process: in the same or the next batch). Each process keeps timm's count of
    samples (`repeat_selection`), so an epoch is about as long as without repeats. Every copy is its own draw, a
    different augmentation. The sampler is already per process: Accelerate must not shard it (`per_rank`).
    """

    def __init__(self, n: int, seed: int, repeats: float = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.repeats, self.rank, self.world = repeats, rank, world
        self.per_rank = repeats > 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return repeat_selection(self.n, self.world) if self.per_rank else self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1)))
        if not self.per_rank:
            return iter((order + self.epoch * self.n).tolist())
        keys = self.repeated_keys(order)
        return iter(keys[self.rank::self.world][: len(self)].tolist())

    def repeated_keys(self, order: torch.Tensor) -> torch.Tensor:
        """Every process's keys of the epoch, in order: image `order[j]` at positions `i` with `i // repeats == j`
        (timm's rule, fractional repeats included), padded by the first entries to a multiple of `world`."""
        size, per_copy = math.ceil(self.repeats * self.n), math.ceil(self.repeats)
        j = torch.div(torch.arange(size, dtype=torch.float64), self.repeats, rounding_mode="floor").long()
        _, counts = torch.unique_consecutive(j, return_counts=True)
        copy = torch.arange(size) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pad = -size % self.world
        j, copy = torch.cat([j, j[:pad]]), torch.cat([copy, copy[:pad] + per_copy])  # padding: draws of their own
        return (self.epoch * 2 * per_copy + copy) * self.n + order[j]


def repeat_selection(n: int, world: int) -> int:
    """Samples per process and epoch with --aug-repeats: timm's RepeatAugSampler count (the data set rounded down
    to a multiple of 256, split over the processes); for sets under 256 images, where that is 0, ceil(n / world)."""
    return (n // 256 * 256) // world or math.ceil(n / world)
