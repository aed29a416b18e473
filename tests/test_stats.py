"""Tests for alignkit.stats: exact values on hand-made inputs."""
from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from alignkit import stats
from alignkit.errors import DataError, UsageError


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_reproducible_and_contains_mean():
    vals = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 0.0]
    est, lo, hi = stats.bootstrap_ci(vals, seed=123)
    assert est == pytest.approx(0.45)
    assert lo < est < hi
    assert stats.bootstrap_ci(vals, seed=123) == (est, lo, hi)
    assert stats.bootstrap_ci(vals, seed=124) != (est, lo, hi)
    # a 95% interval is narrower than a 99% one for the same resamples
    _, lo99, hi99 = stats.bootstrap_ci(vals, alpha=0.01, seed=123)
    assert lo99 <= lo and hi <= hi99


def test_bootstrap_custom_stat_and_constant():
    est, lo, hi = stats.bootstrap_ci([1.0, 2.0, 3.0, 100.0, 4.0], stat=np.median, seed=0)
    assert est == 3.0 and lo <= est <= hi
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert stats.bootstrap_ci([5.0]) == (5.0, 5.0, 5.0)


def test_bootstrap_bad_input():
    with pytest.raises(DataError):
        stats.bootstrap_ci([])
    with pytest.raises(DataError):
        stats.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(UsageError):
        stats.bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(UsageError):
        stats.bootstrap_ci([1.0, 2.0], n_boot=0)


