"""The listwise family: pro (ranking records) and grao (scored samples with a reference
answer), trained by `AlignkitDPOTrainer` (dpo_trainer.py) with a loss hook of
`GROUP_LOSSES` (losses.pro, losses.grao: TRL has neither). No reference model.

Info fields of these entries: `group_loss` (the key of its `GROUP_LOSSES` hook) and
`with_reference` (the records carry a reference answer, GRAO's y).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry import Param
from . import add
from .common import (PolicyRun, check_offline, config, config_overrides, finish, hparams,
                     load_policy, method_beta, quiet, tokenized)

SFT_WEIGHT = Param("sft_weight", float, 0.05, "Weight of PRO's SFT term.")
GRAO_LAMBDA = Param("grao_lambda", float, 0.6, "GRAO's lambda (the weight of the alignment "
                    "term).")

_GROUPS = f"{__name__}:train_groups"
add("pro", "PRO listwise ranking loss plus the SFT term (--sft-weight)", _GROUPS,
    reads="ranking", params=(SFT_WEIGHT,), default_lr=5e-6,
    no_beta="pro has no beta (its temperatures are reward differences)", group_loss="pro",
    with_reference=False)
add("grao", "GRAO group alignment on scored samples with a reference answer "
    "(--grao-lambda)", _GROUPS, reads="samples", params=(GRAO_LAMBDA,), default_lr=1e-6,
    default_beta=0.5, group_loss="grao", with_reference=True)


@quiet
def train_groups(run: PolicyRun) -> Path:
    """pro (ranking records) and grao (scored samples with a reference answer)."""
    from trl import DPOConfig

    from ..training import lora_config, prepare_run
    from .data import group_rows
    from .dpo_trainer import AlignkitDPOTrainer, GroupCollator
    m, opts = run.method, run.opts
    check_offline(run)
    started = time.time()
    beta = method_beta(run)
    config_overrides(DPOConfig, run)
    dataset, _, _, counts = tokenized(
        run, lambda tk: group_rows(run.data, tk, method=m.name, with_reference=m.with_reference))
    work = prepare_run(run.out, opts)
    model, tok = load_policy(run)
    # DPOConfig needs a positive beta; pro's loss has none
    cfg = config(DPOConfig, run, work, beta=max(beta or 0.0, 1e-9), max_length=opts.max_length,
                 precompute_ref_log_probs=True)
    trainer = AlignkitDPOTrainer(
        model=model, args=cfg, data_collator=GroupCollator(pad_token_id=tok.pad_token_id),
        train_dataset=dataset, processing_class=tok, peft_config=lora_config(opts),
        loss_hook=group_hook(GROUP_LOSSES[m.group_loss], beta, run.options))
    return finish(trainer, run, work, tok, started, hparams(run, beta, **run.options), None,
                  counts)


# --- loss hooks -----------------------------------------------------------------------------

@dataclass
class GroupBatch:
    """A listwise batch as the loss terms read it: the summed and length-averaged
    log-probs of every sequence (`sums`, `avg` [N]), the samples' averages on the
    [B, K] grid (`avg_grid`, best first) and the reference answer's [B] (`ref_avg`, GRAO),
    and the collator's columns (`extras`: scores, valid, group, slot, ref_score)."""
    sums: Any
    avg_grid: Any
    ref_avg: Any
    extras: dict

    def grid(self, values):
        return _grid(values, self.extras["group"], self.extras["slot"], *self.extras["scores"].shape)


def _grid(values, group, slot, B: int, K: int):
    """Scatter per-sequence values into [B, K] by (group, slot); slot -1 rows into [B]."""
    sel = slot >= 0
    grid = values.new_zeros(B, K).index_put((group[sel], slot[sel]), values[sel])
    ref = values.new_zeros(B).index_put((group[~sel],), values[~sel]) if (~sel).any() else None
    return grid, ref


def _pro_loss(tr, b: GroupBatch, beta: float | None, options: dict):
    from . import losses
    sum_grid, _ = b.grid(b.sums)
    loss, rank, sft = losses.pro(b.avg_grid, b.extras["scores"], b.extras["valid"],
                                 sum_grid[:, 0], options["sft_weight"])
    tr.log_metric("loss/rank", rank)
    tr.log_metric("loss/sft", sft)
    tr.log_metric("logps/best", sum_grid[:, 0])
    return loss


def _grao_loss(tr, b: GroupBatch, beta: float | None, options: dict):
    from . import losses
    loss = losses.grao(b.avg_grid, b.extras["scores"], b.extras["valid"], b.ref_avg,
                       b.extras["ref_score"], beta, options["grao_lambda"])
    tr.log_metric("avg_logps/reference", b.ref_avg)
    return loss


# The listwise losses by the entries' `group_loss`: fn(trainer, batch, beta, options) -> loss.
GROUP_LOSSES = {"pro": _pro_loss, "grao": _grao_loss}


def group_hook(loss_fn, beta: float | None, options: dict):
    """A loss hook for AlignkitDPOTrainer running one of GROUP_LOSSES."""
    def hook(tr, model, inputs, extras):
        per_token, mask = tr.policy_logps(model, inputs)
        sums = per_token.sum(dim=1)
        avg = sums / mask.sum(dim=1).clamp(min=1)
        B, K = extras["scores"].shape
        avg_grid, ref_avg = _grid(avg, extras["group"], extras["slot"], B, K)
        loss = loss_fn(tr, GroupBatch(sums, avg_grid, ref_avg, extras), beta, options)
        tr.log_metric("avg_logps/samples", avg_grid[extras["valid"]])
        tr.count_tokens(inputs)
        return loss
    return hook
