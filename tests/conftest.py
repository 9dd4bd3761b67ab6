"""Shared fixtures for the WE tests (helpers live in `helpers.py`)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):  # `import reference_we, helpers` and `import we_timm` from a checkout
    if path not in sys.path:
        sys.path.insert(0, path)

from helpers import perturb  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def timm_model():
    """Factory: `timm_model(name, seed)` -> a perturbed fresh copy of a timm model.

    Models are created once per session (pretrained=False) and deep-copied.
    """
    import timm

    cache = {}

    def make(name: str, seed: int = 0, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = timm.create_model(name, pretrained=False, **kwargs)
        return perturb(copy.deepcopy(cache[key]), seed)

    return make



@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run in-process: one intra-op thread is fastest, and immune to a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process train/validate builds its own Accelerator (mixed precision differs per test)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
