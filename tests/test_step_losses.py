"""Step-1 losses against hand computations.

Each test runs one command step (or calls one trainer's loss on hand-made tensors) and
compares the loss with a value computed here from the formulas of ALGORITHMS.md (and
TRL's definitions for the trainers alignkit wraps): the log-probabilities come from the
tiny models by teacher forcing in this file, never from the code under test. Batches are
asymmetric (different lengths, p_win 0.9/0.2, different scores, a reference that is a
different model) so that a chosen/rejected swap, a wrong pairing or a wrong sign changes
the value.

Also the three fixes: P3O's q with the current policy's log-ratios (the pairs being the two
completions of a prompt), SimPO's default gamma (the paper's gamma/beta = 0.5), and
--label-smoothing refused where the loss ignores it.
"""
from __future__ import annotations

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import metrics, write_jsonl

REL = 1e-4  # fp32 training forward vs the float64 reference computation here


# --- helpers ---------------------------------------------------------------------------------

def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", *[str(a) for a in args]])



def step1(folder) -> dict:
    rows = [r for r in metrics(folder) if "loss" in r]
    assert rows and rows[0]["step"] == 1
    return rows[0]


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_model_b):
    """The two tiny models (fp32, eval) and their shared tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    a = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_model_b, dtype=torch.float32).eval()
    return types.SimpleNamespace(a=a, b=b, tok=AutoTokenizer.from_pretrained(tiny_model))


def token_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """log π(token | prompt, earlier tokens) of each completion token, float64."""
    return token_dists(model, prompt_ids, completion_ids).gather(
        1, torch.tensor(completion_ids)[:, None])[:, 0]


def token_dists(model, prompt_ids, completion_ids) -> torch.Tensor:
    """The next-token log-distributions [len(completion), V] that predict each completion
    token (teacher forcing, float64)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    n = len(prompt_ids)
    return torch.log_softmax(logits[n - 1:n - 1 + len(completion_ids)], dim=-1)


def logp(model, prompt_ids, completion_ids) -> float:
    return token_logps(model, prompt_ids, completion_ids).sum().item()


def alignkit_ids(tok, prompt, completion):
    """(prompt ids, completion ids) of the one text layer: what the pair trainer, distill
    and the sampler see (chat-templated prompt, completion text + EOS)."""
    from alignkit.text import encode_pair, render_prompt
    return encode_pair(tok, render_prompt(tok, prompt), completion)


def trl_ids(tok, prompt, completion, extra_eos: bool):
    """(prompt ids, completion ids) as TRL 1.16 tokenizes alignkit's conversational rows
    (sft, kto, simpo, orpo): the chat template over prompt + one assistant turn, the
    completion being what follows the templated prompt, i.e. `text<|im_end|>\\n` (the
    template's newline included); CPO/ORPO's `add_eos_token_if_needed` then adds a second
    EOS because the last token is that newline (`extra_eos`). NOTE: this is not the
    alignkit text layer's `text<|im_end|>` (reported; kept here as TRL's behaviour)."""
    from alignkit.text import render_conversation, render_prompt
    p = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    full = tok(render_conversation(tok, prompt, completion), add_special_tokens=False)["input_ids"]
    assert full[:len(p)] == p
    comp = full[len(p):]
    return p, comp + [tok.eos_token_id] if extra_eos else comp


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# The pair records of the offline tests: two prompts (a string, a message list), completions
# of different lengths, asymmetric p_win and scores.
PAIRS = [
    {"id": "a", "prompt": "Write about the ocean", "chosen": "good answer with many tips",
     "rejected": "bad no", "p_win": {"chosen": 0.9, "rejected": 0.2},
     "score_chosen": 0.8, "score_rejected": -0.3},
    {"id": "b", "prompt": [{"role": "user", "content": "Tell me a joke"}],
     "chosen": "yes thanks", "rejected": "no no music space ocean travel",
     "p_win": {"chosen": 0.6, "rejected": 0.35}, "score_chosen": 1.5, "score_rejected": 0.4},
]
OFFLINE = ["--max-steps", "1", "--logging-steps", "1", "--batch-size", "2", "--dtype",
           "float32", "--max-length", "96", "--lr", "1e-3", "--no-ref-cache"]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("step_pairs")
    return write_jsonl(d / "pairs.jsonl", PAIRS)


