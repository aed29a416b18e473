"""`prm:DIR`: a process reward model from `train-rm --method prm` (ALGORITHMS.md Part D §1).

Each completion's text is split into steps at the folder's separator
(`alignkit.json` "step_separator", as in training: pieces that are empty or only
whitespace are dropped), every step gets p_k = P(step correct), read at the step's last
token in one forward pass, and the completion's score is their aggregate, `--aggregate`
min (default, Easy-to-Hard) | prod | last | mean.

Per completion it also writes `prm: {"steps": [p_1, ..., p_K], "aggregate": HOW}`
(pairs: `prm_chosen`, `prm_rejected`). A completion with no step (empty text), or whose
first step does not fit in `--scorer-max-length` tokens, gets no value (it is then left
out of the combined score); steps past the limit get no p and are not aggregated.

`rm:DIR` also loads a prm folder (scores only, aggregated the same way).

`prm-step:DIR` (PROPA's step reward, ALGORITHMS.md Part D §2; policy/steps.py): the
state's steps are the item's `meta.steps_prefix` (none when absent) followed by the
completion's steps (split at the folder's separator), and the score is p of the LAST
of them, P(correct) of s_k∘a, without aggregation. Online, on step prompts,
train-policy gives the scorers the text so far (prefix + the one sampled step, meta
less `steps_prefix`: policy/steps.py), so the last step is the sampled one and GRPO's
group normalisation over the G siblings of a state gives the step advantage
A_i = (Q_i − mean)/std. An empty completion, or a last step
past `--scorer-max-length`, gets no value; a malformed `meta.steps_prefix` is a
DataError at the item's file:line. Writes `prm_step: {"steps": K, "p": p}`.
"""
from __future__ import annotations

from typing import Sequence

from ..reward_models.prm import aggregate, load_folder
from .base import Item, Scorer, device_of, need_arg

__all__ = ["PRMScorer", "PRMStepScorer"]


class PRMScorer(Scorer):
    kind = "prm"
    missing_reason = "no step to score"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        spec = need_arg(self.kind, arg, "dir")
        self.prm = load_folder(spec, aggregate=options.get("aggregate"),
                               dtype=options.get("dtype") or "auto", device=device_of(options),
                               max_length=options.get("max_length") or 1024,
                               batch_size=options.get("batch_size") or 8)

    def score(self, items: Sequence[Item]) -> list[float | None]:
        steps = self.prm.step_scores([it.prompt for it in items],
                                     [it.completion for it in items])
        out: list[float | None] = []
        for it, ps in zip(items, steps):
            if not ps:
                out.append(None)
                continue
            it.extra["prm"] = {"steps": [round(p, 6) for p in ps],
                               "aggregate": self.prm.aggregate}
            out.append(aggregate(ps, self.prm.aggregate))
        return out


class PRMStepScorer(PRMScorer):
    kind = "prm-step"
    missing_reason = "no step to score"

    def score(self, items: Sequence[Item]) -> list[float | None]:
        from ..errors import DataError
        from ..policy.steps import steps_prefix
        from ..reward_models.prm import split_steps
        from ..text import completion_text
        states = []
        for it in items:
            try:
                prefix = steps_prefix(it.meta) or []
            except DataError as e:
                raise it.located(e) from None
            own = split_steps(completion_text(it.completion), self.prm.separator)
            states.append(prefix + own if own else [])
        probs = self.prm.step_probs([it.prompt for it in items], states)
        out: list[float | None] = []
        for it, state, ps in zip(items, states, probs):
            if not state or len(ps) < len(state):  # no step, or the last did not fit
                out.append(None)
                continue
            it.extra["prm_step"] = {"steps": len(state), "p": round(ps[-1], 6)}
            out.append(ps[-1])
        return out
