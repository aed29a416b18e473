"""`rm:DIR`: a sequence-classification reward model (one scalar per completion).

The model is loaded with `alignkit.models.load_seq_cls` (a safetensors folder, a PEFT
adapter folder or an embedded name) and run in batches of `batch_size` texts, each
truncated to `max_length` tokens (right side, like the tokenizer default).

Input format (`rm_inputs`, in `alignkit.reward_models.inference` with the batching and
the train-rm folder loader, shared with `train-rm` so training and scoring agree): the
prompt and the completion as one chat through the tokenizer's chat template when it
has one (a string prompt becomes a user turn, a string completion an assistant turn);
otherwise the plain text `prompt + "\\n\\n" + completion` (message lists joined by blank
lines). Special tokens are added by the tokenizer only when there is no chat template.
The reward is the model's logit 0 at the last non-padding token (transformers' own
pooling).
"""
from __future__ import annotations

from typing import Sequence

from ..reward_models.inference import needs_loader, rm_inputs, rm_rewards
from .base import Item, Scorer, load_model, need_arg

__all__ = ["RewardModelScorer", "rm_inputs", "rm_rewards"]


class RewardModelScorer(Scorer):
    """Also scores the multi-model folders of `train-rm` (`pal`: per-user mixture weights,
    `maxmin`: K models with `aggregate` min|mean|user): the user comes from the record's
    `meta.user`, else the `user` option (`score --user`)."""
    kind = "rm"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        spec = need_arg(self.kind, arg, "dir")
        self.mixture = None
        if needs_loader(spec):  # a train-rm layout of its own (pal, maxmin)
            from ..reward_models import load_reward_model  # loading only, no training code
            self.mixture = load_reward_model(
                spec, user=options.get("user"), aggregate=options.get("aggregate"),
                dtype=options.get("dtype") or "auto", device=options.get("device"),
                max_length=options.get("max_length") or 1024)
            return
        self.model, self.tokenizer = load_model(options, spec, "seq_cls")

    def rewards(self, items: Sequence[Item]) -> list[float]:
        if self.mixture is not None:
            users = [(it.meta or {}).get("user") or self.options.get("user") for it in items]
            return list(self.mixture.score([it.prompt for it in items],
                                           [it.completion for it in items], users=users))
        texts = [rm_inputs(self.tokenizer, it.prompt, it.completion) for it in items]
        return rm_rewards(self.model, self.tokenizer, texts,
                          batch_size=self.options.get("batch_size") or 8,
                          max_length=self.options.get("max_length") or 1024)

    def score(self, items: Sequence[Item]) -> list[float | None]:
        return list(self.rewards(items))