def pair_logps(lm, policy, ref):
    """Per record: (pc, pr, rc, rr, chosen per-token logps) on the text layer's tokens."""
    out = []
    for rec in PAIRS:
        pc_ids = alignkit_ids(lm.tok, rec["prompt"], rec["chosen"])
        pr_ids = alignkit_ids(lm.tok, rec["prompt"], rec["rejected"])
        out.append(dict(pc=logp(policy, *pc_ids), pr=logp(policy, *pr_ids),
                        rc=logp(ref, *pc_ids), rr=logp(ref, *pr_ids),
                        chosen_tokens=token_logps(policy, *pc_ids)))
    return out


# --- the offline loss hooks: cDPO (+ the SFT term), soft SPPO, single-pair SPPO, CoPG ------------

def expected_pair_loss(name: str, beta: float, lps: list[dict]) -> float:
    """The mean over the batch of the method's per-pair loss, from ALGORITHMS.md."""
    per = []
    for rec, v in zip(PAIRS, lps):
        dc, dr = v["pc"] - v["rc"], v["pr"] - v["rr"]
        if name == "cdpo+sft":       # −(1−ε)logσ(βh) − ε logσ(−βh), ε = 0.2
            h = beta * (dc - dr)
            per.append(-(1 - 0.2) * logsig(h) - 0.2 * logsig(-h))
        elif name == "sppo":         # ½[(Δc − η(p_w − ½))² + (Δr − η(p_l − ½))²], η = 1/β
            eta = 1 / beta
            pw, pl = rec["p_win"]["chosen"], rec["p_win"]["rejected"]
            per.append(0.5 * ((dc - eta * (pw - 0.5)) ** 2 + (dr - eta * (pl - 0.5)) ** 2))
        elif name == "sppo_single":  # P = σ(score_c − score_r) (p_win is not a number)
            eta = 1 / beta
            p = sig(rec["score_chosen"] - rec["score_rejected"])
            per.append(0.5 * ((dc - eta * (p - 0.5)) ** 2 + (dr + eta * (p - 0.5)) ** 2))
        elif name == "copg":         # ((R_c − βΔc) − (R_r − βΔr))²
            per.append(((rec["score_chosen"] - beta * dc) - (rec["score_rejected"] - beta * dr)) ** 2)
    loss = sum(per) / len(per)
    if name == "cdpo+sft":  # + 0.5 · mean NLL over every chosen token of the batch
        toks = torch.cat([v["chosen_tokens"] for v in lps])
        loss += 0.5 * (-toks.sum().item() / toks.numel())
    return loss


PAIR_RUNS = {
    "cdpo+sft": ["--method", "dpo", "--loss", "sigmoid,sft", "--loss-weights", "1,0.5",
                 "--label-smoothing", "0.2", "--beta", "0.5"],
    "sppo": ["--method", "sppo", "--beta", "0.5"],
    "sppo_single": ["--method", "sppo", "--loss", "sppo_single", "--beta", "0.5"],
    "copg": ["--method", "copg", "--beta", "0.5"],
}


@pytest.mark.parametrize("name", list(PAIR_RUNS))
def test_offline_pair_hook_step1_loss_matches_hand_computation(name, lm, pair_data, tiny_model,
                                                               tiny_model_b, tmp_path):
    out = tmp_path / "out"
    assert run(["train-policy", *PAIR_RUNS[name], "--model", tiny_model, "--ref-model",
                tiny_model_b, pair_data, "-o", out, *OFFLINE]) == 0
    beta = 0.5
    lps = pair_logps(lm, lm.a, lm.b)
    want = expected_pair_loss(name, beta, lps)
    # the same formula with chosen and rejected swapped must differ (the batch is asymmetric)
    swapped = [dict(v, pc=v["pr"], pr=v["pc"], rc=v["rr"], rr=v["rc"]) for v in lps]
    assert abs(expected_pair_loss(name, beta, swapped) - want) > 1e-2 * abs(want)
    got = step1(out)
    assert got["loss"] == pytest.approx(want, rel=REL)
    # the logged DPO metrics: rewards = β·Δ per side
    assert got["rewards/chosen"] == pytest.approx(
        sum(beta * (v["pc"] - v["rc"]) for v in lps) / 2, rel=REL, abs=1e-5)
    assert got["logps/rejected"] == pytest.approx(sum(v["pr"] for v in lps) / 2, rel=REL)


# --- --label-smoothing only where a loss reads it ------------------------------------------------

