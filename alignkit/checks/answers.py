"""Answer checks: an exact answer, a number within a tolerance (both fall back to the
record's `meta.reference`), and a regular expression."""
from __future__ import annotations

import math
import re

from alignkit.errors import DataError

from .base import Param, check_type
from .text import norm

_NUMBER_RE = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def _exact(text, spec, prompt_text):
    answers = spec["answer"]
    if isinstance(answers, str):
        answers = [answers]
    whole = norm(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = norm(lines[-1]) if lines else ""
    targets = {norm(str(a)) for a in answers}
    return whole in targets or last in targets


def _last_number(text: str) -> float | None:
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # pragma: no cover - the regex only yields numbers
        return None


def _numeric(text, spec, prompt_text):
    x = _last_number(text)
    if x is None:
        return False
    return math.isclose(x, spec["value"], rel_tol=0.0, abs_tol=spec["tol"])


def _regex(text, spec, prompt_text):
    return bool(re.search(spec["pattern"], text, _regex_flags(spec.get("flags", ""))))


_FLAG_MAP = {"i": re.I, "m": re.M, "s": re.S}


def _regex_flags(flags: str) -> int:
    out = 0
    for c in flags:
        out |= _FLAG_MAP[c]
    return out


def _validate_regex(spec: dict, field: str) -> None:
    flags = spec.get("flags", "")
    bad = [c for c in flags if c not in _FLAG_MAP]
    if bad:
        raise DataError(f"unknown regex flag(s) {''.join(bad)!r} (allowed: i, m, s)",
                        field=f"{field}.flags")
    try:
        re.compile(spec["pattern"], _regex_flags(flags))
    except re.error as e:
        raise DataError(f"invalid regular expression {spec['pattern']!r}: {e}",
                        field=f"{field}.pattern") from None


def _i_regex(spec):
    flags = spec.get("flags", "")
    suffix = " (ignoring case)" if "i" in flags else ""
    return f"Your answer must match the regular expression /{spec['pattern']}/{suffix}."


TYPES = [
    check_type("exact", [Param("answer", "str", required=False, default=None)], _exact,
        "the whole text or its last line equals the answer (whitespace and case "
        "normalised); falls back to meta.reference",
        lambda s: "Give the final answer alone on the last line.",
        reference_param="answer"),
    check_type("numeric",
        [Param("value", "float", required=False, default=None),
         Param("tol", "float", required=False, default=1e-6, minimum=0)],
        _numeric,
        "the last number in the text equals value within tol; falls back to meta.reference",
        lambda s: "End your answer with the final number.",
        reference_param="value"),
    check_type("regex",
        [Param("pattern", "str"),
         Param("flags", "str", required=False, default="", nonempty=False)],
        _regex, "re.search(pattern, text) matches (flags: i, m, s)", _i_regex,
        extra_validate=_validate_regex),
]
