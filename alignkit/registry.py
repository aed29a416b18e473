"""One registry for every kind of plug-in: scorers, relabel strategies, policy methods,
reward-model methods, distill methods, merge methods and checks.

An `Entry` has a name, a one-line summary, its declared parameters (`Param`: type,
default, range or choices, help), the data kind it reads and writes, free-form `info`
(what the kind needs to know about it, e.g. a policy method's default learning rate) and
its implementation: an object, or a lazily imported "module:attribute" string, so that
listing the entries (for `--help`, `--list-methods`, docs and completions) imports
nothing heavy.

A `Registry` holds the entries of one kind. It is filled by the modules that define the
entries (they call `Registry.add` or the `Registry.register` decorator at import); the
registry imports those modules (`modules=`) on first use, so a command module can hold
a registry without paying for its entries. Every kind reports an unknown name the same
way, with a close-match suggestion (`Registry.get`).

A parameter is declared once, as a `Param` in the module of the method that uses it
(or, for options every entry of a kind shares, as a dataclass field whose metadata
carries the help: `params_of`). The command layer turns Params into flags
(`alignkit.commands._common.with_params`), so the flag, its help, its default and
its validation come from this one declaration.

Nothing here imports torch or typer.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Iterator, Mapping

from .errors import UsageError

__all__ = ["Param", "Entry", "Registry", "params_of", "unknown_name"]


@dataclass(frozen=True)
class Param:
    """A declared parameter: its flag, type, default, help and allowed values.

    `type` is bool, int, float or str (with `multiple=True`: a repeatable flag giving a
    list). `default=None` means "not given" (the method then uses `info` or its own
    documented behaviour, which the help says). `low`/`high` bound numbers (`low_open`
    excludes the low bound); `choices` lists the allowed strings.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    metavar: str | None = None
    multiple: bool = False
    flag: str | None = None        # default: --NAME with '_' as '-'
    short: str | None = None       # e.g. "-s"
    negatable: bool = False        # bool flags: also --no-NAME

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The Python identifier a command receives the value under."""
        import keyword
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def describe(self) -> str:
        """The help text with the allowed values and the default appended once."""
        text = self.help.rstrip()
        if self.choices and "|" not in text:
            text += f" ({' | '.join(map(str, self.choices))})"
        if self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" <= {self.high}"
            text += f" ({lo}x{hi})"
        return text

    def coerce(self, value: Any) -> Any:
        """Validate and convert a value given for this parameter (UsageError if bad)."""
        if value is None:
            return None
        if self.multiple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [dataclasses.replace(self, multiple=False).coerce(v) for v in items]
        flag = self.flag_name
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise UsageError(f"{flag} must be true or false, got {value!r}")
        if self.type in (int, float):
            if isinstance(value, bool):
                raise UsageError(f"{flag} must be a number, got {value!r}")
            try:
                v = float(value) if self.type is float else _as_int(value)
            except (TypeError, ValueError):
                what = "an integer" if self.type is int else "a number"
                raise UsageError(f"{flag} must be {what}, got {value!r}") from None
            if not math.isfinite(v):
                raise UsageError(f"{flag} must be finite, got {value!r}")
            if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
                raise UsageError(f"{flag} must be {'>' if self.low_open else '>='} {self.low}, "
                                 f"got {v}")
            if self.high is not None and v > self.high:
                raise UsageError(f"{flag} must be <= {self.high}, got {v}")
            return v
        v = str(value)
        if self.choices and v not in self.choices:
            raise UsageError(f"{flag} must be one of {' | '.join(map(str, self.choices))}, "
                             f"got {v!r}")
        return v


def _as_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip())


def params_of(cls) -> tuple[Param, ...]:
    """The Params of a dataclass whose fields carry `metadata={"help": ...}` (and
    optionally "choices", "low", "high", "metavar", "flag", "short", "negatable",
    "type"). Fields without help are not flags."""
    import typing
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Param(
            f.name, md.get("type") or _base_type(hints[f.name]), default, md["help"],
            choices=tuple(md.get("choices", ())), low=md.get("low"), high=md.get("high"),
            low_open=md.get("low_open", False), metavar=md.get("metavar"),
            multiple=md.get("multiple", False), flag=md.get("flag"), short=md.get("short"),
            negatable=md.get("negatable", False)))
    return tuple(out)


def _base_type(hint) -> type:
    import typing
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not list:
        return _base_type(args[0])
    if typing.get_origin(hint) is list:
        return _base_type(args[0]) if args else str
    return hint if hint in (bool, int, float, str) else str


def opt(default: Any = None, help: str = "", **more) -> Any:
    """A dataclass field carrying its flag's help: `x: int = opt(4, "Batch size.")`."""
    return field(default=default, metadata={"help": help, **more})


