"""Statistics behind `alignkit eval`.

Pure functions over Python lists / numpy arrays: no I/O, no typer, and no torch except
inside `topk_entropy_mass` (imported there). Everything random takes a `seed` and draws
from `numpy.random.default_rng(seed)`, so the same inputs and seed give the same numbers.

Conventions follow ALGORITHMS.md Part C (evaluation conventions) and Part A section 10
(likelihood over-optimisation indicators). Invalid input data raises
`alignkit.errors.DataError`; an impossible parameter (alpha outside (0, 1), k < 1, ...)
raises `alignkit.errors.UsageError`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from alignkit.errors import DataError, UsageError

__all__ = [
    "bootstrap_ci",
    "paired_diff_ci",
    "win_rate",
    "length_controlled_win_rate",
    "kl_estimates",
    "topk_entropy_mass",
    "distinct_n",
    "best_of_n_curve",
    "rm_accuracy",
    "prompt_and_instruction_accuracy",
]


# --------------------------------------------------------------------------- helpers

def _as_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"expected a flat list of numbers, got shape {arr.shape}", field=name)
    if arr.size == 0:
        raise DataError("is empty", field=name)
    if not np.all(np.isfinite(arr)):
        raise DataError("contains NaN or infinite values", field=name)
    return arr


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if int(n_boot) < 1:
        raise UsageError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < float(alpha) < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")


def _sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    """Numerically stable logistic function σ(z) = 1 / (1 + e^(−z))."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out if out.ndim else float(out)


# --------------------------------------------------------------------------- bootstrap

