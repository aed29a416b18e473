"""--off-policy (grpo; ALGORITHMS.md Part D §11, SOPHIA's text-only core): the importance
weight and the group count on hand-made numbers, the grpo trainer's loss on a fixed batch
(the off-policy member's term is −w·A·log πθ with the hand weight, the on-policy terms are
TRL's unchanged), the group composition of a rollout, the advantage over the mixed group,
the CLI run and its metrics, and the data / usage errors."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from alignkit.policy import online_losses as L
from conftest import metrics, write_jsonl

REWARD = '''
def short(prompts, completions, **kw):
    return [-len(c if isinstance(c, str) else c[0]["content"]) / 40.0 for c in completions]
'''
PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color"]
TEACHER = {"q0": ["The sea is wide.", "Waves."], "q1": ["A pun.", "Knock knock."],
           "q2": ["Hello!", "Hi there."], "q3": ["Blue.", "Red."]}



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("offpol")
    (d / "rew.py").write_text(REWARD)
    recs = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    off = [{"id": k, "prompt": PROMPTS[int(k[1])],
            "completions": [{"text": t, "logp": -2.0 * (j + 1), "source": "teacher"}
                            for j, t in enumerate(v)]} for k, v in TEACHER.items()]
    return {"dir": d, "prompts": write_jsonl(d / "prompts.jsonl", recs),
            "off": write_jsonl(d / "off.jsonl", off), "reward": f"python:{d / 'rew.py'}:short"}


# --- pure functions ----------------------------------------------------------------------------

def test_importance_weight_sequence_and_token_mean_clipped_and_not():
    pi = torch.tensor([-10.0, -9.0, -5.0], requires_grad=True)   # log πθ(y|x), summed
    mu = torch.tensor([-12.0, -6.0, -5.0])                        # log μ(y|x)
    n = torch.tensor([4.0, 3.0, 0.0])                             # policy tokens (0: clamped to 1)
    # Δ = 2, -3, 0
    seq = L.off_policy_weights(pi, mu, n, "sequence", clip=0)
    assert seq.tolist() == pytest.approx([math.exp(2), math.exp(-3), 1.0])
    assert L.off_policy_weights(pi, mu, n, "sequence", clip=1.0).tolist() == \
        pytest.approx([1.0, math.exp(-3), 1.0])
    assert L.off_policy_weights(pi, mu, n, "sequence", clip=5.0).tolist() == \
        pytest.approx([5.0, math.exp(-3), 1.0])
    tok = L.off_policy_weights(pi, mu, n, "token-mean", clip=None)
    assert tok.tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0), 1.0])
    assert L.off_policy_weights(pi, mu, n, "token-mean", clip=1.0).tolist() == \
        pytest.approx([1.0, math.exp(-1.0), 1.0])
    assert not tok.requires_grad  # a detached weight
    # a huge sequence log-ratio does not overflow once clipped
    big = L.off_policy_weights(torch.tensor([0.0]), torch.tensor([-1e4]), torch.tensor([1.0]),
                               "sequence", clip=2.0)
    assert big.tolist() == pytest.approx([2.0])
    with pytest.raises(ValueError):
        L.off_policy_weights(pi, mu, n, "token")


def test_off_policy_token_loss_is_minus_w_a_logp():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    per = L.off_policy_token_loss(logps, torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0]))
    assert per.tolist() == [[1.0, 2.0], [0.0, 0.0]]


@pytest.mark.parametrize("share,G,avail,k", [
    (0.25, 4, 5, 1), (0.5, 4, 5, 2), (0.25, 4, 0, 0), (0.0, 4, 5, 0), (0.1, 4, 5, 1),
    (0.6, 4, 5, 2), (1.0, 4, 5, 4), (0.75, 4, 2, 2), (0.25, 8, 5, 2)])
def test_off_policy_count_rounds_down_at_least_one(share, G, avail, k):
    assert L.off_policy_count(share, G, avail) == k


# --- the trainer on a fixed batch --------------------------------------------------------------

def _trainer(tiny_model, tmp_path, *, max_len=4, G=2, records=None, ref=False, **ctx_kw):
    from datasets import Dataset
    from trl import GRPOConfig

    from alignkit.models import load_causal_lm
    from alignkit.policy.online_trainers import AlignkitGRPOTrainer, OnlineContext
    model, tok = load_causal_lm(str(tiny_model), "float32")
    cfg = GRPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4,
                     num_generations=G, max_completion_length=max_len, report_to=[], use_cpu=True,
                     beta=0.0, log_completions=False, loss_type="dapo")
    records = records or [{"id": "a", "prompt": "hi"}]
    ctx = OnlineContext(records=records, tokenizer=tok, work=tmp_path, seed=0, **ctx_kw)
    trainer = AlignkitGRPOTrainer(
        model=model, reward_funcs=[lambda completions, **_: [-len(c) / 10 for c in completions]],
        args=cfg, train_dataset=Dataset.from_list([{"prompt": "hi", "row": 0}] * 4),
        processing_class=tok, ctx=ctx,
        ref_model=load_causal_lm(str(tiny_model), "float32")[0] if ref else None)
    trainer.model.eval()  # eval mode: no gradient-accumulation divisor
    return trainer


def _batch():
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 200, (4, 3), generator=g)
    comp = torch.randint(3, 200, (4, 4), generator=g)
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": comp,
            "completion_mask": cmask, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
            "num_items_in_batch": cmask.sum()}


def _loss_grad(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), trainer.model.get_input_embeddings().weight.grad.clone()


@pytest.mark.parametrize("mode,clip", [("token-mean", 0.0), ("sequence", 0.0), ("sequence", 0.5),
                                       ("token-mean", 1.0)])
def test_off_policy_member_loss_is_the_hand_formula(tiny_model, tmp_path, mode, clip):
    """Row 2 (3 tokens, A = 0.5) is off-policy with log μ = Σ log πθ + 0.6: Δ = −0.6.
    dapo: loss = [Σ_{on} −A_i n_i (ratio 1) + Σ_t −w·A·log πθ_t] / 10 active tokens."""
    trainer = _trainer(tiny_model, tmp_path, off_policy={}, off_is=mode, off_clip=clip)
    inputs = _batch()
    with torch.no_grad():
        cur, _ = trainer._forward(trainer.model, inputs)
    lp2 = cur[2, :3].tolist()
    d = -0.6
    w = math.exp(d / 3) if mode == "token-mean" else math.exp(d)
    w = min(w, clip) if clip else w
    inputs["ak_off"] = torch.tensor([False, False, True, False])
    inputs["ak_off_mu"] = torch.tensor([math.nan, math.nan, sum(lp2) + 0.6, math.nan],
                                       dtype=torch.float64)
    loss, grad = _loss_grad(trainer, inputs)
    on = -(1.0 * 4) - (-1.0 * 2) - (-0.5 * 1)
    off = sum(-w * 0.5 * x for x in lp2)
    assert loss == pytest.approx((on + off) / 10, rel=1e-5)
    assert trainer._metrics["eval"]["off_policy/weight"][-1] == pytest.approx(w, rel=1e-6)
    # on-policy terms unchanged: the same batch without off-policy data, row 2's advantage 0
    plain = {k: v for k, v in inputs.items() if not k.startswith("ak_")}
    plain["advantages"] = torch.tensor([1.0, -1.0, 0.0, -0.5])
    loss0, grad0 = _loss_grad(trainer, plain)
    assert loss0 == pytest.approx(on / 10, rel=1e-5)
    assert loss - loss0 == pytest.approx(off / 10, rel=1e-4, abs=1e-6)
    # the weight is a constant: the gradient is that of −w·A·Σ log πθ / 10 added to TRL's
    trainer.model.zero_grad()
    logps, _ = trainer._forward(trainer.model, inputs)
    (-w * 0.5 * logps[2, :3].sum() / 10).backward()
    hand = trainer.model.get_input_embeddings().weight.grad
    assert ((grad - grad0 - hand).norm() / hand.norm()).item() < 0.02


def test_without_a_behaviour_logp_the_weight_uses_the_old_policy(tiny_model, tmp_path):
    """μ absent: log μ := Σ log πθ_old on the same tokens. Rollout-time log-probs 0.1 below
    the current ones on row 2 (3 tokens): token-mean w = e^0.1 unclipped, 1 with κ = 1;
    with no old log-probs (one iteration) w = 1."""
    trainer = _trainer(tiny_model, tmp_path, off_policy={}, off_is="token-mean", off_clip=0.0)
    inputs = _batch()
    inputs["ak_off"] = torch.tensor([False, False, True, False])
    inputs["ak_off_mu"] = torch.full((4,), math.nan, dtype=torch.float64)
    trainer._compute_loss(trainer.model, inputs)
    assert trainer._metrics["eval"]["off_policy/weight"][-1] == pytest.approx(1.0)
    with torch.no_grad():
        cur, _ = trainer._forward(trainer.model, inputs)
    delta = torch.zeros_like(cur)
    delta[2] = 0.1
    inputs["old_per_token_logps"] = cur - delta
    trainer._compute_loss(trainer.model, inputs)
    assert trainer._metrics["eval"]["off_policy/weight"][-1] == pytest.approx(math.exp(0.1), rel=1e-5)
    trainer._ak.off_clip = 1.0
    trainer._compute_loss(trainer.model, inputs)
    assert trainer._metrics["eval"]["off_policy/weight"][-1] == pytest.approx(1.0)


def test_earl_gate_multiplies_the_off_policy_term(tiny_model, tmp_path):
    """earl: the entropy gate TRL's pass leaves in `_ak_gate` masks the off-policy tokens too."""
    trainer = _trainer(tiny_model, tmp_path, off_policy={}, off_is="sequence", off_clip=0.0)
    inputs = _batch()
    inputs["ak_off"] = torch.tensor([True, False, False, False])
    with torch.no_grad():
        cur, _ = trainer._forward(trainer.model, inputs)
    lp0 = cur[0].tolist()
    inputs["ak_off_mu"] = torch.tensor([sum(lp0) + 1.0, math.nan, math.nan, math.nan],
                                       dtype=torch.float64)
    trainer._ak_gate = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).bool()
    term = trainer._ak_off_policy_loss(cur, inputs)
    w = math.exp(-1.0)
    assert term.item() == pytest.approx(-w * 1.0 * (lp0[0] + lp0[2]) / 10, rel=1e-5)


