"""`referee-tasks`: preference pairs -> URPO judge-kind prompt records (ALGORITHMS.md
Part D §5; the trainer is `train-policy --method urpo`, alignkit/policy/urpo.py).

Each pair becomes `{id: PAIR_ID-judge, prompt: <the judging prompt with both answers>,
meta: {..the pair's meta, urpo: {kind: "judge", label: "A"|"B", swapped, seed,
pair_id}}}`. The judging prompt is `policy.urpo_tasks.JUDGE_TEMPLATE` (one template for
relabel, the trainer and the accuracy eval). Which answer is shown first is drawn per
record from (--seed, pair id): the same seed gives the same order, and `label` names the
position of the chosen answer. A conversational prompt is flattened to its messages'
contents, one per line (the judging prompt is one string).
"""
from __future__ import annotations

from .base import Strategy, strategy


@strategy("referee-tasks", "pairs -> URPO judge-kind prompts (both answers in a judging "
          "prompt, A/B order seeded by --seed, meta.urpo.label the chosen's position)")
class RefereeTasks(Strategy):
    inputs = ("pair",)
    output = "prompt"
    rewrites_text = True

    def record(self, rec, where):
        from ..policy.urpo_tasks import flat_text, judge_record
        return [judge_record(rec, self.opts.seed, flat_text)]
