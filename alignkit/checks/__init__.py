"""Verifiable instruction checks (an IFEval-style family, written for alignkit).

A check spec is a plain dict ``{"type": NAME, **params}`` as found in a prompt
record's ``meta.checks``. Every check type is one registered :class:`CheckType` in
:data:`CHECKS` (name -> parameters, test function, description, instruction text), so
that adding a check is one function plus one entry in its family's ``TYPES`` plus its
tests. The families, one module each:

    counts.py    words, sentences, paragraphs
    keywords.py  keywords, letter case, capital words, commas
    format.py    starts/ends with, JSON, bullets, sections, placeholders, title,
                 postscript, highlights, repeating the request, two responses
    answers.py   exact answer, number within a tolerance, regular expression

`text.py` holds the text rules they share (what a word, a sentence and a paragraph
are), `base.py` the `CheckType`/`Param` types and the relations ("at least" >=,
"at most" <=, "exactly" ==). This module assembles the table and validates and runs
specs.

Public API::

    CHECKS: dict[str, CheckType]
    validate_check(spec, field="check") -> dict          # normalised copy, defaults filled
    validate_checks(checks, field="meta.checks") -> list[dict]
    run_checks(text, checks, prompt_text="", meta=None) -> list[{"type", "passed"}]
    check_score(results) -> float | None                 # fraction passed, None if empty
    describe_check(spec) -> str                           # English instruction sentence
    describe_checks(checks) -> str

Bad specs raise :class:`alignkit.errors.DataError` with ``field`` set, e.g.
``meta.checks[1].n``; the caller adds the file path and line.
"""
from __future__ import annotations

import math
from typing import Any

from alignkit.errors import DataError
from alignkit.registry import Registry, unknown_name

from . import answers, counts, format, keywords
from .base import RELATIONS, CheckType, Param
from .text import as_text, count_sentences, count_words, split_paragraphs, words

__all__ = [
    "Param", "CheckType", "CHECKS", "RELATIONS",
    "validate_check", "validate_checks", "run_checks", "check_score",
    "describe_check", "describe_checks",
    "words", "count_words", "count_sentences", "split_paragraphs", "as_text", "loose_variants",
]

_TYPES: dict[str, CheckType] = {c.name: c for family in (counts, keywords, format, answers)
                                for c in family.TYPES}

# The check types on the one registry (the entry's implementation is its CheckType;
# `CHECKS` stays the name -> CheckType table the checks code reads).
CHECK_TYPES = Registry("check type")
for _c in _TYPES.values():
    CHECK_TYPES.add(_c.name, _c.description, _c, reads="completion", writes="bool",
                    fields=tuple(p.name for p in _c.params))
CHECKS: dict[str, CheckType] = _TYPES


# --------------------------------------------------------------------------- validation

def _check_value(p: Param, value: Any, field: str) -> Any:
    where = f"{field}.{p.name}"
    if p.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"must be an integer, got {value!r}", field=where)
    elif p.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"must be a number, got {value!r}", field=where)
        value = float(value)
        if not math.isfinite(value):
            raise DataError(f"must be a finite number, got {value!r}", field=where)
    elif p.type == "str":
        if not isinstance(value, str):
            raise DataError(f"must be a string, got {value!r}", field=where)
        if p.nonempty and not value.strip():
            raise DataError("must be a non-empty string", field=where)
        if p.choices is not None and value not in p.choices:
            allowed = ", ".join(repr(c) for c in p.choices)
            raise DataError(f"must be one of {allowed}, got {value!r}", field=where)
    elif p.type == "list[str]":
        if not isinstance(value, list):
            raise DataError(f"must be a list of strings, got {value!r}", field=where)
        for j, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise DataError(f"must be a non-empty string, got {item!r}",
                                field=f"{where}[{j}]")
        value = list(value)
    else:  # pragma: no cover - registry bug
        raise AssertionError(f"unknown param type {p.type}")
    if p.minimum is not None and value < p.minimum:
        raise DataError(f"must be >= {p.minimum:g}, got {value!r}", field=where)
    return value


