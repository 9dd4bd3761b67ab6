"""Command-line plumbing shared by train.py, validate.py and `python -m we_timm.export`.

A bad command line ends like every other bad input: one `error: ...` line and exit status 1
(argparse would print the usage block and exit 2); `--debug` shows the exception instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence


class UsageError(ValueError):
    """A malformed command line (argparse's message)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as `UsageError` rather than printed with the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


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