def bootstrap_ci(values: Sequence[float] | np.ndarray,
                 stat: Callable[..., Any] = np.mean,
                 n_boot: int = 1000,
                 alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of a statistic.

    With x_1..x_n the values and θ̂ = stat(x):
    draw B = n_boot resamples x*_b = (x_{i_1}, ..., x_{i_n}), i_j ~ Uniform{1..n} with
    replacement (rng = numpy.random.default_rng(seed)), compute θ*_b = stat(x*_b), and

        lo = quantile(θ*, α/2),   hi = quantile(θ*, 1 − α/2)

    (numpy's default linear interpolation between order statistics).

    Returns (θ̂, lo, hi). `stat` is any callable on a 1-D array returning a number;
    `numpy.mean` (the default) is vectorised over the resamples.
    """
    x = _as_1d(values, "values")
    _check_boot_args(n_boot, alpha)
    rng = np.random.default_rng(seed)
    n = x.size
    idx = rng.integers(0, n, size=(int(n_boot), n))
    samples = x[idx]
    if stat is np.mean:
        boot = samples.mean(axis=1)
    else:
        boot = np.fromiter((float(stat(row)) for row in samples), dtype=np.float64,
                           count=int(n_boot))
    estimate = float(stat(x))
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, float(lo), float(hi)


def paired_diff_ci(a: Sequence[float] | np.ndarray,
                   b: Sequence[float] | np.ndarray,
                   n_boot: int = 1000,
                   alpha: float = 0.05,
                   seed: int = 0) -> tuple[float, float, float]:
    """Bootstrap CI of a paired difference of means, resampling items (prompts).

    For paired items i = 1..n with scores a_i, b_i:

        diff = mean(a) − mean(b) = (1/n) Σ_i (a_i − b_i)

    Each resample draws item indices i_1..i_n with replacement and recomputes
    mean(a[i]) − mean(b[i]); pairs stay together, so the per-prompt correlation between
    a and b is kept. The interval is the percentile interval [α/2, 1 − α/2] as in
    `bootstrap_ci` (same seed → same resampled indices).

    Returns (diff, lo, hi).
    """
    xa = _as_1d(a, "a")
    xb = _as_1d(b, "b")
    if xa.size != xb.size:
        raise DataError(f"paired inputs differ in length: {xa.size} vs {xb.size}")
    return bootstrap_ci(xa - xb, stat=np.mean, n_boot=n_boot, alpha=alpha, seed=seed)


# --------------------------------------------------------------------------- win rates

def _win_labels(scores_m: Any, scores_b: Any) -> np.ndarray:
    m = _as_1d(scores_m, "scores_m")
    b = _as_1d(scores_b, "scores_b")
    if m.size != b.size:
        raise DataError(f"paired inputs differ in length: {m.size} vs {b.size}")
    return np.where(m > b, 1.0, np.where(m == b, 0.5, 0.0))


def win_rate(scores_m: Sequence[float] | np.ndarray,
             scores_b: Sequence[float] | np.ndarray,
             seed: int = 0,
             n_boot: int = 1000,
             alpha: float = 0.05) -> dict[str, float | int]:
    """Discrete head-to-head win rate of model m against baseline b, per item.

    Per item i the label is y_i = 1 if s_m,i > s_b,i, 0.5 if equal (a tie counts half),
    0 otherwise, and

        win_rate = (1/n) Σ_i y_i = (wins + ties/2) / n

    (AlpacaEval's discrete win rate, as a fraction rather than a percentage). lo/hi are
    the percentile bootstrap interval of the mean label (`bootstrap_ci`, resampling
    items).

    Returns dict(win_rate, lo, hi, wins, ties, losses, n).
    """
    y = _win_labels(scores_m, scores_b)
    est, lo, hi = bootstrap_ci(y, n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "win_rate": est,
        "lo": lo,
        "hi": hi,
        "wins": int(np.sum(y == 1.0)),
        "ties": int(np.sum(y == 0.5)),
        "losses": int(np.sum(y == 0.0)),
        "n": int(y.size),
    }


def _fit_logistic(X: np.ndarray, y: np.ndarray, ridge: float,
                  max_iter: int = 200, tol: float = 1e-12) -> np.ndarray:
    """Ridge-penalised logistic regression with soft labels by damped Newton (IRLS).

    Maximises  L(w) = Σ_i [y_i log σ(x_i·w) + (1 − y_i) log(1 − σ(x_i·w))] − (ridge/2)‖w‖².
    Gradient g = Xᵀ(y − p) − ridge·w; Hessian H = −(Xᵀ diag(p(1−p)) X + ridge·I),
    which is negative definite for ridge > 0, so the objective is strictly concave and
    the maximiser is unique and finite even for separable data.
    """
    def objective(w: np.ndarray) -> float:
        z = X @ w
        # log σ(z) = −log(1 + e^(−z)); log(1 − σ(z)) = −log(1 + e^z)
        return float(np.sum(-y * np.logaddexp(0.0, -z) - (1.0 - y) * np.logaddexp(0.0, z))
                     - 0.5 * ridge * (w @ w))

    d = X.shape[1]
    w = np.zeros(d)
    f = objective(w)
    for _ in range(max_iter):
        p = _sigmoid(X @ w)
        g = X.T @ (y - p) - ridge * w
        W = p * (1.0 - p)
        H = (X * W[:, None]).T @ X + ridge * np.eye(d)
        step = np.linalg.solve(H, g)
        t = 1.0
        while True:
            w_new = w + t * step
            f_new = objective(w_new)
            if f_new >= f - 1e-15 * max(1.0, abs(f)) or t < 1e-10:
                break
            t *= 0.5
        converged = np.max(np.abs(w_new - w)) < tol * max(1.0, np.max(np.abs(w_new)))
        w, f = w_new, f_new
        if converged:
            break
    return w


def length_controlled_win_rate(scores_m: Sequence[float] | np.ndarray,
                               scores_b: Sequence[float] | np.ndarray,
                               len_m: Sequence[float] | np.ndarray,
                               len_b: Sequence[float] | np.ndarray,
                               ridge: float = 1e-8) -> dict[str, float | int]:
    """Length-controlled win rate: a simple logistic form of AlpacaEval 2's LC.

    Labels y_i ∈ {1, 0.5, 0} (win, tie, loss of m against b, soft labels as in
    `win_rate`). With Δlen_i = len_m,i − len_b,i and s = std(Δlen) (sample std, ddof=1,
    as pandas' `.std()` in AlpacaEval's `glm_winrate.py`), the feature is

        x_i = tanh(Δlen_i / s)          (x_i = 0 for all i when s = 0 or n = 1:
                                         without variation in Δlen, length effect and
                                         quality cannot be told apart)

    and the model  P(m ≻ b | i) = σ(θ + φ·x_i)  is fitted by Newton/IRLS on the soft-label
    log-likelihood with a tiny L2 ridge (ridge/2)(θ² + φ²) that keeps the fit finite on
    degenerate data (all wins, or labels separable by length). Then

        LC = σ(θ)     (the prediction at Δlen = 0)

    Unlike AlpacaEval there is no per-instruction difficulty term and no regularisation
    toward gamed baselines. When all x_i = 0 the fit reduces to σ(θ) = mean(y) up to the
    ridge (σ(θ) = ȳ − ridge·θ/n), i.e. LC equals the plain win rate (within 1e-6 even for
    all wins with the default ridge 1e-8, where θ ≈ 17). Swapping m and b gives 1 − LC
    exactly (θ → −θ).

    Returns dict(lc_win_rate, win_rate, theta, phi, n), win_rate being the raw mean label.
    """
    y = _win_labels(scores_m, scores_b)
    lm = _as_1d(len_m, "len_m")
    lb = _as_1d(len_b, "len_b")
    if not (lm.size == lb.size == y.size):
        raise DataError(f"scores and lengths differ in length: {y.size}, {lm.size}, {lb.size}")
    if ridge <= 0:
        raise UsageError(f"ridge must be > 0, got {ridge}")
    delta = lm - lb
    n = y.size
    s = float(np.std(delta, ddof=1)) if n > 1 else 0.0
    x = np.tanh(delta / s) if s > 0 else np.zeros(n)
    X = np.column_stack([np.ones(n), x])
    theta, phi = _fit_logistic(X, y, ridge=float(ridge))
    return {
        "lc_win_rate": float(_sigmoid(theta)),
        "win_rate": float(y.mean()),
        "theta": float(theta),
        "phi": float(phi),
        "n": int(n),
    }


# --------------------------------------------------------------------------- KL

def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error std(ddof=1)/sqrt(n) (0 when n = 1)."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise DataError("no values")
    se = float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), se


def kl_estimates(logp_policy_tokens: Sequence[Sequence[float]],
                 logp_ref_tokens: Sequence[Sequence[float]]) -> dict[str, float | int]:
    """Sequence-level Monte-Carlo estimates of KL(π ‖ π_ref) from policy samples.

    Inputs: for each sampled sequence y ~ π, the per-token log-probs of its sampled
    tokens under the policy, log π(y_t | x, y_<t), and under the reference. With
    ℓ_t = log π − log π_ref (Schulman's estimators, as in TRL):

        k1(y) = Σ_t ℓ_t                              (unbiased, can be negative)
        k3(y) = Σ_t (exp(−ℓ_t) − 1 + ℓ_t)           (unbiased, ≥ 0, lower variance)

    Over the n sequences: mean and standard error se = std(ddof=1)/√n (0 when n = 1).
    These are sequence sums (ALGORITHMS.md Part C), not GRPO's per-token means.

    Returns dict(k1_mean, k1_se, k3_mean, k3_se, n).
    """
    if len(logp_policy_tokens) != len(logp_ref_tokens):
        raise DataError(f"policy and reference give a different number of sequences: "
                        f"{len(logp_policy_tokens)} vs {len(logp_ref_tokens)}")
    n = len(logp_policy_tokens)
    if n == 0:
        raise DataError("no sequences")
    k1 = np.empty(n)
    k3 = np.empty(n)
    for i, (lp, lr) in enumerate(zip(logp_policy_tokens, logp_ref_tokens)):
        a = np.asarray(lp, dtype=np.float64).reshape(-1)
        r = np.asarray(lr, dtype=np.float64).reshape(-1)
        if a.size != r.size:
            raise DataError(f"sequence {i}: {a.size} policy log-probs vs {r.size} reference")
        ell = a - r
        if not np.all(np.isfinite(ell)):
            raise DataError(f"sequence {i}: log-probs contain NaN or infinite values")
        k1[i] = ell.sum()
        k3[i] = np.sum(np.expm1(-ell) + ell)

    def se(v: np.ndarray) -> float:
        return float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    return {
        "k1_mean": float(k1.mean()),
        "k1_se": se(k1),
        "k3_mean": float(k3.mean()),
        "k3_se": se(k3),
        "n": n,
    }


# --------------------------------------------------------------------------- top-k H, M

def topk_entropy_mass(logits: Any, mask: Any = None, k: int = 10,
                      chunk: int = 256) -> tuple[float, float]:
    """Top-k entropy (bits) and top-k probability mass of next-token distributions.

    Shi et al. 2024 (ALGORITHMS.md Part A §10). At each position p = softmax(logits);
    let T_k be the k most probable tokens (k = 10 by default; k is capped at V).

        M = Σ_{i∈T_k} p_i
        H = −Σ_{i∈T_k} q_i log₂ q_i,   q_i = p_i / M

    Reading of the UNVERIFIED point in ALGORITHMS.md: the paper's entropy is taken over
    the top-k probabilities *renormalised* to sum to one (q), so H ∈ [0, log₂ k] and a
    uniform top-k gives log₂ k whatever mass lies outside it; M carries the mass
    information separately.

    Both are averaged over the positions where mask is true (all positions when mask is
    None). logits: a torch tensor (or anything `torch.as_tensor` accepts) of shape
    [B, T, V] or [T, V]; mask: [B, T] or [T] (bool or 0/1). Computed in float64, in
    chunks of `chunk` positions to bound memory.

    Returns (mean_entropy_bits, mean_mass).
    """
    import torch

    if int(k) < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    lg = torch.as_tensor(logits)
    if lg.dim() not in (2, 3):
        raise DataError(f"logits must be [B, T, V] or [T, V], got shape {tuple(lg.shape)}")
    V = lg.shape[-1]
    if V == 0:
        raise DataError("logits have an empty vocabulary dimension")
    flat = lg.reshape(-1, V)
    if mask is not None:
        m = torch.as_tensor(mask)
        if tuple(m.shape) != tuple(lg.shape[:-1]):
            raise DataError(f"mask shape {tuple(m.shape)} does not match logits "
                            f"positions {tuple(lg.shape[:-1])}")
        flat = flat[m.reshape(-1).to(torch.bool)]
    n_pos = flat.shape[0]
    if n_pos == 0:
        raise DataError("no positions to average over (empty logits or mask all false)")
    kk = min(int(k), V)
    h_sum = 0.0
    m_sum = 0.0
    with torch.no_grad():
        for start in range(0, n_pos, max(1, int(chunk))):
            block = flat[start:start + max(1, int(chunk))].to(torch.float64)
            logp = torch.log_softmax(block, dim=-1)
            top_logp = torch.topk(logp, kk, dim=-1).values          # [c, k]
            log_mass = torch.logsumexp(top_logp, dim=-1, keepdim=True)
            log_q = top_logp - log_mass                             # renormalised
            q = log_q.exp()
            # 0·log 0 = 0 (q underflows to 0 where log_q is -inf)
            ent = -(torch.where(q > 0, q * log_q, torch.zeros_like(q))).sum(-1) / math.log(2.0)
            h_sum += float(ent.sum())
            m_sum += float(log_mass.exp().sum())
    return h_sum / n_pos, m_sum / n_pos


# --------------------------------------------------------------------------- diversity

def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n diversity of a group of texts.

    Tokens are whitespace tokens (`str.split()`); n-grams are taken inside each text
    (never across two texts). Over the group,

        distinct-n = |{unique n-grams}| / (total number of n-grams)

    0.0 when the group has no n-gram at all (every text shorter than n tokens).
    """
    if int(n) < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    n = int(n)
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        toks = text.split()
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


# --------------------------------------------------------------------------- best-of-n

def _best_of_n_weights(N: int, n: int) -> list[float]:
    """P(max of n draws without replacement is the i-th smallest), i = 1..N:
    C(i−1, n−1) / C(N, n) (exact integer ratio, then rounded to float)."""
    denom = math.comb(N, n)
    return [math.comb(i - 1, n - 1) / denom for i in range(1, N + 1)]


def best_of_n_curve(scores_per_prompt: Sequence[Sequence[float]]) -> dict[str, list]:
    """Exact best-of-n curve from N scored samples per prompt.

    For one prompt with scores sorted ascending s_(1) ≤ ... ≤ s_(N), the maximum of n
    draws without replacement is s_(i) with probability w_i = C(i−1, n−1) / C(N, n), so

        E[max of n] = Σ_i s_(i) · C(i−1, n−1) / C(N, n)

    (n = 1 gives the mean, n = N the maximum; ties are handled since tied order
    statistics have the same value).

    Win rate against a single independent draw S (uniform over the same N scores):

        P(B_n > S) + ½ P(B_n = S) = Σ_i w_i · (#{j: s_j < s_(i)} + ½ #{j: s_j = s_(i)}) / N

    which is exactly 0.5 at n = 1. Both are computed per prompt and averaged over
    prompts with equal weight. Every prompt needs N ≥ 2; the curve runs n = 1..min N.

    Returns dict(n=[1..N_min], expected_best=[...], win_rate_vs_1=[...]).
    """
    if len(scores_per_prompt) == 0:
        raise DataError("no prompts")
    prompts = []
    for i, scores in enumerate(scores_per_prompt):
        s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
        if s.size < 2:
            raise DataError(f"prompt {i}: best-of-n needs at least 2 samples, got {s.size}")
        if not np.all(np.isfinite(s)):
            raise DataError(f"prompt {i}: scores contain NaN or infinite values")
        prompts.append(s)
    n_max = min(s.size for s in prompts)
    expected = np.zeros(n_max)
    wr = np.zeros(n_max)
    for s in prompts:
        N = s.size
        below = np.searchsorted(s, s, side="left")           # #{j: s_j < s_(i)}
        equal = np.searchsorted(s, s, side="right") - below   # #{j: s_j = s_(i)}
        beat = (below + 0.5 * equal) / N                      # P(s_(i) beats S), tie ½
        for n in range(1, n_max + 1):
            w = np.asarray(_best_of_n_weights(N, n))
            expected[n - 1] += float(w @ s)
            wr[n - 1] += float(w @ beat)
    k = len(prompts)
    return {
        "n": list(range(1, n_max + 1)),
        "expected_best": [float(v / k) for v in expected],
        "win_rate_vs_1": [float(v / k) for v in wr],
    }


# --------------------------------------------------------------------------- accuracies

def rm_accuracy(pairs: Sequence[tuple[float, float, str | None]],
                subset_weights: dict[str, float] | None = None) -> dict[str, Any]:
    """Reward-model pair accuracy, RewardBench v1 conventions.

    A pair (score_chosen, score_rejected, subset) is correct iff
    score_chosen > score_rejected strictly; a tie (or NaN) counts as wrong. Subset None
    is reported as "all". Per subset s: acc_s = correct_s / n_s. Overall:

        accuracy = Σ_s acc_s · n_s / Σ_s n_s

    (RewardBench's section weighting by subset size). `subset_weights` replaces n_s in
    that weighting (e.g. RewardBench's EXAMPLE_COUNTS, where math-prm counts 984);
    subsets missing from it keep their n_s.

    Returns dict(accuracy, per_subset={name: {accuracy, n}}, n).
    """
    if len(pairs) == 0:
        raise DataError("no pairs")
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        try:
            chosen, rejected, subset = pair
        except (TypeError, ValueError):
            raise DataError(f"pair {i}: expected (score_chosen, score_rejected, subset)")
        name = "all" if subset is None else str(subset)
        total[name] = total.get(name, 0) + 1
        correct[name] = correct.get(name, 0) + int(float(chosen) > float(rejected))
    per_subset = {name: {"accuracy": correct[name] / total[name], "n": total[name]}
                  for name in total}
    weights = {name: float(total[name]) for name in total}
    if subset_weights:
        for name, w in subset_weights.items():
            if name in weights:
                if w < 0:
                    raise UsageError(f"subset weight for {name!r} must be >= 0, got {w}")
                weights[name] = float(w)
    wsum = sum(weights.values())
    if wsum <= 0:
        raise UsageError("subset weights sum to zero")
    acc = sum(per_subset[name]["accuracy"] * weights[name] for name in total) / wsum
    return {"accuracy": float(acc), "per_subset": per_subset, "n": int(sum(total.values()))}


def prompt_and_instruction_accuracy(results: Sequence[Sequence[bool]]) -> dict[str, float | int]:
    """Strict IFEval accuracies.

    results[p] holds the pass/fail of each instruction check of prompt p.

        prompt_level      = (1/P) Σ_p 1[all checks of p pass]
        instruction_level = Σ_p #passed_p / Σ_p #checks_p

    Returns dict(prompt_level, instruction_level, n_prompts, n_instructions).
    """
    if len(results) == 0:
        raise DataError("no prompts")
    n_ok_prompts = 0
    n_pass = 0
    n_checks = 0
    for i, checks in enumerate(results):
        checks = [bool(c) for c in checks]
        if not checks:
            raise DataError(f"prompt {i}: no instruction checks")
        n_ok_prompts += int(all(checks))
        n_pass += sum(checks)
        n_checks += len(checks)
    return {
        "prompt_level": n_ok_prompts / len(results),
        "instruction_level": n_pass / n_checks,
        "n_prompts": len(results),
        "n_instructions": n_checks,
    }
