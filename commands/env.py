"""`alignkit env`: what a bug report needs."""
from __future__ import annotations

import typer


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Versions of Python, alignkit and the stack, torch threads, device, $ALIGNKIT_HOME.

    Example:  alignkit env --json
    """
    import json
    import platform

    from alignkit.io import versions
    from alignkit.models import alignkit_home
    info = dict(versions())
    info["platform"] = platform.platform()
    info["alignkit_home"] = str(alignkit_home())
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        info["device"] = "torch not installed"
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            typer.echo(f"{k:16} {v}")


def register(app: typer.Typer) -> None:
    app.command("env")(env)
