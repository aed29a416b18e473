"""`mc-rollout:MODEL`: Monte-Carlo step values, stage A of step-level DAPO (Direct
Advantage Policy Optimization, arXiv 2412.18279, Skywork; ALGORITHMS.md Part D §3 — not
ByteDance's DAPO, which is the `length` scorer's overlong penalty).

Each completion's text is split into steps at `--step-separator` (default a blank line,
"\\n\\n"; pieces that are empty or only whitespace are dropped, as `prm` does). The
completion's steps a_1..a_K give the step prefixes s_k = (prompt, a_1..a_k) for
k = 0..K-1 (s_0 is the prompt alone). From every s_k the frozen MODEL draws M =
`--rollouts` continuations with the shared seeded sampler (`generation.sample`,
temperature `--rollout-temperature`, default 1.0, top-k/top-p off, at most
`--rollout-max-new-tokens` tokens), each full text (the k steps, each followed by the
separator, then the continuation) is scored by the verifier `--verifier SPEC` (default
`rules`, any scorer spec but mc-rollout), and

    v̂(s_k) = (1/M) Σ_m verifier(prefix_k + continuation_m)

(with a 0/1 verifier: the success rate; ALGORITHMS.md's critic target). A rollout the
verifier cannot score (None) counts as 0. The completion's own verifier score is the
`outcome` and this scorer's value; a completion the verifier cannot score gets no value
and no fields.

Written on each completion (pairs: `mc_rollout_chosen` / `mc_rollout_rejected`):
`mc_rollout: {"steps": [a_1..a_K], "step_values": [v̂(s_0)..v̂(s_{K-1})], "outcome": r,
"separator": SEP}`, which `train-policy --method step-dapo` reads.

Prompts are rendered as the trainers render them (`text.render_prompt`, the chat
template with the assistant turn opened) and the step prefix is appended as plain text.
Randomness: the stream of rollout m from a state is seeded by (`--rollout-seed`, the
state: prompt and prefix text, m), so equal states get equal rollouts, the same seed
gives the same values, and the values do not depend on record order. All rollouts of one
record (its distinct states x M) go through one `sample` call. Simplification: no critic
V_φ is trained here (the MC values are the targets and, in step-dapo, the values).
"""
from __future__ import annotations

import json
from typing import Sequence

from ..errors import UsageError
from ..reward_models.prm import DEFAULT_SEPARATOR, decode_separator, split_steps
from ..text import completion_text
from .base import Item, Scorer, load_model, need_arg

__all__ = ["MCRolloutScorer", "step_prefixes", "mc_values"]


def step_prefixes(steps: list[str], separator: str) -> list[str]:
    """The completion-side text of the states s_0..s_{K-1}: "" then the first k steps,
    each followed by the separator."""
    return ["".join(s + separator for s in steps[:k]) for k in range(len(steps))]


def mc_values(scores: Sequence[float | None], m: int) -> list[float]:
    """Means of consecutive groups of `m` verifier scores (None counts as 0)."""
    return [sum(float(s or 0.0) for s in scores[i:i + m]) / m for i in range(0, len(scores), m)]


class MCRolloutScorer(Scorer):
    kind = "mc-rollout"
    missing_reason = "the verifier gave the completion no score"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        self.spec = need_arg(self.kind, arg, "model")
        raw = options.get("step_separator")
        self.separator = DEFAULT_SEPARATOR if raw is None else decode_separator(raw)
        self.rollouts = int(options.get("rollouts") or 8)
        if self.rollouts < 1:
            raise UsageError(f"--rollouts must be >= 1, got {self.rollouts}")
        verifier = (options.get("verifier") or "rules").strip()
        if verifier.partition(":")[0] == self.kind:
            raise UsageError("--verifier must not be an mc-rollout scorer")
        from . import build_scorer
        self.verifier = build_scorer([verifier], **options)
        self.temperature = float(options.get("rollout_temperature", 1.0))
        self.max_new_tokens = int(options.get("rollout_max_new_tokens") or 256)
        self.seed = int(options.get("rollout_seed") or 0)
        self._model = None

    def model(self):
        if self._model is None:
            self._model = load_model(self.options, self.spec, "causal")
        return self._model

    def verify(self, items: list[Item]) -> list[float | None]:
        return self.verifier._raw(items)[1] if items else []

    def rollout(self, prompt, prefixes: list[str]) -> list[list[str]]:
        """M continuations of each (prompt, prefix) state, in one `sample` call."""
        from ..generation import SampleParams, sample
        from ..text import render_prompt
        model, tok = self.model()
        rendered = render_prompt(tok, prompt)
        params = SampleParams(n=self.rollouts, temperature=self.temperature, top_p=1.0,
                              top_k=0, max_new_tokens=self.max_new_tokens, seed=self.seed,
                              batch_size=max(1, int(self.options.get("batch_size") or 8)))
        keys = [json.dumps([prompt, p], ensure_ascii=False, sort_keys=True) for p in prefixes]
        groups = sample(model, tok, [rendered + p for p in prefixes], params, raw=True,
                        keys=keys, progress=_Quiet())
        return [[r["text"] for r in g] for g in groups]

    def score(self, items: Sequence[Item]) -> list[float | None]:
        items = list(items)
        outcomes = self.verify([Item(it.prompt, it.completion, it.meta, it.group, it.where)
                                for it in items])
        out: list[float | None] = [None] * len(items)
        by_group: dict[int, list[int]] = {}
        for i, (it, o) in enumerate(zip(items, outcomes)):
            if o is not None:
                by_group.setdefault(it.group, []).append(i)
        for idx in by_group.values():  # one record: its distinct states in one sample call
            steps = {i: split_steps(completion_text(items[i].completion), self.separator)
                     for i in idx}
            states = list(dict.fromkeys(p for i in idx
                                        for p in step_prefixes(steps[i], self.separator)))
            first = items[idx[0]]
            conts = self.rollout(first.prompt, states) if states else []
            texts = [Item(first.prompt, s + c, first.meta, first.group, first.where)
                     for s, cs in zip(states, conts) for c in cs]
            values = dict(zip(states, mc_values(self.verify(texts), self.rollouts)))
            for i in idx:
                v = [values[p] for p in step_prefixes(steps[i], self.separator)]
                items[i].extra["mc_rollout"] = {"steps": steps[i], "step_values": v,
                                                "outcome": float(outcomes[i]),
                                                "separator": self.separator}
                out[i] = float(outcomes[i])
        return out


class _Quiet:
    def advance(self, n: int = 1, **_):
        pass
