"""What every relabel strategy shares: the registry (`STRATEGIES`), the options that are
not a strategy's own (`RelabelOptions`), and the `Strategy` base class with the pair
builder every pair strategy uses (margins, ties, `min_chosen`, the copied fields).

A strategy is a `Strategy` subclass registered with `@strategy(name, summary,
params=...)`: its entry declares its own parameters (the flags only it takes) and
reads/writes the record kinds of the class's `inputs` / `output`.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import DataError
from ..registry import Param, Registry, opt
from ..scorers.options import ScorerOptions

__all__ = ["STRATEGIES", "RelabelOptions", "Strategy", "Where", "strategy", "is_num",
           "ref_usable", "is_cut", "best_and_worst", "is_reference_field", "without_references",
           "pair_record"]

# filled by the strategy modules (imported on first use)
STRATEGIES = Registry("relabel strategy", "--strategy", modules=tuple(
    f"alignkit.relabel.{m}" for m in ("pairs", "augment", "rankings", "filters", "referee",
                                      "exec_trace", "rerank", "steps")))

Where = tuple[Optional[str], Optional[int]]  # (path, line) of a record, for errors


@dataclass(init=False)
class RelabelOptions:
    """The options every strategy shares (one flag per field with help), how the scorers
    it builds run (`scoring`, `dtype`), and the strategy's own parameters (`params`;
    given as keyword arguments too: `RelabelOptions(k=2)`).

    `score_options={"batch_size", "max_length", "device", "dtype", ...}` is the older
    spelling of `scoring`/`dtype` and is still accepted."""

    min_margin: float = opt(0.0, "Drop pairs whose score margin is smaller (ties always "
                            "dropped).")
    min_chosen: Optional[float] = opt(None, "Drop pairs whose chosen scores below SCORE (e.g. "
                                      "keep only chosen answers that pass every check).",
                                      metavar="SCORE")
    length_balance: Optional[float] = opt(None, "Drop random pairs whose chosen is longer "
                                          "(words) until they are at most SHARE of the kept "
                                          "pairs.", metavar="SHARE", low=0.0, high=1.0)
    dedupe: bool = opt(False, "Drop records whose content repeats an earlier one ((prompt, "
                       "chosen, rejected) for pairs).")
    finished_only: bool = opt(False, "Use only completions that ended on EOS (a sample cut at "
                              "--max-new-tokens, `finished: false`, is neither chosen nor "
                              "rejected), so a pair contrasts the checks, not the cut.")
    seed: int = 0
    dtype: str = "auto"
    scoring: ScorerOptions = field(default_factory=ScorerOptions)
    params: dict = field(default_factory=dict)

    _LEGACY = {"batch_size": "scorer_batch_size", "max_length": "scorer_max_length",
               "device": "scorer_device"}

    def __init__(self, **options: Any):
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if f.default is dataclasses.MISSING
                    else f.default)
        names = {f.name for f in dataclasses.fields(self)} - {"params"}
        for k, v in options.items():
            if k == "params":
                self.params.update(v or {})
            elif k == "score_options":
                self._score_options(v or {})
            elif k in names:
                setattr(self, k, v)
            else:
                self.params[k] = v

    def _score_options(self, given: dict) -> None:
        for k, v in given.items():
            if k == "dtype":
                self.dtype = v
            else:
                setattr(self.scoring, self._LEGACY.get(k, k), v)

    def build_scorer(self, spec: str):
        """The scorer of one spec, with these scorer options."""
        return self.scoring.build([spec], dtype=self.dtype)


def strategy(name: str, summary: str, *, params: tuple[Param, ...] = ()) -> Callable:
    """Class decorator: register a Strategy subclass in STRATEGIES."""
    def deco(cls):
        cls.name = name
        STRATEGIES.add(name, summary, cls, params=params, reads=" | ".join(cls.inputs),
                       writes=cls.output)
        return cls
    return deco


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ref_usable(c: dict) -> bool:
    """A completion's `logp` stands in for the trainers' reference log-prob. A sample
    cut by max_new_tokens has no eos term in its `logp`; its `finished: false` travels
    with it (`finished_chosen`/`finished_rejected`, `finished`) and the trainers then
    score it without an eos too, so the two agree either way."""
    return is_num(c.get("logp"))


def is_cut(c: dict) -> bool:
    return c.get("finished", True) is False


# --finished-only drops cut completions before a strategy sees the record; this key holds the
# kept completions' positions in the input record, so that ids name the input's completions
# (an input field of that name is dropped on reading, and the driver strips it from outputs)
KEPT = "_kept_completions"


def completion_index(rec: dict, i: int) -> int:
    """The position in the input record of completion `i` of `rec` (the same unless
    --finished-only dropped some)."""
    kept = rec.get(KEPT)
    return kept[i] if kept is not None else i


def without_kept(rec: dict) -> dict:
    """`rec` without the --finished-only bookkeeping key."""
    return {k: v for k, v in rec.items() if k != KEPT} if KEPT in rec else rec


def is_reference_field(key: str) -> bool:
    """A reference value computed for one (prompt, completion) text: `ref_logp_chosen`,
    `ref_logp_rejected`, an unpaired record's `ref_logp` (every `ref_*` key)."""
    return key.startswith("ref_")