IGNORING = ["hinge", "ipo", "sigmoid_norm", "nca_pair", "bco_pair", "apo_zero", "apo_down",
            "discopop", "sppo_hard", "hinge,sft"]


@pytest.mark.parametrize("loss", IGNORING)
def test_label_smoothing_with_a_loss_that_ignores_it_exits_2(loss, cli, pair_data, tiny_model,
                                                             tmp_path):
    """TRL 1.16's DPO losses other than robust, exo_pair, aot and aot_unpaired (and its
    sigmoid, which alignkit turns into cDPO) never read label_smoothing: refused, naming
    the flag and the loss, before any model is loaded (it was silently ignored)."""
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, pair_data, "-o",
             tmp_path / "out", "--loss", loss, "--label-smoothing", "0.1", *OFFLINE])
    assert r.code == 2, r
    assert "--label-smoothing" in r.err and f"--loss {loss}" in r.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("loss, cdpo", [("sigmoid", True), ("sigmoid,sft", True), ("cdpo", True),
                                        ("robust", False), ("exo_pair", False), ("aot", False),
                                        ("aot_unpaired", False), ("hinge,robust", False)])
def test_label_smoothing_is_kept_where_a_loss_reads_it(loss, cdpo):
    from alignkit.policy import POLICY
    from alignkit.policy.pairs import parse_losses
    specs, custom = parse_losses(POLICY.get("dpo"), loss, None, 0.1)
    assert custom == cdpo and (("cdpo" in dict(specs)) == cdpo)


def test_exo_pair_without_label_smoothing_is_a_usage_error():
    from alignkit.errors import UsageError
    from alignkit.policy import POLICY
    from alignkit.policy.pairs import parse_losses
    with pytest.raises(UsageError, match="exo_pair needs --label-smoothing > 0"):
        parse_losses(POLICY.get("dpo"), "exo_pair", None, 0.0)

# --- TRL's own trainers: SimPO, ORPO, KTO, SFT --------------------------------------------------

def test_simpo_step1_loss_with_the_default_gamma(lm, pair_data, tiny_model, tmp_path, cli):
    """−logσ(β·(avglogπ(y_w) − avglogπ(y_l)) − γ) at the defaults β = 2, γ = 1.0 (the SimPO
    paper's γ/β = 0.5; alignkit used γ = 0.5 before, which fails this test)."""
    out = tmp_path / "out"
    assert run(["train-policy", "--method", "simpo", "--model", tiny_model, pair_data, "-o", out,
                *OFFLINE]) == 0
    beta, gamma = 2.0, 0.5 * 2.0
    per = []
    for rec in PAIRS:
        c = token_logps(lm.a, *trl_ids(lm.tok, rec["prompt"], rec["chosen"], extra_eos=True))
        r = token_logps(lm.a, *trl_ids(lm.tok, rec["prompt"], rec["rejected"], extra_eos=True))
        per.append(-logsig(beta * (c.mean().item() - r.mean().item()) - gamma))
    assert step1(out)["loss"] == pytest.approx(sum(per) / len(per), rel=REL)
    info = json.loads((out / "alignkit.json").read_text())["hyperparameters"]
    assert (info["beta"], info["simpo_gamma"]) == (2.0, 1.0)
    import re
    text = re.sub(r"[\s│]+", " ", cli(["train-policy", "--help"]).out)
    assert "gamma/beta = 0.5" in text and "default 1.0" in text.split("--simpo-gamma")[1][:400]


def test_orpo_step1_loss_is_nll_plus_lambda_log_odds_ratio(lm, pair_data, tiny_model, tmp_path):
    """NLL(y_w) − λ·logσ(log odds(y_w) − log odds(y_l)), odds = p/(1−p), p = exp(avglogπ)
    over the completion tokens; λ = TRL's beta = 0.1. TRL's NLL (as the ORPO authors'
    code by default, `disable_prompt_loss` off) is the mean over every predicted token of
    the chosen sequences, prompt included."""
    out = tmp_path / "out"
    assert run(["train-policy", "--method", "orpo", "--model", tiny_model, pair_data, "-o", out,
                *OFFLINE]) == 0
    lam, ratios, chosen_tokens = 0.1, [], []
    for rec in PAIRS:
        c = token_logps(lm.a, *trl_ids(lm.tok, rec["prompt"], rec["chosen"], extra_eos=True))
        r = token_logps(lm.a, *trl_ids(lm.tok, rec["prompt"], rec["rejected"], extra_eos=True))
        pc, pr = c.mean().item(), r.mean().item()
        log_odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
        ratios.append(logsig(log_odds))
        p_ids, c_ids = trl_ids(lm.tok, rec["prompt"], rec["chosen"], extra_eos=True)
        chosen_tokens.append(token_logps(lm.a, p_ids[:1], p_ids[1:] + c_ids))  # prompt too
    nll = -torch.cat(chosen_tokens).mean().item()
    want = nll - lam * sum(ratios) / len(ratios)
    assert step1(out)["loss"] == pytest.approx(want, rel=REL)


