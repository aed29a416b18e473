"""Pure tensor functions of the online methods (no trainer state), one per formula of
ALGORITHMS.md, so each can be tested on hand-made tensors.

TRL has none of these: GTPO's conflict-token weights and entropy shaping (Part B §2),
EARL's per-response entropy gate (TRL's `top_entropy_quantile` is the batch-scope
gate only; Part B §3), P3O's pairwise clipped objective (Part A §4) and the online /
mixture IPO loss with scorer labels (Part A §1).

Shapes: N completions, T completion positions; `mask` is 1 on real completion tokens
(left-aligned, as TRL pads completions on the right).
"""
from __future__ import annotations

import math

import torch

# GTPO defaults (the authors' code, `gtpo/gtpo_training.py`).
GTPO_CONFLICT_WEIGHT = 2.0
GTPO_ENTROPY_THRESHOLD = 0.7
GTPO_ENTROPY_SCALE = 0.1


# --- GTPO ------------------------------------------------------------------------------------

def _shared_run(ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor,
                neg: torch.Tensor) -> torch.Tensor:
    """Positions (i, t) whose token sits at position t in some positive AND some negative
    completion, kept only while every earlier position of row i is such a position."""
    same = (ids[:, None, :] == ids[None, :, :]) & valid[:, None, :] & valid[None, :, :]  # (N, N, T)
    in_pos = (same & pos[None, :, None]).any(1)
    in_neg = (same & neg[None, :, None]).any(1)
    raw = in_pos & in_neg & valid
    return torch.cumprod(raw.to(torch.int64), dim=1).bool() & valid


