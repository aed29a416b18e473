"""URPO's task kinds and their pure rewards (ALGORITHMS.md Part D §5; no torch here).

URPO (arXiv 2507.17515; no code found) trains one model as player and referee in one
GRPO loop over three kinds of prompt records (`kind_of`):

- "verifiable": `meta.checks` (the `rules` reward of `alignkit score`) or `meta.answer`
  (`answer_reward`: 1 if the completion's final answer equals it, else 0);
- "judge": a preference pair recast as a judging task (`judge_prompt`, written by
  `alignkit relabel --strategy referee-tasks`): `meta.urpo = {"kind": "judge", "label":
  "A"|"B"}`; reward (`judge_reward`) 1 if the parsed verdict is the label, 0 if it is
  the other one, FORMAT_PENALTY (-0.5) if no verdict can be parsed;
- "open": neither; scored by the current policy itself as referee (`SELF_JUDGE`
  template, pointwise: P(yes) of "is this a good answer", `p_yes`).

Simplified vs the paper (whose exact forms ALGORITHMS.md marks UNVERIFIED): pairs, not
N-way rankings (the reward is exact agreement on the better of two, not a ranking
metric); the open-kind referee is pointwise P(yes) from one forward pass (not the
listwise 1-10 scores ALGORITHMS.md suggests): deterministic, differentiable-free and
cheap; no mixing ratios (the batch mix is the file's mix).

Verdict rule (`parse_verdict`), first that matches wins:
1. the last `[[A]]` / `[[B]]`;
2. the last `answer|verdict|winner|better|choice` followed by `:` or `is` and A/B
   (`Answer: A`, `Verdict is B`, `better: (A)`);
3. the whole text, stripped of spaces, quotes, brackets and final punctuation, is A or B;
4. the text ends with a standalone A or B (`... so the better one is B.`).
Case-sensitive for the letter in rules 3 and 4 (a final article "a" is not a verdict).
"""
from __future__ import annotations

import math
import random
import re

from ..errors import DataError


def flat_text(value) -> str:
    """A prompt or answer as one string: a conversation flattened to its messages'
    contents, one per line; a completion by the rules of `alignkit.text`."""
    from ..text import completion_text
    if isinstance(value, list) and any(isinstance(m, dict) and m.get("role") in ("user", "system")
                                       for m in value):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return completion_text(value)


FORMAT_PENALTY = -0.5   # judge kind: no parsable verdict
LABELS = ("A", "B")

JUDGE_TEMPLATE = (
    "You are a referee. Read the question and the two answers, then say which answer is "
    "better. End with your verdict as [[A]] or [[B]].\n\n"
    "[Question]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\nVerdict:")

SELF_JUDGE = (
    "You are a referee. Is the answer below a good answer to the question? Reply yes or "
    "no.\n\n[Question]\n{prompt}\n\n[Answer]\n{answer}\n\nGood answer (yes or no):")
YES, NO = " yes", " no"  # the two continuations compared (their first tokens)


def judge_prompt(prompt: str, a: str, b: str) -> str:
    """The one judging prompt (relabel, trainer, accuracy eval)."""
    return JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)


def self_judge_prompt(prompt: str, answer: str) -> str:
    return SELF_JUDGE.format(prompt=prompt, answer=answer)


def swap_for(seed: int, rec_id: str) -> bool:
    """Whether the chosen answer goes second (B), from (seed, id): same seed, same order."""
    return random.Random(f"{seed}\x00{rec_id}").random() < 0.5


def judge_record(pair: dict, seed: int, text) -> dict:
    """A pair -> a judge-kind prompt record; `text` turns a prompt/answer into a string."""
    swap = swap_for(seed, pair["id"])
    chosen, rejected = text(pair["chosen"]), text(pair["rejected"])
    a, b = (rejected, chosen) if swap else (chosen, rejected)
    meta = dict(pair.get("meta") or {})
    meta["urpo"] = {"kind": "judge", "label": "B" if swap else "A", "swapped": swap,
                    "seed": seed, "pair_id": pair["id"]}
    return {"id": f"{pair['id']}-judge", "prompt": judge_prompt(text(pair["prompt"]), a, b),
            "meta": meta}


