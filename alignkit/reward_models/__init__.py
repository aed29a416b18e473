"""Reward-model training methods (`alignkit train-rm`) and the loader of their folders.

Registry (name -> module with `train(pairs, model_spec, out, opts, cfg) -> dict`):

    bt      Bradley-Terry through TRL's RewardTrainer (plain seq-cls folder)
    pal     pluralistic RM, PAL-B: K prototypes + per-user mixture weights
    maxmin  hard-EM mixture of K BT models over users
    crm     two peer BT models with co-teaching and an easy->hard curriculum

Folders: `bt` and `crm` write a plain AutoModelForSequenceClassification folder
(num_labels=1) that `rm:DIR` loads as is; `pal` and `maxmin` write a layout named by
`"rm_method"` in the folder's alignkit.json, with no config.json at the top. Load any of
them with `load_reward_model(folder, user=None, aggregate="mean")`, whose result has
`.score(prompts, completions, users=None) -> list[float]`.

Nothing here imports torch at module level.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from .common import METHOD_KEY, RMConfig, folder_info

METHODS: dict[str, str] = {
    "bt": "bt",
    "pal": "pal",
    "maxmin": "maxmin",
    "crm": "crm",
}
PLURALISTIC = ("pal", "maxmin")  # layouts that need load_reward_model (not plain seq-cls)

__all__ = ["METHODS", "RMConfig", "train", "load_reward_model", "rm_method", "SeqClsRewardModel"]


def method_module(name: str):
    if name not in METHODS:
        raise UsageError(f"unknown --method {name!r}; known: {', '.join(METHODS)}")
    return import_module(f"{__name__}.{METHODS[name]}")


def train(method: str, pairs: str, model_spec: str, out: str | Path, opts,
          cfg: RMConfig | None = None) -> dict:
    """Train a reward model with `method`; returns {"heldout": metrics, ...}."""
    cfg = cfg or RMConfig(method=method)
    module = method_module(method)
    if cfg.adapt_users:
        if method != "pal":
            raise UsageError("--adapt-users works with --method pal only")
        if rm_method(model_spec) != "pal":
            raise UsageError(f"--adapt-users: {model_spec} is not a pal reward-model folder")
    else:  # a bad --model fails before the work folder is made
        from ..models import resolve
        resolve(model_spec)
    return module.train(pairs, model_spec, out, opts, cfg)


def rm_method(folder: str | Path) -> str:
    """The method that wrote a reward-model folder ('bt' for a plain folder)."""
    return folder_info(folder).get(METHOD_KEY) or "bt"


class SeqClsRewardModel:
    """A plain sequence-classification reward model (bt, crm, or any rm folder),
    scored exactly as the `rm:DIR` scorer does; `users` is accepted and ignored."""

    def __init__(self, model, tokenizer, max_length: int = 1024):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              users: Sequence[Any] | None = None) -> list[float]:
        from .common import seq_cls_rewards
        return seq_cls_rewards(self.model, self.tokenizer, prompts, completions,
                               max_length=self.max_length)


def load_reward_model(folder: str | Path, user: str | None = None, aggregate: str = "mean", *,
                      dtype: str = "auto", device: str | None = None, max_length: int = 1024):
    """Load any train-rm folder; the result has `.score(prompts, completions, users=None)
    -> list[float]`.

    - plain / `bt` / `crm`: the sequence-classification model (user and aggregate unused).
    - `pal`: the user's mixture weights (`user`, or per item `users[i]`); without a user,
      the mean of all known users' weights. An unknown user is a UsageError.
    - `maxmin`: `aggregate` min | mean | user over the K models; `user` (or `users[i]`)
      picks the model for `aggregate="user"`.
    """
    method = rm_method(folder)
    if method == "pal":
        from .pal import PALRewardModel
        return PALRewardModel.load(folder, user=user, dtype=dtype, device=device,
                                   max_length=max_length)
    if method == "maxmin":
        from .maxmin import MaxMinRewardModel
        return MaxMinRewardModel.load(folder, aggregate=aggregate, user=user, dtype=dtype,
                                      device=device, max_length=max_length)
    from ..models import load_seq_cls
    model, tok = load_seq_cls(folder, dtype)
    if device:
        model.to(device)
    return SeqClsRewardModel(model, tok, max_length)
