"""The token-level distillation losses, on flattened logits.

Every function takes the logits at the N scored positions of a batch, flattened to
`[N, V]` (position n predicts completion token n; `seg[n]` is the row it belongs to),
and works in float32 (or the input's float64). They hold the math only, so the unit
tests check them on hand-made logits; `alignkit.distill.trainer` feeds them.

TRL has none of these losses: AlignDistil (ALGORITHMS.md Part B §9), TVD++ (§10) and the
context-distillation KL are alignkit's own. GKD's generalised JSD is TRL's
(`GKDTrainer.generalized_jsd_loss`), used as is by `alignkit.distill.gkd`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ADAPTIVE_EPS = 1e-3  # w_t = beta2' * L1(pi_d, pi_r) + 1e-3 (AlignDistil's reference code)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def row_mean(per_token: torch.Tensor, seg: torch.Tensor, n_rows: int,
             len_norm: bool = True) -> torch.Tensor:
    """Sum the per-token values of each row (divided by the row's length when
    `len_norm`), then average over the rows that have tokens."""
    sums = per_token.new_zeros(n_rows).index_add(0, seg, per_token)
    counts = per_token.new_zeros(n_rows).index_add(0, seg, torch.ones_like(per_token))
    has = counts > 0
    per_row = sums[has] / counts[has] if len_norm else sums[has]
    return per_row.mean() if per_row.numel() else per_token.sum() * 0.0


# --- AlignDistil -------------------------------------------------------------------------

def aligndistil_teacher(z_d: torch.Tensor, z_r: torch.Tensor, *, beta2: float = 10.0,
                        contrast: str = "reverse", weight: float | None = None,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The AlignDistil teacher distribution: (log π*[N, V], w[N]).

    z_d are the DPO model's logits; z_r the reverse-DPO model's (`contrast="reverse"`)
    or the DPO reference's (`contrast="reference"`). The weight is token-adaptive,
    w_t = beta2·Σ_v |π_d(v) − π_r(v)| + 1e-3 (the L1 distance, 2·TVD), unless a fixed
    `weight` is given. Teacher logits:
    - reverse (the paper's `aligndistil`): z* = z_d + w·(z_d − z_r);
    - reference (the paper's theorem-1 form, `theorem1_adaptive` in its code):
      z* = w·z_d + (1 − w)·z_ref.
    log π* = log_softmax(z*/T). Log-probabilities stand in for logits (a per-row
    constant does not change the softmax, so the distribution is the same).
    """
    if contrast not in ("reverse", "reference"):
        raise ValueError(f"contrast must be 'reverse' or 'reference', got {contrast!r}")
    lp_d = F.log_softmax(_float(z_d), dim=-1)
    lp_r = F.log_softmax(_float(z_r), dim=-1)
    if weight is None:
        w = beta2 * (lp_d.exp() - lp_r.exp()).abs().sum(-1) + ADAPTIVE_EPS
    else:
        w = torch.full(lp_d.shape[:-1], float(weight), dtype=lp_d.dtype, device=lp_d.device)
    wv = w.unsqueeze(-1)
    z = lp_d + wv * (lp_d - lp_r) if contrast == "reverse" else wv * lp_d + (1 - wv) * lp_r
    return F.log_softmax(z / temperature, dim=-1), w


def reverse_kl(student: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """KL(π_θ ‖ target) per position: Σ_v π_θ (log π_θ − log target), [N]."""
    lq = F.log_softmax(_float(student), dim=-1)
    return (lq.exp() * (lq - log_target)).sum(-1)


def aligndistil_loss(student: torch.Tensor, z_d: torch.Tensor, z_r: torch.Tensor,
                     seg: torch.Tensor, n_rows: int, *, beta: float = 0.1, beta2: float = 10.0,
                     contrast: str = "reverse", weight: float | None = None,
                     temperature: float = 1.0, len_norm: bool = True):
    """AlignDistil: per token (β / w_t)·KL(π_θ ‖ π*), summed over a response, divided by
    its length (`len_norm`, the paper's `--reward_len_norm`), averaged over the batch.
    The full reverse-KL gradient flows through π_θ (as in the reference code).

    Returns (loss, stats) with stats: per-token KL(π_θ‖π*) `[N]` and the weights `[N]`.
    """
    lp_star, w = aligndistil_teacher(z_d, z_r, beta2=beta2, contrast=contrast, weight=weight,
                                     temperature=temperature)
    kl = reverse_kl(student, lp_star)
    loss = row_mean(beta / w * kl, seg, n_rows, len_norm)
    return loss, {"kl": kl.detach(), "weight": w.detach()}


# --- TVD++ -------------------------------------------------------------------------------

def tvd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ_v |p(v) − q(v)| per position, [N]."""
    p = F.softmax(_float(teacher), dim=-1)
    q = F.softmax(_float(student), dim=-1)
    return 0.5 * (p - q).abs().sum(-1)


def tvdpp_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8):
    """TVD++ (draft-model distillation; arXiv 2403.00858, no public code).

    R(v) = 1{p(v) > q_θ(v)} (p the teacher/target, q_θ the student/draft), normalised
    R̃ = (R − μ)/(σ + eps), loss = −(1/N) Σ_n Σ_v sg(q(v))·R̃(v)·log q_θ(v).

    Our reading of the points ALGORITHMS.md marks UNVERIFIED:
    - the expectation E_{v~q} is exact over the vocabulary at each position (no sampling);
    - μ and σ are the mean and standard deviation of R over the batch's N valid
      positions × the vocabulary, each (position, token) weighted by q(v)/N (so they are
      the moments of R under "pick a position uniformly, then v ~ q");
    - μ, σ and the q weights are stop-gradient.
    A consequence of the exact expectation: Σ_v q ∇log q = 0, so the baseline μ leaves
    the gradient unchanged and ∇loss = ∇(mean TVD)/σ, i.e. TVD's own gradient rescaled by
    the batch's 1/σ. The loss value is a surrogate; the trainer also logs the mean TVD.

    Returns (loss, stats) with stats: per-position TVD `[N]`, `mu`, `sigma`.
    """
    lq = F.log_softmax(_float(student), dim=-1)
    q = lq.exp().detach()
    p = F.softmax(_float(teacher), dim=-1)
    n = max(lq.shape[0], 1)
    r = (p > q).to(lq.dtype)
    mu = (q * r).sum() / n
    sigma = ((q * (r - mu) ** 2).sum() / n).sqrt()
    r_tilde = (r - mu) / (sigma + eps)
    loss = -(q * r_tilde * lq).sum() / n
    return loss, {"tvd": 0.5 * (p - q).abs().sum(-1), "mu": mu, "sigma": sigma}


# --- context distillation ----------------------------------------------------------------

def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ q_student) per position: Σ_v p (log p − log q), [N]."""
    lp = F.log_softmax(_float(teacher), dim=-1)
    lq = F.log_softmax(_float(student), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def context_loss(student: torch.Tensor, teacher: torch.Tensor):
    """Context distillation: the token-level KL(teacher-with-policy ‖ student), averaged
    over the batch's response tokens. Returns (loss, stats) with the per-token KL."""
    kl = forward_kl(student, teacher)
    return kl.mean() if kl.numel() else kl.sum(), {"kl": kl.detach()}


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalised JSD per position, [N] (TRL's `generalized_jsd_loss` with
    reduction 'none', summed over the vocabulary): beta=0 is KL(teacher‖student),
    beta=1 KL(student‖teacher)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "experimental" notice
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss(_float(student), _float(teacher), beta=beta,
                                           reduction="none").sum(-1)