def _end_aligned(x: torch.Tensor, lengths: torch.Tensor, fill) -> torch.Tensor:
    """Row i reversed over its first lengths[i] positions: out[i, k] = x[i, len_i - 1 - k]
    (k < len_i), `fill` after. Applying it twice gives x back on the valid part."""
    T = x.shape[1]
    k = torch.arange(T, device=x.device)[None, :]
    src = (lengths[:, None] - 1 - k).clamp(min=0)
    out = x.gather(1, src)
    return torch.where(k < lengths[:, None], out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def gtpo_conflicts(ids: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) conflict masks [N, T] (bool) of GTPO, per group of `group_size`
    consecutive completions.

    Within a group, P = completions with A > 0, N = those with A < 0. Position t of an
    active completion (A != 0) is a forward conflict when its token is at position t
    in at least one P and at least one N completion and every earlier position is a
    conflict too (the shared prefix run); the backward mask is the same test on
    end-aligned positions (the shared suffix run). Rows with A = 0 have no conflicts.
    """
    N, T = ids.shape
    if N % group_size:
        raise ValueError(f"{N} completions are not groups of {group_size}")
    valid = mask.bool()
    lengths = valid.sum(-1)
    fwd = torch.zeros_like(valid)
    bwd = torch.zeros_like(valid)
    rev_ids = _end_aligned(ids, lengths, 0)
    rev_valid = _end_aligned(valid, lengths, False)
    for start in range(0, N, group_size):
        g = slice(start, start + group_size)
        pos, neg = advantages[g] > 0, advantages[g] < 0
        active = (pos | neg)[:, None]
        fwd[g] = _shared_run(ids[g], valid[g], pos, neg) & active
        run_rev = _shared_run(rev_ids[g], rev_valid[g], pos, neg) & active
        bwd[g] = _end_aligned(run_rev, lengths[g], False) & valid[g]
    return fwd, bwd


def gtpo_token_weights(ids: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                       group_size: int, weight: float = GTPO_CONFLICT_WEIGHT
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ [N, T] float, n_conflict [N] long).

    δ = δ_fwd · δ_bwd · mask, where δ_x is 1 off the conflict positions of mask x and,
    on them, `weight` (2.0) for a positive completion and 0 for a negative one (the
    negative update on shared tokens is skipped, the positive one amplified).
    n_conflict counts a completion's positions in either conflict mask.
    """
    fwd, bwd = gtpo_conflicts(ids, mask, advantages, group_size)
    positive = (advantages > 0)[:, None]
    on_conflict = torch.where(positive, torch.full_like(advantages[:, None], weight, dtype=torch.float32),
                              torch.zeros_like(advantages[:, None], dtype=torch.float32))
    d_fwd = torch.where(fwd, on_conflict, torch.ones_like(on_conflict))
    d_bwd = torch.where(bwd, on_conflict, torch.ones_like(on_conflict))
    delta = d_fwd * d_bwd * mask.float()
    return delta, (fwd | bwd).sum(-1)


def gtpo_advantages(advantages: torch.Tensor, mean_entropy: torch.Tensor,
                    threshold: float = GTPO_ENTROPY_THRESHOLD,
                    scale: float = GTPO_ENTROPY_SCALE) -> torch.Tensor:
    """GTPO's entropy filter: A_i := 0 when the completion's mean token entropy H̄_i
    exceeds `threshold`, else A_i − scale·H̄_i."""
    return torch.where(mean_entropy > threshold, torch.zeros_like(advantages),
                       advantages - scale * mean_entropy)


def gtpo_loss(logps: torch.Tensor, advantages: torch.Tensor, delta: torch.Tensor,
              mask: torch.Tensor, n_conflict: torch.Tensor) -> torch.Tensor:
    """L = mean_i [ −(1/|o_i|) Σ_t ρ_{i,t} A_i δ_{i,t} / max(1, n_conflict_i) ] with
    ρ = exp(logp − sg(logp)) (value 1: no clipping, no KL, no reference)."""
    ratio = torch.exp(logps - logps.detach())
    per_token = -(ratio * advantages[:, None] * delta)
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return (per_seq / n_conflict.clamp(min=1)).mean()


def masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# --- EARL ------------------------------------------------------------------------------------

def earl_gate(entropies: torch.Tensor, mask: torch.Tensor, quantile: float,
              scope: str = "batch") -> torch.Tensor:
    """The EARL gate 1[H_{i,t} ≥ τ] (bool [N, T], False off the mask): keep the top
    `quantile` share of tokens by entropy. τ is the (1 − quantile) quantile (linear
    interpolation, as torch.quantile and TRL's `get_high_entropy_mask`) of the valid
    token entropies of the whole batch (`scope="batch"`) or of each response
    (`scope="response"`)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    valid = mask.bool()
    ent = entropies.detach().float()
    if scope == "batch":
        vals = ent[valid]
        if vals.numel() == 0:
            return torch.zeros_like(valid)
        return (ent >= torch.quantile(vals, 1.0 - quantile)) & valid
    if scope != "response":
        raise ValueError(f"scope must be batch or response, got {scope!r}")
    gate = torch.zeros_like(valid)
    for i in range(ent.shape[0]):
        vals = ent[i][valid[i]]
        if vals.numel():
            gate[i] = (ent[i] >= torch.quantile(vals, 1.0 - quantile)) & valid[i]
    return gate


# --- pairs: P3O and IPO ----------------------------------------------------------------------

def pair_order(groups: torch.Tensor) -> torch.Tensor:
    """The row order [N] that puts the two completions of each pair side by side, so that
    the pairs of P3O / online IPO / IPO-MD are rows (0, 1), (2, 3), ... after indexing.

    `groups` [N] is each completion's prompt (its dataset row). Each completion pairs with
    the next completion of the same prompt (first with second, third with fourth, in
    sampling order; y1 is the one sampled first); the pairs keep the order of their
    first members. A completion left without a partner is a ValueError: the two samples
    of a prompt must be in the same step."""
    open_: dict = {}
    pairs: list[tuple[int, int]] = []
    for i, g in enumerate(groups.tolist()):
        if g in open_:
            pairs.append((open_.pop(g), i))
        else:
            open_[g] = i
    if open_:
        raise ValueError(f"completions {sorted(open_.values())} have no partner of the same "
                         "prompt in this batch")
    pairs.sort()
    return torch.tensor([k for pair in pairs for k in pair], dtype=torch.long,
                        device=groups.device)


def pair_preference(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """P(y1 ≻ y2) from the scorer: 1, 0, or ½ on a tie; NaN when either is unscored."""
    p = (r1 > r2).float() + 0.5 * (r1 == r2).float()
    return torch.where(torch.isnan(r1) | torch.isnan(r2), torch.full_like(p, math.nan), p)


def ipo_online_loss(h: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-pair online IPO loss (h − (P(y1 ≻ y2) − ½)/τ)², h = Δ(y1) − Δ(y2) with
    Δ = Σ log πθ − Σ log πref. A hard label P ∈ {0, 1} gives IPO's (h_wl − 1/(2τ))²."""
    return (h - (p - 0.5) / tau) ** 2


def p3o_q(r1: torch.Tensor, r2: torch.Tensor, L1: torch.Tensor, L2: torch.Tensor,
          kappa: float) -> torch.Tensor:
    """q = sg[(r1 − r2) − κ (L1 − L2)]: the KL-regularised reward difference, with
    L = Σ_t(log πθ − log πref) of the **current** policy (the paper's and the authors'
    trlx code's reading; the rollout-time L_old enters only ρ and the clip)."""
    return ((r1 - r2) - kappa * (L1 - L2)).detach()


def p3o_rho(dL1: torch.Tensor, dL2: torch.Tensor, c: float) -> torch.Tensor:
    """ρ = exp((L1 − L1_old) + (L2 − L2_old)) clamped to [1/c, c] (no gradient)."""
    return torch.exp(dL1 + dL2).clamp(1.0 / c, c).detach()


def p3o_joint_loss(d: torch.Tensor, d_old: torch.Tensor, q: torch.Tensor, rho: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """Per-pair joint (pair) clip: max(−qρ·d, −qρ·clip(d, d_old − ε, d_old + ε)),
    d = L1 − L2."""
    w = q * rho
    clipped = torch.maximum(torch.minimum(d, d_old + eps), d_old - eps)
    return torch.maximum(-w * d, -w * clipped)


def p3o_token_loss(lp1: torch.Tensor, lp1_old: torch.Tensor, m1: torch.Tensor,
                   lp2: torch.Tensor, lp2_old: torch.Tensor, m2: torch.Tensor,
                   q: torch.Tensor, rho: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-pair token-wise clip: every token log-prob of y1 (weight −qρ) and of y2
    (weight +qρ) is clipped to its rollout value ± ε on its own; summed over tokens."""
    def side(lp, lp_old, m, w):
        clipped = torch.maximum(torch.minimum(lp, lp_old + eps), lp_old - eps)
        return (torch.maximum(w * lp, w * clipped) * m).sum(-1)
    w = (q * rho)[:, None]
    return side(lp1, lp1_old, m1, -w) + side(lp2, lp2_old, m2, w)


def p3o_pair_loss(logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                  rewards: torch.Tensor, kappa: float, ratio_clip: float, eps: float,
                  clip: str = "pair") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P3O on rows paired (0,1), (2,3), ... (`pair_order`): (per-pair loss, q, ρ).

    L_i = Σ_t (log πθ − log πref) with the CURRENT policy's log-probs, as the paper and its
    authors' code define q = sg[(r1 − r2) − κ(L1 − L2)]; the rollout-time log-probs `old`
    enter only the ratio ρ and the clipping (ALGORITHMS.md Part B, P3O)."""
    seq = ((logps - ref) * mask).sum(-1)
    seq_old = ((old - ref) * mask).sum(-1)
    q = torch.nan_to_num(p3o_q(rewards[0::2], rewards[1::2], seq[0::2], seq[1::2], kappa))
    diff = ((logps.detach() - old) * mask).sum(-1)
    rho = p3o_rho(diff[0::2], diff[1::2], ratio_clip)
    if clip == "pair":
        per = p3o_joint_loss(seq[0::2] - seq[1::2], seq_old[0::2] - seq_old[1::2], q, rho, eps)
    else:
        per = p3o_token_loss(logps[0::2], old[0::2], mask[0::2], logps[1::2], old[1::2],
                             mask[1::2], q, rho, eps)
    return per, q, rho


class RunningStd:
    """Running standard deviation (Welford) of every reward seen: P3O divides rewards by
    it and clips to ±`clip`."""

    def __init__(self, clip: float = 10.0):
        self.count, self.mean, self.m2, self.clip = 0, 0.0, 0.0, clip

    def update(self, values: torch.Tensor) -> None:
        for v in values[~torch.isnan(values)].double().tolist():
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def scale(self, values: torch.Tensor) -> torch.Tensor:
        return (values / max(self.std, 1e-8)).clamp(-self.clip, self.clip)

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
