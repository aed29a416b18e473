"""The online trainers on alignkit's CPU head (cpu_head): the sampling temperature
divides the logits as in TRL's fused head (values and gradients), and grpo / rloo runs
on it match runs on TRL's head (ALIGNKIT_CPU_HEAD=0) step by step; with --entropy-coef
the loss pass keeps TRL's head, whose entropy has a gradient."""
from __future__ import annotations

import json

import pytest
import torch

from alignkit.policy import cpu_head
from conftest import metrics, write_jsonl

PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color"]


def test_temperature_matches_trls_head(tiny_model):
    from trl.trainer.utils import add_fused_lm_head

    from alignkit.models import load_causal_lm
    model, _ = load_causal_lm(tiny_model, "float32")
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :4] = -100
    weights = torch.randn(2, 11, generator=g)
    runs = {}
    for name, fn in (("trl", lambda: model(input_ids=ids, attention_mask=attn, labels=labels,
                                           fused_lm_head=True)),
                     ("ours", lambda: cpu_head.fused_forward(model, ids, attn, labels,
                                                             ("log_probs", "entropy"), 0.7))):
        model.zero_grad()
        out = fn()
        (out.log_probs * weights).sum().backward()
        runs[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None})
    (trl_out, trl_g), (ours, our_g) = runs["trl"], runs["ours"]
    mask = labels[:, 1:] != -100
    for f in ("log_probs", "entropy"):
        assert torch.allclose(getattr(ours, f)[mask], getattr(trl_out, f)[mask], atol=1e-5), f
    plain = cpu_head.fused_forward(model, ids, attn, labels).log_probs
    assert not torch.allclose(plain[mask], ours.log_probs[mask], atol=1e-3)  # T matters
    assert our_g.keys() == trl_g.keys()
    for n in our_g:
        assert torch.allclose(our_g[n], trl_g[n], atol=1e-5), n


@pytest.fixture()
def calls(monkeypatch):
    """Each cpu_head.fused_forward call, as whether gradients were on."""
    seen: list[bool] = []
    real = cpu_head.fused_forward

    def counting(*a, **kw):
        seen.append(torch.is_grad_enabled())
        return real(*a, **kw)

    monkeypatch.setattr(cpu_head, "fused_forward", counting)
    return seen


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_runs_match_trls_head_step_by_step(cli, tiny_model, tmp_path, monkeypatch, calls,
                                           method):
    prompts = write_jsonl(tmp_path / "p.jsonl",
                          [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ALIGNKIT_CPU_HEAD", flag)
        out = tmp_path / f"{method}{flag}"
        r = cli(["train-policy", "--method", method, "--model", tiny_model, prompts,
                 "--reward", "length", "-o", out, "--max-steps", 2, "--batch-size", 8,
                 "--max-new-tokens", 8, "--sample-every", 1, "--temperature", "0.8",
                 "--lora-r", "4", "--lr", "1e-2", "--dtype", "float32", "--beta", "0.04"])
        assert r.code == 0, r.err
        rows = [x for x in metrics(out) if "loss" in x and "reward" in x]
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        got[flag] = (rows, samples)
        if flag == "1":
            assert any(calls) and not all(calls)  # the loss pass and the reference pass
            n = len(calls)
    assert len(calls) == n  # ALIGNKIT_CPU_HEAD=0: TRL's head only
    (ours, s1), (trl, s0) = got["1"], got["0"]
    assert len(ours) == len(trl) == 2
    for a, b in zip(ours, trl):
        for key in ("loss", "reward", "kl_ref", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    c1 = [c for r in s1 for c in r["completions"]]
    c0 = [c for r in s0 for c in r["completions"]]
    assert [c["text"] for c in c1] == [c["text"] for c in c0]
    assert [c["logp_ref"] for c in c1] == pytest.approx([c["logp_ref"] for c in c0], abs=1e-4)


def test_entropy_coef_keeps_trls_head_in_the_loss_pass(cli, tiny_model, tmp_path, calls):
    prompts = write_jsonl(tmp_path / "p.jsonl",
                          [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, prompts,
             "--reward", "length", "-o", tmp_path / "e", "--max-steps", 1, "--batch-size", 8,
             "--max-new-tokens", 8, "--lora-r", "4", "--entropy-coef", "0.1", "--beta", "0.04"])
    assert r.code == 0, r.err
    assert calls and not any(calls)  # cpu_head only in the reference pass (no gradient)
    assert any("entropy_bonus" in x for x in metrics(tmp_path / "e"))
