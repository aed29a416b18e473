"""The pair family: dpo (every TRL DPO loss, multi-loss, alignkit's cDPO), sppo and copg,
trained on pair records by `AlignkitDPOTrainer` (dpo_trainer.py).

TRL's own DPO losses run unchanged in DPOTrainer; alignkit's losses (losses.py: cDPO,
soft and single-pair SPPO, CoPG, none of which TRL has) plug in through a loss hook that
sums the `losses.PAIR_TERMS` named by `--loss` (with TRL's `sft` term beside them).

Info fields of these entries: `default_loss` (the --loss when none is given),
`custom_losses` (alignkit's losses the method takes) and `trl_losses` (TRL's).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import UsageError
from ..registry import Param
from . import add
from .common import (PolicyRun, check_offline, config, config_overrides, finish, hparams,
                     load_policy, load_reference, method_beta, quiet, resolve_dtypes, tokenized)

# The --loss values of each method that takes --loss; the first listed is the default.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")                       # TRL's DPOConfig.loss_type (dpo)
SPPO_LOSSES = ("sppo", "sppo_single")               # alignkit's (losses.py)
COPG_LOSSES = ("copg",)
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")  # TRL's GRPOConfig (grpo, earl)
GRPO_DEFAULT_LOSS = "dapo"
# With --label-smoothing > 0 (dpo): TRL's sigmoid ignores it, alignkit's cDPO is the
# smoothed sigmoid.
SMOOTHED = {"sigmoid": "cdpo"}
# the losses a label-smoothing value changes (alignkit's cDPO, also as sigmoid; TRL's others:
# TRL 1.16's hinge, ipo, sigmoid_norm, nca_pair, bco_pair, sppo_hard, apo_*, discopop and
# sft ignore it)
SMOOTHING_LOSSES = frozenset({"sigmoid", "cdpo", "exo_pair", "robust", "aot", "aot_unpaired"})

# --- parameters (`--loss` is also grpo's and earl's: online.py) -------------------------------

LOSS = Param("loss", str, None, "The loss; for dpo, sppo and copg also a comma list "
             f"(--loss-weights). dpo: {' | '.join(DPO_LOSSES)} (TRL's) or cdpo, default "
             f"{DPO_LOSSES[0]}; sppo: {' | '.join(SPPO_LOSSES)}, default {SPPO_LOSSES[0]}; "
             f"copg: {' | '.join(COPG_LOSSES)}; grpo, earl: {' | '.join(GRPO_LOSSES)}, "
             f"default {GRPO_DEFAULT_LOSS}.", metavar="NAME")
LOSS_WEIGHTS = Param("loss_weights", str, None, "Weights of a multi-loss --loss, e.g. 1,0.1.",
                     metavar="W,W")
LABEL_SMOOTHING = Param("label_smoothing", float, 0.0, "cDPO label-flip probability, in "
                        "[0, 0.5), with --loss sigmoid (also robust, exo_pair, aot, aot_unpaired; refused "
                        "with the losses it does not change).")

_PAIR = f"{__name__}:train_pairs"
add("dpo", "DPO; --loss takes every TRL DPO loss (comma list, --loss-weights); "
    "--label-smoothing with sigmoid = cDPO", _PAIR, reads="pairs",
    params=(LOSS, LOSS_WEIGHTS, LABEL_SMOOTHING), trl="DPOTrainer", default_lr=1e-6,
    default_beta=0.1, needs_ref=True, default_loss=DPO_LOSSES[0], custom_losses=("cdpo",),
    trl_losses=DPO_LOSSES)
add("sppo", "soft SPPO with p_win (eta = 1/beta); --loss sppo_single for the single-pair "
    "variant", _PAIR, reads="pairs", params=(LOSS, LOSS_WEIGHTS), default_lr=5e-7,
    default_beta=0.001, needs_ref=True, default_loss=SPPO_LOSSES[0], custom_losses=SPPO_LOSSES,
    trl_losses=())
add("copg", "contrastive policy gradient on pairs with score_chosen/score_rejected", _PAIR,
    reads="pairs", params=(LOSS, LOSS_WEIGHTS), default_lr=1e-6, default_beta=0.1,
    needs_ref=True, default_loss=COPG_LOSSES[0], custom_losses=COPG_LOSSES, trl_losses=())


def parse_losses(method, loss: str | None, weights: str | None,
                 label_smoothing: float) -> tuple[list[tuple[str, float]], bool]:
    """`--loss a,b --loss-weights 1,0.1` -> ([(name, weight)], custom?) for a pair-family
    entry. With `--label-smoothing` > 0, dpo's `sigmoid` becomes alignkit's cDPO."""
    names = [s.strip() for s in (loss or method.default_loss).split(",") if s.strip()]
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(f"--loss-weights must be numbers, got {weights!r}") from None
        if len(ws) != len(names):
            raise UsageError(f"--loss-weights has {len(ws)} values for {len(names)} losses")
    else:
        ws = [1.0] * len(names)
    allowed = set(method.custom_losses) | {"sft"} | set(method.trl_losses)
    for n in names:
        if n not in allowed:
            raise UsageError(f"--loss {n!r} is not a {method.name} loss; choose from "
                             f"{', '.join(sorted(allowed))}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UsageError("--label-smoothing must be in [0, 0.5)")
    if label_smoothing > 0:
        if not any(n in SMOOTHING_LOSSES for n in names):
            raise UsageError(f"--label-smoothing has no effect with --loss {','.join(names)}: "
                             f"only {', '.join(sorted(SMOOTHING_LOSSES))} use it")
        names = [SMOOTHED.get(n, n) for n in names]
    elif "exo_pair" in names:  # TRL raises only once the models are loaded
        raise UsageError("--loss exo_pair needs --label-smoothing > 0 (the EXO paper: 1e-3)")
    ours = [n for n in names if n in method.custom_losses]
    custom = bool(ours)
    if custom:
        other = [n for n in names if n not in ours and n != "sft"]
        if other:
            raise UsageError(f"alignkit's losses ({', '.join(ours)}) combine only with sft, "
                             f"not with TRL's {', '.join(other)}")
    return list(zip(names, ws)), custom


def _record_ref_rule(run: PolicyRun, ref_sha: str):
    """Whether a record's ref_logp_* may be used: never with --no-record-ref; when the
    record names its sampler (`gen.model_sha256`), only if that is the reference; else
    only when the reference is the base (no --ref-model)."""
    if not run.record_ref:
        return None

    def usable(rec: dict) -> bool:
        gen = rec.get("gen")
        if isinstance(gen, dict) and gen.get("model_sha256"):
            return gen["model_sha256"] == ref_sha
        return not run.ref_model
    return usable


@quiet
def train_pairs(run: PolicyRun) -> Path:
    """dpo (TRL losses, or cDPO), sppo, copg: pairs through AlignkitDPOTrainer."""
    from trl import DPOConfig

    from ..models import model_sha256
    from ..training import lora_config, prepare_run
    from .data import pair_rows
    from .dpo_trainer import AlignkitDPOTrainer, PairCollator
    from .losses import PAIR_TERMS
    from .refcache import RefCache, model_identity
    m, options, opts, data = run.method, run.options, run.opts, run.data
    check_offline(run)
    started = time.time()
    beta = method_beta(run)
    ls = float(options.get(LABEL_SMOOTHING.name, LABEL_SMOOTHING.default))
    specs, custom = parse_losses(m, options["loss"], options["loss_weights"], ls)
    config_overrides(DPOConfig, run)
    extras = tuple(dict.fromkeys(PAIR_TERMS[n].extra for n, _ in specs
                                 if n in PAIR_TERMS and PAIR_TERMS[n].extra))

    ref_spec = run.ref_model or run.model
    ref_sha = model_identity(ref_spec)
    rule = _record_ref_rule(run, model_sha256(ref_spec))
    dataset, built, fingerprint, counts = tokenized(
        run, lambda tk: pair_rows(data, tk, extras=extras, method=m.name, record_ref=rule))
    work = prepare_run(run.out, opts)
    model, tok = load_policy(run)
    ref_model = None
    if run.ref_model:  # freed once the reference log-probs are filled
        ref_model, _ = load_reference(run.ref_model, run)
    _, bf16 = resolve_dtypes(opts)
    cache = RefCache(ref_sha, data.sha256, fingerprint, "bf16" if bf16 else "fp32",
                     enabled=run.ref_cache)
    trl_names = [n for n, _ in specs] if not custom else ["sigmoid"]
    cfg = config(DPOConfig, run, work, beta=beta, loss_type=trl_names,
                 loss_weights=[w for _, w in specs] if not custom else None,
                 label_smoothing=ls, max_length=opts.max_length,
                 precompute_ref_log_probs=True)
    collator = PairCollator(pad_token_id=tok.pad_token_id, extra_keys=built.extras)
    trainer = AlignkitDPOTrainer(
        model=model, ref_model=ref_model, args=cfg, data_collator=collator,
        train_dataset=dataset, processing_class=tok, peft_config=lora_config(opts), ref_cache=cache,
        loss_hook=pair_hook(specs, beta, ls) if custom else None, extra_keys=built.extras)
    del ref_model
    reference = {"spec": str(ref_spec), "sha256": ref_sha,
                 "kind": "base (adapter disabled)" if opts.lora_r > 0 and not run.ref_model
                 else ("base" if not run.ref_model else "folder"),
                 **trainer.ref_report}
    hp = hparams(run, beta, loss=[n for n, _ in specs], loss_weights=[w for _, w in specs],
                 label_smoothing=ls)
    return finish(trainer, run, work, tok, started, hp, reference, counts)


def pair_hook(specs: list[tuple[str, float]], beta: float, label_smoothing: float):
    """A loss hook for AlignkitDPOTrainer: the weighted sum of the `losses.PAIR_TERMS`
    named in `specs`, plus the reward metrics TRL's DPO logs."""
    from .losses import PAIR_TERMS, PairBatch
    terms = [(PAIR_TERMS[name], weight) for name, weight in specs]

    def hook(tr, model, inputs, extras):
        per_token, mask = tr.policy_logps(model, inputs)
        pc, pr = per_token.sum(dim=1).chunk(2)
        rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        batch = PairBatch(pc, pr, rc, rr, per_token, mask, extras)
        total = 0.0
        for term, weight in terms:
            total = total + weight * term.fn(batch, beta, label_smoothing)
        reward_c, reward_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        tr.log_metric("rewards/chosen", reward_c)
        tr.log_metric("rewards/rejected", reward_r)
        tr.log_metric("rewards/accuracies", (reward_c > reward_r).float())
        tr.log_metric("rewards/margins", reward_c - reward_r)
        tr.log_metric("logps/chosen", pc)
        tr.log_metric("logps/rejected", pr)
        tr.count_tokens(inputs)
        return total
    return hook