def validate_check(spec: Any, field: str = "check") -> dict:
    """Validate one check spec; return a normalised copy with defaults filled in.

    Raises DataError (``field`` like ``meta.checks[2].n``) for a spec that is not an
    object, a missing or unknown ``type``, a missing required parameter, an unknown
    parameter, a wrong-typed or out-of-range value, or an invalid regex.
    """
    if not isinstance(spec, dict):
        raise DataError(f"a check must be an object with a 'type', got {spec!r}", field=field)
    if "type" not in spec:
        raise DataError("missing check type", field=f"{field}.type")
    name = spec["type"]
    if not isinstance(name, str) or name not in CHECKS:
        raise DataError(str(unknown_name("check type", name, sorted(CHECKS))),
                        field=f"{field}.type")
    ct = CHECKS[name]
    allowed = {p.name for p in ct.params}
    unknown = sorted(k for k in spec if k != "type" and k not in allowed)
    if unknown:
        params = ", ".join(sorted(allowed)) or "none"
        raise DataError(f"unknown parameter {unknown[0]!r} for check {name!r} "
                        f"(parameters: {params})", field=f"{field}.{unknown[0]}")
    out: dict[str, Any] = {"type": name}
    for p in ct.params:
        if p.name in spec and not (spec[p.name] is None and not p.required):
            out[p.name] = _check_value(p, spec[p.name], field)
        elif p.required:
            raise DataError(f"missing required parameter {p.name!r} for check {name!r}",
                            field=f"{field}.{p.name}")
        elif p.default is not None:
            out[p.name] = list(p.default) if isinstance(p.default, list) else p.default
    if ct.extra_validate is not None:
        ct.extra_validate(out, field)
    return out


def validate_checks(checks: Any, field: str = "meta.checks") -> list[dict]:
    """Validate a list of check specs (``meta.checks``); normalised copies."""
    if not isinstance(checks, list):
        raise DataError(f"must be a list of checks, got {checks!r}", field=field)
    return [validate_check(c, f"{field}[{i}]") for i, c in enumerate(checks)]


# --------------------------------------------------------------------------- running

def _resolve_reference(spec: dict, ct: CheckType, meta: dict, field: str) -> dict:
    pname = ct.reference_param
    if pname is None or spec.get(pname) is not None:
        return spec
    if "reference" not in meta or meta["reference"] is None:
        raise DataError(f"check {ct.name!r} needs {pname!r} or meta.reference",
                        field=f"{field}.{pname}")
    ref = meta["reference"]
    spec = dict(spec)
    if pname == "answer":
        if isinstance(ref, list):
            spec["answer"] = [str(r) for r in ref]
        else:
            spec["answer"] = str(ref)
    else:
        try:
            if isinstance(ref, bool):
                raise ValueError
            spec["value"] = float(str(ref).replace(",", "").strip())
        except ValueError:
            raise DataError(f"must be a number for check 'numeric', got {ref!r}",
                            field="meta.reference") from None
    return spec


def loose_variants(text: str) -> list[str]:
    """The responses IFEval's loose accuracy tries (lm-evaluation-harness / the IFEval
    reference code): the response, without its first line, without its last line,
    without both, and each of those with every ``*`` removed."""
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
           "\n".join(lines[1:-1]).strip()]
    return [cut[0], cut[0].replace("*", ""), cut[1], cut[2], cut[3],
            cut[1].replace("*", ""), cut[2].replace("*", ""), cut[3].replace("*", "")]


def run_checks(text: Any, checks: list[dict] | None, prompt_text: Any = "",
               meta: dict | None = None, *, loose: bool = False) -> list[dict]:
    """Run every check on ``text``: ``[{"type": NAME, "passed": bool}, ...]`` in order.

    ``checks`` None means ``meta["checks"]``. ``prompt_text`` is used by
    ``repeat_prompt``; ``meta["reference"]`` is the fallback answer of ``exact`` and
    ``numeric``. Invalid specs raise DataError with ``field`` ``meta.checks[i]...``.
    ``loose``: IFEval's loose reading, a check passes when the response or any non-empty
    variant of `loose_variants` passes it (so loose >= strict, also for empty responses).
    """
    meta = meta or {}
    if checks is None:
        checks = meta.get("checks", [])
    specs = validate_checks(checks)
    text_s = as_text(text, "assistant")
    prompt_s = as_text(prompt_text, "user")
    results = []
    for i, spec in enumerate(specs):
        ct = CHECKS[spec["type"]]
        spec = _resolve_reference(spec, ct, meta, f"meta.checks[{i}]")
        if loose:
            variants = loose_variants(text_s)  # the response itself counts as in strict
            ok = ct.fn(text_s, spec, prompt_s) or any(
                v.strip() and ct.fn(v, spec, prompt_s) for v in variants[1:])
        else:
            ok = ct.fn(text_s, spec, prompt_s)
        results.append({"type": ct.name, "passed": bool(ok)})
    return results


def check_score(results: list[dict]) -> float | None:
    """Fraction of results that passed; None when there are no results."""
    if not results:
        return None
    return sum(1 for r in results if r["passed"]) / len(results)


def describe_check(spec: dict) -> str:
    """An English instruction sentence for a check, e.g. "Answer in at most 50 words."."""
    spec = validate_check(spec)
    return CHECKS[spec["type"]].instruction(spec)


def describe_checks(checks: list[dict]) -> str:
    """The instructions of several checks, joined by spaces."""
    return " ".join(describe_check(c) for c in checks)
