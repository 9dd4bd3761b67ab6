"""Command-line plumbing and error reporting shared by train.py, validate.py and `python -m we_timm.export`.

A bad command line ends like every other bad input: one `error: ...` line and exit status 1
(argparse would print the usage block and exit 2); `--debug` shows the exception instead.
Errors met while reading data mid-run become one-line `DataReadError`s as well.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Sequence

import torch

_log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A malformed command line (argparse's message)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as `UsageError` rather than printed with the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


class DataReadError(OSError):
    """Samples could not be read mid-run (timm skips unreadable files, then gives up)."""


class Terminated(Exception):  # not a RuntimeError: never mistaken for a data or collective error
    """SIGTERM arrived: a scheduler preempting the job, or the launcher stopping every process after one failed."""


@contextmanager
def sigterm_as_error() -> Iterator[None]:
    """Inside, SIGTERM raises `Terminated` (so it ends with one error line, and checkpoint writes in flight
    clean up their temp files) instead of killing the process silently."""
    def terminated(signum, frame):
        raise Terminated("terminated by SIGTERM (a scheduler preempting the job, or `accelerate launch` stopping "
                         "every process after one failed: see its 'Root Cause'); the checkpoints on disk are "
                         "complete, --resume auto continues the run")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# what gloo / NCCL / c10d put in the RuntimeErrors of a failed collective (a peer gone, or the timeout passed)
_COLLECTIVE_FAILURE = ("gloo", "nccl", "processgroup", "connection reset by peer", "connection closed by peer",
                       "pair closure", "c10d")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a failed torch.distributed collective (a peer died, or the timeout passed)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and
                                         any(k in str(e).lower() for k in _COLLECTIVE_FAILURE))


@contextmanager
def process_group_ends(accelerator: Any) -> Iterator[None]:
    """`accelerator.end_training()` on leaving, also on errors: a process group still alive at exit makes
    the process abort (SIGABRT). Skipped after a failed collective or SIGTERM: a peer may be gone, and
    ending could block."""
    try:
        yield
    except BaseException as e:
        if not (is_collective_failure(e) or isinstance(e, Terminated)):
            try:
                accelerator.end_training()
            except Exception as cleanup:  # never hide the error that ended the run
                _log.warning("could not end the process group cleanly: %s", " ".join(str(cleanup).split()))
        raise
    accelerator.end_training()


def read_batches(loader: Any, what: str) -> Iterator[Any]:
    """Iterate `loader`; an error raised while *fetching* a batch becomes a one-line DataReadError
    (failed collectives pass through unchanged)."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, RuntimeError) as e:
            if is_collective_failure(e):
                raise
            lines = [line for line in str(e).splitlines() if line.strip()]  # a worker's error ends with the cause
            raise DataReadError(f"reading the {what} data failed: {lines[-1] if lines else type(e).__name__} "
                                "(the warnings above name the unreadable files)") from e
        yield batch


def error_line(e: BaseException) -> str:
    """`error: <the message on one line>`."""
    return f"error: {' '.join(str(e).split())}"


def run(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None,
        errors: tuple[type[BaseException], ...]) -> int:
    """Call `main(argv)`; an exception of `errors` becomes SystemExit(one line) unless argv holds --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except (UsageError, *errors) as e:
        if "--debug" in argv:
            raise
        raise SystemExit(error_line(e)) from None
    return 0
