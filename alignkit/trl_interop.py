"""Training alignkit pair files in plain TRL: the same tokens, the records' reference log-probs.

alignkit's pair files load in `datasets` and train as they are in TRL's `DPOTrainer`,
with two differences a TRL user should know about, and the two helpers below:

1. **Rendering.** alignkit puts a string prompt through the tokenizer's chat template
   (one user turn, plus the `gen.system` message if gen-pairs had `--system`), unless
   gen-pairs ran with `--raw` (`gen.raw: true` in the record). TRL takes a string
   prompt as raw text. So the same file trains on different tokens in the two tools.
   `to_trl(record)` writes a pair in the form that means the same in both: the prompt
   as messages and each completion as one assistant message when alignkit would apply
   the template; raw prompts stay strings (and TRL adds the EOS alignkit adds).
   TRL's conversational tokenization also scores the template's text after the end of
   turn (`"\\n"` after `<|im_end|>` in ChatML templates), one token alignkit does not
   score, so the policy and reference log-probs of each side each hold one extra,
   near-certain token in TRL.
2. **Reference log-probs.** alignkit writes them under TRL's names
   (`ref_chosen_logps`/`ref_rejected_logps`) as well as its own, but TRL 1.16's
   `DPOTrainer` recomputes them with `precompute_ref_log_probs=True` and ignores them
   otherwise. `RecordRefDPOTrainer` is `DPOTrainer` that takes them from the dataset
   when every row has both, so no reference pass runs; with any missing value it falls
   back to TRL's own pass. Only valid for the policy's starting weights the values
   were computed with (gen-pairs' `logp` is the sampling model's, at temperature 1).

This module imports TRL and `datasets` when its functions are called, so importing it
is cheap.
"""
from __future__ import annotations

import math

from .text import completion_text

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def to_trl(record: dict) -> dict:
    """A pair record (alignkit or TRL shape) as TRL should read it to see the tokens
    alignkit trains on: `{"prompt", "chosen", "rejected"}` plus TRL's reference
    columns when the record has them. See the module docstring."""
    gen = record.get("gen") or {}
    out = {}
    prompt = record["prompt"]
    if isinstance(prompt, str) and not gen.get("raw"):
        prompt = ([{"role": "system", "content": gen["system"]}] if gen.get("system") else []) + \
            [{"role": "user", "content": prompt}]
    out["prompt"] = prompt
    for side in ("chosen", "rejected"):
        text = completion_text(record[side])
        out[side] = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
    for trl_name, ours in zip(REF_COLUMNS, ("ref_logp_chosen", "ref_logp_rejected")):
        value = record.get(trl_name, record.get(ours))
        if value is not None:
            out[trl_name] = float(value)
    return out


def _has_all_refs(dataset) -> bool:
    if not set(REF_COLUMNS) <= set(dataset.column_names):
        return False
    return all(v is not None and not math.isnan(float(v)) for c in REF_COLUMNS for v in dataset[c])


def record_ref_dpo_trainer():
    """The class `RecordRefDPOTrainer` (built on first use, so that importing this
    module does not import TRL)."""
    global _TRAINER
    if _TRAINER is None:
        from trl import DPOTrainer

        class RecordRefDPOTrainer(DPOTrainer):
            """TRL's DPOTrainer that reads the reference log-probs from the dataset's
            `ref_chosen_logps`/`ref_rejected_logps` columns when every row has them
            (run it with `DPOConfig(precompute_ref_log_probs=True)`); otherwise TRL's
            own reference pass. Our addition to TRL, not part of it."""

            def _precompute_ref_logps(self, dataset, name, batch_size):
                if _has_all_refs(dataset):
                    return dataset
                drop = [c for c in REF_COLUMNS if c in dataset.column_names]
                return super()._precompute_ref_logps(dataset.remove_columns(drop), name,
                                                     batch_size)

        _TRAINER = RecordRefDPOTrainer
    return _TRAINER


_TRAINER = None

__all__ = ["to_trl", "record_ref_dpo_trainer", "REF_COLUMNS"]
