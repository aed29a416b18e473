"""The offline loss hooks through the whole command: the first logged loss of
`train-policy` equals a hand computation from the formulas (ALGORITHMS.md) on a fixed
batch of two asymmetric pairs, with a reference model that differs from the policy, so
a chosen/rejected swap or a wrong sign changes the number."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl

PAIRS = [
    {"id": "a", "prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "Rocks",
     "p_win": {"chosen": 0.9, "rejected": 0.2}, "score_chosen": 1.0, "score_rejected": -0.5},
    {"id": "b", "prompt": "Say hello.", "chosen": "Hello there!", "rejected": "no",
     "p_win": {"chosen": 0.7, "rejected": 0.4}, "score_chosen": 0.6, "score_rejected": 0.1},
]
BETA = 0.5


def _seq_logp(model, tok, prompt, completion) -> float:
    from alignkit.text import encode_pair, render_prompt
    p_ids, c_ids = encode_pair(tok, render_prompt(tok, prompt), completion, add_eos=True)
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    tgt = ids[0, 1:]
    start = len(p_ids) - 1
    return float(logp[start:, :].gather(-1, tgt[start:, None]).sum())


@pytest.fixture(scope="module")
def deltas(tiny_model, tiny_model_b):
    from alignkit.models import load_causal_lm
    pol, tok = load_causal_lm(str(tiny_model), "float32")
    ref, _ = load_causal_lm(str(tiny_model_b), "float32")
    out = []
    for p in PAIRS:
        dc = _seq_logp(pol, tok, p["prompt"], p["chosen"]) - _seq_logp(ref, tok, p["prompt"], p["chosen"])
        dr = _seq_logp(pol, tok, p["prompt"], p["rejected"]) - _seq_logp(ref, tok, p["prompt"], p["rejected"])
        out.append((dc, dr))
    return out


def _first_loss(cli, tmp_path, tiny_model, tiny_model_b, *extra) -> float:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "m"
    r = cli(["train-policy", "--model", tiny_model, data, "-o", out, "--ref-model", tiny_model_b,
             "--beta", str(BETA), "--max-steps", "1", "--batch-size", "2", "--lr", "1e-9",
             "--dtype", "float32", "--no-ref-cache", "--no-record-ref", *extra])
    assert r.code == 0, r
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_sppo_first_step_loss(cli, tmp_path, tiny_model, tiny_model_b, deltas):
    eta = 1.0 / BETA
    want = sum(0.5 * ((dc - eta * (p["p_win"]["chosen"] - 0.5)) ** 2
                      + (dr - eta * (p["p_win"]["rejected"] - 0.5)) ** 2)
               for p, (dc, dr) in zip(PAIRS, deltas)) / len(PAIRS)
    got = _first_loss(cli, tmp_path, tiny_model, tiny_model_b, "--method", "sppo")
    assert got == pytest.approx(want, rel=1e-3)


def test_copg_first_step_loss(cli, tmp_path, tiny_model, tiny_model_b, deltas):
    want = sum(((p["score_chosen"] - BETA * dc) - (p["score_rejected"] - BETA * dr)) ** 2
               for p, (dc, dr) in zip(PAIRS, deltas)) / len(PAIRS)
    got = _first_loss(cli, tmp_path, tiny_model, tiny_model_b, "--method", "copg")
    assert got == pytest.approx(want, rel=1e-3)


def test_cdpo_first_step_loss(cli, tmp_path, tiny_model, tiny_model_b, deltas):
    eps = 0.2
    want = sum(-(1 - eps) * _logsig(BETA * (dc - dr)) - eps * _logsig(-BETA * (dc - dr))
               for dc, dr in deltas) / len(PAIRS)
    got = _first_loss(cli, tmp_path, tiny_model, tiny_model_b, "--method", "dpo",
                      "--label-smoothing", str(eps))
    assert got == pytest.approx(want, rel=1e-3)
