"""Pure tensor functions of the online methods (no trainer state), one per formula of
ALGORITHMS.md, so each can be tested on hand-made tensors.

TRL has none of these: GTPO's conflict-token weights and entropy shaping (Part B §2),
EARL's per-response entropy gate (TRL's `top_entropy_quantile` is the batch-scope
gate only; Part B §3), P3O's pairwise clipped objective (Part A §4) and the online /
mixture IPO loss with scorer labels (Part A §1). Also, for every online method, the
entropy bonus of `--entropy-coef` (Part D §10, the Policy Cliff: loss − C·Ĥ, Ĥ the token
mean of the full-vocabulary entropy over the loss's tokens, TRL's `entropy_coef`
aggregation), and, for grpo / earl `--credit chunk`, IPA's chunk-level credit (Part D
§4): `token_pieces` gives each token's text, `chunk_ids` splits a completion at the
ends of a boundary regex, `chunk_ratios` takes ρ_c = exp(mean_{t∈c} log-ratio) (the
report's geometric mean), `chunk_clipped_loss` applies GRPO's clip to ρ_c with the
sequence advantage (`--chunk-clip ppo`), `chunk_topr_loss` the report's TOPR split
instead (positives un-reweighted, negatives [ρ_c]_0^1; `--chunk-clip ipa`), and
`aggregate_loss` is TRL's --loss aggregation.
Simplified from IPA: the sequence advantage instead of per-chunk discounted returns
γ^Δ·R_final, and no mismatch mask (no rollout-engine log-probs here).
For grpo `--off-policy` (Part D §11, SOPHIA's text-only core): `off_policy_weights` (w =
min(πθ/μ, κ), per sequence or as the per-token geometric mean, detached),
`off_policy_token_loss` (−w·A·log πθ) and `off_policy_count` (k = floor(S·G), ≥ 1).

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


# --- entropy bonus (ALGORITHMS.md Part D §10, Policy Cliff) ---------------------------------

def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary token entropy H_t = −Σ_v π(v|s_t) log π(v|s_t) [.., T] of logits
    [.., T, V] (already divided by the sampling temperature); differentiable."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ĥ = Σ m·H / Σ m: the mean token entropy over the tokens the policy loss acts on
    (TRL's `entropy_coef` aggregation: a token mean, NOT rescaled by the loss type, so
    a coefficient C means the same for every method). The objective is loss − C·Ĥ.
    `entropies` must carry the gradient (TRL's fused head's do)."""
    mask = mask.to(entropies.dtype)
    return (entropies * mask).sum() / mask.sum().clamp(min=1.0)


# --- IPA chunk-level credit (ALGORITHMS.md Part D §4, ROME report Eqs. 7-9) ------------------

CHUNK_PATTERNS = {"newline": r"\n+", "sentence": r"[.!?]+(?=\s|$)"}


def chunk_pattern(mode: str):
    """The compiled boundary regex of a --chunk-by value (newline | sentence | regex:P);
    ValueError on an unknown mode or a bad / empty pattern."""
    import re
    if mode in CHUNK_PATTERNS:
        return re.compile(CHUNK_PATTERNS[mode])
    if not mode.startswith("regex:") or not mode[6:]:
        raise ValueError(f"must be newline, sentence or regex:PATTERN, got {mode!r}")
    try:
        return re.compile(mode[6:])
    except re.error as e:
        raise ValueError(f"bad regex {mode[6:]!r}: {e}") from None


def token_pieces(tok, ids: list[int]) -> list[str]:
    """The text each completion token adds, from the decoded prefixes: a token ending in
    the middle of a character (a partial UTF-8 byte sequence decodes to U+FFFD) adds
    "" and the token completing it adds the character. Their concatenation is the
    decoded text (where a tokenizer's decoding is prefix-stable, as byte-level BPE's)."""
    import os.path
    pieces, prev = [], ""
    for k in range(len(ids)):
        text = tok.decode(ids[:k + 1], skip_special_tokens=False)
        if text.endswith("\ufffd") and k + 1 < len(ids):
            pieces.append("")
            continue
        keep = len(prev) if text.startswith(prev) else len(os.path.commonprefix([prev, text]))
        pieces.append(text[keep:])
        prev = text
    return pieces


def chunk_ids(pieces: list[str], mode: str = "newline") -> torch.Tensor:
    """The chunk index (LongTensor [T], 0, 1, ... consecutive) of each completion token,
    from the token texts `pieces` (their concatenation is the completion, so piece k
    spans characters [s_k, e_k)). A chunk ends at the end of every match of the mode's
    boundary regex (newline: a run of newlines; sentence: a run of . ! ? followed by
    whitespace or the end; regex:P: P). Token k is in chunk #{boundaries b < e_k}: the
    token holding the boundary closes its chunk and the next token opens a new one."""
    pattern = chunk_pattern(mode)
    text = "".join(pieces)
    bounds = sorted({m.end() for m in pattern.finditer(text) if m.end() > m.start()})
    ids, end, j, raw = [], 0, 0, []
    for piece in pieces:
        end += len(piece)
        while j < len(bounds) and bounds[j] < end:
            j += 1
        raw.append(j)
    # renumber consecutively (a boundary inside one token, or two in a row, leaves gaps)
    for k, r in enumerate(raw):
        ids.append(0 if k == 0 else ids[-1] + (r != raw[k - 1]))
    return torch.tensor(ids, dtype=torch.long)


