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
"""
from __future__ import annotations

from typing import Sequence

from ..reward_models.prm import aggregate, load_folder
from .base import Item, Scorer, device_of, need_arg

__all__ = ["PRMScorer"]


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
