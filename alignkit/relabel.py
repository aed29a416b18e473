"""Relabel strategies: scored samples (or pairs) -> training records.

One registered unit per strategy (`STRATEGIES`, name -> class). Every strategy reads
records one batch at a time; the ones that need the whole input (`unpaired
--quantile`, `filter --keep`, and `--length-balance` on any pair output) buffer their
*output* records until the end.

Scores come from `alignkit score`: a completion's `score` (the combined score). A
completion without `score` is skipped (counted as "unscored completion"); a samples
record none of whose completions was ever scored (no `score` and no `scores` key) is a
DataError: run `alignkit score` first.

Pair strategies (samples in, pairs out; completions compared by `score`):

- `best-worst` (default): the highest against the lowest score (first index wins ties).
- `all-pairs`: every two completions with different scores, higher one chosen.
- `top-k`: sorted best first (stable), pair i is (i-th best, i-th worst) for
  i < min(k, n // 2): k pairs, no completion on both sides.
- `sppo`: the best-worst pair, with `p_win` for chosen and rejected (the completions'
  `p_win` from the `pairwise` scorer when every scored completion has one, else SPPO's
  estimate from the scores: p_i = mean_j σ(s_i − s_j), self-term included), written as
  `"p_win": {"chosen": p_w, "rejected": p_l}` plus `p_win_chosen` / `p_win_rejected`.
- `reward-augmented` (ALGORITHMS.md Part A §7): samples (paired best-worst first) or
  scored pairs in; each pair becomes two: (a) `-a`, goal g = score of chosen, chosen ≻
  rejected; (b) `-b`, goal g = score of rejected, **swapped** (old rejected is chosen).
  The goal sentence (`GOAL_TEMPLATE`) goes into a system message (prepended, with a
  blank line, to an existing first system message), or with `no_system` in front of
  the first user turn followed by a blank line (a string prompt stays a string). With
  `scale=(MIN, MAX)` a score s maps to g = 1 + 9·(s − MIN)/(MAX − MIN), clamped to
  [1, 10]; g is rounded to 2 decimals and printed without decimals when whole. The
  records carry `goal` and no `margin` (the swapped pair would have a negative one).

A pair has `id` = `{samples_id}-{chosen_index}-{rejected_index}` (reward-augmented adds
`-a` / `-b`), `prompt`, `chosen`, `rejected`, `score_chosen`, `score_rejected`, `margin`,
`scores_chosen` / `scores_rejected` (the per-scorer dicts, when present),
`ref_logp_chosen` / `ref_logp_rejected` (the completions' `logp`, when both have one),
`finished_chosen` / `finished_rejected` (written when either sample was cut by
max_new_tokens: the trainers then add no eos to the cut side, so that it matches its
`logp` and does not teach the policy to stop mid-sentence), `meta`, and the samples
record's other keys (e.g. `gen`). Ties (margin 0) are always dropped; `min_margin`
drops pairs with a smaller margin; `min_chosen` drops pairs whose chosen scores below
it (only pairs whose chosen reaches a quality bar, e.g. passes every rules check).

Other outputs:

- `rank`: a ranking record (PRO): the samples record with its scored completions sorted
  best first (stable); records with fewer than two scored completions are dropped.
- `unpaired` (KTO): one record per scored completion, `id` `{samples_id}-{index}`,
  `label = score >= threshold`; the threshold is `threshold`, or the `quantile` q of all
  scores (linear interpolation, numpy's default; q = 0.5 when neither is given). Keeps
  `score`, `meta`, `ref_logp` from the completion's `logp`, and `finished: false` for a
  cut sample.
- `filter` (pairs in): noisy-pair filtering. `agree=[spec, ...]`: keep the pairs that
  every scorer ranks strictly chosen > rejected (scores taken from `scores_chosen` /
  `scores_rejected[spec]` when present, else computed and stored there).
  `keep=share`: keep the ceil(share·N) pairs with the smallest Bradley–Terry loss
  −log σ(r_c − r_r), where r is the `rm:DIR` reward of `rm=DIR` (stored or computed),
  or the pairs' own `score_chosen` / `score_rejected` without `rm`; ties in loss keep
  input order. Both together: agreement first, then the small-loss share.

Post-processing: `dedupe` drops a record whose content repeats an earlier one
((prompt, chosen, rejected) for pairs; (prompt, completion, label) for unpaired;
(prompt, completion texts) for rankings). `length_balance=SHARE` (pair outputs): let
N be the kept pairs and L those whose chosen has more words than rejected
(alignkit.checks word count); the smallest number d of L-pairs is dropped such that
(|L| − d) ≤ SHARE·(N − d), the d pairs drawn uniformly from L with `random.Random(seed)`;
output order is kept.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from .checks import as_text, count_words
from .errors import DataError, UsageError
from .records import validate
from .scorers.pairwise import win_probabilities

GOAL_TEMPLATE = ("You are an assistant that generates responses for the instruction while "
                 "implicitly achieving the following target scores (on a scale of 1-10, where "
                 "1 is lowest and 10 is highest):\nOverall score: {g}.")

Where = tuple[str | None, int | None]


@dataclass
class RelabelOptions:
    k: int = 1
    min_margin: float = 0.0
    min_chosen: float | None = None
    length_balance: float | None = None
    seed: int = 0
    no_system: bool = False
    scale: tuple[float, float] | None = None
    threshold: float | None = None
    quantile: float | None = None
    agree: list[str] = field(default_factory=list)
    keep: float | None = None
    rm: str | None = None
    dedupe: bool = False
    score_options: dict = field(default_factory=dict)  # batch_size, max_length, dtype, ...


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ref_usable(c: dict) -> bool:
    """A completion's `logp` stands in for the trainers' reference log-prob. A sample
    cut by max_new_tokens has no eos term in its `logp`; its `finished: false` travels
    with it (`finished_chosen`/`finished_rejected`, `finished`) and the trainers then
    score it without an eos too, so the two agree either way."""
    return _is_num(c.get("logp"))


def _cut(c: dict) -> bool:
    return c.get("finished", True) is False


def format_goal(g: float) -> str:
    """Whole numbers without decimals (7, not 7.0); others as rounded (7.25)."""
    return str(int(g)) if float(g).is_integer() else f"{g:g}"


def goal_score(s: float, scale: tuple[float, float] | None) -> float | int:
    g = s if scale is None else 1 + 9 * (s - scale[0]) / (scale[1] - scale[0])
    if scale is not None:
        g = min(10.0, max(1.0, g))
    g = round(g, 2)
    return int(g) if float(g).is_integer() else g


def with_goal(prompt: Any, g: float, no_system: bool) -> Any:
    """The prompt with the reward-augmentation goal sentence (see the module docstring)."""
    text = GOAL_TEMPLATE.format(g=format_goal(g))
    if no_system:
        if isinstance(prompt, str):
            return f"{text}\n\n{prompt}"
        msgs = [dict(m) for m in prompt]
        for m in msgs:
            if m["role"] == "user":
                m["content"] = f"{text}\n\n{m['content']}"
                return msgs
        return [{"role": "user", "content": text}] + msgs
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        [dict(m) for m in prompt]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{text}\n\n{msgs[0]['content']}"
        return msgs
    return [{"role": "system", "content": text}] + msgs


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def length_balance(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """Drop randomly chosen pairs whose chosen is longer (in words) until such pairs are
    at most `share` of the kept ones; returns (kept pairs in order, number dropped)."""
    longer = [i for i, p in enumerate(pairs)
              if count_words(as_text(p["chosen"])) > count_words(as_text(p["rejected"]))]
    n, d = len(pairs), 0
    while len(longer) - d > share * (n - d) + 1e-12:
        d += 1
    drop = set(random.Random(seed).sample(longer, d))
    return [p for i, p in enumerate(pairs) if i not in drop], d


def content_key(rec: dict) -> str:
    if "chosen" in rec:
        parts = [rec["prompt"], rec["chosen"], rec["rejected"]]
    elif "completion" in rec:
        parts = [rec["prompt"], rec["completion"], rec.get("label")]
    else:
        parts = [rec["prompt"], [c["text"] for c in rec["completions"]]]
    canon = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --- strategies ------------------------------------------------------------------------

class Strategy:
    """A registered relabel strategy. `inputs`: accepted record kinds; `output`: the
    kind written; `buffered`: whether `finish` needs every output first."""

    name = ""
    inputs: tuple[str, ...] = ("samples",)
    output = "pair"
    buffered = False

    def __init__(self, opts: RelabelOptions, summary: Counter):
        self.opts = opts
        self.summary = summary

    def check_options(self) -> None:
        pass

    def process(self, batch: list[tuple[dict, Where]]) -> list[dict]:
        out: list[dict] = []
        for rec, where in batch:
            out.extend(self.record(rec, where))
        return out

    def record(self, rec: dict, where: Where) -> list[dict]:  # pragma: no cover
        raise NotImplementedError

    def finish(self, outs: list[dict]) -> list[dict]:
        return outs

    # helpers for samples input
    def scored(self, rec: dict, where: Where) -> list[tuple[int, dict]]:
        comps = rec["completions"]
        scored = [(i, c) for i, c in enumerate(comps) if _is_num(c.get("score"))]
        if not scored and not any("scores" in c for c in comps):
            raise DataError("missing required field (run `alignkit score` first)", *where,
                            field="completions[0].score")
        self.summary["unscored completion"] += len(comps) - len(scored)
        if len(scored) < 2 and self.output != "unpaired":
            self.summary["fewer than 2 scored completions"] += 1
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
        pair = {"id": f"{rec['id']}-{ci}-{ri}", "prompt": rec["prompt"],
                "chosen": c["text"], "rejected": r["text"],
                "score_chosen": c["score"], "score_rejected": r["score"], "margin": margin}
        if isinstance(c.get("scores"), dict) and isinstance(r.get("scores"), dict):
            pair["scores_chosen"], pair["scores_rejected"] = c["scores"], r["scores"]
        if _ref_usable(c) and _ref_usable(r):
            pair["ref_logp_chosen"], pair["ref_logp_rejected"] = c["logp"], r["logp"]
        if _cut(c) or _cut(r):
            pair["finished_chosen"], pair["finished_rejected"] = not _cut(c), not _cut(r)
        for k, v in rec.items():
            if k not in ("id", "prompt", "completions"):
                pair.setdefault(k, v)
        return pair


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
        (bi, b), (wi, w) = _best_worst(scored)
        pair = self.make_pair(rec, bi, b, wi, w)
        return [pair] if pair else []


def _best_worst(scored: list[tuple[int, dict]]):
    best = max(scored, key=lambda ic: ic[1]["score"])
    worst = min(scored, key=lambda ic: ic[1]["score"])
    return best, worst


def bt_loss(margin: float) -> float:
    """−log σ(margin), computed stably (softplus(−margin))."""
    if margin >= 0:
        return math.log1p(math.exp(-margin))
    return -margin + math.log1p(math.exp(margin))


class BestWorst(Strategy):
    name = "best-worst"

    def record(self, rec, where):
        return self.best_worst(rec, where)


class AllPairs(Strategy):
    name = "all-pairs"

    def record(self, rec, where):
        scored = self.scored(rec, where)
        return self.make_pairs(rec, [
            (a, b) if b[1]["score"] <= a[1]["score"] else (b, a)
            for n, a in enumerate(scored) for b in scored[n + 1:]])


class TopK(Strategy):
    name = "top-k"

    def check_options(self):
        if self.opts.k < 1:
            raise UsageError("--k must be >= 1")

    def record(self, rec, where):
        ranked = sorted(self.scored(rec, where), key=lambda ic: -ic[1]["score"])
        n = min(self.opts.k, len(ranked) // 2)
        return self.make_pairs(rec, [(ranked[i], ranked[-1 - i]) for i in range(n)])


class SPPO(Strategy):
    name = "sppo"

    def record(self, rec, where):
        scored = self.scored(rec, where)
        if not scored:
            return []
        if all(_is_num(c.get("p_win")) for _, c in scored):
            probs = [c["p_win"] for _, c in scored]
        else:
            probs = win_probabilities([c["score"] for _, c in scored])
        p_of = {i: p for (i, _), p in zip(scored, probs)}
        (bi, b), (wi, w) = _best_worst(scored)
        pair = self.make_pair(rec, bi, b, wi, w)
        if not pair:
            return []
        pair["p_win"] = {"chosen": p_of[bi], "rejected": p_of[wi]}
        pair["p_win_chosen"], pair["p_win_rejected"] = p_of[bi], p_of[wi]
        return [pair]


def _swap(pair: dict) -> dict:
    out = {}
    for k, v in pair.items():
        if k in ("chosen", "rejected"):
            k = "rejected" if k == "chosen" else "chosen"
        elif k.endswith("_chosen"):
            k = k[:-len("_chosen")] + "_rejected"
        elif k.endswith("_rejected"):
            k = k[:-len("_rejected")] + "_chosen"
        elif k == "p_win" and isinstance(v, dict):
            v = {"chosen": v.get("rejected"), "rejected": v.get("chosen")}
        out[k] = v
    order = ["id", "prompt", "chosen", "rejected"]
    return {**{k: out[k] for k in order}, **{k: v for k, v in out.items() if k not in order}}


class RewardAugmented(Strategy):
    name = "reward-augmented"
    inputs = ("samples", "pair")

    def check_options(self):
        s = self.opts.scale
        if s is not None and not s[0] < s[1]:
            raise UsageError("--scale MIN:MAX needs MIN < MAX")

    def record(self, rec, where):
        if "completions" in rec:
            pairs = self.best_worst(rec, where)
        else:
            for side in ("score_chosen", "score_rejected"):
                if not _is_num(rec.get(side)):
                    raise DataError("missing required field (reward-augmented needs scored "
                                    "pairs)", *where, field=side)
            pairs = [rec] if self.keep_margin(rec["score_chosen"] - rec["score_rejected"]) else []
        out = []
        for pair in pairs:
            base = {k: v for k, v in pair.items() if k != "margin"}
            for suffix, p in (("a", base), ("b", _swap(base))):
                g = goal_score(p["score_chosen"], self.opts.scale)
                out.append({**p, "id": f"{pair['id']}-{suffix}",
                            "prompt": with_goal(pair["prompt"], g, self.opts.no_system),
                            "goal": g})
        return out


class Rank(Strategy):
    name = "rank"
    output = "ranking"

    def record(self, rec, where):
        scored = self.scored(rec, where)
        if not scored:
            return []
        ranked = sorted((c for _, c in scored), key=lambda c: -c["score"])
        return [{**rec, "completions": ranked}]


class Unpaired(Strategy):
    name = "unpaired"
    output = "unpaired"

    def __init__(self, opts, summary):
        super().__init__(opts, summary)
        self.buffered = opts.threshold is None

    def check_options(self):
        o = self.opts
        if o.threshold is not None and o.quantile is not None:
            raise UsageError("give --threshold or --quantile, not both")
        if o.quantile is not None and not 0 <= o.quantile <= 1:
            raise UsageError("--quantile must be in [0, 1]")
        if o.threshold is not None and not math.isfinite(o.threshold):
            raise UsageError("--threshold must be finite")

    def record(self, rec, where):
        out = []
        for i, c in self.scored(rec, where):
            u = {"id": f"{rec['id']}-{i}", "prompt": rec["prompt"], "completion": c["text"],
                 "label": None, "score": c["score"]}
            if _ref_usable(c):
                u["ref_logp"] = c["logp"]
            if _cut(c):
                u["finished"] = False
            if "meta" in rec:
                u["meta"] = rec["meta"]
            if self.opts.threshold is not None:
                self.label(u, self.opts.threshold)
            out.append(u)
        return out

    def label(self, u: dict, threshold: float) -> None:
        u["label"] = u["score"] >= threshold
        self.summary["_desirable" if u["label"] else "_undesirable"] += 1

    def finish(self, outs):
        if self.buffered and outs:
            q = 0.5 if self.opts.quantile is None else self.opts.quantile
            t = quantile([u["score"] for u in outs], q)
            self.summary["_threshold"] = t
            for u in outs:
                self.label(u, t)
        return outs


class Filter(Strategy):
    name = "filter"
    inputs = ("pair",)

    def __init__(self, opts, summary):
        super().__init__(opts, summary)
        self.buffered = opts.keep is not None
        self._scorers: dict[str, Any] = {}

    def check_options(self):
        o = self.opts
        if not o.agree and o.keep is None:
            raise UsageError("filter needs --agree SPECS and/or --keep SHARE")
        if o.keep is not None and not 0 < o.keep <= 1:
            raise UsageError("--keep must be in (0, 1]")
        if o.rm is not None and o.keep is None:
            raise UsageError("--rm is used with --keep")
        from .scorers import parse_spec
        for spec in o.agree:
            parse_spec(spec)

    def _ensure(self, spec: str, batch: list[tuple[dict, Where]]) -> None:
        """Make sure scores_chosen/scores_rejected[spec] exist (compute the missing)."""
        need = [(rec, where) for rec, where in batch
                if not (_is_num((rec.get("scores_chosen") or {}).get(spec))
                        and _is_num((rec.get("scores_rejected") or {}).get(spec)))]
        if not need:
            return
        if spec not in self._scorers:
            from .scorers import build_scorer
            self._scorers[spec] = build_scorer([spec], **self.opts.score_options)
        copies = [{k: rec[k] for k in ("id", "prompt", "chosen", "rejected", "meta") if k in rec}
                  for rec, _ in need]
        self._scorers[spec].score_records(copies, [w for _, w in need])
        for (rec, _), cp in zip(need, copies):
            for side in ("chosen", "rejected"):
                got = cp[f"scores_{side}"]
                if spec in got:
                    rec[f"scores_{side}"] = {**(rec.get(f"scores_{side}") or {}), spec: got[spec]}

    @staticmethod
    def _pair_scores(rec: dict, spec: str) -> tuple[float, float] | None:
        c = (rec.get("scores_chosen") or {}).get(spec)
        r = (rec.get("scores_rejected") or {}).get(spec)
        return (c, r) if _is_num(c) and _is_num(r) else None

    def process(self, batch):
        for spec in self.opts.agree:
            self._ensure(spec, batch)
        kept = []
        for rec, where in batch:
            verdicts = [self._pair_scores(rec, spec) for spec in self.opts.agree]
            if any(v is None for v in verdicts):
                self.summary["no score from an --agree scorer"] += 1
                continue
            if not all(c > r for c, r in verdicts):
                self.summary["scorers disagree"] += 1
                continue
            kept.append((rec, where))
        if self.opts.keep is None:
            return [rec for rec, _ in kept]
        if self.opts.rm:
            spec = f"rm:{self.opts.rm}"
            self._ensure(spec, kept)
        for rec, where in kept:
            if self.opts.rm:
                rc, rr = self._pair_scores(rec, f"rm:{self.opts.rm}")
            else:
                for side in ("score_chosen", "score_rejected"):
                    if not _is_num(rec.get(side)):
                        raise DataError("missing required field (--keep without --rm uses the "
                                        "pairs' scores)", *where, field=side)
                rc, rr = rec["score_chosen"], rec["score_rejected"]
            rec["_bt_loss"] = bt_loss(rc - rr)
        return [rec for rec, _ in kept]

    def finish(self, outs):
        if not self.buffered:
            return outs
        n_keep = min(len(outs), math.ceil(self.opts.keep * len(outs) - 1e-9))
        order = sorted(range(len(outs)), key=lambda i: (outs[i]["_bt_loss"], i))
        keep = set(order[:n_keep])
        self.summary["high BT loss (--keep)"] += len(outs) - n_keep
        result = []
        for i, rec in enumerate(outs):
            rec.pop("_bt_loss", None)
            if i in keep:
                result.append(rec)
        return result


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (
    BestWorst, AllPairs, TopK, RewardAugmented, Rank, Unpaired, SPPO, Filter)}


# --- driver -----------------------------------------------------------------------------

class Relabeler:
    """Run one strategy over records; `summary` counts what was kept and dropped."""

    def __init__(self, strategy: str = "best-worst", options: RelabelOptions | None = None,
                 batch_records: int = 64):
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.opts = options or RelabelOptions()
        self.summary: Counter = Counter()
        self.strategy = STRATEGIES[strategy](self.opts, self.summary)
        self.batch_records = batch_records
        o = self.opts
        if o.length_balance is not None:
            if self.strategy.output != "pair":
                raise UsageError(f"--length-balance applies to pair outputs, not {strategy}")
            if not 0 <= o.length_balance <= 1:
                raise UsageError("--length-balance must be in [0, 1]")
        if not math.isfinite(o.min_margin):
            raise UsageError("--min-margin must be finite")
        if o.min_chosen is not None:
            if not math.isfinite(o.min_chosen):
                raise UsageError("--min-chosen must be finite")
            if self.strategy.output != "pair":
                raise UsageError(f"--min-chosen applies to pair outputs, not {strategy}")
        self.strategy.check_options()

    def _validated(self, rec: Any, where: Where) -> dict:
        inputs = self.strategy.inputs
        kind = "pair" if isinstance(rec, dict) and ("chosen" in rec or "rejected" in rec) \
            else "samples"
        if kind not in inputs:
            raise DataError(f"strategy {self.strategy.name!r} reads "
                            f"{' or '.join(inputs)} records, got a {kind} record", *where)
        try:
            return validate(rec, kind)
        except DataError as e:
            raise e.at(*where) from None

    def run(self, records: Iterable[dict | tuple[dict, Where]]) -> Iterator[dict]:
        """Yield output records. Items are records or (record, (path, line)) tuples."""
        buffered = self.strategy.buffered or self.opts.length_balance is not None
        seen: set[str] = set()
        held: list[dict] = []
        batch: list[tuple[dict, Where]] = []

        def flush():
            outs = self.strategy.process(batch)
            batch.clear()
            for out in outs:
                if self.opts.dedupe:
                    key = content_key(out)
                    if key in seen:
                        self.summary["duplicate"] += 1
                        continue
                    seen.add(key)
                if buffered:
                    held.append(out)
                else:
                    self.summary["_written"] += 1
                    yield out

        for item in records:
            rec, where = item if isinstance(item, tuple) else (item, (None, None))
            batch.append((self._validated(rec, where), where))
            self.summary["_read"] += 1
            if len(batch) >= self.batch_records:
                yield from flush()
        if batch:
            yield from flush()
        if buffered:
            outs = self.strategy.finish(held)
            if self.opts.length_balance is not None:
                outs, d = length_balance(outs, self.opts.length_balance, self.opts.seed)
                self.summary["length-balance"] += d
            self.summary["_written"] += len(outs)
            yield from outs

    def summary_text(self) -> str:
        s = self.summary
        kind = {"pair": "pairs", "ranking": "rankings", "unpaired": "unpaired records"}
        text = (f"relabel {self.strategy.name}: read {s['_read']} records, wrote "
                f"{s['_written']} {kind[self.strategy.output]}")
        if "_threshold" in s:
            text += f" (threshold {s['_threshold']:g})"
        if self.strategy.output == "unpaired":
            text += f"; labels: {s['_desirable']} desirable, {s['_undesirable']} undesirable"
        dropped = [f"{k} {v}" for k, v in sorted(s.items()) if not k.startswith("_") and v]
        text += "; dropped: " + (", ".join(dropped) if dropped else "nothing")
        return text


def relabel(records: Iterable[dict], strategy: str = "best-worst", **options) -> list[dict]:
    """Convenience: run a strategy over in-memory records; options as RelabelOptions."""
    return list(Relabeler(strategy, RelabelOptions(**options)).run(records))
