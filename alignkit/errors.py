"""The library's own exceptions.

Library code raises these; only the CLI (`alignkit/cli.py`) turns them into a message
on stderr and an exit code (DESIGN.md): 1 runtime failure, 2 usage error, 3 invalid
input data. Keeping the mapping in one place means the library stays usable from
Python without typer or sys.exit surprises.
"""
from __future__ import annotations


class AlignkitError(Exception):
    """A runtime failure (exit 1)."""

    exit_code = 1


class UsageError(AlignkitError):
    """The user asked for something that cannot work: bad flag value, unknown
    method or scorer, incompatible models (exit 2)."""

    exit_code = 2


class DataError(AlignkitError):
    """Invalid input data (exit 3). Formats as `path:line: field: problem`."""

    exit_code = 3

    def __init__(self, problem: str, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.problem = problem
        self.path = path
        self.line = line
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:"
            if self.line is not None:
                where += f"{self.line}:"
            where += " "
        fld = f"{self.field}: " if self.field else ""
        return f"{where}{fld}{self.problem}"

    def at(self, path: str | None = None, line: int | None = None) -> "DataError":
        """Return a copy located at path/line (keeps what is already known)."""
        return DataError(self.problem, self.path or path,
                         self.line if self.line is not None else line, self.field)
