"""URPO's trainer (torch; see alignkit/policy/urpo.py for the method): TRL's GRPO with
alignkit's sampler (`online_trainers.AlignkitGRPOTrainer`, a `_GRPOBase`) whose reward
hook `_calculate_rewards` replaces the scorer's value of every judge row (the verdict
reward of `urpo_tasks.judge_reward`), every `meta.answer` row without checks
(`answer_reward`) and every open row (the live policy's P(yes) as its own referee,
`self_judge_scores`, under no_grad), and whose `train` measures the greedy judging
accuracy on the eval judge tasks before and after training.
"""
from __future__ import annotations

import logging
import math

import torch

from .. import console
from ..generation import SampleParams, sample
from ..text import encode_prompt, render_prompt
from . import urpo_tasks as T
from .online_trainers import AlignkitGRPOTrainer


def yes_no_ids(tok) -> tuple[int, int]:
    """The first tokens of " yes" and " no" (the self-judge's two continuations)."""
    return (tok(T.YES, add_special_tokens=False)["input_ids"][0],
            tok(T.NO, add_special_tokens=False)["input_ids"][0])


@torch.no_grad()
def self_judge_scores(model, tok, prompts: list, answers: list[str]) -> list[float]:
    """P(yes) = σ(l_yes − l_no) at the last position of the chat-templated SELF_JUDGE
    prompt, one forward pass per answer of `model` itself (no copy)."""
    y, n = yes_no_ids(tok)
    device = next(model.parameters()).device
    out = []
    for p, a in zip(prompts, answers):
        ids = encode_prompt(tok, render_prompt(tok, T.self_judge_prompt(T.flat_text(p), a)))
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        out.append(T.p_yes(float(logits[y]), float(logits[n])))
    return out


@torch.no_grad()
def judge_accuracy(model, tok, records: list[dict], max_new_tokens: int) -> float | None:
    """Share of judge records whose greedy verdict is the label (None: no records)."""
    if not records:
        return None
    params = SampleParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0,
                          batch_size=8)
    groups = sample(model, tok, [r["prompt"] for r in records], params,
                    progress=console.NullTask())
    hits = [T.parse_verdict(g[0]["text"]) == r["meta"]["urpo"]["label"]
            for g, r in zip(groups, records)]
    return sum(hits) / len(hits)


class URPOTrainer(AlignkitGRPOTrainer):
    """GRPO over URPO's three kinds (see the module docstring)."""

    def __init__(self, *args, eval_records: list[dict] | None = None, **kwargs):
        self._urpo_eval_records = list(eval_records or [])  # judge records of the accuracy eval
        super().__init__(*args, **kwargs)

    def _urpo_eval(self) -> list[dict]:
        return self._urpo_eval_records

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # the scorers give None on judge/open rows (replaced below): no TRL warning for that
        log = logging.getLogger("trl.trainer.grpo_trainer")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            log.setLevel(level)
        recs = [self._ak.records[int(x["row"])] for x in inputs]
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        local = [math.nan] * len(recs)
        open_idx = []
        for i, (rec, text) in enumerate(zip(recs, texts)):
            kind, meta = T.kind_of(rec), rec.get("meta") or {}
            if kind == "judge":
                local[i] = T.judge_reward(text, meta["urpo"]["label"])
            elif kind == "verifiable" and meta.get("checks") in (None, []):
                local[i] = T.answer_reward(text, meta["answer"])
            elif kind == "open":
                open_idx.append(i)
        if open_idx:
            model = self.accelerator.unwrap_model(self.model)
            scores = self_judge_scores(model, self._ak.tokenizer,
                                       [recs[i]["prompt"] for i in open_idx],
                                       [texts[i] for i in open_idx])
            for i, s in zip(open_idx, scores):
                local[i] = s
        mine = torch.tensor(local, device=out.device, dtype=out.dtype)
        every = self.accelerator.gather(mine)
        set_ = ~torch.isnan(every)
        if bool(set_.any()):
            w = float(self.reward_weights[0]) if len(self.reward_weights) else 1.0
            out[set_] = math.nan
            out[set_, 0] = every[set_] / (w if w else 1.0)
        mode = "train" if self.model.training else "eval"
        for kind in ("judge", "open"):
            vals = [v for v, r in zip(local, recs) if T.kind_of(r) == kind and not math.isnan(v)]
            if vals:
                self._metrics[mode][f"urpo/{kind}_reward"].append(sum(vals) / len(vals))
        return out

    def _urpo_accuracy(self) -> float | None:
        model = self.accelerator.unwrap_model(self.model)
        was = model.training
        model.eval()
        try:
            return judge_accuracy(model, self._ak.tokenizer, self._urpo_eval(),
                                  self.max_completion_length)
        finally:
            model.train(was)

    def train(self, *args, **kwargs):
        before = self._urpo_accuracy()
        result = super().train(*args, **kwargs)
        after = self._urpo_accuracy()
        if before is not None:
            row = {"urpo/judge_acc_before": before, "urpo/judge_acc_after": after,
                   "urpo/judge_eval_n": len(self._urpo_eval()), "step": self.state.global_step}
            console.info(f"urpo: judging accuracy {before:.3f} -> {after:.3f} on "
                         f"{row['urpo/judge_eval_n']} held-out judge tasks")
            self.state.log_history.append(row)
            if self.accelerator.is_main_process:
                from .urpo import write_accuracy
                write_accuracy(self._ak.work, row)
        return result