def test_paired_diff_ci():
    a = [1.0, 2.0, 3.0, 4.0]
    assert stats.paired_diff_ci(a, [x - 1.0 for x in a]) == (1.0, 1.0, 1.0)
    a = [0.9, 0.4, 0.7, 0.8, 0.3, 0.6]
    b = [0.5, 0.5, 0.2, 0.6, 0.1, 0.6]
    diff, lo, hi = stats.paired_diff_ci(a, b, seed=7)
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    assert lo <= diff <= hi
    # same seed, same resampled items as bootstrapping the per-item differences
    assert (diff, lo, hi) == pytest.approx(
        stats.bootstrap_ci(np.subtract(a, b), seed=7))
    with pytest.raises(DataError):
        stats.paired_diff_ci([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- win rates

def test_win_rate_with_ties():
    m = [3, 2, 1, 5, 4]
    b = [1, 2, 3, 4, 4]  # win, tie, loss, win, tie
    r = stats.win_rate(m, b, seed=0)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 2, 1, 5)
    assert r["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert r["lo"] <= r["win_rate"] <= r["hi"]
    assert 0.0 <= r["lo"] and r["hi"] <= 1.0
    assert stats.win_rate(m, b, seed=0) == r


def test_lc_equals_win_rate_when_no_length_difference():
    m = [3, 2, 1, 5, 4, 7, 1]
    b = [1, 2, 3, 4, 4, 2, 0]
    lens = [10, 20, 30, 40, 50, 60, 70]
    r = stats.length_controlled_win_rate(m, b, lens, lens)
    wr = stats.win_rate(m, b)["win_rate"]
    assert r["win_rate"] == pytest.approx(wr)
    assert abs(r["lc_win_rate"] - wr) < 1e-6
    assert r["n"] == 7


def test_lc_constant_length_difference_falls_back_to_win_rate():
    m = [1, 0, 1, 1]
    b = [0, 1, 0, 0]
    r = stats.length_controlled_win_rate(m, b, [15, 15, 15, 15], [10, 10, 10, 10])
    assert abs(r["lc_win_rate"] - 0.75) < 1e-6


def test_lc_below_raw_when_winner_always_longer():
    # the model wins exactly when its answer is longer: length explains the wins
    m = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    len_m = [120, 150, 110, 200, 130, 170, 80, 90, 60, 70]
    len_b = [100] * 10
    r = stats.length_controlled_win_rate(m, b, len_m, len_b)
    assert r["win_rate"] == pytest.approx(0.6)
    assert r["lc_win_rate"] < r["win_rate"]
    assert r["phi"] > 0
    assert math.isfinite(r["theta"]) and math.isfinite(r["phi"])


def test_lc_non_separable_and_symmetry():
    # mostly wins when longer, one win when shorter, one loss when longer, a tie
    m = [1, 1, 1, 1, 0, 1, 0, 0, 5]
    b = [0, 0, 0, 0, 1, 0, 1, 1, 5]
    len_m = [130, 160, 120, 140, 150, 80, 70, 90, 100]
    len_b = [100] * 9
    r = stats.length_controlled_win_rate(m, b, len_m, len_b)
    assert r["lc_win_rate"] < r["win_rate"] == pytest.approx(5.5 / 9)
    # swapping the two models gives 1 - LC
    r2 = stats.length_controlled_win_rate(b, m, len_b, len_m)
    assert r2["lc_win_rate"] == pytest.approx(1.0 - r["lc_win_rate"], abs=1e-9)
    assert r2["phi"] == pytest.approx(r["phi"], rel=1e-6)


def test_lc_degenerate_all_wins_is_finite():
    r = stats.length_controlled_win_rate([2, 2, 2, 2], [1, 1, 1, 1],
                                         [10, 50, 20, 30], [20, 20, 20, 20])
    assert r["win_rate"] == 1.0
    assert all(math.isfinite(r[key]) for key in ("lc_win_rate", "theta", "phi"))
    assert 0.99 < r["lc_win_rate"] <= 1.0
    r = stats.length_controlled_win_rate([2, 2, 2, 2], [1, 1, 1, 1], [9] * 4, [9] * 4)
    assert abs(r["lc_win_rate"] - 1.0) < 1e-6 and math.isfinite(r["theta"])
    r = stats.length_controlled_win_rate([0], [1], [5], [3])
    assert math.isfinite(r["lc_win_rate"]) and r["lc_win_rate"] < 0.01


# --------------------------------------------------------------------------- KL

def test_kl_bernoulli_exact():
    # policy Bernoulli(0.75) over {a, b}, reference uniform; four one-token samples in
    # the exact proportions of π: three a's and one b.
    la, lb = math.log(0.75) - math.log(0.5), math.log(0.25) - math.log(0.5)
    pol = [[math.log(0.75)]] * 3 + [[math.log(0.25)]]
    ref = [[math.log(0.5)]] * 4
    r = stats.kl_estimates(pol, ref)
    true_kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812...
    assert r["n"] == 4
    assert r["k1_mean"] == pytest.approx(true_kl, abs=1e-12)
    # k3 per sample: exp(-l) - 1 + l; a: 2/3 - 1 + ln 1.5, b: 2 - 1 + ln 0.5
    k3a, k3b = 2 / 3 - 1 + math.log(1.5), 1 + math.log(0.5)
    assert r["k3_mean"] == pytest.approx((3 * k3a + k3b) / 4, abs=1e-12)
    # with exact proportions both estimators give the true KL
    assert r["k3_mean"] == pytest.approx(true_kl, abs=1e-12)
    assert r["k1_se"] == pytest.approx(statistics.stdev([la] * 3 + [lb]) / 2, abs=1e-12)
    assert r["k3_se"] == pytest.approx(statistics.stdev([k3a] * 3 + [k3b]) / 2, abs=1e-12)


def test_kl_sequence_sums_and_single_sequence():
    pol = [[-1.0, -2.0, -0.5]]
    ref = [[-1.5, -1.0, -0.5]]  # l = [0.5, -1.0, 0.0]
    r = stats.kl_estimates(pol, ref)
    assert r["k1_mean"] == pytest.approx(-0.5)
    assert r["k3_mean"] == pytest.approx((math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0))
    assert r["k1_se"] == 0.0 and r["k3_se"] == 0.0 and r["n"] == 1
    assert r["k3_mean"] >= 0
    with pytest.raises(DataError):
        stats.kl_estimates([[-1.0, -2.0]], [[-1.0]])
    with pytest.raises(DataError):
        stats.kl_estimates([[-1.0]], [])


# --------------------------------------------------------------------------- top-k H, M

def test_topk_uniform_ten_tokens():
    torch = pytest.importorskip("torch")
    h, m = stats.topk_entropy_mass(torch.zeros(2, 3, 10))
    assert h == pytest.approx(math.log2(10), abs=1e-12)
    assert m == pytest.approx(1.0, abs=1e-12)
    h, m = stats.topk_entropy_mass(torch.zeros(4, 10))  # [T, V]
    assert h == pytest.approx(math.log2(10)) and m == pytest.approx(1.0)


def test_topk_known_distribution_v20():
    torch = pytest.importorskip("torch")
    top = [0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025]  # sums to 0.95
    p = top + [0.005] * 10
    perm = [7, 3, 19, 0, 12, 5, 16, 9, 1, 14, 2, 4, 6, 8, 10, 11, 13, 15, 17, 18]
    shuffled = [0.0] * 20
    for src, dst in enumerate(perm):
        shuffled[dst] = p[src]
    logits = torch.log(torch.tensor([shuffled], dtype=torch.float64)) + 3.0
    h, m = stats.topk_entropy_mass(logits, k=10)
    mass = 0.95
    expected_h = -sum((x / mass) * math.log2(x / mass) for x in top)
    assert m == pytest.approx(mass, abs=1e-12)
    assert h == pytest.approx(expected_h, abs=1e-12)
    # k = 2: top-2 = {0.3, 0.2}, q = {0.6, 0.4}
    h2, m2 = stats.topk_entropy_mass(logits, k=2)
    assert m2 == pytest.approx(0.5)
    assert h2 == pytest.approx(-(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)))


def test_topk_mask_and_k_cap():
    torch = pytest.importorskip("torch")
    logits = torch.zeros(2, 3, 4)              # uniform over 4: H = 2 bits, M = 1
    logits[0, 1] = torch.tensor([50.0, 0.0, 0.0, 0.0])   # near one-hot: H ~ 0
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    h, m = stats.topk_entropy_mass(logits, mask=mask, k=10)  # k capped at V = 4
    assert h == pytest.approx(2.0) and m == pytest.approx(1.0)
    h_all, _ = stats.topk_entropy_mass(logits, k=10)
    assert h_all < 2.0
    h1, m1 = stats.topk_entropy_mass(logits, mask=mask.bool(), k=1)
    assert h1 == 0.0 and m1 == pytest.approx(0.25)
    with pytest.raises(DataError):
        stats.topk_entropy_mass(logits, mask=torch.zeros(2, 3))
    with pytest.raises(DataError):
        stats.topk_entropy_mass(logits, mask=torch.ones(3, 2))


def test_topk_float16_and_chunks():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 30, generator=g)
    h_ref, m_ref = stats.topk_entropy_mass(logits, chunk=1000)
    h_c, m_c = stats.topk_entropy_mass(logits, chunk=4)
    assert h_c == pytest.approx(h_ref, abs=1e-12) and m_c == pytest.approx(m_ref, abs=1e-12)
    h16, m16 = stats.topk_entropy_mass(logits.half())
    assert h16 == pytest.approx(h_ref, abs=1e-2) and m16 == pytest.approx(m_ref, abs=1e-2)


