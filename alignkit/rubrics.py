"""Contrastive rubric generation (`alignkit gen-rubrics`): rubrics for the `judge:MODEL`
scorer, written from preference pairs and kept only when they explain the label.

OpenRubrics / Rubric-RM (arXiv 2510.07743; ALGORITHMS.md Part B §8):

1. **Contrastive generation.** The judge model reads (prompt, chosen, rejected) in
   `CONTRASTIVE_TEMPLATE` (through its chat template) and writes a numbered list of
   hard rules (explicit constraints) and principles (implicit qualities) that explain
   why the chosen answer is better. The assistant turn is pre-filled with "1." so that
   even a small model starts a list; `parse_rubric_list` turns the text into rubric
   items (`{"text", "kind"}`, the list format `judge:` reads from `meta.rubric`),
   skipping items that name "Response A/B" (not checkable on one response) and, for
   an answer cut at max_new_tokens, its last (cut) line. Nothing parsed: the try failed.
2. **Consistency filter (rejection sampling).** The same judge, conditioned on the
   candidate rubric, scores chosen and rejected with `JudgeScorer` (P(yes) per item,
   hard rules gate, principles average: `alignkit.scorers.judge`); the rubric is kept
   iff score(chosen) > score(rejected), i.e. it reproduces the label (by more than
   `min_margin`, default 0). Up to `tries`
   samples per pair, each try with its own seed (`try_seed`); the first kept one wins.
3. The record gets `meta.rubric`, `meta.rubric_tries` (tries made) and
   `meta.rubric_margin` (score(chosen) - score(rejected) under the kept rubric).

Simplifications against the paper: one model both writes and checks the rubric (the
paper fine-tunes a rubric generator and a separate pairwise judge that reads
(prompt, rubric, A, B)); the check is pointwise with alignkit's judge score, not a
pairwise verdict; no rubric fine-tuning. The prompt format is our own (the paper's is
UNVERIFIED in ALGORITHMS.md). At temperature 0 (greedy) every try would repeat the
first, so one try is made. A pair whose tries all fail keeps its other fields but no
`meta.rubric` (an input rubric is removed: the output's rubrics all passed this
filter), or is dropped with `drop_unkept`.

torch and transformers are imported inside functions only (through the sampler and the
judge scorer).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from .errors import DataError, UsageError
from .registry import opt
from .text import completion_text, transcript

CONTRASTIVE_TEMPLATE = (
    "Compare two responses to the same instruction. Response A is better than Response B."
    "\n\nInstruction:\n{prompt}\n\nResponse A (better):\n{chosen}\n\n"
    "Response B (worse):\n{rejected}\n\n"
    "Write up to {max_items} criteria that a good response to this instruction meets and "
    "that explain why A is better than B. Each criterion is one short sentence about a "
    "single response that can be answered with yes or no, for example 'The response "
    "answers in one word.' Begin explicit requirements of the instruction with "
    "'Hard rule:' and general qualities of a good answer with 'Principle:'. "
    "Answer with the numbered list only.")
PREFILL = "1."          # the assistant turn starts here: a list, even from a small model
MAX_ITEM_CHARS = 300    # longer "items" are paragraphs, not checkable criteria
TO = ("pairs", "prompts")

# ======================================================================================
# Parsing the judge's list
# ======================================================================================

_ITEM = re.compile(r"^\s*(?:\(?\d{1,2}[.):](?!\d)|\(\d{1,2}\)|[-*\u2022+](?=\s))\s*(.*?)\s*$")
_HEADER = re.compile(r"^[\s#*_]*(hard[ _-]?rules?|principles?)[\s*_]*:?[\s*_]*$", re.I)
_KIND = re.compile(r"^[*_\[(\s]*(hard[ _-]?rules?|hard|principles?|rules?)[\])*_]*"
                   r"(?:\s*[:\u2013\u2014]|\s+-\s)[*_\s]*", re.I)
_NAMES_AB = re.compile(r"\b(?i:responses?) [AB]\b|\b[AB] (?i:is|was) better\b")
_JUNK = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")  # control characters, undecodable bytes


def _kind_of(word: str) -> str:
    return "principle" if word.lower().startswith("principle") else "hard"


def _split_inline(line: str) -> list[str]:
    """`1. X 2. Y 3. Z` on one line -> three lines (only at the next numbers in order)."""
    m = re.match(r"^\s*\(?(\d{1,2})[.)]", line)
    if not m:
        return [line]
    parts, nxt, start = [], int(m.group(1)) + 1, 0
    for n in re.finditer(r"(?<=\s)\(?(\d{1,2})[.)](?=\s)", line):
        if int(n.group(1)) == nxt:
            parts.append(line[start:n.start()])
            start, nxt = n.start(), nxt + 1
    return parts + [line[start:]]


def parse_rubric_list(text: str, max_items: int = 8, truncated: bool = False) -> list[dict]:
    """Rubric items from a judge's answer: lines that start with a list marker
    (`1.`, `1)`, `(1)`, `-`, `*`, `•`; `1. X 2. Y` on one line is split). A leading
    `Hard rule:` / `Principle:` (bold or bracketed too) sets the item's kind; a heading
    line `Hard rules:` / `Principles:` sets the kind of the items under it; otherwise an
    item is a principle. Markdown emphasis, control characters and surrounding quotes
    are stripped, whitespace runs become one space. Skipped: items without two
    letters, longer than MAX_ITEM_CHARS, naming "Response A/B" (not checkable on one
    response), duplicates (case-insensitive). At most `max_items`. `truncated` (the
    answer was cut at max_new_tokens): the last item is dropped as likely cut. Text
    that is not a list gives []."""
    items, seen, section = [], set(), "principle"
    lines = [part for line in text.splitlines() for part in _split_inline(line)]
    if truncated and lines:
        lines = lines[:-1]
    for line in lines:
        if _HEADER.match(line):
            section = _kind_of(_HEADER.match(line).group(1))
            continue
        m = _ITEM.match(line)
        if not m:
            continue
        body, kind = m.group(1), section
        k = _KIND.match(body)
        if k:
            kind, body = _kind_of(k.group(1)), body[k.end():]
        body = _JUNK.sub("", body.replace("**", "").replace("__", ""))
        body = " ".join(body.split()).strip("\"'`").strip()
        key = body.lower()
        if (len(re.findall(r"[^\W\d_]", body)) < 2 or len(body) > MAX_ITEM_CHARS
                or key in seen or _NAMES_AB.search(body)):
            continue
        seen.add(key)
        items.append({"text": body, "kind": kind})
        if len(items) >= max_items:
            break
    return items


def contrastive_prompt(record: dict, max_items: int = 8) -> str:
    """The instruction the judge model answers with a rubric (before its chat template)."""
    return CONTRASTIVE_TEMPLATE.format(prompt=transcript(record["prompt"]),
                                       chosen=completion_text(record["chosen"]),
                                       rejected=completion_text(record["rejected"]),
                                       max_items=max_items)


def try_seed(seed: int, t: int) -> int:
    """The sampler seed of try t (0-based): a hash of (seed, t), so tries differ and
    --seed S try 1 is not --seed S+1 try 0."""
    digest = hashlib.sha256(f"{seed}\x00gen-rubrics\x00{t}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# ======================================================================================
# The consistency filter (rejection sampling)
# ======================================================================================

# propose(records, seed) -> one judge answer per record: its text, or (text, finished)
Propose = Callable[[Sequence[dict], int], list]
# judge(triples of (prompt, completion, rubric)) -> one score (or None) per triple
Judge = Callable[[Sequence[tuple]], list]


@dataclass
class Outcome:
    """What the filter found for one pair."""
    rubric: Optional[list] = None
    tries: int = 0
    margin: Optional[float] = None
    scores: tuple = ()        # (score chosen, score rejected) under the kept rubric


def consistency_filter(records: Sequence[dict], propose: Propose, judge: Judge, *,
                       tries: int = 3, seed: int = 0, max_items: int = 8,
                       min_margin: float = 0.0) -> list[Outcome]:
    """Up to `tries` rubric samples per pair; keep the first whose judge score of chosen
    exceeds that of rejected by more than `min_margin` (0: strictly greater). Try t
    samples every still-open pair with `try_seed(seed, t)`; a try whose text parses to
    no item fails without a judge call (an answer cut at max_new_tokens loses its last,
    likely cut, item)."""
    if tries < 1:
        raise UsageError(f"--tries must be >= 1, got {tries}")
    out = [Outcome() for _ in records]
    open_ = list(range(len(records)))
    for t in range(tries):
        if not open_:
            break
        texts = propose([records[i] for i in open_], try_seed(seed, t))
        cands = []
        for i, answer in zip(open_, texts):
            out[i].tries = t + 1
            text, finished = (answer, True) if isinstance(answer, str) else answer
            rubric = parse_rubric_list(text or "", max_items, truncated=not finished)
            if rubric:
                cands.append((i, rubric))
        triples = []
        for i, rubric in cands:
            rec = records[i]
            triples += [(rec["prompt"], rec["chosen"], rubric),
                        (rec["prompt"], rec["rejected"], rubric)]
        scores = judge(triples) if triples else []
        for k, (i, rubric) in enumerate(cands):
            sc, sr = scores[2 * k], scores[2 * k + 1]
            if sc is not None and sr is not None and sc - sr > min_margin:
                out[i] = Outcome(rubric, t + 1, float(sc) - float(sr), (float(sc), float(sr)))
        open_ = [i for i in open_ if out[i].rubric is None]
    return out


def apply_outcome(record: dict, oc: Outcome, to: str = "pairs") -> dict:
    """The output record: the pair (or its prompt record) with the rubric fields in meta."""
    meta = {k: v for k, v in (record.get("meta") or {}).items()
            if k not in ("rubric", "rubric_tries", "rubric_margin")}
    if oc.rubric is not None:
        meta.update(rubric=oc.rubric, rubric_margin=oc.margin)
    meta["rubric_tries"] = oc.tries
    if to == "prompts":
        return {"id": record["id"], "prompt": record["prompt"], "meta": meta}
    return {**record, "meta": meta}


# ======================================================================================
# The model side: sampling rubrics and judging with them
# ======================================================================================


@dataclass
class RubricGenOptions:
    """How `gen-rubrics` samples and filters (one flag per field)."""

    tries: int = opt(3, "Rubric samples per pair at most (rejection sampling: the first "
                     "that makes the judge score chosen above rejected is kept).", low=1)
    temperature: float = opt(0.7, "Sampling temperature of the rubric writer (0: greedy, "
                             "then one try is made).", low=0)
    top_p: float = opt(1.0, "Nucleus sampling mass (1: off).", low=0, low_open=True, high=1)
    max_new_tokens: int = opt(256, "Tokens per rubric answer, at most.", low=1)
    min_margin: float = opt(0.0, "Keep a rubric only if score(chosen) - score(rejected) "
                            "exceeds this (0: chosen strictly above rejected).", low=0)
    max_items: int = opt(8, "Rubric items kept per answer, at most.", low=1)
    gen_batch_size: int = opt(8, "Pairs whose rubric answers are decoded at once.", low=1)
    judge_batch_size: int = opt(8, "Judge questions per forward pass (the filter).", low=1)
    judge_max_length: int = opt(2048, "Max tokens of a judge question (left-truncated).", low=1)
    to: str = opt("pairs", "Write the pairs with meta.rubric, or prompt records {id, prompt, "
                  "meta.rubric} (for `score -s judge:MODEL` on samples of them).", choices=TO)
    drop_unkept: bool = opt(False, "Drop pairs whose tries all failed (default: write them "
                            "without meta.rubric; the count goes to stderr).")
    device: Optional[str] = opt(None, "Device of the judge model (default: cuda if "
                                "available).", metavar="DEVICE")


class RubricGenerator:
    """One judge model that writes rubrics (the sampler) and checks them (JudgeScorer)."""

    def __init__(self, judge: str, opts: RubricGenOptions, *, seed: int = 0,
                 dtype: str = "auto", allow_pickle: bool = False,
                 trust_remote_code: bool = False):
        from .scorers.judge import JudgeScorer
        if opts.to not in TO:
            raise UsageError(f"--to must be one of {' | '.join(TO)}, got {opts.to!r}")
        self.opts, self.seed, self.spec = opts, seed, judge
        options = dict(rubric=None, batch_size=opts.judge_batch_size,
                       max_length=opts.judge_max_length, device=opts.device, dtype=dtype,
                       allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        self.scorer = JudgeScorer(f"judge:{judge}", judge, options)
        self.model, self.tokenizer = self.scorer.model, self.scorer.tokenizer
        self.tries = 1 if opts.temperature == 0 else opts.tries
        self.counts = {"read": 0, "kept": 0, "unkept": 0, "written": 0}
        self._ids: set = set()

    def propose(self, records: Sequence[dict], seed: int) -> list[str]:
        """One sampled rubric answer per record, (text with PREFILL, finished), seeded by
        `seed` and the record's id."""
        from .generation import SampleParams, sample
        from .text import render_prompt
        o = self.opts
        params = SampleParams(n=1, temperature=o.temperature, top_p=o.top_p,
                              max_new_tokens=o.max_new_tokens, seed=seed,
                              batch_size=o.gen_batch_size)
        rendered = [render_prompt(self.tokenizer, contrastive_prompt(r, o.max_items)) + PREFILL
                    for r in records]
        rows = sample(self.model, self.tokenizer, rendered, params, raw=True,
                      keys=[str(r["id"]) for r in records], progress_desc="rubrics")
        return [(PREFILL + row[0]["text"], row[0]["finished"]) for row in rows]

    def judge(self, triples: Sequence[tuple]) -> list:
        """The judge score of each (prompt, completion, rubric) (JudgeScorer.score)."""
        from .scorers.base import Item
        return self.scorer.score([Item(p, c, {"rubric": r}) for p, c, r in triples])

    def run(self, located: Iterable[tuple[dict, tuple]], chunk: int = 16) -> Iterable[dict]:
        """Output records for (pair, (path, line)) inputs, chunk by chunk."""
        batch: list = []
        for rec, where in located:
            self.counts["read"] += 1
            if self.opts.to == "prompts":
                if rec["id"] in self._ids:
                    raise DataError(f"duplicate id {rec['id']!r}: --to prompts writes one "
                                    "prompt record per id", field="id").at(*where)
                self._ids.add(rec["id"])
            batch.append(rec)
            if len(batch) >= chunk:
                yield from self._chunk(batch)
                batch = []
        if batch:
            yield from self._chunk(batch)

    def _chunk(self, records: list[dict]) -> list[dict]:
        outcomes = consistency_filter(records, self.propose, self.judge, tries=self.tries,
                                      seed=self.seed, max_items=self.opts.max_items,
                                      min_margin=self.opts.min_margin)
        out = []
        for rec, oc in zip(records, outcomes):
            self.counts["kept" if oc.rubric is not None else "unkept"] += 1
            if oc.rubric is None and self.opts.drop_unkept:
                continue
            out.append(apply_outcome(rec, oc, self.opts.to))
        self.counts["written"] += len(out)
        return out

    def summary_text(self) -> str:
        c = self.counts
        return (f"gen-rubrics: {c['kept']} of {c['read']} pairs got a rubric that reproduces "
                f"their label (up to {self.tries} tries); {c['unkept']} without "
                f"({'dropped' if self.opts.drop_unkept else 'written without meta.rubric'})")
