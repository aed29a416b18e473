"""Re-ranking N scored samples that have a verifiable answer (Easy-to-Hard, ALGORITHMS.md
Part D §1): best-of-N, weighted majority voting and plain majority voting by any scorer.

`alignkit eval` reports these (`rerank` in a model's metrics) for samples records whose
`meta.answer` holds the reference answer and that have at least two scored completions.

- Extracted answer of a completion: the content of its last `\\boxed{...}` (nested braces
  allowed) when it has one, else its last number; none: the completion votes for nothing
  (and is wrong when best-of-N picks it).
- Answers are compared after normalisation: surrounding whitespace and `$` removed,
  inner spaces dropped; a number (commas as thousands separators allowed) is written
  canonically, so "4", "4.0" and "4.00" agree. `meta.answer` is normalised the same way
  (a number or a string; a list means any of them is correct).
- Best-of-N: the answer of the completion with the highest `score` (ties: the first).
- Weighted vote: argmax_a Σ_i 1[ans_i = a]·score_i (ties: the answer seen first).
  The weights are the combined `score` as it is (a prm's aggregated probability; an
  `rm:DIR` logit can be negative, which a vote weight should not be: calibrate or use a
  probability scorer). UNVERIFIED: whether the paper weights by the raw PRM output or
  by the aggregate; here the completion's score, i.e. the aggregate.
- Majority vote: the weighted vote with every weight 1.
- pass@N: whether any completion's answer is correct (the ceiling of any selection).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from .text import completion_text

__all__ = ["extract_answer", "normalize_answer", "best_of_n", "weighted_vote",
           "rerank_metrics"]

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: not an answer


def extract_answer(text: Any) -> str | None:
    """The last `\\boxed{}` content, else the last number, normalised; None if neither."""
    text = completion_text(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return normalize_answer(boxed)
    found = _NUMBER.findall(text)
    return normalize_answer(found[-1]) if found else None


def normalize_answer(value: Any) -> str:
    s = str(value).strip().strip("$").strip()
    s = re.sub(r"\s+", "", s)
    if _NUMBER.fullmatch(s):
        x = float(s.replace(",", ""))
        return str(int(x)) if x.is_integer() else repr(x)
    return s


def best_of_n(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer of the highest-scoring completion (ties: the first)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return answers[best]


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """argmax_a Σ_i 1[ans_i = a]·w_i over the answers that are not None (ties: the
    answer seen first); None when no completion has an answer."""
    total: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            total[a] = total.get(a, 0.0) + w
    if not total:
        return None
    order = list(total)
    return max(order, key=lambda a: (total[a], -order.index(a)))


def _references(meta: dict) -> set[str] | None:
    ref = (meta or {}).get("answer")
    if ref is None:
        return None
    refs = ref if isinstance(ref, list) else [ref]
    return {normalize_answer(r) for r in refs}


def rerank_metrics(records: list[dict]) -> dict | None:
    """Accuracy of best-of-N, weighted and majority voting, and pass@N, over the samples
    records with `meta.answer` and >= 2 scored completions (None when there are none)."""
    hits = {"best_of_n": 0, "weighted_vote": 0, "majority_vote": 0, "pass_at_n": 0}
    n = 0
    sizes = []
    for r in records:
        refs = _references(r.get("meta") or {})
        comps = [c for c in r.get("completions") or [] if c.get("score") is not None]
        if refs is None or len(comps) < 2:
            continue
        n += 1
        sizes.append(len(comps))
        answers = [extract_answer(c["text"]) for c in comps]
        scores = [float(c["score"]) for c in comps]
        picked = {"best_of_n": best_of_n(answers, scores),
                  "weighted_vote": weighted_vote(answers, scores),
                  "majority_vote": weighted_vote(answers, [1.0] * len(answers))}
        for k, a in picked.items():
            hits[k] += a in refs
        hits["pass_at_n"] += any(a in refs for a in answers)
    if not n:
        return None
    return {"n_prompts": n, "mean_n": sum(sizes) / n,
            **{f"{k}_accuracy" if k != "pass_at_n" else k: v / n for k, v in hits.items()}}
