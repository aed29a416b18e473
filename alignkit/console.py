"""Messages and progress on stderr (stdout carries records only).

The CLI sets the verbosity once (`--quiet` / `--verbose`); library code calls `info`,
`warn`, `debug` and `progress`. Progress bars appear only when stderr is a terminal;
otherwise long loops log a line now and then, so cron logs stay readable.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

VERBOSITY = 1  # 0 quiet, 1 normal, 2 verbose


def set_verbosity(level: int) -> None:
    global VERBOSITY
    VERBOSITY = level


def _emit(prefix: str, msg: str) -> None:
    try:
        sys.stderr.write(f"{prefix}{msg}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


def info(msg: str) -> None:
    if VERBOSITY >= 1:
        _emit("", msg)


def warn(msg: str) -> None:
    _emit("Warning: ", msg)


def debug(msg: str) -> None:
    if VERBOSITY >= 2:
        _emit("debug: ", msg)


class _Task:
    def __init__(self, bar, task_id, total, desc):
        self.bar, self.task_id, self.total, self.desc = bar, task_id, total, desc
        self.done = 0
        self._last_log = time.monotonic()

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task_id, advance=n)
        elif VERBOSITY >= 1 and time.monotonic() - self._last_log > 30:
            self._last_log = time.monotonic()
            total = f"/{self.total}" if self.total else ""
            _emit("", f"{self.desc}: {self.done}{total}")


class NullTask:
    """A progress task that reports nothing (for inner loops whose caller reports)."""

    def advance(self, n: int = 1, **_) -> None:
        pass


@contextmanager
def progress(desc: str, total: int | None = None):
    """`with progress("sampling", total=n) as p: ... p.advance()`."""
    if VERBOSITY >= 1 and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        with bar:
            yield _Task(bar, bar.add_task(desc, total=total), total, desc)
    else:
        yield _Task(None, None, total, desc)
