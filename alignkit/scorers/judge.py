"""`judge:MODEL`: an LLM judge that answers yes/no questions from a rubric.

Rubric items (ALGORITHMS.md Part B §8, OpenRubrics): **hard rules** (explicit
constraints) and **principles** (implicit qualities). A record's rubric is `meta.rubric`
when present, else the `--rubric FILE` rubric. An item is a string (a principle) or
`{"text": str, "kind": "hard" | "principle"}` (kind defaults to principle).

For each (completion, item) the judge model reads `JUDGE_TEMPLATE` rendered through its
chat template (`alignkit.generation.render_prompt` when available, else
`tokenizer.apply_chat_template(..., add_generation_prompt=True)`; plain text plus
"\\nAnswer:" without a template). One forward pass gives the next-token distribution;
P(yes) is normalised over the answer variants that are single tokens of the judge's
tokenizer:

    P(yes) = Σ_{v∈YES} p(v) / (Σ_{v∈YES} p(v) + Σ_{v∈NO} p(v)),
    YES = {"yes", " yes", "Yes", " Yes"},  NO = {"no", " no", "No", " No"}.

Score (`rubric_score`): 0 when any hard rule has P(yes) < 0.5 (hard rules gate);
otherwise the mean P(yes) of the principles, or 1.0 when the rubric has only hard rules
(all passed). A record without a rubric gets no judge score (None). The per-item
results are kept on the completion as `"judge": [{"text", "kind", "p_yes"}, ...]`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError, UsageError
from ..text import completion_text, render_prompt, transcript
from .base import Item, Scorer, batches, encode, load_model, need_arg

YES = ("yes", " yes", "Yes", " Yes")
NO = ("no", " no", "No", " No")
KINDS = ("hard", "principle")

JUDGE_TEMPLATE = (
    "Read the instruction and the response below, then answer the question with yes or no."
    "\n\nInstruction:\n{prompt}\n\nResponse:\n{completion}\n\nQuestion: {question}")
QUESTIONS = {
    "hard": "Does the response follow this rule: {text}",
    "principle": "Does the response satisfy this principle: {text}",
}


def parse_rubric(items: Any, field: str = "meta.rubric") -> list[dict]:
    """Validate rubric items; return `[{"text", "kind"}, ...]`. Raises DataError."""
    if not isinstance(items, list):
        raise DataError(f"must be a list of rubric items, got {items!r}", field=field)
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise DataError(f"a rubric item is a string or an object with 'text', got {item!r}",
                            field=where)
        unknown = sorted(set(item) - {"text", "kind"})
        if unknown:
            raise DataError(f"unknown key {unknown[0]!r} (keys: text, kind)",
                            field=f"{where}.{unknown[0]}")
        text, kind = item.get("text"), item.get("kind", "principle")
        if not isinstance(text, str) or not text.strip():
            raise DataError("must be a non-empty string", field=f"{where}.text")
        if kind not in KINDS:
            raise DataError(f"must be 'hard' or 'principle', got {kind!r}", field=f"{where}.kind")
        out.append({"text": text.strip(), "kind": kind})
    return out


def load_rubric_file(path: str) -> list[dict]:
    """A rubric file: a JSON list of items, or plain text with one item per line
    (`hard: TEXT` for a hard rule, `principle: TEXT` or just `TEXT` for a principle;
    blank lines and lines starting with `#` are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--rubric {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            head, sep, rest = line.partition(":")
            if sep and head.strip().lower() in KINDS:
                items.append({"text": rest.strip(), "kind": head.strip().lower()})
            else:
                items.append(line)
    try:
        rubric = parse_rubric(items, "rubric")
    except DataError as e:
        raise UsageError(f"--rubric {path}: {e}") from None
    if not rubric:
        raise UsageError(f"--rubric {path}: no rubric items")
    return rubric


def rubric_score(results: Sequence[dict]) -> float | None:
    """Hard rules gate (0.0 if any P(yes) < 0.5); principles average (1.0 if none)."""
    if not results:
        return None
    if any(r["kind"] == "hard" and r["p_yes"] < 0.5 for r in results):
        return 0.0
    principles = [r["p_yes"] for r in results if r["kind"] == "principle"]
    return sum(principles) / len(principles) if principles else 1.0


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the yes/no variants that are a single token (deduplicated)."""
    def ids(variants):
        found = set()
        for v in variants:
            t = tokenizer.encode(v, add_special_tokens=False)
            if len(t) == 1:
                found.add(t[0])
        return sorted(found)
    yes, no = ids(YES), ids(NO)
    if not yes or not no:
        raise UsageError("judge: the tokenizer has no single-token 'yes'/'no' answers")
    if set(yes) & set(no):
        raise UsageError("judge: 'yes' and 'no' share a token in this tokenizer")
    return yes, no


def judge_prompt(tokenizer, prompt: Any, completion: Any, item: dict) -> str:
    """The rendered judge input for one completion and one rubric item."""
    question = QUESTIONS[item["kind"]].format(text=item["text"])
    text = JUDGE_TEMPLATE.format(prompt=transcript(prompt), completion=completion_text(completion),
                                 question=question)
    return render_prompt(tokenizer, text)


def p_yes(model, tokenizer, texts: Sequence[str], yes: list[int], no: list[int], *,
          batch_size: int = 8, max_length: int = 2048) -> list[float]:
    """P(yes) of the next token after each text (left-padded batches with explicit
    position ids, so padding does not change the result; left truncation keeps the
    question)."""
    import torch
    from ..generation import forward_keep
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = [0.0] * len(texts)
    with torch.inference_mode():
        for _, idx in batches(order, batch_size):
            enc = encode(tokenizer, [texts[i] for i in idx], max_length,
                         padding_side="left", truncation_side="left").to(device)
            mask = enc["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = forward_keep(model, 1, input_ids=enc["input_ids"], attention_mask=mask,
                                  position_ids=pos)[1][:, -1].float()
            ly = torch.logsumexp(logits[:, yes], -1)
            ln = torch.logsumexp(logits[:, no], -1)
            for i, v in zip(idx, torch.sigmoid(ly - ln).tolist()):
                out[i] = float(v)
    return out


class JudgeScorer(Scorer):
    kind = "judge"
    missing_reason = "no rubric (meta.rubric or --rubric)"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        spec = need_arg(self.kind, arg, "model")
        rubric = options.get("rubric")
        if isinstance(rubric, (str, Path)):
            rubric = load_rubric_file(str(rubric))
        elif rubric is not None:
            try:
                rubric = parse_rubric(rubric, "rubric")
            except DataError as e:
                raise UsageError(f"rubric: {e}") from None
        self.default_rubric = rubric
        self.last_scored: list[dict] = []  # the last score() call (MPO reads it)

        self.model, self.tokenizer = load_model(options, spec, "causal")
        self.yes, self.no = answer_token_ids(self.tokenizer)

    def set_rubric(self, items: Any) -> None:
        """Replace the default (--rubric) rubric, validated (MPO's evolving rubric;
        records with their own meta.rubric keep it)."""
        try:
            self.default_rubric = parse_rubric(items, "rubric")
        except DataError as e:
            raise UsageError(f"rubric: {e}") from None

    def rubric_for(self, item: Item) -> list[dict] | None:
        if item.meta.get("rubric") is not None:
            try:
                return parse_rubric(item.meta["rubric"])
            except DataError as e:
                raise item.located(e) from None
        return self.default_rubric

    def score(self, items: Sequence[Item]) -> list[float | None]:
        rubrics = [self.rubric_for(it) for it in items]
        texts, owners = [], []
        for i, (it, rubric) in enumerate(zip(items, rubrics)):
            for r in rubric or ():
                texts.append(judge_prompt(self.tokenizer, it.prompt, it.completion, r))
                owners.append(i)
        probs = p_yes(self.model, self.tokenizer, texts, self.yes, self.no,
                      batch_size=self.options.get("batch_size") or 8,
                      max_length=self.options.get("max_length") or 2048)
        results: list[list[dict]] = [[] for _ in items]
        for owner, p in zip(owners, probs):
            rubric = rubrics[owner]
            r = rubric[len(results[owner])]
            results[owner].append({"text": r["text"], "kind": r["kind"], "p_yes": p})
        out: list[float | None] = []
        for it, res in zip(items, results):
            if res:
                it.extra["judge"] = res
            out.append(rubric_score(res))
        self.last_scored = [{"prompt": it.prompt, "completion": it.completion, "score": s,
                             "default_rubric": it.meta.get("rubric") is None}
                            for it, s in zip(items, out) if s is not None]
        return out