def chunk_ratios(logps: torch.Tensor, old_logps: torch.Tensor, chunk: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPA's chunk ratio ρ_c = (Π_{t∈c} πθ/πold)^{1/|c|} = exp(mean_{t∈c} (log πθ − log πold))
    (the geometric mean of the report, as GSPO's per sequence), over the masked tokens.
    Returns (per-token ratio [N, T]: each token gets its chunk's ρ_c, with gradient;
    chunk ratios [N, K]; chunk token counts [N, K], 0 for a chunk a row lacks)."""
    mask = mask.to(logps.dtype)
    ids = chunk.long().clamp(min=0)
    K = int(ids.max().item()) + 1 if ids.numel() else 1
    zeros = torch.zeros(logps.shape[0], K, dtype=logps.dtype, device=logps.device)
    sums = zeros.scatter_add(1, ids, (logps - old_logps) * mask)
    counts = zeros.scatter_add(1, ids, mask)
    chunk_rho = torch.exp(sums / counts.clamp(min=1.0))
    return chunk_rho.gather(1, ids), chunk_rho, counts


def chunk_clipped_loss(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                       eps_high: float) -> torch.Tensor:
    """Per-token loss [N, T] of the chunk credit: −min(ρ_c·A, clip(ρ_c, 1−ε_low, 1+ε_high)·A)
    with ρ_c the token's chunk ratio and A the sequence advantage [N] (GRPO's clipped
    surrogate with the ratio taken per chunk; every token of a chunk carries its
    chunk's term, so a chunk weighs by its token count in the aggregation and each
    token's gradient is A·ρ_c·∇log πθ(t), the report's Σ_{k∈c} ∇log π form)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * adv, clipped * adv)


def chunk_topr_loss(logps: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor
                    ) -> torch.Tensor:
    """IPA's own chunk update (report Eq. 9, TOPR split, no PPO clip), per token [N, T]:
    −w_c·A·log πθ(t) with w_c = 1 for a positive completion (A > 0: un-reweighted,
    return-weighted SL) and w_c = sg([ρ_c]_0^1) otherwise (truncated importance
    sampling); A is the sequence advantage in place of the report's per-chunk return."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    w = torch.where(adv > 0, torch.ones_like(ratio), ratio.detach().clamp(0.0, 1.0))
    return -w * adv * logps


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                   max_len: int = 0, n_tokens: float | None = None) -> torch.Tensor:
    """TRL GRPO's aggregations (ALGORITHMS.md Part B §1): grpo = mean over sequences of the
    token mean; bnpo = Σ mℓ / Σ m; dr_grpo = Σ mℓ / (N·max_len); dapo = Σ mℓ / n_tokens
    (the active tokens TRL counts for the accumulated batch; default Σ m)."""
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_len)
    if loss_type == "dapo":
        return total / max(float(n_tokens if n_tokens is not None else mask.sum().item()), 1.0)
    raise ValueError(f"chunk credit has no aggregation for loss {loss_type!r}")


# --- semi-off-policy members (--off-policy; SOPHIA's text-only core, Part D §11) ---------------

def off_policy_weights(logp_policy: torch.Tensor, logp_behaviour: torch.Tensor,
                       n_tokens: torch.Tensor, mode: str = "token-mean",
                       clip: float | None = 1.0) -> torch.Tensor:
    """The importance weight of an off-policy completion (detached, float64):
    sequence: w = min(πθ(y|x) / μ(y|x), κ) = exp(min(Δ, log κ)), Δ = log πθ(y|x) − log μ(y|x)
    (both summed over the completion); token-mean: w = min(exp(Δ / n), κ), the geometric
    mean of the per-token ratios over the n policy tokens. `clip` κ None or 0: no clip."""
    d = (logp_policy.detach().double() - logp_behaviour.detach().double())
    if mode == "token-mean":
        d = d / n_tokens.detach().double().clamp(min=1.0)
    elif mode != "sequence":
        raise ValueError(f"unknown off-policy weighting {mode!r}")
    if clip:
        d = d.clamp(max=math.log(clip))
    return torch.exp(d)


def off_policy_token_loss(logps: torch.Tensor, weights: torch.Tensor,
                          advantages: torch.Tensor) -> torch.Tensor:
    """SOPHIA's off-policy policy-gradient term per token, −w·A·log πθ(y_t | x, y_<t)
    (w a detached weight per completion, A the group advantage; no PPO clip: the
    truncation of w is the only one). Shape [N, T]; rows with w = 0 contribute 0."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages[:, :1]
    return -(weights.to(logps.dtype)[:, None] * adv.to(logps.dtype)) * logps


def off_policy_count(share: float, generations: int, available: int) -> int:
    """How many of a group's `generations` members are off-policy: floor(share·G), at
    least 1 when share > 0, at most the prompt's available completions (0 if none)."""
    if share <= 0 or available <= 0:
        return 0
    return min(max(1, int(math.floor(share * generations + 1e-9))), generations, available)