UNPAIRED = [
    {"id": "u0", "prompt": "Write about the ocean", "completion": "good answer with tips", "label": True},
    {"id": "u1", "prompt": "Tell me a joke", "completion": "bad no", "label": True},
    {"id": "u2", "prompt": [{"role": "user", "content": "Say hello"}], "completion": "hello there yes",
     "label": True},
    {"id": "u3", "prompt": "Name a color", "completion": "music space ocean travel art", "label": False},
]


def test_kto_step1_loss_with_its_reference_point(lm, tiny_model, tiny_model_b, tmp_path):
    """Desirable: 1 − σ(β(Δ − z0)); undesirable: 1 − σ(β(z0 − Δ)); the mean over the batch
    (λ_D = λ_U = 1). z0 = max(0, mean of Δ on the mismatched pairs (x_i, y_{i−1}), TRL's
    rotation of the completions within the batch). Δ = logπθ − logπref, summed."""
    data = write_jsonl(tmp_path / "u.jsonl", UNPAIRED)
    out = tmp_path / "out"
    beta = 0.5
    # policy: the seed-1 model, reference: the seed-0 one (so that z0 > 0 on this batch)
    assert run(["train-policy", "--method", "kto", "--model", tiny_model_b, "--ref-model", tiny_model,
                data, "-o", out, "--beta", beta, *OFFLINE[:-1], "--batch-size", "4"]) == 0
    ids = [trl_ids(lm.tok, r["prompt"], r["completion"], extra_eos=False) for r in UNPAIRED]
    delta = [logp(lm.b, p, c) - logp(lm.a, p, c) for p, c in ids]
    mismatched = [(ids[i][0], ids[i - 1][1]) for i in range(len(ids))]   # (x_i, y_{i-1})
    kl = sum(logp(lm.b, p, c) - logp(lm.a, p, c) for p, c in mismatched) / len(ids)
    assert kl > 0, "the batch must exercise the reference point (z0 > 0), not its clamp"
    z0 = max(0.0, kl)
    per = [1 - sig(beta * (d - z0)) if r["label"] else 1 - sig(beta * (z0 - d))
           for r, d in zip(UNPAIRED, delta)]
    assert step1(out)["loss"] == pytest.approx(sum(per) / len(per), rel=REL)
    # without the reference point (z0 = 0) the value differs: the test sees z0
    assert abs(sum(1 - sig(beta * (d if r["label"] else -d)) for r, d in zip(UNPAIRED, delta)) / 4
               - sum(per) / 4) > 1e-3


def test_sft_step1_loss_is_the_mean_completion_token_nll(lm, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]}
                                              for r in UNPAIRED[:3]])
    out = tmp_path / "out"
    assert run(["train-policy", "--method", "sft", "--model", tiny_model, data, "-o", out,
                *OFFLINE[:-1], "--batch-size", "3"]) == 0
    toks = torch.cat([token_logps(lm.a, *trl_ids(lm.tok, r["prompt"], r["completion"], False))
                      for r in UNPAIRED[:3]])
    assert step1(out)["loss"] == pytest.approx(-toks.mean().item(), rel=REL)


# --- online: P3O's q (the fix), pairing, GTPO's gather/scatter -----------------------------------

class OneProcess:
    """accelerate's Accelerator as a single process sees it."""
    process_index, num_processes = 0, 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def pair_trainer(kind: str, coef: float, logps, clip: str = "pair", eps: float = 0.2):
    """A PairTrainer without TRL's init: its `_compute_loss` on hand-made tensors."""
    from alignkit.policy.online_trainers import PairTrainer
    t = object.__new__(PairTrainer)
    t.pair_kind, t.coef, t.clip, t.eps, t.ratio_clip = kind, coef, clip, eps, 10.0
    t.accelerator = OneProcess()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = types.SimpleNamespace(training=True)
    t._forward = lambda model, inputs: (logps, torch.zeros_like(logps))
    t._ga_scale = lambda: 1.0
    return t


