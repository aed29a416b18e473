"""`filter` (pairs in): noisy-pair filtering.

`--agree SPECS`: keep the pairs that every scorer ranks strictly chosen > rejected
(scores taken from `scores_chosen` / `scores_rejected[spec]` when present, else computed
with the scorer options and stored there).

`--keep SHARE`: keep the ceil(SHARE·N) pairs with the smallest Bradley–Terry loss
−log σ(r_c − r_r), where r is the `rm:DIR` reward of `--rm DIR` (stored or computed),
or the pairs' own `score_chosen` / `score_rejected` without `--rm`; ties in loss keep
input order (this buffers the output until the end).

Both together: agreement first, then the small-loss share.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import DataError, UsageError
from ..registry import Param
from .base import Strategy, Where, is_num, strategy

AGREE = Param("agree", str, None, "Comma-separated scorer specs that must all rank chosen "
              "above rejected.", metavar="SPECS")
KEEP = Param("keep", float, None, "Keep this share of pairs with the smallest BT loss.",
             low=0.0, high=1.0, low_open=True, metavar="SHARE")
RM = Param("rm", str, None, "With --keep: reward model for the BT loss (default: the pairs' "
           "scores).", metavar="DIR")


def bt_loss(margin: float) -> float:
    """−log σ(margin), computed stably (softplus(−margin))."""
    if margin >= 0:
        return math.log1p(math.exp(-margin))
    return -margin + math.log1p(math.exp(margin))


def pair_scores(rec: dict, spec: str) -> tuple[float, float] | None:
    """(chosen, rejected) scores of `spec` stored on a pair, or None."""
    c = (rec.get("scores_chosen") or {}).get(spec)
    r = (rec.get("scores_rejected") or {}).get(spec)
    return (c, r) if is_num(c) and is_num(r) else None


@strategy("filter", "noisy-pair filtering: --agree SPECS and/or --keep SHARE "
          "[--rm DIR]", params=(AGREE, KEEP, RM))
class Filter(Strategy):
    inputs = ("pair",)

    @classmethod
    def given(cls, params: dict) -> dict:
        a = params.get("agree")
        if isinstance(a, (list, tuple)):  # the library's list of specs
            params = {**params, "agree": ",".join(a) or None}
        return params

    def check_options(self):
        p = self.params
        self.agree = [s.strip() for s in (p["agree"] or "").split(",") if s.strip()]
        if not self.agree and p["keep"] is None:
            raise UsageError("filter needs --agree SPECS and/or --keep SHARE")
        if p["rm"] is not None and p["keep"] is None:
            raise UsageError("--rm is used with --keep")
        from ..scorers import parse_spec
        for spec in self.agree:
            parse_spec(spec)
        self.buffered = p["keep"] is not None
        self.scorers: dict[str, Any] = {}

    def ensure(self, spec: str, batch: list[tuple[dict, Where]]) -> None:
        """Make sure scores_chosen/scores_rejected[spec] exist (compute the missing)."""
        need = [(rec, where) for rec, where in batch if pair_scores(rec, spec) is None]
        if not need:
            return
        if spec not in self.scorers:
            self.scorers[spec] = self.opts.build_scorer(spec)
        copies = [{k: rec[k] for k in ("id", "prompt", "chosen", "rejected", "meta") if k in rec}
                  for rec, _ in need]
        self.scorers[spec].score_records(copies, [w for _, w in need])
        for (rec, _), cp in zip(need, copies):
            for side in ("chosen", "rejected"):
                got = cp[f"scores_{side}"]
                if spec in got:
                    rec[f"scores_{side}"] = {**(rec.get(f"scores_{side}") or {}), spec: got[spec]}

    def process(self, batch):
        for spec in self.agree:
            self.ensure(spec, batch)
        kept = []
        for rec, where in batch:
            verdicts = [pair_scores(rec, spec) for spec in self.agree]
            if any(v is None for v in verdicts):
                self.summary["no score from an --agree scorer"] += 1
                continue
            if not all(c > r for c, r in verdicts):
                self.summary["scorers disagree"] += 1
                continue
            kept.append((rec, where))
        if self.params["keep"] is None:
            return [rec for rec, _ in kept]
        rm = self.params["rm"]
        if rm:
            self.ensure(f"rm:{rm}", kept)
        for rec, where in kept:
            if rm:
                rc, rr = pair_scores(rec, f"rm:{rm}")
            else:
                for side in ("score_chosen", "score_rejected"):
                    if not is_num(rec.get(side)):
                        raise DataError("missing required field (--keep without --rm uses the "
                                        "pairs' scores)", *where, field=side)
                rc, rr = rec["score_chosen"], rec["score_rejected"]
            rec["_bt_loss"] = bt_loss(rc - rr)
        return [rec for rec, _ in kept]

    def finish(self, outs):
        if not self.buffered:
            return outs
        n_keep = min(len(outs), math.ceil(self.params["keep"] * len(outs) - 1e-9))
        order = sorted(range(len(outs)), key=lambda i: (outs[i]["_bt_loss"], i))
        keep = set(order[:n_keep])
        self.summary["high BT loss (--keep)"] += len(outs) - n_keep
        result = []
        for i, rec in enumerate(outs):
            rec.pop("_bt_loss", None)
            if i in keep:
                result.append(rec)
        return result
