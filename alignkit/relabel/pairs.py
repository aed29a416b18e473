"""Pair strategies: samples in, pairs out, completions compared by `score`.

- `best-worst` (default): the highest against the lowest score (first index wins ties).
- `all-pairs`: every two completions with different scores, higher one chosen.
- `top-k`: sorted best first (stable), pair i is (i-th best, i-th worst) for
  i < min(k, n // 2): k pairs, no completion on both sides.
- `sppo`: the best-worst pair, with `p_win` for chosen and rejected (the completions'
  `p_win` from the `pairwise` scorer when every scored completion has one, else SPPO's
  estimate from the scores: p_i = mean_j σ(s_i − s_j), self-term included), written as
  `"p_win": {"chosen": p_w, "rejected": p_l}` plus `p_win_chosen` / `p_win_rejected`.
- `near-miss`: the best completion against the lower-scored one nearest to it, so the
  pair contrasts one constraint rather than everything at once. With per-check results
  (the `rules` scorer's `checks` list) the rejected must fail a check the chosen passes;
  among those it has the fewest check outcomes that differ from the chosen's, then the
  length (words) closest to the chosen's, then the higher score, then the first index.
  Without check results on both sides: the lower score closest to the best's. alignkit's
  own strategy (no paper): the "rejected fails exactly the constraint the chosen passes"
  pairs of instruction-following preference work, built from the samples at hand.
"""
from __future__ import annotations

from ..registry import Param
from ..scorers.pairwise import win_probabilities
from .base import Strategy, best_and_worst, is_num, strategy

K = Param("k", int, 1, "Pairs (i-th best, i-th worst) for i < K.", low=1)


def check_outcomes(c: dict) -> dict[int, bool] | None:
    """{check index: passed} from a completion's `checks` list (the rules scorer's), or
    None when it has none."""
    checks = c.get("checks")
    if not isinstance(checks, list) or not checks:
        return None
    return {i: bool(ch.get("passed")) for i, ch in enumerate(checks) if isinstance(ch, dict)}


def near_miss(best: dict, lower: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    """The rejected of a near-miss pair for `best` among the `lower`-scored completions
    (see the module docstring), or None when none fails a check the best passes."""
    mine = check_outcomes(best)
    words = len(best["text"].split())

    def closeness(ic):
        return (abs(len(ic[1]["text"].split()) - words), -ic[1]["score"], ic[0])

    if mine is None or any(check_outcomes(c) is None for _, c in lower):
        return min(lower, key=lambda ic: (best["score"] - ic[1]["score"], *closeness(ic)))
    ranked = []
    for ic in lower:
        theirs = check_outcomes(ic[1])
        if not any(ok and not theirs.get(i, False) for i, ok in mine.items()):
            continue  # fails nothing the best passes: a length or style pair, not a miss
        differ = sum(theirs.get(i) != ok for i, ok in mine.items())
        ranked.append(((differ, *closeness(ic)), ic))
    return min(ranked, key=lambda r: r[0])[1] if ranked else None


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


@strategy("near-miss", "the best completion against the lower-scored one that fails the "
          "fewest of the checks it passes (then closest in length): one constraint apart")
class NearMiss(Strategy):
    def record(self, rec, where):
        scored = self.scored(rec, where)
        if not scored:
            return []
        bi, b = max(scored, key=lambda ic: ic[1]["score"])
        lower = [ic for ic in scored if ic[1]["score"] < b["score"]]
        if not lower:
            self.summary["tie"] += 1
            return []
        pick = near_miss(b, lower)
        if pick is None:
            self.summary["no lower completion fails a check the best passes"] += 1
            return []
        pair = self.make_pair(rec, bi, b, *pick)
        return [pair] if pair else []
