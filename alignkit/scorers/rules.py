"""`rules`: verifiable checks from `meta.checks` (alignkit/checks/).

Score = fraction of the record's checks that the completion passes. The per-check
results are kept on the completion as `"checks": [{"type", "passed"}, ...]` (eval reads
this key). A record without `meta.checks` (absent, null or an empty list) gets no
`rules` score (None): the combination then leaves it out, and `alignkit score` prints a
count of such completions on stderr. A malformed `meta.checks` is a DataError located
at the record's line.
"""
from __future__ import annotations

from typing import Sequence

from ..checks import check_score, run_checks
from ..errors import DataError, UsageError
from .base import Item, Scorer


def has_checks(meta: dict) -> bool:
    """Whether a record asks for rule checks (`meta.checks` present and non-empty)."""
    return meta.get("checks") not in (None, [])


class RulesScorer(Scorer):
    kind = "rules"
    missing_reason = "no meta.checks"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        if arg:
            raise UsageError(f"scorer 'rules' takes no argument, got {name!r}")

    def score(self, items: Sequence[Item]) -> list[float | None]:
        out: list[float | None] = []
        for item in items:
            if not has_checks(item.meta):
                out.append(None)
                continue
            try:
                results = run_checks(item.completion, None, prompt_text=item.prompt,
                                     meta=item.meta)
            except DataError as e:
                raise item.located(e) from None
            item.extra["checks"] = results
            out.append(check_score(results))
        return out
