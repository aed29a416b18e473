"""Pair strategies: samples in, pairs out, completions compared by `score`.

- `best-worst` (default): the highest against the lowest score (first index wins ties).
- `all-pairs`: every two completions with different scores, higher one chosen.
- `top-k`: sorted best first (stable), pair i is (i-th best, i-th worst) for
  i < min(k, n // 2): k pairs, no completion on both sides.
- `sppo`: the best-worst pair, with `p_win` for chosen and rejected (the completions'
  `p_win` from the `pairwise` scorer when every scored completion has one, else SPPO's
  estimate from the scores: p_i = mean_j σ(s_i − s_j), self-term included), written as
  `"p_win": {"chosen": p_w, "rejected": p_l}` plus `p_win_chosen` / `p_win_rejected`.
"""
from __future__ import annotations

from ..registry import Param
from ..scorers.pairwise import win_probabilities
from .base import Strategy, best_and_worst, is_num, strategy

K = Param("k", int, 1, "Pairs (i-th best, i-th worst) for i < K.", low=1)


@strategy("best-worst", "the highest against the lowest score of each samples record")
class BestWorst(Strategy):
    def record(self, rec, where):
        return self.best_worst(rec, where)


@strategy("all-pairs", "every two completions with different scores, the higher chosen")
class AllPairs(Strategy):
    def record(self, rec, where):
        scored = self.scored(rec, where)
        return self.make_pairs(rec, [
            (a, b) if b[1]["score"] <= a[1]["score"] else (b, a)
            for n, a in enumerate(scored) for b in scored[n + 1:]])


@strategy("top-k", "(i-th best, i-th worst) for i < --k: k pairs, no completion on both "
          "sides", params=(K,))
class TopK(Strategy):
    def record(self, rec, where):
        ranked = sorted(self.scored(rec, where), key=lambda ic: -ic[1]["score"])
        n = min(self.params["k"], len(ranked) // 2)
        return self.make_pairs(rec, [(ranked[i], ranked[-1 - i]) for i in range(n)])


@strategy("sppo", "the best-worst pair with the win probabilities p_win of both sides")
class SPPO(Strategy):
    def record(self, rec, where):
        scored = self.scored(rec, where)
        if not scored:
            return []
        if all(is_num(c.get("p_win")) for _, c in scored):
            probs = [c["p_win"] for _, c in scored]
        else:
            probs = win_probabilities([c["score"] for _, c in scored])
        p_of = {i: p for (i, _), p in zip(scored, probs)}
        (bi, b), (wi, w) = best_and_worst(scored)
        pair = self.make_pair(rec, bi, b, wi, w)
        if not pair:
            return []
        pair["p_win"] = {"chosen": p_of[bi], "rejected": p_of[wi]}
        pair["p_win_chosen"], pair["p_win_rejected"] = p_of[bi], p_of[wi]
        return [pair]
