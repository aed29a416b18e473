"""alignkit.policy.losses: each custom loss against a direct implementation of its
formula (plain Python math on hand-made log-probs), and a few training steps on the
tiny Llama that lower it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.policy import losses
from conftest import write_jsonl

# Hand-made summed log-probs for two pairs: policy chosen/rejected, reference chosen/rejected.
PC, PR, RC, RR = [-10.0, -4.0], [-12.0, -3.5], [-11.0, -4.5], [-11.5, -3.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_cdpo_matches_formula_and_reduces_to_dpo():
    beta, eps = 0.1, 0.3
    got = losses.cdpo(t(PC), t(PR), t(RC), t(RR), beta, eps).tolist()
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        want = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
        assert got[i] == pytest.approx(want, abs=1e-12)
    # pair 0: h = 1 - (-0.5) = 1.5 -> exact numbers for the record
    assert got[0] == pytest.approx(0.7 * math.log1p(math.exp(-0.15)) + 0.3 * math.log1p(math.exp(0.15)),
                                   abs=1e-12)
    plain = losses.cdpo(t(PC), t(PR), t(RC), t(RR), beta, 0.0).tolist()
    assert plain[1] == pytest.approx(-logsig(beta * ((PC[1] - RC[1]) - (PR[1] - RR[1]))), abs=1e-12)


def test_sppo_soft_and_single_match_formulas():
    beta = 0.5  # eta = 2
    pw, pl = [0.8, 0.6], [0.3, 0.45]
    got = losses.sppo(t(PC), t(PR), t(RC), t(RR), t(pw), t(pl), beta).tolist()
    for i in range(2):
        dw, dl = PC[i] - RC[i], PR[i] - RR[i]
        want = 0.5 * ((dw - 2 * (pw[i] - 0.5)) ** 2 + (dl - 2 * (pl[i] - 0.5)) ** 2)
        assert got[i] == pytest.approx(want, abs=1e-12)
    # pair 0 by hand: dw = 1, dl = -0.5 -> 0.5 * ((1 - 0.6)^2 + (-0.5 + 0.4)^2) = 0.085
    assert got[0] == pytest.approx(0.085, abs=1e-12)
    p = [0.9, 0.55]
    single = losses.sppo_single(t(PC), t(PR), t(RC), t(RR), t(p), beta).tolist()
    for i in range(2):
        dw, dl = PC[i] - RC[i], PR[i] - RR[i]
        want = 0.5 * ((dw - 2 * (p[i] - 0.5)) ** 2 + (dl + 2 * (p[i] - 0.5)) ** 2)
        assert single[i] == pytest.approx(want, abs=1e-12)
    # pair 0 by hand: 0.5 * ((1 - 0.8)^2 + (-0.5 + 0.8)^2) = 0.065
    assert single[0] == pytest.approx(0.065, abs=1e-12)


def test_sppo_soft_with_hard_probabilities_is_half_trl_sppo_hard():
    beta = 0.25
    soft = losses.sppo(t(PC), t(PR), t(RC), t(RR), t([1.0, 1.0]), t([0.0, 0.0]), beta)
    hard = ((t(PC) - t(RC)) - 0.5 / beta) ** 2 + ((t(PR) - t(RR)) + 0.5 / beta) ** 2
    assert torch.allclose(soft, 0.5 * hard)


def test_copg_matches_formula_and_ipo_relation():
    beta = 0.2
    rc, rr = [1.0, 0.25], [0.0, 0.75]
    got = losses.copg(t(PC), t(PR), t(RC), t(RR), t(rc), t(rr), beta).tolist()
    for i in range(2):
        want = ((rc[i] - beta * (PC[i] - RC[i])) - (rr[i] - beta * (PR[i] - RR[i]))) ** 2
        assert got[i] == pytest.approx(want, abs=1e-12)
    # pair 0 by hand: (1 - 0.2) - (0 + 0.1) = 0.7 -> 0.49
    assert got[0] == pytest.approx(0.49, abs=1e-12)
    # R_c - R_r = 1/2 gives beta^2 (h - 1/(2 beta))^2 (IPO with tau = beta)
    half = losses.copg(t(PC), t(PR), t(RC), t(RR), t([0.5, 0.5]), t([0.0, 0.0]), beta)
    h = (t(PC) - t(RC)) - (t(PR) - t(RR))
    assert torch.allclose(half, beta ** 2 * (h - 1 / (2 * beta)) ** 2)


def test_sft_nll_is_masked_token_mean():
    lp = t([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert losses.sft_nll(lp, mask).item() == pytest.approx((2 + 3 + 4) / 3, abs=1e-12)


def _pro_direct(s, r, n, best, sft_weight, eps=1e-10):
    """PRO for one record, straight from the formula."""
    total = 0.0
    for k in range(n - 1):
        tk = [r[k] - r[i] for i in range(k + 1, n)]
        tkk = max(tk)
        denom = eps + math.exp(s[k] * tkk) + sum(math.exp(s[i] * tki)
                                                 for i, tki in zip(range(k + 1, n), tk))
        total += math.log(denom) - s[k] * tkk
    return total, (n - 1) ** 2 * -best


def test_pro_matches_formula_with_ragged_lists():
    avg = [[-1.0, -1.5, -2.0], [-0.5, -3.0, 0.0]]
    rew = [[3.0, 2.0, 0.5], [1.0, 0.0, 0.0]]
    valid = [[True, True, True], [True, True, False]]
    best = [-20.0, -8.0]
    sw = 0.05
    total, rank, sft = losses.pro(t(avg), t(rew), torch.tensor(valid), t(best), sw)
    r0, s0 = _pro_direct(avg[0], rew[0], 3, best[0], sw)
    r1, s1 = _pro_direct(avg[1], rew[1], 2, best[1], sw)
    # stage 0 averages both records, stage 1 only record 0
    stage0_0 = math.log(1e-10 + math.exp(-1.0 * 2.5) + math.exp(-1.5 * 1.0) + math.exp(-2.0 * 2.5)) + 2.5
    stage0_1 = r1
    stage1_0 = r0 - stage0_0
    want_rank = (stage0_0 + stage0_1) / 2 + stage1_0
    assert rank.item() == pytest.approx(want_rank, abs=1e-9)
    assert sft.item() == pytest.approx((s0 + s1) / 2, abs=1e-9)  # (4*20 + 1*8)/2 = 44
    assert sft.item() == pytest.approx(44.0, abs=1e-9)
    assert total.item() == pytest.approx(want_rank + sw * 44.0, abs=1e-9)


def test_pro_epsilon_matters_for_tiny_terms():
    """With exp(s*T) far below 1e-10 the epsilon of the reference code dominates."""
    avg, rew = t([[-30.0, -30.0]]), t([[2.0, 0.0]])
    _, rank, _ = losses.pro(avg, rew, torch.ones(1, 2, dtype=torch.bool), t([-1.0]), 0.0)
    want = math.log(1e-10 + 2 * math.exp(-60.0)) + 60.0
    assert rank.item() == pytest.approx(want, rel=1e-9)


def test_grao_matches_formula():
    beta, lam = 0.5, 0.6
    avg = [[-1.0, -2.0, -0.5], [-1.2, -0.8, 0.0]]
    rew = [[1.0, 0.0, 0.5], [0.2, 0.9, 0.0]]
    valid = [[True, True, True], [True, True, False]]
    ref_avg, ref_r = [-0.7, -1.1], [1.0, 0.9]
    got = losses.grao(t(avg), t(rew), torch.tensor(valid), t(ref_avg), t(ref_r), beta, lam).item()
    js = []
    for b in range(2):
        g = sum(valid[b])
        rs = rew[b][:g] + [ref_r[b]]
        mu = sum(rs) / len(rs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / len(rs))
        adv = [(x - mu) / (sd + 1e-4) for x in rs]
        j = sum(adv[i] * avg[b][i] + beta * adv[-1] * ref_avg[b]
                + lam * adv[i] * (avg[b][i] - ref_avg[b]) for i in range(g)) / g
        js.append(j)
    assert got == pytest.approx(-(js[0] + js[1]) / 2, abs=1e-9)


def test_grao_equal_rewards_give_zero_loss():
    got = losses.grao(t([[-1.0, -2.0]]), t([[0.5, 0.5]]), torch.ones(1, 2, dtype=torch.bool),
                      t([-3.0]), t([0.5]), 0.5, 0.6)
    assert got.item() == 0.0


# --- a few steps on the tiny Llama lower each custom loss ----------------------------------

def _pairs(n=8):
    return [{"id": f"p{i}", "prompt": f"Explain the sky {i}" if i % 2 else
             [{"role": "user", "content": f"Give tips {i}"}],
             "chosen": "good answer with tips", "rejected": "bad no",
             "score_chosen": 1.0, "score_rejected": 0.0,
             "p_win": {"chosen": 0.75, "rejected": 0.25}} for i in range(n)]


def _groups(n=8, reference=False):
    recs = []
    for i in range(n):
        comps = [{"text": "best answer please", "score": 1.0},
                 {"text": "good answer", "score": 0.6},
                 {"text": "bad", "score": 0.1}]
        rec = {"id": f"g{i}", "prompt": f"Write about music {i}", "completions": comps}
        if reference:
            rec["reference"] = "best answer please thanks"
        recs.append(rec)
    return recs


@pytest.mark.parametrize("method,extra,kind", [
    ("dpo", ["--loss", "sigmoid", "--label-smoothing", "0.2"], "pairs"),
    ("sppo", ["--beta", "0.1"], "pairs"),
    ("sppo", ["--loss", "sppo_single", "--beta", "0.1"], "pairs"),
    ("copg", [], "pairs"),
    ("pro", [], "ranking"),
    ("grao", [], "samples"),
])
def test_custom_loss_decreases_on_tiny(cli, tiny_model, tmp_path, method, extra, kind):
    recs = _pairs() if kind == "pairs" else _groups(reference=kind == "samples")
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = tmp_path / "out"
    r = cli(["train-policy", "--method", method, "--model", tiny_model, data, "-o", out,
             "--batch-size", "8", "--epochs", "20", "--max-steps", "6", "--lr", "3e-3",
             "--no-ref-cache", *extra])
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["loss"] < steps[0]["loss"]
    info = json.loads((out / "alignkit.json").read_text())
    assert info["method"] == method and info["trainer"] == "AlignkitDPOTrainer"