# 4 completions of 2 prompts, 3 positions; the current log-probs differ from the rollout's
CUR = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.0], [-0.2, -0.9, -1.1], [-2.2, -0.4, -0.7]])
OLD = torch.tensor([[-1.2, -1.7, -0.5], [-1.1, -0.6, -2.0], [-0.4, -0.9, -1.3], [-2.0, -0.1, -0.9]])
REF = torch.tensor([[-1.1, -1.9, -0.8], [-1.3, -0.5, -1.5], [-0.6, -0.7, -1.0], [-1.9, -0.6, -0.8]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
REWARDS = torch.tensor([0.9, -0.4, 0.1, 0.6])


def _rows(x):
    return [list(map(float, row)) for row in x]


def p3o_by_hand(pairs, kappa, eps, clip, c=10.0):
    """P3O (ALGORITHMS.md Part A §4, the authors' modeling_p3o.py): q = (r1 − r2) − κ(L1 − L2)
    with L = Σ_t m·(logπθ − logπref) of the CURRENT policy, ρ = clamp(exp(ΔL1 + ΔL2), 1/c, c),
    ΔL = L − L_old; the sum over pairs divided by the completion tokens."""
    cur, old, ref, m = _rows(CUR), _rows(OLD), _rows(REF), _rows(MASK)
    L = [sum(mm * (a - b) for a, b, mm in zip(cur[i], ref[i], m[i])) for i in range(4)]
    Lo = [sum(mm * (a - b) for a, b, mm in zip(old[i], ref[i], m[i])) for i in range(4)]
    total = 0.0
    for i, j in pairs:
        q = (float(REWARDS[i]) - float(REWARDS[j])) - kappa * (L[i] - L[j])
        rho = min(max(math.exp((L[i] - Lo[i]) + (L[j] - Lo[j])), 1 / c), c)
        w = q * rho
        if clip == "pair":
            d, d_old = L[i] - L[j], Lo[i] - Lo[j]
            total += max(-w * d, -w * min(max(d, d_old - eps), d_old + eps))
        else:
            for k, sign in ((i, -1.0), (j, 1.0)):
                for t in range(3):
                    if m[k][t]:
                        lp, lo = cur[k][t], old[k][t]
                        total += max(sign * w * lp, sign * w * min(max(lp, lo - eps), lo + eps))
    return total / sum(map(sum, m))


@pytest.mark.parametrize("clip", ["pair", "token"])
def test_p3o_q_uses_the_current_log_ratios(clip):
    """Fails with q from the rollout-time log-ratios (alignkit before this fix)."""
    kappa, eps = 0.5, 0.2
    t = pair_trainer("p3o", kappa, CUR.clone().requires_grad_(True), clip=clip, eps=eps)
    inputs = {"completion_mask": MASK, "old_per_token_logps": OLD, "ref_token_logps": REF,
              "pair_rewards": REWARDS, "pair_group": torch.tensor([7, 7, 3, 3])}
    got = type(t)._compute_loss(t, None, inputs)
    want = p3o_by_hand([(0, 1), (2, 3)], kappa, eps, clip)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # with q from the rollout-time L the value differs (so the test tells the two apart)
    L_old = ((OLD - REF) * MASK).sum(-1)
    q_old = (REWARDS[0::2] - REWARDS[1::2]) - kappa * (L_old[0::2] - L_old[1::2])
    assert t._metrics["train"]["p3o/q_abs"][0] != pytest.approx(q_old.abs().mean().item(), rel=1e-3)


def test_pair_order_pairs_the_two_completions_of_each_prompt():
    from alignkit.policy.online_losses import pair_order
    assert pair_order(torch.tensor([4, 4, 9, 9])).tolist() == [0, 1, 2, 3]
    assert pair_order(torch.tensor([9, 4, 9, 4])).tolist() == [0, 2, 1, 3]
    assert pair_order(torch.tensor([1, 2, 2, 1])).tolist() == [0, 3, 1, 2]
    assert pair_order(torch.tensor([6, 6, 6, 6])).tolist() == [0, 1, 2, 3]  # a prompt twice
    with pytest.raises(ValueError, match=r"\[2\] have no partner"):
        pair_order(torch.tensor([1, 1, 2]))


@pytest.mark.parametrize("groups,pairs", [([5, 5, 2, 2], [(0, 1), (2, 3)]),
                                          ([5, 2, 5, 2], [(0, 2), (1, 3)])])
def test_online_ipo_pairs_completions_of_the_same_prompt(groups, pairs):
    """(h − (P(y1 ≻ y2) − ½)/τ)², h = L(y1) − L(y2), mean over the pairs; a consecutive
    layout pairs (0, 1), (2, 3) (not OnlineDPO's first half against the second half)."""
    tau = 0.5
    t = pair_trainer("ipo", tau, CUR.clone())
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.9])   # one pair of each layout is a tie
    inputs = {"completion_mask": MASK, "ref_token_logps": REF, "pair_rewards": rewards,
              "pair_group": torch.tensor(groups)}
    got = type(t)._compute_loss(t, None, inputs).item()
    cur, ref, m = _rows(CUR), _rows(REF), _rows(MASK)
    L = [sum(mm * (a - b) for a, b, mm in zip(cur[i], ref[i], m[i])) for i in range(4)]
    per = []
    for i, j in pairs:
        r1, r2 = float(rewards[i]), float(rewards[j])
        p = 1.0 if r1 > r2 else 0.0 if r1 < r2 else 0.5
        per.append((L[i] - L[j] - (p - 0.5) / tau) ** 2)
    assert got == pytest.approx(sum(per) / len(per), rel=1e-6)
    first_half = [(0, 2), (1, 3)] if pairs == [(0, 1), (2, 3)] else [(0, 1), (2, 3)]
    other = [(L[i] - L[j] - ((1.0 if rewards[i] > rewards[j] else 0.0 if rewards[i] < rewards[j]
                               else 0.5) - 0.5) / tau) ** 2 for i, j in first_half]
    assert abs(sum(other) / 2 - got) > 1e-3


