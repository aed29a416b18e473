"""`alignkit lineage`: which data, models and commands made an artifact."""
from __future__ import annotations

import typer


def lineage(
    artifact: str = typer.Argument(..., help="A records file or a model folder written by alignkit."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as JSON."),
) -> None:
    """Walk an artifact's manifests back to the original prompts and models.

    Each output's manifest (FILE.alignkit.json, or alignkit.json in a folder) names the
    command that made it and its inputs with their sha256; lineage follows them and
    prints the chain as a tree: every artifact, the command that made it, and whether
    a file has changed since it was consumed ([changed]) or is gone ([missing]).

    Example:  alignkit lineage out/aligned
    """
    import json

    from pathlib import Path

    from alignkit.errors import UsageError
    from alignkit.lineage import render, trace
    if not Path(artifact).exists():
        raise UsageError(f"{artifact}: no such file or folder")
    tree = trace(artifact)
    if as_json:
        typer.echo(json.dumps(tree, indent=2))
    else:
        for line in render(tree):
            typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("lineage")(lineage)
