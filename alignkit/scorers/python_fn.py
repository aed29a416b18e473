"""`python:MODULE:FUNCTION`: a user reward function.

The spec names an importable module (`python:mypkg.rewards:brevity`) or a file
(`python:path/to/rewards.py:brevity`). The function is called once per batch with
TRL's reward-function convention:

    fn(prompts=[...], completions=[...], meta=[...], **columns) -> list[float | None]

`prompts` and `completions` are the records' values (strings or chat message lists);
`meta` is each row's `meta` dict; every key found in any row's `meta` is also passed as
its own column (a list, None where a row lacks it), so TRL-style functions such as
`fn(completions, solution, **kw)` work with `meta.solution`. None (or NaN) means "no
score" for that completion.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Sequence

from ..errors import AlignkitError, UsageError
from .base import Item, Scorer, need_arg

RESERVED = ("prompts", "completions", "meta")


def load_function(spec: str):
    """`module:function` or `path/to/file.py:function` -> the callable."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise UsageError(f"python scorer needs MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise UsageError(f"python scorer: no such file {mod_name}")
        name = f"alignkit_user_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise UsageError(f"python scorer: importing {mod_name} failed: "
                             f"{type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UsageError(f"python scorer: cannot import {mod_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"python scorer: {mod_name} has no function {fn_name!r}")
    return fn


def _as_score(v, name: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:  # numpy / torch scalars
            v = float(v)
        except (TypeError, ValueError):
            raise AlignkitError(f"{name}: the reward function returned {v!r}, "
                                "expected a number or None") from None
    v = float(v)
    return None if math.isnan(v) else v


class PythonScorer(Scorer):
    kind = "python"
    missing_reason = "the function returned None"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        self.fn = load_function(need_arg(self.kind, arg, "module:function"))

    def score(self, items: Sequence[Item]) -> list[float | None]:
        if not items:
            return []
        keys = sorted({k for it in items for k in it.meta} - set(RESERVED))
        columns = {k: [it.meta.get(k) for it in items] for k in keys}
        values = self.fn(prompts=[it.prompt for it in items],
                         completions=[it.completion for it in items],
                         meta=[it.meta for it in items], **columns)
        try:
            values = list(values)
        except TypeError:
            raise AlignkitError(f"{self.name}: the reward function must return a list") from None
        if len(values) != len(items):
            raise AlignkitError(f"{self.name}: the reward function returned {len(values)} "
                                f"values for {len(items)} completions")
        return [_as_score(v, self.name) for v in values]
