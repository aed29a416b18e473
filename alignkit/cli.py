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
    "eval", "lineage", "models", "schema", "env", "gen_rubrics",
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


class _Registrar:
    """What a command module's `register(app)` sees: `command()` adds the flags every
    command has (--config FILE, -q, -v) before handing the function to typer."""

    def __init__(self, target):
        self._target = target

    def command(self, *args, **kwargs):
        from alignkit.commands._common import with_cli_flags
        deco = self._target.command(*args, **kwargs)
        return lambda fn: deco(with_cli_flags(fn))

    def add_typer(self, sub, **kwargs):
        from alignkit.commands._common import with_cli_flags
        for info in sub.registered_commands:
            info.callback = with_cli_flags(info.callback)
        return self._target.add_typer(sub, **kwargs)

    def __getattr__(self, name):
        return getattr(self._target, name)


for _name in COMMAND_MODULES:
    try:
        _mod = import_module(f"alignkit.commands.{_name}")
    except ModuleNotFoundError as _e:  # a command not built yet must not break the others
        if _e.name != f"alignkit.commands.{_name}":
            raise
        continue
    _mod.register(_Registrar(app))


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C (cleanup, checkpoint, exit 130)."""


def _on_sigterm(signum, frame):
    raise Interrupted()


MODEL_OPTION_NAMES = {"model", "models", "teacher", "teacher_ref", "student", "ref_model", "baseline",
                "base", "tokenizer", "pair_with_reference", "mixture"}
FILE_OPTION_NAMES = {"input", "data", "pairs", "eval_pairs", "baseline_samples", "resume_from",
               "training_metrics", "samples_out", "policy", "opt_file", "calibrate", "rubric"}


def _metavar(param) -> str:
    """The placeholder a user reads: FILE, DIR, MODEL, N, X, SPEC, A|B; none on flags."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if getattr(param, "metavar", None):
        return param.metavar
    name = param.name or ""
    ptype = getattr(param, "type", None)
    choices = getattr(ptype, "choices", None)
    desc = getattr(param, "type_descriptor", None)  # typer >= 0.29 keeps the annotation here
    ann = getattr(desc, "annotation", None)
    import typing
    args = [a for a in typing.get_args(ann) if a is not type(None)] if ann is not None else []
    if args and typing.get_origin(ann) is not list:
        ann = args[0]
    if typing.get_origin(ann) is list:
        ann = (typing.get_args(ann) or (str,))[0]
    if choices:
        return "|".join(map(str, choices))
    kind = getattr(ptype, "name", "") or {int: "integer", float: "float"}.get(ann, "")
    if name in MODEL_OPTION_NAMES:
        return "MODEL"
    if name in ("output", "report"):
        return "DIR" if name == "report" or "folder" in (getattr(param, "help", "") or "").lower() \
            else "FILE"
    if name in FILE_OPTION_NAMES:
        return "FILE"
    if name in ("method", "strategy"):
        return name.upper()
    named = {"scorer": "SPEC", "reward": "SPEC", "dtype": "DTYPE", "shard": "I/N",
             "device": "DEVICE", "system": "TEXT", "weights": "W,W", "reward_weights": "W,W",
             "loss_weights": "W,W", "opt": "KEY=VALUE", "lora_targets": "NAMES"}
    if name in named:
        return named[name]
    if kind.startswith("integer"):
        return "N"
    if kind.startswith("float"):
        return "X"
    return "TEXT"


def _readable_metavars(cmd) -> None:
    """Replace typer's Python-type placeholders (<bool>, <str>, <list[str]>) in --help."""
    for sub in getattr(cmd, "commands", {}).values():
        _readable_metavars(sub)
    original = cmd.get_help_option

    def help_option(ctx, original=original):
        opt = original(ctx)
        if opt is not None:
            opt.display_type_rich = lambda ctx: None
        return opt
    cmd.get_help_option = help_option
    for param in getattr(cmd, "params", []):
        label = _metavar(param)
        param.display_type_rich = (lambda ctx, v=label: v or None)
        if getattr(param, "param_type_name", "") == "option" and label:
            param.metavar = label


def _float_annotation(param) -> bool:
    """Whether a typer option holds a float (float, float | None, list[float])."""
    import typing
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(ann) is list:
        ann = (typing.get_args(ann) or (str,))[0]
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return ann is float or args == [float]


def _finite_floats(cmd) -> None:
    """Every float option of every command refuses nan and inf (a usage error, exit 2):
    `float()` parses them, and a bound such as `>= 0` does not catch nan."""
    import math
    for sub in getattr(cmd, "commands", {}).values():
        _finite_floats(sub)
    for param in getattr(cmd, "params", []):
        if getattr(param, "param_type_name", "") != "option" or not _float_annotation(param):
            continue
        original = param.process_value

        def process_value(ctx, value, original=original, param=param):
            value = original(ctx, value)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    from ._click import click
                    raise click.UsageError(f"{param.opts[0]} must be finite, got {v}", ctx=ctx)
            return value
        param.process_value = process_value


def click_command():
    """The click command tree of `alignkit` (what --help, docs and completions read)."""
    import typer.main
    cmd = typer.main.get_command(app)
    _readable_metavars(cmd)
    _finite_floats(cmd)
    return cmd


def _config_after_command(argv: list[str]) -> list[str]:
    """`alignkit --config FILE CMD ...` (or `--config=FILE`) means `alignkit CMD --config
    FILE ...`: the file holds the command's flags, so the command reads it."""
    out, moved, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            moved += argv[i:i + 2]
            i += 2
            continue
        if a.startswith("--config="):
            moved.append(a)
            i += 1
            continue
        if not a.startswith("-"):  # the subcommand (and, for `models`, its own subcommand)
            sub = [a]
            if a == "models" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                sub.append(argv[i + 1])
                i += 1
            if not moved:
                return argv
            return out + sub + moved + argv[i + 1:]
        out.append(a)
        i += 1
    if moved and len(moved) == 1 and moved[0] == "--config":
        raise typer.BadParameter("--config needs a file")
    return out + moved


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
        argv = _config_after_command(argv)
        rv = click_command().main(args=argv, prog_name="alignkit", standalone_mode=False)
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
