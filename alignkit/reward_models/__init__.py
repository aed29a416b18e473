"""Reward-model training methods (`alignkit train-rm`) and the loader of their folders.

`RM_METHODS` holds one entry per method; its implementation is the method's module
(imported on first use), which defines `train(pairs, model_spec, out, opts, cfg) ->
dict` and, for a method with its own folder layout, `load_folder(folder, ...)`. Each
entry declares its parameters (the train-rm flags it takes) and its `info`:

    default_lr   the learning rate when --lr is not given
    plain        True: writes a plain AutoModelForSequenceClassification folder
                 (num_labels=1) that `rm:DIR` loads as is; False: its own layout, named
                 by "rm_method" in the folder's alignkit.json (no config.json at the top)
    adapt_users  whether --adapt-users applies (fit new users' weights in a folder of it)
    trainer      what trains it (TRL's trainer, or alignkit's loss)

Load any folder with `load_reward_model(folder, user=None, aggregate=None)` (in
`inference`), whose result has `.score(prompts, completions, users=None) -> list[float]`.

Nothing here imports torch at module level.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import console
from ..errors import UsageError
from ..registry import Param, Registry, opt, params_of
from .inference import SeqClsRewardModel, load_reward_model, rm_method

__all__ = ["RM_METHODS", "RMConfig", "train", "table", "load_reward_model", "rm_method",
           "SeqClsRewardModel"]

RM_METHODS = Registry("reward-model method", "--method")

CENTER_REWARDS = Param("center_rewards", float, 0.0, "Reward-centering coefficient λ (0: off; "
                       "0.01 recommended).", low=0.0)
K = Param("k", int, 2, "pal: preference prototypes; maxmin: reward models.", low=1)
PAL_DIM = Param("pal_dim", int, 512, "Preference-embedding size.", low=1)
HEAD_LR = Param("head_lr", float, 1e-3, "Projector learning rate.", low=0.0, low_open=True)
USER_LR = Param("user_lr", float, 0.2, "User-weight learning rate.", low=0.0, low_open=True)
EM_ITERS = Param("em_iters", int, 10, "At most this many EM rounds (fewer when no user moves); "
                 "the default is the MaxMin-RLHF paper's.", low=1)
MARGIN = Param("margin", bool, False, "Train with the pairs' `margin` field, −log σ(r_c − r_r − "
               "m) (in the E-step too for maxmin); without it the loss is plain Bradley-Terry "
               "and the field is ignored.")
NOISE_RATE = Param("noise_rate", float, 0.2, "Prior label-noise rate η (share of each batch a "
                   "peer drops; < 1).", low=0.0)
CURRICULUM = Param("curriculum", bool, True, "Easy->hard order by peer margin.", negatable=True)

_LR = 1e-4  # train-rm's default learning rate (every method)

RM_METHODS.add("bt", "Bradley-Terry through TRL's RewardTrainer (per-pair margin with --margin)",
               f"{__name__}.bt", params=(MARGIN, CENTER_REWARDS), reads="pair", writes="model",
               default_lr=_LR, plain=True, adapt_users=False, trainer="TRL RewardTrainer")
RM_METHODS.add("pal", "pluralistic RM (PAL-B): K preference prototypes + per-user mixture "
               "weights from meta.user", f"{__name__}.pal",
               params=(K, PAL_DIM, HEAD_LR, USER_LR), reads="pair", writes="model",
               default_lr=_LR, plain=False, adapt_users=True, trainer="alignkit loss")
RM_METHODS.add("maxmin", "hard-EM mixture of K Bradley-Terry models over the users of "
               "meta.user", f"{__name__}.maxmin", params=(K, EM_ITERS, MARGIN, CENTER_REWARDS),
               reads="pair", writes="model", default_lr=_LR, plain=False, adapt_users=False,
               trainer="TRL RewardTrainer (EM)")
RM_METHODS.add("crm", "two peer BT models that filter each other's noisy pairs, with an "
               "easy->hard curriculum; writes the peer with the better held-out accuracy",
               f"{__name__}.crm", params=(NOISE_RATE, CURRICULUM, MARGIN, CENTER_REWARDS),
               reads="pair", writes="model",
               default_lr=_LR, plain=True, adapt_users=False, trainer="alignkit loss")
VAS_GAMMA = Param("gamma", float, 1.0, "value: discount γ of the TD(λ)/GAE targets.",
                  low=0.0, high=1.0)
VAS_LAM = Param("lam", float, 0.95, "value: GAE λ of the targets.", low=0.0, high=1.0)
REWARD_KEY = Param("reward_key", str, None, "value: terminal reward = completions' "
                   "scores[SPEC] (default: `score`).", metavar="SPEC")
RM_METHODS.add("value", "VAS value model: per-token V(s) on samples records of the frozen "
               "policy, TD(λ)/GAE targets from the terminal score (guides sampling with "
               "--value-guide; simplified: no reward whitening, no LoRA)",
               f"{__name__}.value", params=(VAS_GAMMA, VAS_LAM, REWARD_KEY), reads="samples",
               writes="model", default_lr=_LR, plain=False, adapt_users=False,
               trainer="alignkit loss")
STEP_SEPARATOR = Param("step_separator", str, None, "prm: splits a `completion` text into "
                       "steps (escapes \\n \\t decoded; default a blank line, \\n\\n).",
                       metavar="TEXT")
RM_METHODS.add("prm", "process reward model: P(step correct) at each step's last token, BCE "
               "(TRL's PRM format or completion + labels; simplified: one-token labels only)",
               f"{__name__}.prm", params=(STEP_SEPARATOR,), reads="steps", writes="model",
               default_lr=_LR, plain=False, adapt_users=False, trainer="alignkit loss")


@dataclass(init=False)
class RMConfig:
    """train-rm's options beyond the shared training flags (TrainOptions): the held-out
    split, --adapt-users, and the method's parameters (declared on its `RM_METHODS`
    entry; keyword arguments here, kept in `params` and read as attributes: `cfg.k`).

    `as_dict()` (the folder's "rm_options") has every declared parameter: the method's
    values, the declared default for the others."""

    method: str = "bt"
    eval_split: float = opt(0.1, "Share of each user's pairs held out for metrics (< 1).",
                            low=0.0, high=1.0)
    eval_pairs: Optional[str] = opt(None, "Held-out pairs file (replaces --eval-split).",
                                    metavar="FILE")
    adapt_users: bool = opt(False, "Fit only the weights of users that the --model folder (one "
                            "of this method, e.g. pal) does not know; everything else frozen.")
    params: dict = field(default_factory=dict)

    def __init__(self, method: str = "bt", **values: Any):
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if f.default is dataclasses.MISSING
                    else f.default)
        self.method = method
        shared = {f.name for f in dataclasses.fields(self)} - {"method"}
        for k, v in values.items():
            if k == "params":
                self.params.update(v or {})
            elif k in shared:
                setattr(self, k, v)
            else:
                self.params[k] = v

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        declared = RM_METHODS.params()
        if name in declared:
            return declared[name].default
        raise AttributeError(name)

    def as_dict(self) -> dict:
        out = {"method": self.method, **{p.name: getattr(self, p.name) for p in params_of(RMConfig)}}
        out.update({n: p.default for n, p in RM_METHODS.params().items()})
        out.update(self.params)
        return out

    def resolve(self, entry) -> "RMConfig":
        """Check the shared options and fill the method's parameters (declared defaults,
        given values validated). A parameter of another method is ignored with a warning
        (train-rm has always accepted every method's flags)."""
        for p in params_of(RMConfig):
            p.coerce(getattr(self, p.name))
        if self.eval_pairs is None and not 0.0 <= self.eval_split < 1.0:
            raise UsageError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        given = {k: v for k, v in self.params.items() if v is not None}
        mine = {p.name for p in entry.params}
        other = sorted(k for k in given if k not in mine)
        unknown = [k for k in other if k not in RM_METHODS.params()]
        if unknown:  # no method declares it: the registry's error
            entry.options({unknown[0]: given[unknown[0]]})
        if other:
            flags = ", ".join(RM_METHODS.params()[k].flag_name for k in other)
            console.warn(f"{flags}: not a parameter of --method {entry.name}; ignored")
        self.params = entry.options({k: v for k, v in given.items() if k in mine})
        return self


def train(method: str, pairs: str, model_spec: str, out: str | Path, opts,
          cfg: RMConfig | None = None) -> dict:
    """Train a reward model with `method`; returns {"heldout": metrics, ...}. `opts.lr`
    None takes the method's default learning rate."""
    entry = RM_METHODS.get(method)
    cfg = (cfg or RMConfig(method=method)).resolve(entry)
    cfg.method = method
    if cfg.adapt_users:
        if not entry.adapt_users:
            able = [e.name for e in RM_METHODS if e.adapt_users]
            raise UsageError(f"--adapt-users works with --method {' | '.join(able)} only")
        if rm_method(model_spec) != method:
            raise UsageError(f"--adapt-users: {model_spec} is not a {method} reward-model folder")
    else:  # a bad --model fails before the work folder is made
        from ..models import resolve
        resolve(model_spec)
    opts.with_lr(entry.default_lr)
    return entry.load().train(pairs, model_spec, out, opts, cfg)


def table() -> list[str]:
    """One line per method, for `train-rm --list-methods`."""
    return RM_METHODS.table((
        ("trainer", lambda e: e.trainer),
        ("lr", lambda e: f"{e.default_lr:g}"),
        ("folder", lambda e: "plain" if e.plain else "own"),
        ("flags", lambda e: " ".join(p.flag_name for p in e.params) or "-")))