# --------------------------------------------------------------------------- distinct-n

def test_distinct_n_exact():
    texts = ["a b c a b", "a b d"]
    assert stats.distinct_n(texts, 1) == pytest.approx(4 / 8)
    # bigrams: ab bc ca ab | ab bd -> 4 unique of 6 (none across the text boundary)
    assert stats.distinct_n(texts, 2) == pytest.approx(4 / 6)
    assert stats.distinct_n(texts, 3) == 1.0
    assert stats.distinct_n(["a  b\tc\n"], 1) == 1.0
    assert stats.distinct_n(["a b"], 3) == 0.0
    assert stats.distinct_n([], 2) == 0.0
    with pytest.raises(UsageError):
        stats.distinct_n(texts, 0)


# --------------------------------------------------------------------------- best-of-n

def test_best_of_n_1234():
    r = stats.best_of_n_curve([[3, 1, 4, 2]])
    assert r["n"] == [1, 2, 3, 4]
    assert r["expected_best"] == pytest.approx([2.5, 20 / 6, 15 / 4, 4.0])
    # P(B_n beats a single draw) + P(tie)/2; s_(i) beats a draw w.p. (i - 1/2)/4
    assert r["win_rate_vs_1"] == pytest.approx([0.5, 17 / 24, 13 / 16, 7 / 8])