# --- the rollout -------------------------------------------------------------------------------

def _fake_rows(n):
    return [{"token_ids": [5, 6], "text": f"s{i}", "logp": -1.0, "n_tokens": 2, "finished": True}
            for i in range(n)]


@pytest.mark.parametrize("share,want", [(0.25, [3, 1]), (0.5, [2, 2])])
def test_group_composition(tiny_model, tmp_path, share, want):
    off = {0: [{"text": "Blue sky.", "logp": -3.0, "finished": True},
               {"text": "Red.", "logp": None, "finished": True},
               {"text": "Green", "logp": -1.0, "finished": False}]}
    trainer = _trainer(tiny_model, tmp_path, max_len=16, G=4, off_policy=off, off_share=share)
    tok = trainer._ak.tokenizer
    trainer._ak_batch_rows = [0] * 4 + [1] * 4  # prompt 1 has no off-policy completions
    rows = trainer._ak_mix_off_policy(_fake_rows(8), 4)
    flags = [bool(r.get("off_policy")) for r in rows]
    on, k = want
    assert flags == [False] * on + [True] * k + [False] * 4
    assert [r["text"] for r in rows[:on]] == [f"s{i}" for i in range(on)]
    picked = off[0][:k]
    for r, item in zip(rows[on:4], picked):  # the policy's tokenizer, then eos
        assert r["token_ids"] == tok(item["text"], add_special_tokens=False)["input_ids"] + \
            [tok.eos_token_id]
        assert r["logp"] == item["logp"] and r["finished"]
    # the next step cycles on through the prompt's list (from (step*k) mod n)
    trainer.state.global_step = 1
    rows = trainer._ak_mix_off_policy(_fake_rows(8), 4)
    texts = [r["text"] for r in rows[on:4]]
    assert texts == [off[0][(k + j) % 3]["text"] for j in range(k)]
    if k == 2:  # "Green" was cut by its sampler: no eos
        g = rows[on + 1] if texts[1] == "Green" else rows[on]
        assert g["token_ids"][-1] != tok.eos_token_id and not g["finished"]