_BRACKET = re.compile(r"\[\[\s*([AB])\s*\]\]")
_KEYED = re.compile(r"(?:answer|verdict|winner|better|choice)\s*(?::|is)\s*[\(\[\"'*]*\s*([AB])\b",
                    re.IGNORECASE)
_TAIL = re.compile(r"(?:^|[\s\(\[\"'*])([AB])[\s\)\]\"'*.!]*$")


def parse_verdict(text: str) -> str | None:
    """"A", "B" or None (the module docstring's rule)."""
    m = _BRACKET.findall(text)
    if m:
        return m[-1]
    m = _KEYED.findall(text)
    if m:
        return m[-1].upper()
    bare = text.strip().strip("\"'*()[] ").rstrip(".!")
    if bare in LABELS:
        return bare
    m = _TAIL.search(text)
    return m.group(1) if m else None


def judge_reward(completion: str, label: str) -> float:
    v = parse_verdict(completion)
    if v is None:
        return FORMAT_PENALTY
    return 1.0 if v == label else 0.0


def _norm(s: str) -> str:
    return re.sub(r"[\s$.,;:!]+$", "", re.sub(r"^[\s$]+", "", s)).lower()


def answer_reward(completion: str, answer) -> float:
    """1 if the final answer (after the last "answer:" / "answer is", else the last
    non-empty line's last word) equals `meta.answer` (case and outer punctuation aside)."""
    m = list(re.finditer(r"answer\s*(?::|is)\s*(.+)", completion, re.IGNORECASE))
    if m:
        got = m[-1].group(1).strip().splitlines()[0] if m[-1].group(1).strip() else ""
    else:
        lines = [x for x in completion.strip().splitlines() if x.strip()]
        got = lines[-1].split()[-1] if lines else ""
    return 1.0 if _norm(got) == _norm(str(answer)) else 0.0


def p_yes(logit_yes: float, logit_no: float) -> float:
    """The self-judge score: P(yes) renormalised over {yes, no} = σ(l_yes − l_no)."""
    return 1.0 / (1.0 + math.exp(logit_no - logit_yes))


def kind_of(rec: dict) -> str:
    meta = rec.get("meta") or {}
    if isinstance(meta.get("urpo"), dict) and meta["urpo"].get("kind") == "judge":
        return "judge"
    if meta.get("checks") not in (None, []) or "answer" in meta:
        return "verifiable"
    return "open"


def check_records(records: list[dict], path: str, lines: list[int]) -> list[str]:
    """The kind of every record; a malformed `meta.urpo` is a DataError at file:line."""
    kinds = []
    for i, rec in enumerate(records):
        meta = rec.get("meta") or {}
        u = meta.get("urpo")
        line = lines[i] if i < len(lines) else None
        if u is not None:
            if not isinstance(u, dict) or u.get("kind") != "judge":
                raise DataError('must be {"kind": "judge", "label": "A"|"B"}', path, line,
                                "meta.urpo")
            if u.get("label") not in LABELS:
                raise DataError(f"must be \"A\" or \"B\", got {u.get('label')!r}", path, line,
                                "meta.urpo.label")
            if not isinstance(rec["prompt"], str):
                raise DataError("a judge-kind prompt must be a string", path, line, "prompt")
        kinds.append(kind_of(rec))
    return kinds


def split_held_out(kinds: list[str], share: float, seed: int) -> set[int]:
    """The judge-kind record indices held out for the accuracy eval (seeded; at least one
    when share > 0 and there are at least two judge records)."""
    judge = [i for i, k in enumerate(kinds) if k == "judge"]
    if share <= 0 or len(judge) < 2:
        return set()
    n = max(1, int(round(share * len(judge))))
    return set(random.Random(seed).sample(judge, min(n, len(judge) - 1)))
