"""The pure pieces of ESSA (`train-policy --method essa`, essa.py): the SVD of a LoRA
update and its write-back, the population size, antithetic Gaussian noise, centred-rank
fitness shaping and the OpenAI-ES update. Functions of numbers and tensors only (no
model, no files), so each is tested on hand-made values (tests/test_essa.py).

Search space (ALGORITHMS.md Part D §14): a LoRA module computes ΔW = c·B·A (c = its
scaling, alpha/r). Its truncated SVD ΔW = U diag(s) Vᵀ (rank r) is taken once; U and V
are frozen and the search moves s. The searched vector is z (one entry per singular
value, all modules concatenated) in relative space, s' = s ⊙ (1 + z), starting at z = 0
(the SFT singular values).

ES (OpenAI-ES with antithetic pairs; the paper uses CMA-ES, see essa.py): λ members
z ± σ·ε_k (k = 1..λ/2, ε_k ~ N(0, I)), fitness F_i, centred ranks
u_i = rank_i/(λ−1) − ½ (rank 0 = lowest fitness; tied fitnesses share their mean rank,
so a tied antithetic pair adds nothing), then z ← z + α/(λσ) · Σ_i u_i ε_i.

torch is imported inside the functions.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["lora_svd", "lora_factors", "auto_popsize", "centered_ranks", "antithetic_noise",
           "es_update"]


def lora_svd(B, A, scaling: float):
    """(U, s, Vh) with c·B·A = U diag(s) Vh, truncated to rank r = B.shape[1], in float64.

    Computed from two thin QRs and an r×r SVD (B = Q_b R_b, Aᵀ = Q_a R_a, c·R_b R_aᵀ =
    Uₘ diag(s) Vₘᵀ; U = Q_b Uₘ, Vh = (Q_a Vₘ)ᵀ), never the full out×in product."""
    import torch
    B, A = B.detach().to(torch.float64).cpu(), A.detach().to(torch.float64).cpu()
    qb, rb = torch.linalg.qr(B)          # (out, r), (r, r)
    qa, ra = torch.linalg.qr(A.T)        # (in, r), (r, r)
    um, s, vmh = torch.linalg.svd(float(scaling) * rb @ ra.T)
    return qb @ um, s, vmh @ qa.T


def lora_factors(U, s, Vh, scaling: float):
    """(B', A') with c·B'·A' = U diag(s) Vh: B' = U diag(s)/c, A' = Vh."""
    return U * (s / float(scaling)).unsqueeze(0), Vh.clone()


def auto_popsize(n: int) -> int:
    """CMA-ES's default λ = 4 + ⌊3 ln n⌋, rounded up to even (antithetic pairs)."""
    lam = 4 + int(math.floor(3 * math.log(max(n, 1))))
    return lam + lam % 2


def centered_ranks(fitness: Sequence[float]) -> list[float]:
    """u_i = rank_i/(λ−1) − ½ with rank 0 for the lowest fitness; ties share the mean of
    their ranks; NaN (no score) ranks below every number."""
    vals = [(-math.inf if f is None or math.isnan(f) else float(f)) for f in fitness]
    lam = len(vals)
    if lam < 2:
        raise ValueError("centered ranks need at least 2 members")
    order = sorted(range(lam), key=lambda i: vals[i])
    ranks = [0.0] * lam
    i = 0
    while i < lam:
        j = i
        while j + 1 < lam and vals[order[j + 1]] == vals[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return [r / (lam - 1) - 0.5 for r in ranks]


def antithetic_noise(n: int, popsize: int, seed: int):
    """(popsize, n) float64 noise: rows 2k and 2k+1 are +ε_k and −ε_k, ε_k ~ N(0, I) from a
    generator seeded by `seed` (the same seed gives the same noise on every machine)."""
    import torch
    if popsize < 2 or popsize % 2:
        raise ValueError(f"the population must be even and >= 2, got {popsize}")
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(popsize // 2, n, generator=g, dtype=torch.float64)
    return torch.stack([eps, -eps], dim=1).reshape(popsize, n)


def es_update(theta, noise, utilities: Sequence[float], lr: float, sigma: float):
    """θ + α/(λσ) · Σ_i u_i ε_i (`noise` rows ε_i, λ = its row count)."""
    import torch
    u = torch.as_tensor(list(utilities), dtype=noise.dtype)
    lam = noise.shape[0]
    return theta + (lr / (lam * sigma)) * (u @ noise)
