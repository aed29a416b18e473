"""The `alignkit` command: registers the subcommands and maps errors to exit codes.

Exit codes (DESIGN.md): 0 success, 1 runtime failure, 2 usage error, 3 invalid input
data, 130 interrupted. Tracebacks only with `--debug` or `ALIGNKIT_DEBUG=1`. A closed
stdout pipe (`| head`) ends quietly. Nothing heavy is imported here: `alignkit --help`
and `alignkit CMD --help` never import torch, transformers, trl or datasets.
"""
from __future__ import annotations

import os
import signal
import sys
from importlib import import_module

import typer

from . import __version__, console
from .errors import AlignkitError

# One line per subcommand module; each module defines `register(app)`.
COMMAND_MODULES = [
    "gen_pairs", "score", "relabel", "train_rm", "train_policy", "distill", "merge_soup",
    "eval", "models", "schema", "env",
]

app = typer.Typer(
    name="alignkit",
    help="Composable alignment steps for language models: sample, score, relabel, train, "
         "distill, merge, evaluate. Records are JSONL; models are Hugging Face folders.\n\n"
         "Example:  alignkit models tiny --out m && alignkit gen-pairs --model m -n 4 "
         "prompts.jsonl | alignkit score --scorer rules | alignkit relabel > pairs.jsonl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alignkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _STATE["debug"] = debug or _STATE["debug"]
    console.set_verbosity(0 if quiet else 2 if verbose else 1)


for _name in COMMAND_MODULES:
    try:
        _mod = import_module(f"alignkit.commands.{_name}")
    except ModuleNotFoundError as _e:  # a command not built yet must not break the others
        if _e.name != f"alignkit.commands.{_name}":
            raise
        continue
    _mod.register(app)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C (cleanup, checkpoint, exit 130)."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def _config_defaults(argv: list[str]) -> dict | None:
    """`--config FILE` (YAML or TOML) -> click default_map for the subcommand.

    Keys are flag names with or without dashes (`max-new-tokens` or `max_new_tokens`);
    flags given on the command line win, since they override defaults."""
    if "--config" not in argv:
        return None
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise typer.BadParameter("--config needs a file")
    path = argv[i + 1]
    del argv[i:i + 2]
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd is None:
        return None
    from .config import load_config
    values = load_config(path)
    import keyword

    def pyname(key: str) -> str:  # `lambda` -> typer's parameter `lambda_`
        name = key.lstrip("-").replace("-", "_")
        return name + "_" if keyword.iskeyword(name) else name
    return {cmd: {pyname(k): v for k, v in values.items()}}


def _env_setup() -> None:
    # No network at run time: the hub is never asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DISABLE_TQDM", "1")
    import warnings
    # Library deprecation chatter (transformers 5 / peft / trl) is not for our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)\.")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Returns the exit code (and exits with it)."""
    _env_setup()
    argv = list(sys.argv[1:] if argv is None else argv)
    _STATE["debug"] = "--debug" in argv or os.environ.get("ALIGNKIT_DEBUG", "") not in ("", "0")
    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    try:
        default_map = _config_defaults(argv)
        rv = app(args=argv, prog_name="alignkit", standalone_mode=False,
                 **({"default_map": default_map} if default_map else {}))
        if isinstance(rv, int):
            code = rv
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if _click_saw_broken_pipe():
            code = _quiet_broken_pipe()
    except AlignkitError as e:
        if _STATE["debug"]:
            import traceback
            traceback.print_exc()
        typer.echo(f"Error: {e}", err=True)
        code = e.exit_code
    except BrokenPipeError:
        code = _quiet_broken_pipe()
    except OSError as e:  # a path the user gave: one clean line, no exception name
        if _STATE["debug"]:
            import traceback
            traceback.print_exc()
        typer.echo(f"Error: {_os_error_message(e)}", err=True)
        code = 2 if isinstance(e, (IsADirectoryError, NotADirectoryError)) else 1
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        code = 130
    except Exception as e:  # click usage errors and genuine crashes
        from ._click import click
        if type(e).__name__ == "Exit":
            code = getattr(e, "exit_code", 0)
        elif type(e).__name__ == "Abort":
            typer.echo("Interrupted.", err=True)
            code = 130
        elif isinstance(e, click.ClickException):
            e.show()
            code = 2 if isinstance(e, click.UsageError) else e.exit_code
        else:
            if _STATE["debug"]:
                raise
            typer.echo(f"Error: {type(e).__name__}: {e} (run with --debug for a traceback)",
                       err=True)
            code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _quiet_broken_pipe()
    except ValueError:
        pass
    return code


def _os_error_message(e: OSError) -> str:
    """`PATH: problem` for an OSError, naming the user's path rather than a temp file."""
    import re
    name = e.filename
    if isinstance(name, (str, bytes, os.PathLike)):
        name = os.fsdecode(name)
        head, tail = os.path.split(name)
        m = re.match(r"^\.(.+)\.\d+\.[^/]*\.tmp$", tail)
        if m:  # the temp file of an atomic write: report the output it stands for
            name = os.path.join(head, m.group(1))
        return f"{name}: {e.strerror or e}"
    return e.strerror or str(e)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _click_saw_broken_pipe() -> bool:
    """click turns a closed stdout pipe (EPIPE) into exit 1 and wraps sys.stdout in its
    PacifyFlushWrapper; a closed downstream pipe is a normal end for alignkit (exit 0)."""
    return type(sys.stdout).__name__ == "PacifyFlushWrapper"


def _quiet_broken_pipe() -> int:
    # Point stdout at devnull so the interpreter's final flush does not complain.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