@dataclass(frozen=True)
class Entry:
    """One registered plug-in of a kind (see the module docstring)."""

    kind: str
    name: str
    summary: str
    target: Any = None                  # the implementation, or "module:attribute"
    params: tuple[Param, ...] = ()
    reads: str = ""
    writes: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        """The implementation (imported on first use when declared as a string)."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = import_module(module)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
            return obj
        return self.target

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def options(self, given: Mapping[str, Any], *, flag_of: Callable[[str], str] | None = None
                ) -> dict[str, Any]:
        """This entry's parameter values: the declared defaults, overridden by the values
        in `given` that are not None (validated). A value given for a parameter this
        entry does not declare is a UsageError naming the flag."""
        names = {p.name for p in self.params}
        extra = [k for k, v in given.items() if v is not None and k not in names]
        if extra:
            flags = ", ".join((flag_of or _flag)(k) for k in sorted(extra))
            raise UsageError(f"{flags} does not apply to {self.kind} {self.name!r}")
        out = {}
        for p in self.params:
            v = given.get(p.name)
            out[p.name] = p.default if v is None else p.coerce(v)
        return out

    def __getattr__(self, key: str) -> Any:  # info fields read as attributes
        info = object.__getattribute__(self, "info")
        if key in info:
            return info[key]
        raise AttributeError(key)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def unknown_name(kind: str, name: str, known: list[str], flag: str | None = None) -> UsageError:
    """The one "unknown name" message of every kind, with a close-match suggestion."""
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f" ({flag})" if flag else ""
    return UsageError(f"unknown {kind} {name!r}{where}{hint} Known: {', '.join(known)}.")


class Registry:
    """The entries of one kind, filled by `modules` on first use."""

    def __init__(self, kind: str, flag: str | None = None, modules: tuple[str, ...] = ()):
        self.kind = kind
        self.flag = flag
        self._modules = tuple(modules)
        self._entries: dict[str, Entry] = {}
        self._loaded = not self._modules

    # --- filling ------------------------------------------------------------------------
    def add(self, name: str, summary: str, target: Any = None, *, params=(), reads: str = "",
            writes: str = "", **info) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        entry = Entry(self.kind, name, summary, target, tuple(params), reads, writes, info)
        self._entries[name] = entry
        return entry

    def register(self, name: str, summary: str, **kw) -> Callable:
        """Decorator form of `add`: the decorated object is the implementation."""
        def deco(obj):
            self.add(name, summary, obj, **kw)
            return obj
        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for m in self._modules:
                import_module(m)

    # --- reading ------------------------------------------------------------------------
    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise unknown_name(self.kind, name, list(self._entries), self.flag)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def params(self) -> dict[str, Param]:
        """Every declared parameter by name, across entries (declared once: two entries
        declaring the same name must share the same declaration)."""
        out: dict[str, Param] = {}
        for e in self:
            for p in e.params:
                if p.name in out and out[p.name] != p:
                    raise ValueError(f"{self.kind} parameter {p.name!r} declared twice "
                                     f"with different settings")
                out.setdefault(p.name, p)
        return out

    def users(self, param: str) -> list[str]:
        return [e.name for e in self if any(p.name == param for p in e.params)]

    def param_help(self, name: str) -> str:
        """A parameter's help with the entries that take it and its default."""
        p = self.params()[name]
        users = self.users(name)
        default = "" if p.default is None else f"; default {p.default}"
        return f"{p.describe()} ({', '.join(users)}{default})"

    def summary_line(self) -> str:
        return "; ".join(f"{e.name}: {e.summary}" for e in self)

    def table(self, columns: tuple[tuple[str, Callable[[Entry], str]], ...] = ()) -> list[str]:
        """One line per entry: name, the extra columns, summary (for --list-methods)."""
        entries = list(self)
        heads = [self.kind.split()[-1]] + [h for h, _ in columns] + ["summary"]
        rows = [[e.name] + [str(fn(e)) for _, fn in columns] + [e.summary] for e in entries]
        widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads) - 1)]
        fmt = lambda r: " ".join(f"{c:{w}}" for c, w in zip(r, widths)) + " " + r[-1]  # noqa: E731
        return [fmt(heads)] + [fmt(r) for r in rows]