def test_cut_completion_drops_its_behaviour_logp(tiny_model, tmp_path):
    off = {0: [{"text": "A very long teacher answer that keeps going.", "logp": -9.0,
                "finished": True}]}
    trainer = _trainer(tiny_model, tmp_path, max_len=4, G=4, off_policy=off, off_share=0.25)
    trainer._ak_batch_rows = [0] * 4
    r = trainer._ak_mix_off_policy(_fake_rows(4), 4)[3]
    assert len(r["token_ids"]) == 4 and r["logp"] is None and not r["finished"]


def test_advantage_is_normalised_over_the_mixed_group(tiny_model, tmp_path):
    """A real rollout of one prompt (G = 4, share 0.5): 2 policy samples + 2 teacher texts,
    rewards −len(text)/10 by the same reward function, A = (r − mean) / (std + 1e-4)."""
    from alignkit.generation import render_prompt
    off = {0: [{"text": "Hello there friend.", "logp": -4.0, "finished": True},
               {"text": "Hi.", "logp": -1.0, "finished": True}]}
    trainer = _trainer(tiny_model, tmp_path, max_len=16, G=4, off_policy=off, off_share=0.5,
                       ref=True)
    trainer.model.train()
    text = render_prompt(trainer._ak.tokenizer, "hi")
    out = trainer._generate_and_score_completions([{"prompt": text, "row": 0}] * 4)
    assert out["ak_off"].tolist() == [False, False, True, True]
    assert out["ak_off_mu"][2:].tolist() == [-4.0, -1.0]
    texts = trainer._ak.tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    assert texts[2:] == ["Hello there friend.", "Hi."]
    r = [-len(t) / 10 for t in texts]
    mean, std = statistics.mean(r), statistics.stdev(r)
    assert out["advantages"].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in r],
                                                       rel=1e-4)
    m = trainer._metrics["train"]
    assert m["off_policy/share"][-1] == 0.5
    assert m["off_policy/reward"][-1] == pytest.approx((r[2] + r[3]) / 2)