def without_references(rec: dict) -> dict:
    """The record without its reference values (`is_reference_field`), for a record whose
    prompt or completion text was rewritten: the values were computed for the old text,
    so they are dropped and the trainer computes them. `finished_*` stays: it says
    whether a completion was cut (no eos), which the text itself still is."""
    return {k: v for k, v in rec.items() if not is_reference_field(k)}


def best_and_worst(scored: list[tuple[int, dict]]):
    """((index, completion) of the highest score, of the lowest); first index on ties."""
    best = max(scored, key=lambda ic: ic[1]["score"])
    worst = min(scored, key=lambda ic: ic[1]["score"])
    return best, worst


class Strategy:
    """A registered relabel strategy. `inputs`: accepted record kinds; `output`: the
    kind written; `buffered`: whether `finish` needs every output first; `min_scored`:
    the scored completions a samples record needs to give anything; `rewrites_text`:
    whether its outputs' prompt or completion texts differ from its input's (the driver
    then drops the reference values copied from the input, `without_references`).
    `params` are the values of the strategy's declared parameters (defaults filled,
    validated)."""

    name = ""
    inputs: tuple[str, ...] = ("samples",)
    output = "pair"
    buffered = False
    min_scored = 2
    rewrites_text = False

    def __init__(self, opts: RelabelOptions, summary: Counter, params: dict):
        self.opts = opts
        self.summary = summary
        self.params = params

    @classmethod
    def given(cls, params: dict) -> dict:
        """The given parameter values in their declared form (a strategy that also takes
        library values, e.g. a list for a comma-separated flag, converts them here)."""
        return params

    def check_options(self) -> None:
        """Checks across parameters (each value is already validated)."""

    def process(self, batch: list[tuple[dict, Where]]) -> list[dict]:
        out: list[dict] = []
        for rec, where in batch:
            out.extend(self.record(rec, where))
        return out

    def record(self, rec: dict, where: Where) -> list[dict]:  # pragma: no cover
        raise NotImplementedError

    def finish(self, outs: list[dict]) -> list[dict]:
        return outs

    def summary_note(self) -> str:
        """What the summary line adds after "wrote N records" (e.g. unpaired's labels)."""
        return ""

    # helpers for samples input
    def scored(self, rec: dict, where: Where) -> list[tuple[int, dict]]:
        comps = rec["completions"]
        scored = [(i, c) for i, c in enumerate(comps) if is_num(c.get("score"))]
        if not scored and not any("scores" in c for c in comps):
            raise DataError("missing required field (run `alignkit score` first)", *where,
                            field="completions[0].score")
        self.summary["unscored completion"] += len(comps) - len(scored)
        if len(scored) < self.min_scored:
            self.summary[f"fewer than {self.min_scored} scored completions"] += 1
            return []
        return scored

    def keep_margin(self, margin: float) -> bool:
        if margin <= 0:
            self.summary["tie"] += 1
            return False
        if margin < self.opts.min_margin:
            self.summary["below min-margin"] += 1
            return False
        return True

    def make_pair(self, rec: dict, ci: int, c: dict, ri: int, r: dict) -> dict | None:
        margin = c["score"] - r["score"]
        if not self.keep_margin(margin):
            return None
        if self.opts.min_chosen is not None and c["score"] < self.opts.min_chosen:
            self.summary["chosen below min-chosen"] += 1
            return None
        return pair_record(rec, ci, c, ri, r)

    def make_pairs(self, rec: dict, candidates) -> list[dict]:
        """Pairs of ((chosen index, completion), (rejected index, completion)) candidates
        that pass the margin rules."""
        out = []
        for (i, ci), (j, cj) in candidates:
            pair = self.make_pair(rec, i, ci, j, cj)
            if pair:
                out.append(pair)
        return out

    def best_worst(self, rec: dict, where: Where) -> list[dict]:
        """The (highest, lowest) score pair of a samples record (first index on ties)."""
        scored = self.scored(rec, where)
        if not scored:
            return []
        (bi, b), (wi, w) = best_and_worst(scored)
        pair = self.make_pair(rec, bi, b, wi, w)
        return [pair] if pair else []


def pair_record(rec: dict, ci: int, c: dict, ri: int, r: dict) -> dict:
    """The pair of completions `ci` (chosen) and `ri` (rejected) of a samples record: their
    texts, scores and margin, their reference log-probs when usable, cut flags, and the
    record's other fields."""
    pair = {"id": f"{rec['id']}-{completion_index(rec, ci)}-{completion_index(rec, ri)}",
            "prompt": rec["prompt"],
            "chosen": c["text"], "rejected": r["text"],
            "score_chosen": c["score"], "score_rejected": r["score"],
            "margin": c["score"] - r["score"]}
    if isinstance(c.get("scores"), dict) and isinstance(r.get("scores"), dict):
        pair["scores_chosen"], pair["scores_rejected"] = c["scores"], r["scores"]
    if ref_usable(c) and ref_usable(r):
        pair["ref_logp_chosen"], pair["ref_logp_rejected"] = c["logp"], r["logp"]
    if is_cut(c) or is_cut(r):
        pair["finished_chosen"], pair["finished_rejected"] = not is_cut(c), not is_cut(r)
    for k, v in rec.items():
        if k not in ("id", "prompt", "completions"):
            pair.setdefault(k, v)
    return pair
