"""The one data layer: a file of validated records, and the read -> process -> write
stream.

`Records` is what every command that trains or evaluates from a whole file holds: the
rows, the line each came from (so any later problem is reported as `path:line`), the
sha256 of the input bytes (for manifests) and a seeded train/held-out split. `load`
reads and validates a file as one record kind, or as one of several kinds detected per
file (`records.detect_kind`; one kind per file), with an optional extra check per
record. `stream` is the loop of the streaming commands (score, relabel, gen-pairs):
records in, processed in chunks, records out, so a command only opens files.

Library functions take `Records` or lists of records; commands open the files.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from .errors import DataError, UsageError
from .records import UNIQUE_ID_KINDS, detect_kind, validate

__all__ = ["Records", "load", "stream", "checked", "validated", "split_indices"]


@dataclass
class Records:
    """Validated records of one input (see the module docstring)."""

    path: str
    kind: str
    records: list[dict]
    lines: list[int] = field(default_factory=list)
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    @property
    def name(self) -> str:
        return "<stdin>" if self.path == "-" else self.path

    def line(self, i: int) -> int | None:
        return self.lines[i] if i < len(self.lines) else None

    def error(self, i: int, field: str | None, problem: str) -> DataError:
        """A DataError located at record i's line."""
        return DataError(problem, self.name, self.line(i), field)

    def located(self, i: int, err: DataError) -> DataError:
        return err.at(self.name, self.line(i))

    def subset(self, idx: Sequence[int]) -> "Records":
        return Records(self.path, self.kind, [self.records[i] for i in idx],
                       [self.lines[i] for i in idx] if self.lines else [], self.sha256)

    def split(self, frac: float, seed: int, group: Callable[[dict], object] | None = None
              ) -> tuple[list[int], list[int]]:
        """(train, held-out) indices: see `split_indices`."""
        return split_indices(self.records, frac, seed, group)


def split_indices(records: Sequence[dict], frac: float, seed: int,
                  group: Callable[[dict], object] | None = None) -> tuple[list[int], list[int]]:
    """(train, held-out) indices, both sorted: a seeded `frac` share of each group's
    records (of all records without `group`) is held out, and every group keeps at least
    one training record. Same records + seed -> same split."""
    if not 0.0 <= frac < 1.0:
        raise UsageError(f"--eval-split must be in [0, 1), got {frac}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(group(r)) if group else "", []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for key in sorted(groups):
        idx = list(groups[key])
        rng.shuffle(idx)
        held.update(idx[:min(int(round(frac * len(idx))), len(idx) - 1)])
    return [i for i in range(len(records)) if i not in held], sorted(held)


def checked(reader, kinds: Sequence[str] | str | None = None,
            check: Callable[[dict, str], None] | None = None, *, one_kind: bool = False
            ) -> Iterator[tuple[dict, str, int]]:
    """(record, kind, line) for each record of a `RecordReader`, validated as one of
    `kinds` (detected per record; None: any kind) plus `check(record, kind)`; with
    `one_kind` a file mixing kinds is an error. DataErrors are located."""
    wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
    first = None
    seen: set[str] = set()
    for rec in reader:
        try:
            kind = wanted[0] if len(wanted) == 1 else detect_kind(rec)
            if wanted and kind not in wanted:
                raise DataError(f"expected a {' or '.join(wanted)} record, got a {kind} record")
            if one_kind and first is not None and kind != first:
                raise DataError(f"a {kind} record in a file of {first} records "
                                "(one kind per file)")
            validate(rec, kind)
            if kind in UNIQUE_ID_KINDS:
                if rec["id"] in seen:
                    raise DataError(f"duplicate id {rec['id']!r} (a {kind} file holds one "
                                    "record per prompt)", field="id")
                seen.add(rec["id"])
            if check is not None:
                check(rec, kind)
        except DataError as e:
            raise e.at(reader.name, reader.line) from None
        first = first or kind
        yield rec, kind, reader.line


@contextlib.contextmanager
def validated(path: str, kinds: Sequence[str] | str | None = None, *,
              check: Callable[[dict, str], None] | None = None):
    """Validate a whole input before any work, then yield a fresh `RecordReader` over it.

    For the streaming commands: a malformed line 10,000 fails (exit 3, path:line)
    before a model is loaded or an output is started. Standard input is spooled to a
    temporary file for the second pass (removed afterwards); its messages still say
    `<stdin>`. The reader's `sha256` is the input's."""
    import os
    import shutil
    import sys
    import tempfile

    from .io import read_records
    spool = None
    src = path
    if path == "-":
        from .io import stdin_is_terminal
        if stdin_is_terminal():
            raise UsageError("refusing to read records from a terminal: give an input path "
                             "or pipe data in (use '-' for stdin)")
        fd, spool = tempfile.mkstemp(prefix="alignkit-stdin-", suffix=".jsonl")
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        src = spool
    try:
        reader = read_records(src)
        reader.name = "<stdin>" if path == "-" else reader.name
        for _ in checked(reader, kinds, check, one_kind=False):
            pass
        again = read_records(src)
        again.name = reader.name
        yield again
    finally:
        if spool is not None:
            with contextlib.suppress(OSError):
                os.unlink(spool)


def load(path: str, kinds: Sequence[str] | str | None = None, *,
         check: Callable[[dict, str], None] | None = None, allow_empty: bool = False,
         one_kind: bool = True) -> Records:
    """Read and validate a whole file (one record kind per file unless `one_kind` is
    False); see `checked`."""
    from .io import read_records
    reader = read_records(path, allow_empty=allow_empty)
    records, lines, kind = [], [], None
    for rec, k, line in checked(reader, kinds, check, one_kind=one_kind):
        records.append(rec)
        lines.append(line)
        kind = k
    default = kinds if isinstance(kinds, str) else (kinds[0] if kinds else "prompt")
    return Records(path, kind or default, records, lines, reader.sha256 or "")


def stream(items: Iterable, process: Callable[[list], Iterable[dict]],
           write: Callable[[Iterable[dict]], None], *, chunk: int = 64,
           progress: Callable[[int], None] | None = None) -> int:
    """Feed `items` to `process` in chunks of `chunk` and `write` what it returns; the
    count of items read. The loop of score, relabel and gen-pairs."""
    if chunk < 1:
        raise UsageError("--chunk must be >= 1")
    batch: list = []
    n = 0
    for item in items:
        batch.append(item)
        n += 1
        if len(batch) >= chunk:
            write(process(batch))
            if progress:
                progress(len(batch))
            batch = []
    if batch:
        write(process(batch))
        if progress:
            progress(len(batch))
    return n
