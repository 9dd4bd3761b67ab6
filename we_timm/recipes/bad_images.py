"""Unreadable images: timm's datasets skip them (reading the next image in their place); here each is
named with its path and counted across DataLoader workers, and too many in one pass stop the run."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch.utils.data

from .dataset import DatasetView
from .errors import DataReadError

_logger = logging.getLogger(__name__)

DEFAULT_MAX_BAD_IMAGES = 10  # unreadable images tolerated per split and epoch (timm skips them) before the run stops
_reading: list["BadImageCounter"] = []  # the counter whose item this process is reading


class _SkippedSamples(logging.Filter):
    """Sees timm's "Skipped sample (index i)" warnings (in whichever process reads) and counts them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if _reading and msg.startswith("Skipped sample"):
            _reading[-1].skipped(msg)
        return True


_SKIPPED = _SkippedSamples()


class BadImageCounter(DatasetView):
    """A map-style dataset whose unreadable images (skipped by timm) are named with their path and counted
    across DataLoader workers; more than `limit` in one pass (`per`: train.py's epoch, validate.py's
    evaluation) raises DataReadError."""

    def __init__(self, dataset: torch.utils.data.Dataset, what: str, limit: int, per: str = "in one epoch"):
        import multiprocessing

        self.dataset, self.what, self.limit, self.per = dataset, what, limit, per
        self.count = multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Value("i", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        logging.getLogger("timm.data.dataset").addFilter(_SKIPPED)  # once per process (addFilter ignores repeats)
        _reading.append(self)
        try:
            item = self.dataset[index]
        finally:
            _reading.pop()
        if self.count.value > self.limit:
            raise DataReadError(f"more than {self.limit} unreadable {self.what} images {self.per} (named in the "
                                "warnings above); fix or remove them, or raise --max-bad-images")
        return item

    def skipped(self, message: str) -> None:
        inner = getattr(self.dataset, "dataset", self.dataset)  # under FixedSubset
        index = message.split("(index ", 1)[-1].split(")", 1)[0]
        path = inner.filename(int(index), absolute=True) if hasattr(inner, "filename") and index.isdigit() else "?"
        _logger.warning(f"unreadable {self.what} image skipped: {path} ({message.split('). ', 1)[-1]})")
        with self.count.get_lock():
            self.count.value += 1

    def take_count(self) -> int:
        """Unreadable images met since the last call (the epoch's), and start counting anew."""
        with self.count.get_lock():
            n, self.count.value = self.count.value, 0
        return n


def count_bad_images(dataset: Any, what: str, limit: int, per: str = "in one epoch") -> Any:
    """`dataset` in a `BadImageCounter`; a streaming (iterable) set as it is: its readers report their own errors."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return dataset
    return BadImageCounter(dataset, what, limit, per)


def _counter(dataset: Any) -> BadImageCounter | None:
    """The `BadImageCounter` of `dataset`, under any views (e.g. `SeededSamples`); None for a set that counts none."""
    while isinstance(dataset, DatasetView) and not isinstance(dataset, BadImageCounter):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, BadImageCounter) else None


def take_bad_images(dataset: Any) -> int:
    """The unreadable images `dataset` skipped since the last call (0 for a set that does not count)."""
    counter = _counter(dataset)
    return counter.take_count() if counter is not None else 0


def report_bad_images(epoch: int, *datasets: Any) -> None:
    """The end-of-epoch summary of the unreadable images each split skipped."""
    for dataset in datasets:
        counter = _counter(dataset)
        if counter is None:
            continue
        n = counter.take_count()
        if n:
            _logger.warning(f"epoch {epoch}: {n} unreadable {counter.what} image(s) skipped (named above; the "
                            f"run stops beyond --max-bad-images {counter.limit} {counter.per})")
