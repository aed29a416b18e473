"""`alignkit schema NAME`: print a record type's JSON Schema."""
from __future__ import annotations

import typer


def schema(name: str = typer.Argument(..., help="prompt | samples | pair | ranking | unpaired")) -> None:
    """Print the JSON Schema of a record type (DESIGN.md "Records").

    Example:  alignkit schema pair
    """
    import json

    from alignkit.errors import UsageError
    from alignkit.records import KINDS, schema as get
    if name not in KINDS:
        raise UsageError(f"unknown record type {name!r}; known: {', '.join(KINDS)}")
    typer.echo(json.dumps(get(name), indent=2))


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
