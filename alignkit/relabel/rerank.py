"""`rerank`: preference pairs from re-ranking N scored samples by their extracted answers
(ALGORITHMS.md Part D §1: "train the PRM on easy problems, rerank hard ones"; the
selection rules are `alignkit.rerank`'s, the same `eval` reports).

Per samples record, each scored completion's answer is extracted (its last `\\boxed{}`,
else its last number; `alignkit.rerank.extract_answer`) and one answer is selected
without looking at any reference:

- `--select vote` (default): the weighted majority vote, argmax_a Σ_i 1[ans_i = a]·score_i
  (the scores must be non-negative weights: a PRM's aggregated probability, `rules`,
  `code`; a negative score is a DataError);
- `--select majority`: every completion votes with weight 1;
- `--select best`: the answer of the highest-scored completion (best-of-N).

The pair is then chosen = the highest-scored completion whose answer is the selected one,
rejected = the lowest-scored completion whose answer differs (a completion without an
answer counts as different). A record where every completion agrees, or none has an
answer, gives no pair (counted). The pair's `margin` is the score difference (it can be
zero or negative: the vote, not the score, decides, so `--min-margin` does not apply
here), and `meta.rerank` records `{"select", "answer", "votes": {answer: weight}}`.
When the record has `meta.answer`, `meta.rerank.correct` says whether the selection is
right, so the pseudo-label accuracy of a run can be read off the pairs.
"""
from __future__ import annotations

from ..errors import DataError
from ..registry import Param
from .base import Strategy, pair_record, strategy

SELECT = Param("select", str, "vote", "rerank: the answer to prefer: vote = weighted majority "
               "vote by score, majority = one vote each, best = best-of-N.",
               choices=("vote", "majority", "best"))


@strategy("rerank", "pairs from re-ranking by extracted answers: chosen has the voted (or "
          "best-of-N) answer, rejected another one (no reference needed)", params=(SELECT,))
class Rerank(Strategy):
    def record(self, rec, where):
        from ..rerank import best_of_n, extract_answer, normalize_answer, weighted_vote
        scored = self.scored(rec, where)
        if not scored:
            return []
        answers = [extract_answer(c["text"]) for _, c in scored]
        scores = [c["score"] for _, c in scored]
        select = self.params["select"]
        if select == "vote":
            for (i, c) in scored:
                if c["score"] < 0:
                    raise DataError(f"--select vote weighs answers by score, got "
                                    f"{c['score']} (use --select majority or best, or a "
                                    f"non-negative scorer)", *where,
                                    field=f"completions[{i}].score")
            answer = weighted_vote(answers, scores)
        elif select == "majority":
            answer = weighted_vote(answers, [1.0] * len(answers))
        else:
            answer = best_of_n(answers, scores)
        if answer is None:
            self.summary["no extracted answer"] += 1
            return []
        agree = [(ic, s) for ic, a, s in zip(scored, answers, scores) if a == answer]
        other = [(ic, s) for ic, a, s in zip(scored, answers, scores) if a != answer]
        if not other:
            self.summary["every completion agrees"] += 1
            return []
        (ci, c), _ = max(agree, key=lambda t: (t[1], -t[0][0]))
        (ri, r), _ = min(other, key=lambda t: (t[1], t[0][0]))
        weights = scores if select == "vote" else [1.0] * len(scores)
        votes: dict[str, float] = {}
        for a, w in zip(answers, weights):
            if a is not None:
                votes[a] = votes.get(a, 0.0) + w
        info = {"select": select, "answer": answer, "votes": votes}
        meta = rec.get("meta") or {}
        if meta.get("answer") is not None:
            refs = meta["answer"] if isinstance(meta["answer"], list) else [meta["answer"]]
            info["correct"] = answer in {normalize_answer(x) for x in refs}
        pair = pair_record(rec, ci, c, ri, r)
        pair["meta"] = {**meta, "rerank": info}
        return [pair]