class SecondOfTwoProcesses:
    """Process 1 of 2: `gather` puts process 0's tensors (padded the same way) first."""
    process_index, num_processes = 1, 2

    def __init__(self, ids0, mask0, adv0):
        self.to_pad = [ids0, mask0]   # process 0's tensors, in the order they are padded
        self.ready: list = []         # ... and gathered (padded ones first, then adv0)
        self.adv0 = adv0

    def pad_across_processes(self, t, dim=1, pad_index=0):
        other = self.to_pad.pop(0)
        width = max(t.size(1), other.size(1))
        pad = lambda x: torch.cat([x, x.new_full((x.size(0), width - x.size(1)), pad_index)], 1)
        self.ready.append(pad(other))
        return pad(t)

    def gather(self, t):
        return torch.cat([self.ready.pop(0) if self.ready else self.adv0, t], 0)


def test_gtpo_weights_of_a_group_split_over_two_processes(monkeypatch):
    """A group of 4 (G = 4): rows 0-1 on process 0 (width 5), rows 2-3 on process 1 (width 3).
    Process 1 must get the weights of ITS rows, computed on the whole group, cut to width 3.

    By hand (ALGORITHMS.md Part B §2), P = {c0, c2}, N = {c1, c3}:
      c0 = 5 6 7 8 9 (+)   c1 = 5 6 1 2 (-)   c2 = 5 6 9 (+)   c3 = 5 2 9 (-)
    shared prefix run: c2 positions 0,1,2 (5 6 in c0/c1, 9 in c2/c3 at 2); c3 position 0.
    shared suffix run (end-aligned): c2 and c3 their last token (9 ends c0, c2, c3).
    δ (conflict: 2 for P, 0 for N; fwd·bwd): c2 = 2 2 2·2, c3 = 0 1 0.
    n_conflict: c2 3, c3 2; conflict share over the group 10 / 15 tokens."""
    from alignkit.policy import online_trainers as T
    ids0 = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 1, 2, 0]])
    mask0 = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    adv0 = torch.tensor([1.0, -1.0])
    out = {"completion_ids": torch.tensor([[5, 6, 9], [5, 2, 9]]),
           "completion_mask": torch.ones(2, 3, dtype=torch.long),
           "advantages": torch.tensor([0.5, -0.5])}
    monkeypatch.setattr(T.OnlineMixin, "_generate_and_score_completions", lambda self, inputs: dict(out))
    t = object.__new__(T.GTPOTrainer)
    t.accelerator = SecondOfTwoProcesses(ids0, mask0, adv0)
    t.num_generations = 4
    t._ak = types.SimpleNamespace(tokenizer=types.SimpleNamespace(pad_token_id=0), off_policy=None)
    t.model = types.SimpleNamespace(training=True)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    got = T.GTPOTrainer._generate_and_score_completions(t, [])
    assert got["gtpo_delta"].tolist() == [[2.0, 2.0, 4.0], [0.0, 1.0, 0.0]]
    assert got["gtpo_conflicts"].tolist() == [3, 2]
    assert t._metrics["train"]["gtpo/conflict_tokens"] == [pytest.approx(10 / 15)]


