"""The custom preference losses, as pure functions of log-probability tensors.

TRL has none of these losses (its DPOTrainer has the others, used as they are): cDPO
(`sigmoid` with label smoothing, dropped from TRL's `sigmoid` in v0.29), soft SPPO and
its single-pair variant, CoPG, PRO and GRAO. Each function takes summed (or averaged)
sequence log-probabilities and returns per-example losses (shape [B]) or, for the
listwise losses, a scalar; the trainers (pairs.py, groups.py) take the mean and log
metrics. `PAIR_TERMS` is how the pair trainer calls them: one hook per `--loss` name.
The formulas are those of ALGORITHMS.md; every choice the sources leave open is named
in the docstring (UNVERIFIED there).

Notation: `pc`/`pr` are the policy's summed log-probs of the chosen/rejected
completions, `rc`/`rr` the reference's; Δ = logπθ − logπref; h = Δc − Δr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F


def cdpo(pc, pr, rc, rr, beta: float, label_smoothing: float):
    """Conservative DPO (cDPO): −(1−ε)·logσ(β·h) − ε·logσ(−β·h).

    ε is the probability that a label is flipped; ε = 0 is plain DPO. TRL ≥ 0.29 has no
    such loss (its `sigmoid` ignores `label_smoothing`), so it lives here.
    """
    logits = beta * ((pc - rc) - (pr - rr))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sppo(pc, pr, rc, rr, p_w, p_l, beta: float):
    """Soft SPPO (uclaml/SPPO `loss_type="sppo"`), η = 1/β:
    ½[(Δc − η(p_w − ½))² + (Δr − η(p_l − ½))²].

    p_w = P̂(y_w ≻ π_t) and p_l = P̂(y_l ≻ π_t) are the estimated win rates of the chosen
    and rejected completions against the sampling policy. TRL has only `sppo_hard`
    (p_w = 1, p_l = 0, no ½ factor).
    """
    eta = 1.0 / beta
    loss_w = ((pc - rc) - eta * (p_w - 0.5)) ** 2
    loss_l = ((pr - rr) - eta * (p_l - 0.5)) ** 2
    return 0.5 * (loss_w + loss_l)


def sppo_single(pc, pr, rc, rr, p_wl, beta: float):
    """Single-pair SPPO (uclaml/SPPO `loss_type="sppo_single"`), η = 1/β:
    ½[(Δc − η(P − ½))² + (Δr + η(P − ½))²] with P = P(y_w ≻ y_l). Not in TRL."""
    eta = 1.0 / beta
    loss_w = ((pc - rc) - eta * (p_wl - 0.5)) ** 2
    loss_l = ((pr - rr) + eta * (p_wl - 0.5)) ** 2
    return 0.5 * (loss_w + loss_l)


def copg(pc, pr, rc, rr, reward_c, reward_r, beta: float):
    """Contrastive Policy Gradient (Flet-Berliac et al. 2024) on a pair:
    ((R_c − β·Δc) − (R_r − β·Δr))², the squared difference of the KL-regularised rewards.

    Off-policy, no importance weights: the other sample's regularised reward is the
    baseline. With R_c − R_r = ½ it is β²·(h − 1/(2β))², i.e. IPO with τ = β (summed
    log-probs). Not in TRL.
    """
    return ((reward_c - beta * (pc - rc)) - (reward_r - beta * (pr - rr))) ** 2


def sft_nll(per_token_logps, mask):
    """Mean negative log-likelihood over the masked tokens of a batch (TRL's `sft` loss
    type, used with the custom losses in a multi-loss `--loss X,sft`)."""
    mask = mask.to(per_token_logps.dtype)
    return -(per_token_logps * mask).sum() / mask.sum().clamp(min=1.0)


def pro(avg_logps, rewards, valid, best_logps, sft_weight: float, eps: float = 1e-10):
    """PRO listwise loss (Song et al., DAMO-ConvAI `PRO/train/utils/process_manager.py`).

    avg_logps [B, K]: s_k = length-averaged log-prob of completion k (best first);
    rewards [B, K]: their scores r_k; valid [B, K]: which entries exist (records may
    have different numbers of completions); best_logps [B]: the summed log-prob of the
    best completion (the SFT term). No reference model.

    For each stage k with at least one worse completion i > k:
    T_ki = r_k − r_i, T_kk = max_i T_ki, and
    L_k = log(ε + e^{s_k·T_kk} + Σ_{i>k} e^{s_i·T_ki}) − s_k·T_kk
    (ε = 1e-10 inside the log, as in the reference code; computed with logsumexp).
    L_rank = Σ_k mean over the records that have stage k of L_k.
    L_SFT = mean_b (n_b − 1)²·(−logπ(y¹_b)) where n_b is record b's completion count (for
    equal n this is the paper's (n−1)²·L_SFT); total = L_rank + sft_weight·L_SFT.

    Returns (total, rank, sft), all scalars.
    """
    B, K = avg_logps.shape
    valid = valid.bool()
    rank = avg_logps.new_zeros(())
    log_eps = math.log(eps)
    for k in range(K - 1):
        later = valid[:, k + 1:] & valid[:, k:k + 1]
        has = later.any(dim=1)
        if not has.any():
            continue
        t_neg = rewards[:, k:k + 1] - rewards[:, k + 1:]                       # [B, K-k-1]
        t_pos = t_neg.masked_fill(~later, float("-inf")).max(dim=1).values     # [B]
        t_pos = torch.where(has, t_pos, torch.zeros_like(t_pos))
        pos = avg_logps[:, k] * t_pos                                          # [B]
        neg = (avg_logps[:, k + 1:] * t_neg).masked_fill(~later, float("-inf"))
        terms = torch.cat([pos[:, None], neg, torch.full_like(pos[:, None], log_eps)], dim=1)
        per = torch.logsumexp(terms, dim=1) - pos                              # [B]
        rank = rank + per[has].mean()
    n = valid.sum(dim=1).to(avg_logps.dtype)
    sft = ((n - 1) ** 2 * -best_logps).mean()
    return rank + sft_weight * sft, rank, sft


def group_advantages(rewards, valid, eps: float = 1e-4):
    """(R − mean) / (std + eps) over the valid entries of each row (population std)."""
    valid = valid.to(rewards.dtype)
    n = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (rewards * valid).sum(dim=1, keepdim=True) / n
    var = (((rewards - mean) ** 2) * valid).sum(dim=1, keepdim=True) / n
    return (rewards - mean) / (var.sqrt() + eps) * valid


def grao(avg_logps, rewards, valid, ref_avg_logps, ref_rewards, beta: float, lam: float):
    """GRAO (arXiv 2508.07750, no public code; ALGORITHMS.md §6). Loss = −mean_b J_b with
    J = (1/G)·Σ_i [Â_oi·J_exp(o_i) + β·Â_y·J_imi(y) + λ·Â_oi·(J_exp(o_i) − J_imi(y))],
    J_exp(o) = avglogπθ(o) and J_imi(y) = avglogπθ(y) for the reference answer y.

    avg_logps/rewards/valid [B, G] are the sampled outputs; ref_avg_logps/ref_rewards [B]
    the reference answer. Choices where the paper is unclear (UNVERIFIED): the
    advantages are normalised in one group made of the G outputs *and* y ("in one group
    (o_i, y)"), with the population std plus 1e-4; G counts the valid outputs of each
    record. There is no reference-model KL and no clipping.
    """
    valid_f = valid.to(avg_logps.dtype)
    all_r = torch.cat([rewards, ref_rewards[:, None]], dim=1)
    all_v = torch.cat([valid_f, torch.ones_like(ref_rewards[:, None])], dim=1)
    adv = group_advantages(all_r, all_v)
    a_o, a_y = adv[:, :-1], adv[:, -1]
    j_imi = ref_avg_logps[:, None]
    per = (a_o * avg_logps + beta * a_y[:, None] * j_imi + lam * a_o * (avg_logps - j_imi)) * valid_f
    g = valid_f.sum(dim=1).clamp(min=1.0)
    return -(per.sum(dim=1) / g).mean()


# --- the pair trainer's loss terms, by --loss name --------------------------------------------

@dataclass(frozen=True)
class PairBatch:
    """What a pair-loss term reads: the summed log-probs of the policy (`pc`, `pr`) and
    of the reference (`rc`, `rr`) [B], the policy's per-token log-probs and completion
    mask [2B, T] (chosen rows first) and the batch's extra columns (`p_w`, `p_l`, `p_wl`,
    `score_chosen`, `score_rejected`)."""
    pc: Any
    pr: Any
    rc: Any
    rr: Any
    per_token: Any
    mask: Any
    extras: dict


@dataclass(frozen=True)
class PairTerm:
    """One `--loss` term of the pair trainer: `fn(batch, beta, label_smoothing)` -> a
    scalar. `extra` names the row columns it needs (`data.pair_rows` extras)."""
    fn: Callable
    extra: str | None = None


def _cdpo_term(b: PairBatch, beta: float, label_smoothing: float):
    return cdpo(b.pc, b.pr, b.rc, b.rr, beta, label_smoothing).mean()


def _sppo_term(b: PairBatch, beta: float, label_smoothing: float):
    return sppo(b.pc, b.pr, b.rc, b.rr, b.extras["p_w"], b.extras["p_l"], beta).mean()


def _sppo_single_term(b: PairBatch, beta: float, label_smoothing: float):
    return sppo_single(b.pc, b.pr, b.rc, b.rr, b.extras["p_wl"], beta).mean()


def _copg_term(b: PairBatch, beta: float, label_smoothing: float):
    return copg(b.pc, b.pr, b.rc, b.rr, b.extras["score_chosen"], b.extras["score_rejected"],
                beta).mean()


def _sft_term(b: PairBatch, beta: float, label_smoothing: float):
    return sft_nll(b.per_token.chunk(2)[0], b.mask.chunk(2)[0])


# The custom pair losses (TRL has none of them) plus TRL's `sft` term, which a multi-loss
# `--loss X,sft` adds beside them.
PAIR_TERMS: dict[str, PairTerm] = {
    "cdpo": PairTerm(_cdpo_term),
    "sppo": PairTerm(_sppo_term, "p_win"),
    "sppo_single": PairTerm(_sppo_single_term, "p_pair"),
    "copg": PairTerm(_copg_term, "scores"),
    "sft": PairTerm(_sft_term),
}
