"""Outputs other than pairs: rankings (PRO) and unpaired records (KTO).

- `rank`: a ranking record: the samples record with its scored completions sorted
  best first (stable); records with fewer than two scored completions are dropped.
- `unpaired`: one record per scored completion, `id` `{samples_id}-{index}`,
  `label = score >= threshold`; the threshold is `--threshold`, or the `--quantile` q
  of all scores (linear interpolation, numpy's default; the median when neither is
  given, which buffers the output until the end). Keeps `score`, `meta`, `ref_logp`
  from the completion's `logp`, and `finished: false` for a cut sample.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..errors import UsageError
from ..registry import Param
from .base import Strategy, completion_index, is_cut, ref_usable, strategy

MEDIAN = 0.5  # the quantile without --threshold and --quantile
THRESHOLD = Param("threshold", float, None, "Label = score >= THRESHOLD.")
QUANTILE = Param("quantile", float, None, "Threshold = this quantile of all scores (neither "
                 "this nor --threshold: the median).", low=0.0, high=1.0)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@strategy("rank", "a ranking record (PRO): the scored completions sorted best first")
class Rank(Strategy):
    output = "ranking"

    def record(self, rec, where):
        scored = self.scored(rec, where)
        if not scored:
            return []
        ranked = sorted((c for _, c in scored), key=lambda c: -c["score"])
        return [{**rec, "completions": ranked}]


@strategy("unpaired", "one KTO record per scored completion, labelled by --threshold or "
          "--quantile", params=(THRESHOLD, QUANTILE))
class Unpaired(Strategy):
    output = "unpaired"
    min_scored = 0

    def check_options(self):
        p = self.params
        if p["threshold"] is not None and p["quantile"] is not None:
            raise UsageError("give --threshold or --quantile, not both")
        self.buffered = p["threshold"] is None

    def record(self, rec, where):
        out = []
        for i, c in self.scored(rec, where):
            u = {"id": f"{rec['id']}-{completion_index(rec, i)}", "prompt": rec["prompt"],
                 "completion": c["text"],
                 "label": None, "score": c["score"]}
            if ref_usable(c):
                u["ref_logp"] = c["logp"]
            if is_cut(c):
                u["finished"] = False
            if "meta" in rec:
                u["meta"] = rec["meta"]
            if self.params["threshold"] is not None:
                self.label(u, self.params["threshold"])
            out.append(u)
        return out

    def label(self, u: dict, threshold: float) -> None:
        u["label"] = u["score"] >= threshold
        self.summary["_desirable" if u["label"] else "_undesirable"] += 1

    def summary_note(self) -> str:
        s = self.summary
        text = f" (threshold {s['_threshold']:g})" if "_threshold" in s else ""
        return text + f"; labels: {s['_desirable']} desirable, {s['_undesirable']} undesirable"

    def finish(self, outs):
        if self.buffered and outs:
            q = MEDIAN if self.params["quantile"] is None else self.params["quantile"]
            t = quantile([u["score"] for u in outs], q)
            self.summary["_threshold"] = t
            for u in outs:
                self.label(u, t)
        return outs