# --- online: one IPO-MD step and one RLOO step against the formulas ------------------------------

REWARD = '''
def score(prompts, completions, **kw):
    """A deterministic reward that separates most completions."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [(sum(ord(ch) * (i + 1) for i, ch in enumerate(t)) % 97) / 10.0 for t in texts]
'''


def reward_of(text: str) -> float:
    return (sum(ord(ch) * (i + 1) for i, ch in enumerate(text)) % 97) / 10.0


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("step_online")
    (d / "rew.py").write_text(REWARD)
    recs = [{"id": "q0", "prompt": "Write about the ocean"},
            {"id": "q1", "prompt": [{"role": "user", "content": "Tell me a joke"}]}]
    return {"path": write_jsonl(d / "prompts.jsonl", recs), "records": recs,
            "reward": f"python:{d / 'rew.py'}:score"}


ONLINE = ["--max-steps", "1", "--logging-steps", "1", "--batch-size", "4", "--dtype", "float32",
          "--max-new-tokens", "8", "--sample-every", "1", "--lr", "1e-3"]


def capture_rollout(monkeypatch) -> list:
    """Record what the sampler returned: (prompt ids, completion ids) per completion."""
    from alignkit.policy import online_trainers as T
    seen: list = []
    original = T.OnlineMixin._ak_generate

    def spy(self, prompt_ids):
        out = original(self, prompt_ids)
        seen.extend(zip([list(p) for p in prompt_ids], [list(c) for c in out]))
        return out
    monkeypatch.setattr(T.OnlineMixin, "_ak_generate", spy)
    return seen


def rollout_values(lm, prompts, seen, policy, ref):
    """Per completion: (record index, reward, Σ logπθ − Σ logπref, n tokens), computed
    here: the prompt ids must be the text layer's, the reward is `reward_of` on TRL's
    decoded completion."""
    from alignkit.text import encode_prompt, render_prompt
    enc = [encode_prompt(lm.tok, render_prompt(lm.tok, r["prompt"])) for r in prompts["records"]]
    out = []
    for p_ids, c_ids in seen:
        assert p_ids in enc
        text = lm.tok.decode(c_ids, skip_special_tokens=True)
        lr = token_logps(policy, p_ids, c_ids) - token_logps(ref, p_ids, c_ids)
        out.append((enc.index(p_ids), reward_of(text), lr.sum().item(), len(c_ids)))
    return out


def test_ipo_md_step1_loss_matches_the_formula(lm, prompts, tiny_model, tiny_model_b, tmp_path,
                                                monkeypatch):
    """(h − (P(y1 ≻ y2) − ½)/τ)² averaged over the prompts' pairs, h = Δ(y1) − Δ(y2) with
    Δ = Σ logπθ − Σ logπref on the mixture samples; P = 1, 0 or ½ from the rewards."""
    seen = capture_rollout(monkeypatch)
    out = tmp_path / "out"
    assert run(["train-policy", "--method", "ipo-md", "--model", tiny_model, "--ref-model",
                tiny_model_b, prompts["path"], "--reward", prompts["reward"], "-o", out,
                "--alpha", "0.5", *ONLINE]) == 0
    vals = rollout_values(lm, prompts, seen, lm.a, lm.b)
    assert len(vals) == 4
    tau, per = 0.1, []
    for (g1, r1, d1, _), (g2, r2, d2, _) in zip(vals[0::2], vals[1::2]):
        assert g1 == g2  # the two samples of a prompt are consecutive
        p = 1.0 if r1 > r2 else 0.0 if r1 < r2 else 0.5
        per.append((d1 - d2 - (p - 0.5) / tau) ** 2)
    assert {g for g, *_ in vals} == {0, 1}
    row = step1(out)
    assert row["loss"] == pytest.approx(sum(per) / len(per), rel=REL)
    # samples.jsonl holds the same completions with the same rewards
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [c["score"] for r in recs for c in r["completions"]] == \
        pytest.approx([r for _, r, _, _ in vals])