# --- the CLI -----------------------------------------------------------------------------------

def _train(cli, env, tiny_model, out, *extra, method="grpo"):
    return cli(["train-policy", "--method", method, "--model", tiny_model, env["prompts"],
                "--reward", env["reward"], "-o", out, "--max-steps", 2, "--batch-size", 8,
                "--max-new-tokens", 16, *extra])


def test_cli_grpo_with_off_policy_logs_share_reward_and_weight(cli, env, tiny_model, tmp_path):
    r = _train(cli, env, tiny_model, tmp_path / "o", "--off-policy", env["off"],
               "--off-policy-share", "0.5", "--off-policy-is", "sequence", "--sample-every", 1)
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "o") if "reward" in x]
    assert len(rows) == 2
    # each group of 4 takes both teacher texts of its prompt; a step holds 2 distinct prompts
    per_prompt = [statistics.mean(-len(t) / 40 for t in v) for v in TEACHER.values()]
    steps = [(a + b) / 2 for i, a in enumerate(per_prompt) for b in per_prompt[i + 1:]]
    for x in rows:
        assert x["off_policy/share"] == 0.5
        assert any(x["off_policy/reward"] == pytest.approx(v) for v in steps), x
        assert 0.0 < x["off_policy/weight"] <= 1.0
    man = json.loads((tmp_path / "o" / "alignkit.json").read_text())
    hp = man["hyperparameters"]
    assert hp["off_policy_share"] == 0.5 and hp["off_policy_is"] == "sequence"
    assert hp["off_policy_clip"] == 1.0 and hp["off_policy"] == str(env["off"])
    recs = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    for rec in recs:  # 2 policy samples + 2 teacher completions (with their logp) per group
        comps = rec["completions"]
        assert len(comps) == 4
        assert [c.get("source") for c in comps] == [None, None, "off-policy", "off-policy"]
        assert [c["text"] for c in comps[2:]] == TEACHER[rec["prompt_id"]]
        assert [c["logp"] for c in comps[2:]] == [-2.0, -4.0]
    # same seed -> the same groups
    r = _train(cli, env, tiny_model, tmp_path / "o2", "--off-policy", env["off"],
               "--off-policy-share", "0.5", "--off-policy-is", "sequence", "--sample-every", 1)
    assert r.code == 0, r
    again = [json.loads(x) for x in (tmp_path / "o2" / "samples.jsonl").read_text().splitlines()]
    assert [x["completions"] for x in again] == [x["completions"] for x in recs]


