"""Which epochs' checkpoints a run keeps: timm's `CheckpointSaver` policy, and the repair of a folder whose
links a stop interrupted."""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

from .checkpoint import atomic_save, read_metadata
from .errors import CheckpointError
from .files import link_or_copy, remove
from .resuming import STATE_EXT, WEIGHTS_EXT, load_state


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