def test_best_of_n_ties_and_min_length():
    r = stats.best_of_n_curve([[1, 1, 2]])
    assert r["expected_best"] == pytest.approx([4 / 3, 5 / 3, 2.0])
    assert r["win_rate_vs_1"] == pytest.approx([0.5, 2 / 3, 5 / 6])
    r = stats.best_of_n_curve([[1, 2, 3, 4], [0, 10]])
    assert r["n"] == [1, 2]
    assert r["expected_best"] == pytest.approx([(2.5 + 5) / 2, (20 / 6 + 10) / 2])
    assert r["win_rate_vs_1"] == pytest.approx([0.5, (17 / 24 + 0.75) / 2])
    with pytest.raises(DataError):
        stats.best_of_n_curve([[1, 2], [3]])
    with pytest.raises(DataError):
        stats.best_of_n_curve([])


def test_best_of_n_matches_enumeration():
    rng = np.random.default_rng(3)
    scores = [list(rng.integers(0, 4, size=6).astype(float)), list(rng.normal(size=5))]
    r = stats.best_of_n_curve(scores)
    for n in r["n"]:
        e_tot, w_tot = 0.0, 0.0
        for s in scores:
            subsets = list(itertools.combinations(range(len(s)), n))
            bests = [max(s[i] for i in c) for c in subsets]
            e_tot += sum(bests) / len(bests)
            w_tot += sum((b > x) + 0.5 * (b == x) for b in bests for x in s) / (
                len(bests) * len(s))
        assert r["expected_best"][n - 1] == pytest.approx(e_tot / len(scores), abs=1e-12)
        assert r["win_rate_vs_1"][n - 1] == pytest.approx(w_tot / len(scores), abs=1e-12)


# --------------------------------------------------------------------------- accuracies

def test_rm_accuracy_weighting_with_tie():
    pairs = [
        (2.0, 1.0, "chat"),      # correct
        (1.0, 1.0, "chat"),      # tie -> wrong
        (3.0, 0.0, "chat"),      # correct
        (0.0, 1.0, "safety"),    # wrong
    ]
    r = stats.rm_accuracy(pairs)
    assert r["n"] == 4
    assert r["per_subset"]["chat"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert r["per_subset"]["safety"] == {"accuracy": 0.0, "n": 1}
    assert r["accuracy"] == pytest.approx((2 / 3 * 3 + 0.0 * 1) / 4)  # 0.5, not 1/3
    r = stats.rm_accuracy(pairs, subset_weights={"chat": 1, "safety": 1})
    assert r["accuracy"] == pytest.approx(1 / 3)
    r = stats.rm_accuracy([(1.0, 0.0, None), (0.5, 0.5, None)])
    assert r["per_subset"] == {"all": {"accuracy": 0.5, "n": 2}}
    assert r["accuracy"] == 0.5
    with pytest.raises(DataError):
        stats.rm_accuracy([])


def test_ifeval_accuracies():
    r = stats.prompt_and_instruction_accuracy([[True, True], [True, False, True], [False]])
    assert r["prompt_level"] == pytest.approx(1 / 3)
    assert r["instruction_level"] == pytest.approx(4 / 6)
    assert (r["n_prompts"], r["n_instructions"]) == (3, 6)
    with pytest.raises(DataError):
        stats.prompt_and_instruction_accuracy([[True], []])
