"""docs/cli.md: the reference of every command, generated from `--help`.

`make docs` writes it; a test regenerates it and fails when the committed file drifts
from the real CLI (so the docs cannot go stale).  Usage: python -m alignkit.docs [PATH]
"""
from __future__ import annotations

import sys
from pathlib import Path


def _commands():
    from .cli import click_command
    root = click_command()
    out = [((), root)]

    def walk(cmd, path):
        for name in sorted(getattr(cmd, "commands", {})):
            sub = cmd.commands[name]
            out.append((path + (name,), sub))
            walk(sub, path + (name,))

    walk(root, ())
    return out


def _help(path: tuple[str, ...]) -> str:
    import io
    from contextlib import redirect_stdout

    from .cli import main
    buf = io.StringIO()
    import os
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    os.environ["TERM"] = "dumb"
    try:
        with redirect_stdout(buf):
            main(list(path) + ["--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(line.rstrip() for line in buf.getvalue().strip().splitlines())


def render() -> str:
    parts = ["# alignkit command reference", "",
             "Generated from `alignkit ... --help` by `make docs`; do not edit by hand.", ""]
    for path, _cmd in _commands():
        title = " ".join(("alignkit",) + path)
        parts += [f"## {title}", "", "```", _help(path), "```", ""]
    return "\n".join(parts)


def main(path: str = "docs/cli.md") -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render(), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