def test_cli_earl_with_off_policy_runs(cli, env, tiny_model, tmp_path):
    r = _train(cli, env, tiny_model, tmp_path / "e", "--off-policy", env["off"],
               "--entropy-quantile", "0.5", method="earl")
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "e") if "reward" in x]
    assert rows and all(x["off_policy/share"] == 0.25 and 0.4 <= x["earl/gate_frac"] <= 0.6
                        and math.isfinite(x["loss"]) for x in rows)


def test_malformed_off_policy_line_exits_3_with_file_and_line(cli, env, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q0", "prompt": "x", "completions": [{"text": "a"}]}) + "\n"
                   + json.dumps({"id": "q1", "prompt": "y", "completions": [{"logp": -1}]}) + "\n")
    r = _train(cli, env, tiny_model, tmp_path / "m", "--off-policy", bad)
    assert r.code == 3, r
    assert f"{bad}:2:" in r.err and "text" in r.err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method,extra,needle", [
    ("grpo", ["--off-policy-share", "1.5"], "--off-policy-share must be <= 1.0"),
    ("grpo", ["--off-policy-share", "-0.1"], "--off-policy-share must be >= 0.0"),
    ("grpo", ["--off-policy-is", "token"], "--off-policy-is must be one of"),
    ("grpo", ["--off-policy-clip", "0.5"], "--off-policy-clip needs --off-policy FILE"),
    ("grpo", ["--credit", "chunk"], "--off-policy cannot be combined with --credit chunk"),
    ("gtpo", [], "--off-policy does not apply"),
])
def test_usage_errors_exit_2_naming_the_flag(cli, env, tiny_model, tmp_path, method, extra, needle):
    args = extra if "needs" in needle else ["--off-policy", env["off"], *extra]
    r = _train(cli, env, tiny_model, tmp_path / "m", *args, method=method)
    assert r.code == 2, r
    assert needle in r.err
    assert not (tmp_path / "m").exists()


# --- real model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_grpo_off_policy_on_smollm2_token_mean_weights_from_the_records(cli, tmp_path, smollm2):
    """SmolLM2 (byte-level BPE, a chat template): teacher answers with a logp near the
    policy's own join the groups; the unclipped token-mean weight is positive and finite."""

    model = smollm2
    qs = ["What is 2 + 2?", "Name a primary color.", "What is the capital of France?",
          "Say hi politely."]
    answers = ["4.", "Red.", "Paris.", "Hello, nice to meet you."]
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"s{i}", "prompt": q} for i, q in enumerate(qs)])
    off = write_jsonl(tmp_path / "off.jsonl", [
        {"id": f"s{i}", "prompt": q, "completions": [{"text": a, "logp": -3.0 * len(a.split())}]}
        for i, (q, a) in enumerate(zip(qs, answers))])
    r = cli(["train-policy", "--method", "grpo", "--model", model, src, "--reward", "length",
             "-o", tmp_path / "o", "--max-steps", 2, "--batch-size", 8, "--num-generations", 4,
             "--max-new-tokens", 24, "--lora-r", 8, "--lr", "1e-4", "--off-policy", off,
             "--off-policy-clip", "0"])
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "o") if "reward" in x]
    assert len(rows) == 2
    for x in rows:
        assert x["off_policy/share"] == 0.25
        assert 0.0 < x["off_policy/weight"] and math.isfinite(x["off_policy/weight"])
