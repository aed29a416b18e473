"""Flags shared by several commands, declared once so they read the same everywhere."""
from __future__ import annotations

from typing import Optional

import typer

INPUT_HELP = "Input JSONL (.jsonl or .jsonl.gz); '-' reads stdin."


def input_arg(help: str = INPUT_HELP):
    return typer.Argument("-", help=help, show_default=True)


def output_opt(help: str = "Output JSONL path; '-' writes stdout."):
    return typer.Option("-", "--output", "-o", help=help)


def out_dir_opt(help: str = "Output model folder (written atomically)."):
    return typer.Option(..., "--output", "-o", help=help)


def seed_opt(default: int = 0):
    return typer.Option(default, "--seed", help="Random seed: same inputs + seed -> same output.")


def dtype_opt(default: str = "auto"):
    return typer.Option(default, "--dtype",
                        help="auto | float32 | bfloat16 (bf16 is ~3x faster on CPUs with AVX-512 BF16).")


def shard_opt():
    return typer.Option(None, "--shard", help="Process only shard I of N (I/N, by id hash).")


def force_opt(help: str = "Replace an existing output folder."):
    return typer.Option(False, "--force", help=help)


def allow_pickle_opt():
    return typer.Option(False, "--allow-pickle", help="Allow loading pickle (.bin) weights.")


def trust_remote_code_opt():
    return typer.Option(False, "--trust-remote-code", help="Allow model code from the folder.")


def value_guide_opt():
    """`--value-guide DIR[:BETA]` (gen-pairs, eval): parse with
    `alignkit.reward_models.value.parse_guides`."""
    return typer.Option(None, "--value-guide", metavar="DIR[:BETA]",
                        help="Value Augmented Sampling: a `train-rm --method value` folder whose "
                             "V(s·a) shifts the top-10 logits by BETA·(V − mean V) (BETA "
                             "default 1.0; repeat to sum several guides). Records name the "
                             "guides in gen.value_guides; logp stays the base model's.")


def config_note() -> str:
    return ("Flags from a YAML or TOML file (keys: flag names); command-line flags win, an "
            "unknown key is an error.")


# --- flags generated from declared parameters ---------------------------------------

def param_option(p, *, aliases: tuple[str, ...] = (), help: str | None = None,
                 unset: bool = False):
    """(annotation, typer.Option) of a declared `alignkit.registry.Param`. With `unset`
    the flag's default is None ("not given": the method fills its declared default,
    which the help names)."""
    from typing import List
    decls = [p.flag_name]
    if p.type is bool and p.negatable:
        decls = [f"{p.flag_name}/--no-{p.flag_name[2:]}"]
    decls += [a for a in (p.short, *aliases) if a]
    if p.type is bool and not p.negatable:
        annotation, default = bool, False if unset else bool(p.default)
    elif p.multiple:
        annotation, default = Optional[List[p.type]], None
    else:
        annotation, default = Optional[p.type], None if unset else p.default
    metavar = p.metavar or _metavar(p)
    return annotation, typer.Option(default, *decls, help=help or p.describe(), metavar=metavar,
                                    show_default=default is not None and default is not False
                                    and default != "")


def _metavar(p) -> str | None:
    if p.type is bool:
        return None
    if p.choices:
        return "|".join(map(str, p.choices)) if len(p.choices) <= 4 else "NAME"
    return {int: "N", float: "X"}.get(p.type, "TEXT")


