"""`step-prompts`: samples records -> step-prefix prompt records, the states s_k of
PROPA's step-level GRPO (ALGORITHMS.md Part D §2, "Text-only core for alignkit"; the
trainer side is alignkit/policy/steps.py, the reward `prm-step:DIR`).

Each completion's text is split into steps at `--step-separator` (escapes decoded;
default a blank line, "\\n\\n"; pieces that are empty or only whitespace are dropped,
as `prm.split_steps`). A completion of K steps gives the prefixes s_k = its first k
steps, k = 0..K-1 (s_0 is the empty prefix: the question alone; the finished answer
s_K has no next step and gives none). Prefixes are deduplicated per prompt (the same
steps under the same prompt text are written once, over the whole input); then, with
`--max-prefixes N`, at most N of a record's new prefixes are kept, drawn without
replacement by a RNG seeded with (--seed, record id) and written in their original
order (k, then completion order); a prefix left out by the draw counts as seen. Each is one prompt record

    {"id": "<rec id>-s<k>-<hash>", "prompt": <the record's prompt>,
     "meta": {..the record's meta.., "steps_prefix": [steps], "step_index": k,
              "step_separator": SEP}}

where <hash> is the first 8 hex digits of sha256 of the prefix (JSON), so ids are
unique and stable. `train-policy` renders such a record as the chat prompt + the
prefix steps + the separator and samples ONE next step (cut at the separator).
Simplification: PROPA draws its states from an MCTS tree; here they are the prefixes
of any rollouts (e.g. gen-pairs' samples), without tree values.
"""
from __future__ import annotations

import hashlib
import json
import random

from ..registry import Param
from ..text import completion_text
from .base import Strategy, strategy

MAX_PREFIXES = Param("max_prefixes", int, None, "step-prompts: keep at most N step "
                     "prefixes per record (a seeded draw, by --seed and the record id; "
                     "default all).", low=1, metavar="N")


def prefix_hash(prefix: list[str]) -> str:
    return hashlib.sha256(json.dumps(prefix, ensure_ascii=False).encode()).hexdigest()[:8]


@strategy("step-prompts", "samples -> one prompt record per distinct step prefix of the "
          "completions (meta.steps_prefix, step_index; PROPA step-level GRPO states; "
          "--step-separator, --max-prefixes)", params=(MAX_PREFIXES,))
class StepPrompts(Strategy):
    inputs = ("samples",)
    output = "prompt"
    rewrites_text = True

    def __init__(self, opts, summary, params):
        super().__init__(opts, summary, params)
        from ..reward_models.prm import DEFAULT_SEPARATOR, decode_separator
        flag = opts.scoring.step_separator
        self.sep = DEFAULT_SEPARATOR if flag is None else decode_separator(flag)
        self._seen: set[tuple[str, tuple[str, ...]]] = set()

    def record(self, rec, where):
        from ..reward_models.prm import split_steps
        from ..errors import DataError
        pkey = json.dumps(rec["prompt"], sort_keys=True, ensure_ascii=False)
        new: list[tuple[int, list[str]]] = []
        for j, comp in enumerate(rec["completions"]):
            try:  # the driver validated the record; a bad text is still located
                steps = split_steps(completion_text(comp.get("text")), self.sep)
            except DataError as e:
                raise DataError(e.problem, *where, field=e.field or f"completions[{j}].text") \
                    from None
            for k in range(len(steps)):
                key = (pkey, tuple(steps[:k]))
                if key in self._seen:
                    self.summary["duplicate prefix"] += 1
                    continue
                self._seen.add(key)
                new.append((k, steps[:k]))
        n = self.params.get("max_prefixes")
        if n is not None and len(new) > n:
            rng = random.Random(f"{self.opts.seed}\x00{rec['id']}")
            keep = sorted(rng.sample(range(len(new)), n))
            self.summary["prefix over --max-prefixes"] += len(new) - n
            new = [new[i] for i in keep]
        new.sort(key=lambda kp: kp[0])  # stable: completion order within one k
        meta = rec.get("meta") or {}
        return [{"id": f"{rec['id']}-s{k}-{prefix_hash(p)}", "prompt": rec["prompt"],
                 "meta": {**meta, "steps_prefix": p, "step_index": k,
                          "step_separator": self.sep}} for k, p in new]
