"""What a check type is (`CheckType`, its `Param`s) and the pieces the families share:
the count relations, the common parameters and the helpers that phrase instructions."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

RELATIONS = ("at least", "at most", "exactly")


@dataclass(frozen=True)
class Param:
    """One parameter of a check type.

    ``type`` is one of "int", "float", "str", "list[str]". ``choices`` restricts a "str"
    parameter; ``minimum`` bounds numbers; strings and list items must be non-empty.
    """

    name: str
    type: str
    required: bool = True
    default: Any = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    nonempty: bool = True
    doc: str = ""


@dataclass(frozen=True)
class CheckType:
    """A registered check: parameters, test ``fn(text, spec, prompt_text) -> bool``,
    a one-line ``description`` for docs, and ``instruction(spec) -> str`` for prompts.

    ``reference_param`` names the parameter that falls back to ``meta.reference``.
    """

    name: str
    params: tuple[Param, ...]
    fn: Callable[[str, dict, str], bool]
    description: str
    instruction: Callable[[dict], str]
    reference_param: str | None = None
    extra_validate: Callable[[dict, str], None] | None = dc_field(default=None, repr=False)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


def check_type(name, params, fn, description, instruction, **kw) -> CheckType:
    return CheckType(name, tuple(params), fn, description, instruction, **kw)


def compare(count: int, relation: str, n: int) -> bool:
    if relation == "at least":
        return count >= n
    if relation == "at most":
        return count <= n
    return count == n


# The parameters several check types take.
N = Param("n", "int", minimum=0, doc="the count")


REL_LEAST = Param("relation", "str", required=False, default="at least", choices=RELATIONS)


REL_EXACT = Param("relation", "str", required=False, default="exactly", choices=RELATIONS)


# Phrasing helpers for the instruction sentences.
def plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def quoted_list(items: list[str], conj: str) -> str:
    q = [f'"{k}"' for k in items]
    if len(q) == 1:
        return q[0]
    return ", ".join(q[:-1]) + f" {conj} " + q[-1]
