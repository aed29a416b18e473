"""`alignkit models`: list, materialise and build the embedded models."""
from __future__ import annotations

import typer

from ._common import force_opt, seed_opt

models_app = typer.Typer(help="List, materialise (pull) and build embedded models.\n\n"
                              "Example:  alignkit models pull smollm2-135m-instruct",
                         no_args_is_help=True)


@models_app.command("list")
def list_models() -> None:
    """Show the embedded models and whether each is materialised.

    Example:  alignkit models list
    """
    from alignkit.models import EMBEDDED, is_materialised, models_dir
    for name, emb in EMBEDDED.items():
        state = "materialised" if is_materialised(name) else "not materialised"
        typer.echo(f"{name:24} {state:18} {emb.description}")
    typer.echo(f"cache: {models_dir()}", err=True)


@models_app.command("pull")
def pull(
    name: str = typer.Argument(..., help="Embedded model name (see `alignkit models list`)."),
    to: str = typer.Option(None, "--to", help="Target folder (default: $ALIGNKIT_HOME/models/NAME)."),
    force: bool = force_opt(),
) -> None:
    """Materialise an embedded model as a plain transformers folder; print its path.

    Example:  alignkit models pull smollm2-135m-instruct --to ./smol
    """
    from alignkit.models import pull as do_pull
    typer.echo(str(do_pull(name, to, force=force)))


@models_app.command("tiny")
def tiny(
    out: str = typer.Option(..., "--out", "-o", help="Folder to write."),
    seed: int = seed_opt(),
    hidden: int = typer.Option(64, help="Hidden size."),
    layers: int = typer.Option(2, help="Number of layers."),
    heads: int = typer.Option(4, help="Attention heads."),
    tokenizer_from: str = typer.Option(None, "--tokenizer-from",
                                       help="Copy this model's tokenizer (a student for a teacher)."),
    force: bool = force_opt(),
) -> None:
    """Build a random tiny Llama with a locally built tokenizer (tests, smoke runs).

    Different seeds give different weights and the same tokenizer.

    Example:  alignkit models tiny --out tiny --seed 1
    """
    from alignkit.io import atomic_dir
    from alignkit.models import build_tiny
    with atomic_dir(out, force=force) as tmp:
        build_tiny(tmp, seed=seed, hidden=hidden, layers=layers, heads=heads,
                   tokenizer_from=tokenizer_from)
    typer.echo(out)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