def test_rloo_step1_advantages_and_loss_match_the_formula(lm, prompts, tiny_model, tiny_model_b,
                                                          tmp_path, monkeypatch):
    """TRL's RLOO: r̃ = r − β·Σ_t(log πθ − log πref) (the KL in the reward), A_i = r̃_i − the
    mean of the other r̃ of its prompt; loss = −mean min(ρA, clip(ρ)A), and at step 1
    ρ = 1, so the loss is −mean A (= 0: leave-one-out advantages sum to 0 per prompt)."""
    from alignkit.policy import online_trainers as T
    seen = capture_rollout(monkeypatch)
    got_adv: list = []
    original = T.RLOOTrainer._compute_loss

    def spy(self, model, inputs):  # TRL shuffles the rollout: keep each row's tokens
        for ids, m, a in zip(inputs["completion_ids"], inputs["completion_mask"], inputs["advantages"]):
            got_adv.append((ids[m.bool()].tolist(), a.item()))
        return original(self, model, inputs)
    monkeypatch.setattr(T.AlignkitRLOOTrainer, "_compute_loss", spy)
    out = tmp_path / "out"
    beta = 0.5
    assert run(["train-policy", "--method", "rloo", "--model", tiny_model, "--ref-model",
                tiny_model_b, prompts["path"], "--reward", prompts["reward"], "-o", out,
                "--beta", beta, "--num-generations", "2", *ONLINE]) == 0
    vals = rollout_values(lm, prompts, seen, lm.a, lm.b)
    shaped = [r - beta * kl for _, r, kl, _ in vals]
    adv = []
    for i, (g, *_rest) in enumerate(vals):
        others = [shaped[j] for j, (h, *_x) in enumerate(vals) if h == g and j != i]
        adv.append(shaped[i] - sum(others) / len(others))
    assert sorted(c for c, _ in got_adv) == sorted(c for _, c in seen)
    got = [next(a for c, a in got_adv if c == ids) for _, ids in seen]
    assert got == pytest.approx(adv, rel=REL, abs=1e-5)
    row = step1(out)
    assert row["loss"] == pytest.approx(-sum(adv) / len(adv), abs=1e-5)
    assert row["reward"] == pytest.approx(sum(r for _, r, _, _ in vals) / 4, rel=1e-6)
    # TRL's logged kl: Σ over every completion token of (logπθ − logπref) / the tokens
    assert row["kl"] == pytest.approx(sum(v[2] for v in vals) / sum(v[3] for v in vals), rel=REL)


# --- GKD (TRL's GKDTrainer through `alignkit distill`) -------------------------------------------

def test_gkd_step1_loss_is_the_generalized_jsd(lm, pair_data, tiny_model, tiny_model_b, tmp_path):
    """Off-policy (--lmbda 0) on the chosen completions: the mean over every completion
    token of JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M), M = β·T + (1−β)·S (TRL's generalized_jsd_loss,
    at temperature 1: TRL's --temperature is the sampling one), β = 0.3 so that a
    teacher/student swap changes the value."""
    out = tmp_path / "out"
    beta = 0.3
    assert run(["distill", "--method", "gkd", "--teacher", tiny_model_b, "--student", tiny_model,
                pair_data, "-o", out, "--lmbda", "0", "--beta", beta, "--eval-split", "0",
                "--max-steps", "1", "--logging-steps", "1", "--batch-size", "2", "--dtype",
                "float32", "--lr", "1e-3"]) == 0
    total, n, swapped = 0.0, 0, 0.0
    for rec in PAIRS:
        ids = alignkit_ids(lm.tok, rec["prompt"], rec["chosen"])
        s, t = token_dists(lm.a, *ids), token_dists(lm.b, *ids)      # log-probs [n, V]

        def jsd(s, t):
            m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
            kl_t = (t.exp() * (t - m)).sum(-1)
            kl_s = (s.exp() * (s - m)).sum(-1)
            return beta * kl_t + (1 - beta) * kl_s
        total += jsd(s, t).sum().item()
        swapped += jsd(t, s).sum().item()
        n += len(ids[1])
    assert step1(out)["loss"] == pytest.approx(total / n, rel=REL)  # fp32: ~3e-5 here
    # the tiny random models are near-uniform, so the teacher/student (β ↔ 1−β) swap moves
    # the value by only ~8e-4 (relative): still well outside the tolerance
    assert abs(swapped - total) > 4 * REL * total
