"""`aepo[:K]`: the AEPO adaptive exploration reward for multi-answer responses
(InfiGUI-G1, arXiv 2508.05731; ALGORITHMS.md Part D §7, read from the verl recipe
`recipe/infigui-g1/reward_fn.py::calculate_point_reward`), moved from GUI points to
text questions with a verifiable answer.

The policy proposes up to K candidate answers, best first, in one response; the reward
is an efficiency η = U/C (utility over the cost of the list) plus a format term:

    R = -1                      invalid format, or a degenerate list (duplicates)
    R = 1 + 1/sqrt(N*k)         valid, first correct candidate at 1-based rank k
    R = 1 - 1/N                 valid, N >= 1 candidates, none correct
    R = 0                       valid but empty list (N = 0: R_acc = -1)

(R = R_fmt + R_acc with R_fmt = 1, U = +1, C = sqrt(N*k) on a hit; U = -1, C = N on a
miss; FMT_RATIO = ACC_RATIO = 1 as in the recipe.) One correct answer alone gives 2.

**Record shape.** A samples (or pair) record with `meta.answer`: the accepted answer, a
string or a list of accepted strings (`meta.reference` is read when `meta.answer` is
absent). A record with neither gets no `aepo` score (None: "not scorable").

**Completion format** (read from the text after the last `</think>`, if any):
- a JSON list of strings (numbers are taken as their text), e.g. `["Paris", "Lyon"]`,
  when the answer text is, or ends with, such a list; `[]` is the empty list (R = 0);
- otherwise one candidate per numbered line: `1. Paris`, `2) Lyon`, `Answer 3: Nice`,
  `Candidate 4 - Lille` (other lines are ignored);
- no list and no numbered line is an invalid format (R = -1).
Candidates and answers are compared after normalising: case-folded, whitespace
collapsed, surrounding quotes/`$`/backticks and trailing `.,;:!` stripped.

**Simplifications / choices** (the paper is GUI grounding, these are not in it):
- the collinear penalty has no text meaning; as ALGORITHMS.md proposes it becomes a
  *degenerate-list penalty*: R = -1 when two kept candidates are equal after
  normalisation (duplicates only inflate N);
- the recipe's `<think>` format gate is not applied (text after `</think>` is used when
  present, the whole completion otherwise);
- the recipe sets no cap on N (UNVERIFIED in the paper); here at most K candidates are
  kept (default K = 5, ALGORITHMS.md's `--max-candidates 5`): candidates past the K-th
  are dropped before scoring, so N <= K and a hit past rank K does not count;
- correctness is exact match after normalisation (no math-equivalence checker).

Per completion `aepo` details are kept as `"aepo": {"n", "rank", "valid"}` (rank =
1-based rank of the first correct candidate or null), from which eval can read
first-correct (rank == 1) and has-correct (rank is not null).
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

from ..checks import as_text
from ..errors import DataError, UsageError
from .base import Item, Scorer

DEFAULT_K = 5

_LINE_RE = re.compile(r"^\s*(?:(?:answer|candidate)\s*)?#?(\d+)\s*[.):\-]\s*(.+?)\s*$",
                      re.IGNORECASE)
_STRIP = "\"'`$ \t"


def normalise(text: str) -> str:
    """Case-folded, whitespace-collapsed, quotes/`$`/backticks and trailing `.,;:!` off."""
    s = " ".join(str(text).split()).casefold()
    prev = None
    while s != prev:
        prev = s
        s = s.strip(_STRIP).rstrip(".,;:!").strip(_STRIP)
    return s


def parse_candidates(text: str) -> list[str] | None:
    """The candidate list of a completion (see the module docstring); None = bad format."""
    body = text.rsplit("</think>", 1)[-1].strip()
    start = body.rfind("[") if body.endswith("]") else -1
    while start >= 0:
        try:
            value = json.loads(body[start:])
        except ValueError:
            start = body.rfind("[", 0, start)
            continue
        if isinstance(value, list) and all(isinstance(v, (str, int, float))
                                           and not isinstance(v, bool) for v in value):
            return [str(v) for v in value]
        break
    cands = [m.group(2) for m in map(_LINE_RE.match, body.splitlines()) if m]
    return cands or None


def accepted_answers(meta: dict) -> list[str] | None:
    """The normalised accepted answers of `meta.answer` (or `meta.reference`); None when
    the record has none. A malformed value is a DataError."""
    key = "answer" if meta.get("answer") is not None else "reference"
    value = meta.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                             for v in values):
        raise DataError("must be a string or a non-empty list of strings",
                        field=f"meta.{key}")
    return [normalise(str(v)) for v in values]


def is_degenerate(candidates: Sequence[str]) -> bool:
    """Two candidates equal after normalisation (the text stand-in for collinearity)."""
    norm = [normalise(c) for c in candidates]
    return len(set(norm)) < len(norm)


def first_correct_rank(correct_flags: Sequence[bool], k: int = DEFAULT_K) -> int | None:
    """1-based rank of the first True among the first k flags, or None."""
    return next((i + 1 for i, f in enumerate(list(correct_flags)[:k]) if f), None)


def aepo_reward(correct_flags: Sequence[bool], k: int = DEFAULT_K, *, valid: bool = True,
                degenerate: bool = False) -> float:
    """R = R_fmt + R_acc for the candidates' correctness flags (best first).

    Only the first k flags count (N = min(len, k)). Invalid or degenerate -> -1; else
    1 + 1/sqrt(N*rank) on a hit, 1 - 1/N on a miss, 0 for N = 0.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if not valid or degenerate:
        return -1.0
    flags = list(correct_flags)[:k]
    n = len(flags)
    if n == 0:
        return 0.0  # R_fmt = 1, R_acc = -1
    rank = first_correct_rank(flags, k)
    r_acc = 1.0 / math.sqrt(n * rank) if rank else -1.0 / n
    return 1.0 + r_acc


class AEPOScorer(Scorer):
    kind = "aepo"
    missing_reason = "no meta.answer"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        try:
            self.k = int(arg) if arg else DEFAULT_K
        except ValueError:
            raise UsageError(f"scorer {name!r}: K must be an integer (use aepo[:K])") from None
        if self.k < 1:
            raise UsageError(f"scorer {name!r}: K must be >= 1")

    def score_one(self, completion, answers: list[str]) -> tuple[float, dict]:
        cands = parse_candidates(as_text(completion, "assistant"))
        if cands is None:
            return aepo_reward([], self.k, valid=False), {"n": 0, "rank": None, "valid": False}
        cands = cands[:self.k]
        flags = [normalise(c) in answers for c in cands]
        degenerate = is_degenerate(cands)
        rank = None if degenerate else first_correct_rank(flags, self.k)
        detail = {"n": len(cands), "rank": rank, "valid": not degenerate}
        return aepo_reward(flags, self.k, degenerate=degenerate), detail

    def score(self, items: Sequence[Item]) -> list[float | None]:
        out: list[float | None] = []
        for item in items:
            try:
                answers = accepted_answers(item.meta)
            except DataError as e:
                raise item.located(e) from None
            if answers is None:
                out.append(None)
                continue
            value, detail = self.score_one(item.completion, answers)
            item.extra["aepo"] = detail
            out.append(value)
        return out