def with_params(**groups):
    """Decorator: add the flags of declared parameters to a typer command function.

    Each keyword names the argument the function receives and gives its parameters:
    a dataclass type whose fields carry help (`registry.params_of`; the function gets
    an instance), a `registry.Registry` (the union of its entries' parameters, each
    flag's help naming the entries that take it and their default) or an iterable of
    `registry.Param`s. For the last two the function gets a dict of the values given
    (None for a flag not given, so that `Entry.options` can tell a flag that does not
    apply). A flag the function declares itself is left to it.
    `aliases={"name": ("--old",)}` adds old spellings.
    """
    import dataclasses
    import functools
    import inspect

    from alignkit.registry import Registry, params_of
    aliases = groups.pop("aliases", {})
    plan, helps = {}, {}
    for arg, spec in groups.items():
        if dataclasses.is_dataclass(spec):
            plan[arg] = (spec, params_of(spec))
        elif isinstance(spec, Registry):
            plan[arg] = (None, tuple(spec.params().values()))
            helps.update({n: spec.param_help(n) for n in spec.params()})
        else:
            plan[arg] = (None, tuple(spec))

    def deco(fn):
        sig = inspect.signature(fn)
        import typing
        hints = typing.get_type_hints(fn)  # resolved here: the wrapper lives in this module
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                         annotation=hints.get(n, p.annotation))
               for n, p in sig.parameters.items() if n not in plan]
        taken = {p.name for p in own}
        extra, routes = [], {}
        for arg, (_, params) in plan.items():
            for prm in params:
                if prm.dest in taken:
                    continue
                taken.add(prm.dest)
                routes[prm.dest] = (arg, prm)
                ann, default = param_option(prm, aliases=tuple(aliases.get(prm.name, ())),
                                            help=helps.get(prm.name),
                                            unset=plan[arg][0] is None)
                extra.append(inspect.Parameter(prm.dest, inspect.Parameter.KEYWORD_ONLY,
                                               default=default, annotation=ann))

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values = {arg: {} for arg in plan}
            for dest, (arg, prm) in routes.items():
                v = kwargs.pop(dest)
                if prm.type is bool and not prm.negatable and v is False:
                    v = prm.default if plan[arg][0] is not None else None
                if prm.multiple and v is not None:
                    v = list(v) or None
                if v is not None:
                    v = prm.coerce(v)
                values[arg][prm.name] = v
            for arg, (cls, _) in plan.items():
                kwargs[arg] = cls(**{k: v for k, v in values[arg].items()
                                     if v is not None}) if cls is not None else values[arg]
            return fn(**kwargs)

        return _with_signature(wrapper, sig, own + extra)

    return deco


def _with_signature(wrapper, sig, params):
    """Give a functools.wraps wrapper the rewritten parameter list typer reads: its
    signature and resolved annotations (typer evaluates string annotations in the
    wrapper's module, not the command's), and no __wrapped__ to see through."""
    import inspect
    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params
                               if p.annotation is not inspect.Parameter.empty}
    del wrapper.__wrapped__
    return wrapper


def train_command(fn=None):
    """Decorator: the shared training flags (the fields of `TrainOptions`, declared once
    there) become flags; the function receives `opts: TrainOptions`."""
    from alignkit.training import TrainOptions
    deco = with_params(opts=TrainOptions)
    return deco(fn) if fn is not None else deco


# --- flags every command has: --config FILE, -q/--quiet, -v/--verbose -------------------

def _load_config(ctx, param, value):
    """Eager: the file's values become the command's defaults (command-line flags win)."""
    if not value:
        return value
    from alignkit.config import config_defaults, load_config
    values = config_defaults(ctx.command.params, load_config(value), value,
                             ctx.info_name or "")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _verbosity(level: int):
    def cb(ctx, param, value):
        if value:
            from alignkit import console
            console.set_verbosity(level)
        return value
    return cb


def with_cli_flags(fn):
    """Add --config FILE, -q/--quiet and -v/--verbose to a command function."""
    import functools
    import inspect
    sig = inspect.signature(fn)
    extra = {
        "config": (Optional[str], typer.Option(
            None, "--config", metavar="FILE", is_eager=True, callback=_load_config,
            expose_value=True, help=config_note())),
        "quiet": (bool, typer.Option(False, "--quiet", "-q", callback=_verbosity(0),
                                     help="Only errors on stderr.")),
        "verbose": (bool, typer.Option(False, "--verbose", "-v", callback=_verbosity(2),
                                       help="More detail on stderr.")),
    }
    names = set(sig.parameters)
    added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
             for n, (a, d) in extra.items() if n not in names]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        for p in added:
            kwargs.pop(p.name, None)
        return fn(**kwargs)

    import typing
    hints = typing.get_type_hints(fn)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params] + added
    return _with_signature(wrapper, sig, params)


def check_training_output(output: str, opts) -> None:
    """A training command's output folder, checked before any data is read or model
    loaded (the work folder OUT.partial is checked by prepare_run)."""
    from alignkit.io import check_output_dir
    check_output_dir(output, opts.force)
