"""Online `train-policy` methods (grpo, gtpo, earl, rloo, p3o, online-ipo, ipo-md): the pure
loss functions on hand-made tensors, each method raising a learnable reward on the tiny
Llama, metrics.jsonl / samples.jsonl, same seed -> same output, usage and data errors,
SIGTERM + resume, LoRA, and a slow GRPO run on SmolLM2 with the rules reward."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
from pathlib import Path

import pytest
import torch

from alignkit.policy import online_losses as L
from conftest import metrics, write_jsonl

PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color",
           "What is art", "Describe space", "Talk about music", "Give advice"]
REWARD = '''
def short(prompts, completions, **kw):
    """Fewer characters is better: a dense reward a tiny random model can learn."""
    return [-len(c if isinstance(c, str) else c[0]["content"]) / 40.0 for c in completions]


def bad(prompts, completions, **kw):
    return [1.0] * len(completions)
'''


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", *[str(a) for a in args]])



def samples(folder) -> list[dict]:
    return [json.loads(x) for x in (Path(folder) / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("online")
    (d / "rew.py").write_text(REWARD)
    recs = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    recs[3]["prompt"] = [{"role": "user", "content": PROMPTS[3]}]  # a message list too
    return {"dir": d, "prompts": write_jsonl(d / "prompts.jsonl", recs),
            "reward": f"python:{d / 'rew.py'}:short"}


# --- pure functions ----------------------------------------------------------------------------

def test_gtpo_conflict_mask_on_a_hand_made_group():
    # group 1: c0 (+), c1 (-), c2 (+, 4 tokens), c3 (A = 0, same tokens as c0)
    # group 2: only a negative and inactive rows -> no conflicts (nothing leaks across groups)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 3, 8, 9], [5, 4, 7, 9, 0], [5, 6, 7, 8, 9],
                        [5, 6, 7, 8, 9], [5, 6, 3, 8, 9], [1, 2, 3, 4, 5], [5, 4, 7, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, -1.0, 0.0, 0.0, 0.0])
    fwd, bwd = L.gtpo_conflicts(ids, mask, adv, group_size=4)
    assert fwd.int().tolist()[:4] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5]
    assert bwd.int().tolist()[:4] == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0] * 5]
    assert not fwd[4:].any() and not bwd[4:].any()
    delta, n = L.gtpo_token_weights(ids, mask, adv, group_size=4)
    assert delta.tolist() == [[2, 2, 1, 2, 2], [0, 0, 1, 0, 0], [2, 1, 1, 2, 0], [1, 1, 1, 1, 1],
                              [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert n.tolist() == [4, 4, 2, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        L.gtpo_conflicts(ids[:6], mask[:6], adv[:6], group_size=4)


def test_gtpo_entropy_filter_and_loss_match_the_formula():
    adv = torch.tensor([1.0, -0.5, 2.0])
    h = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(L.gtpo_advantages(adv, h), torch.tensor([0.98, -0.55, 0.0]))
    assert torch.allclose(L.gtpo_advantages(adv, h, threshold=1.0, scale=1.0),
                          torch.tensor([0.8, -1.0, 1.1]))
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0], [-1.0, -1.0, -1.0]],
                         requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    delta = torch.tensor([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    n_conf = torch.tensor([2, 0, 1])
    a = torch.tensor([0.5, -1.0, 3.0])
    loss = L.gtpo_loss(logps, a, delta, mask, n_conf)
    # L_i = -(1/|o_i|) sum_t A_i delta_it / max(1, n_i), then the mean (rho = 1 in value)
    want = (-(0.5 * 4) / 3 / 2 + -(-1.0 * 1) / 2 / 1 + -(3.0 * 1) / 1 / 1) / 3
    assert loss.item() == pytest.approx(want)
    loss.backward()
    grad = -(a[:, None] * delta * mask) / mask.sum(-1, keepdim=True) / n_conf.clamp(min=1)[:, None] / 3
    assert torch.allclose(logps.grad, grad)


def test_earl_gate_batch_and_response_scope():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.25, 0.2, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # batch: median of [0.1, 0.2, 0.25, 0.3, 0.5, 0.9] = 0.275 (linear interpolation)
    assert L.earl_gate(ent, mask, 0.5, "batch").int().tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    # response: medians 0.4 and 0.225
    assert L.earl_gate(ent, mask, 0.5, "response").int().tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    # top 25% per response: 0.75-quantiles 0.6 and 0.2375
    assert L.earl_gate(ent, mask, 0.25, "response").int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert L.earl_gate(ent, mask, 1.0, "batch").int().tolist() == mask.tolist()
    assert not L.earl_gate(ent, torch.zeros_like(mask), 0.5, "batch").any()
    with pytest.raises(ValueError):
        L.earl_gate(ent, mask, 0.5, "token")
    with pytest.raises(ValueError):
        L.earl_gate(ent, mask, 0.0, "batch")


def test_p3o_losses_match_the_direct_formulas():
    q = L.p3o_q(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 1.0]),
                torch.tensor([1.0, 2.0]), kappa=0.1)
    assert torch.allclose(q, torch.tensor([1.0 - 0.1 * 2.0, -2.0 - 0.1 * -1.0]))
    rho = L.p3o_rho(torch.tensor([0.1, 5.0, -5.0]), torch.tensor([0.2, 0.0, 0.0]), c=10.0)
    assert torch.allclose(rho, torch.tensor([math.exp(0.3), 10.0, 0.1]))
    # joint clip: d = 1.0 beyond d_old + eps = 0.7; q > 0 -> the clipped (flat) term wins
    d = torch.tensor([1.0, 1.0, 0.6], requires_grad=True)
    d_old = torch.tensor([0.5, 0.5, 0.5])
    qs, rhos = torch.tensor([2.0, -2.0, 2.0]), torch.tensor([1.5, 1.5, 1.0])
    loss = L.p3o_joint_loss(d, d_old, qs, rhos, eps=0.2)
    want = [max(-3.0 * 1.0, -3.0 * 0.7), max(3.0 * 1.0, 3.0 * 0.7), max(-2.0 * 0.6, -2.0 * 0.6)]
    assert loss.tolist() == pytest.approx(want)
    loss.sum().backward()
    assert d.grad.tolist() == pytest.approx([0.0, 3.0, -2.0])
    # token-wise clip: each token log-prob clipped to its rollout value +- eps on its own
    lp1 = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    lp1_old = torch.tensor([[-1.5, -2.1]])
    lp2 = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    lp2_old = torch.tensor([[-0.6, -2.5]])
    m1, m2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    qq, rr = torch.tensor([2.0]), torch.tensor([1.0])
    tok = L.p3o_token_loss(lp1, lp1_old, m1, lp2, lp2_old, m2, qq, rr, eps=0.2)
    # y1: max(-2*-1.0, -2*-1.3) = 2.6, max(-2*-2.0, -2*-2.0) = 4.0; y2: max(2*-0.5, 2*-0.5) = -1.0
    assert tok.tolist() == pytest.approx([2.6 + 4.0 - 1.0])
    tok.sum().backward()
    assert lp1.grad.tolist() == [[0.0, -2.0]] and lp2.grad.tolist() == [[2.0, 0.0]]


def test_ipo_loss_and_labels_match_the_direct_formulas():
    p = L.pair_preference(torch.tensor([1.0, 0.0, 0.5, float("nan")]),
                          torch.tensor([0.0, 1.0, 0.5, 1.0]))
    assert p[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(p[3])
    h = torch.tensor([1.2, 1.2, 1.2])
    loss = L.ipo_online_loss(h, torch.tensor([1.0, 0.5, 0.0]), tau=0.1)
    assert loss.tolist() == pytest.approx([(1.2 - 5.0) ** 2, 1.2 ** 2, (1.2 + 5.0) ** 2])


def test_running_std_scales_and_clips_rewards():
    rs = L.RunningStd(clip=2.0)
    rs.update(torch.tensor([1.0, 2.0, float("nan")]))
    rs.update(torch.tensor([4.0]))
    assert rs.count == 3 and rs.std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    s = rs.std
    assert rs.scale(torch.tensor([1.0, 100.0])).tolist() == pytest.approx([1.0 / s, 2.0])
    back = L.RunningStd()
    back.load(rs.state())
    assert back.std == rs.std


# --- each method raises the reward ---------------------------------------------------------

RISE = {  # method: (flags, least rise of the mean reward from the first to the last quarter)
    # (seeds 0-4 all rise by at least 0.12 with these settings; the test runs seed 0)
    "grpo": (["--lr", "3e-2"], 0.1),
    "gtpo": (["--lr", "1e-2", "--entropy-threshold", "10", "--reward-weights", "20"], 2.0),
    "earl": (["--lr", "5e-2", "--entropy-scope", "response", "--entropy-quantile", "0.5"], 0.1),
    "rloo": (["--lr", "3e-2"], 0.1),
    "p3o": (["--lr", "3e-2", "--clip", "token"], 0.1),
    "online-ipo": (["--lr", "3e-2"], 0.1),
    "ipo-md": (["--lr", "5e-2", "--alpha", "0.25"], 0.1),
}
STEPS = 24


def trained(env, tiny_model, method) -> Path:
    """The output folder of METHOD's rise run (trained once per module)."""
    out = env["dir"] / f"rise-{method}"
    if not out.exists():
        assert run(["train-policy", "--method", method, "--model", tiny_model, env["prompts"],
                    "--reward", env["reward"], "-o", out, "--max-steps", STEPS, "--batch-size", 16,
                    "--max-new-tokens", 12, "--sample-every", 8, *RISE[method][0]]) == 0
    return out


@pytest.mark.parametrize("method", list(RISE))
def test_each_method_raises_the_mean_reward(env, tiny_model, method):
    least = RISE[method][1]
    out = trained(env, tiny_model, method)
    rows = [r for r in metrics(out) if "reward" in r]
    rewards = [r["reward"] for r in rows]
    k = len(rewards) // 4
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last - first >= least, (method, rewards)
    for r in rows:  # the per-step metrics of every online run
        for key in ("reward", "reward_std", "kl_ref", "entropy", "completions/mean_length"):
            assert math.isfinite(r[key]), (method, key)
    assert abs(rows[0]["kl_ref"]) < 1e-3  # the first rollout is the reference policy
    assert rows[-1]["kl_ref"] != 0.0
    man = json.loads((out / "alignkit.json").read_text())
    assert man["method"] == method and man["hyperparameters"]["rewards"] == [env["reward"]]
    assert man["data"]["kind"] == "prompts" and man["data"]["prompts"] == len(PROMPTS)
    recs = samples(out)
    per_prompt = 2 if method in ("p3o", "online-ipo", "ipo-md") else 4
    assert {r["step"] for r in recs} == {0, 8, 16}  # --sample-every 8 (p3o: a rollout every 2)
    assert all(len(r["completions"]) == per_prompt for r in recs)


def test_samples_records_are_what_was_trained_and_eval_reads_them(env, tiny_model, cli):
    from alignkit.records import validate
    out = trained(env, tiny_model, "grpo")
    recs = samples(out)
    assert len(recs) == 3 * 16 // 4  # 3 sampling steps x 4 prompts of 4 completions
    prompts = {json.loads(x)["id"]: json.loads(x)["prompt"]
               for x in env["prompts"].read_text().splitlines()}
    for r in recs:
        validate(r, "samples")
        assert r["id"] == f"{r['prompt_id']}@{r['step']}" and r["prompt"] == prompts[r["prompt_id"]]
        assert r["gen"]["method"] == "grpo" and r["gen"]["max_new_tokens"] == 12
        for c in r["completions"]:
            text = c["text"] if isinstance(c["text"], str) else c["text"][0]["content"]
            assert isinstance(c["text"], list) == isinstance(r["prompt"], list)
            assert c["score"] == pytest.approx(-len(text) / 40.0, abs=1e-6)  # the --reward value
            assert 1 <= c["n_tokens"] <= 12 and c["logp"] < 0
    step0 = [c for r in recs if r["step"] == 0 for c in r["completions"]]
    assert all(c["logp"] == pytest.approx(c["logp_ref"], abs=1e-4) for c in step0)
    r = cli(["eval", out / "samples.jsonl", "--scorer", env["reward"], "--n-boot", "10"])
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["models"]["samples"]


def test_same_seed_same_output(env, tiny_model):
    outs = []
    for name in ("s1", "s2"):
        out = env["dir"] / name
        assert run(["train-policy", "--method", "gtpo", "--model", tiny_model, env["prompts"],
                    "--reward", env["reward"], "-o", out, "--max-steps", 3, "--batch-size", 8,
                    "--max-new-tokens", 8, "--sample-every", 1, "--lr", "1e-2",
                    "--entropy-threshold", "10"]) == 0
        outs.append(out)
    a, b = ([{**r, "gen": {**r["gen"], "model": None}} for r in samples(o)] for o in outs)
    assert a == b and len(a) == 3 * 2
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    out = env["dir"] / "s3"
    assert run(["train-policy", "--method", "gtpo", "--model", tiny_model, env["prompts"],
                "--reward", env["reward"], "-o", out, "--max-steps", 1, "--batch-size", 8,
                "--max-new-tokens", 8, "--sample-every", 1, "--seed", 1]) == 0
    assert samples(out)[0]["completions"] != a[0]["completions"]


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,code,needle", [
    (["--reward", "nosuch:x"], 2, "unknown scorer 'nosuch'"),
    (["--reward", "rules,bogus"], 2, "unknown scorer 'bogus'"),
    ([], 2, "need --reward"),
    (["--reward", "length", "--clip", "pair"], 2, "--clip does not apply to policy method 'grpo'"),
    (["--reward", "length", "--num-generations", "3"], 2, "must be a multiple of --num-generations (3)"),
    (["--reward", "length", "--loss", "sigmoid"], 2, "--loss must be one of grpo"),
    (["--reward", "length", "--scale-rewards", "std"], 2, "--scale-rewards must be one of"),
    (["--reward", "length", "--temperature", "0"], 2, "--temperature must be > 0"),
])
def test_usage_errors_exit_2(cli, env, tiny_model, tmp_path, extra, code, needle):
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
             "-o", tmp_path / "m", "--batch-size", 4, *extra])
    assert r.code == code, r
    assert needle in r.err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


@pytest.mark.parametrize("method,extra,needle", [
    ("gtpo", ["--beta", "0.1"], "gtpo has no KL term"),
    ("online-ipo", ["--beta", "0"], "--beta must be > 0"),
    ("p3o", ["--batch-size", "6", "--grad-accum", "1", "--clip", "joint"], "--clip must be one of"),
    ("ipo-md", ["--alpha", "1.5"], "--alpha must be <= 1.0"),
    ("earl", ["--entropy-scope", "token"], "--entropy-scope must be one of"),
    ("earl", ["--entropy-quantile", "0"], "--entropy-quantile must be > 0.0"),
    ("p3o", ["--batch-size", "3", "--grad-accum", "2"], "--batch-size must be even"),
])
def test_method_option_errors_exit_2(cli, env, tiny_model, tmp_path, method, extra, needle):
    r = cli(["train-policy", "--method", method, "--model", tiny_model, env["prompts"],
             "--reward", "length", "-o", tmp_path / "m", *extra])
    assert r.code == 2, r
    assert needle in r.err


def test_scorer_options_reach_the_reward_scorers(cli, env, tmp_path, monkeypatch):
    """The online trainer builds its rewards with the shared scorer options
    (ScorerOptions.build), as `alignkit score` does: --aggregate, --rubric, --user, ..."""
    from alignkit.errors import UsageError
    from alignkit.scorers.options import ScorerOptions
    seen = {}

    def build(self, specs, weights=None, **kw):
        seen.update(options=self, specs=list(specs), weights=weights, **kw)
        raise UsageError("stop here")

    monkeypatch.setattr(ScorerOptions, "build", build)
    r = cli(["train-policy", "--method", "rloo", "--model", "no-such-model", env["prompts"],
             "-o", tmp_path / "m", "--batch-size", 4, "--reward", "rules,length",
             "--reward-weights", "2,1", "--aggregate", "min", "--rubric", "r.txt", "--user", "u7",
             "--tokenizer", "tok", "--scorer-batch-size", 3, "--hybrid"])
    assert r.code == 2 and "stop here" in r.err, r
    o = seen["options"]
    assert (o.aggregate, o.rubric, o.user, o.tokenizer, o.scorer_batch_size, o.hybrid) == (
        "min", "r.txt", "u7", "tok", 3, True)
    assert seen["specs"] == ["rules", "length"] and seen["weights"] == "2,1"
    assert not (tmp_path / "m.partial").exists()


def test_bad_prompt_records_exit_3_with_path_and_line(cli, env, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": 7}\n')
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, bad, "--reward", "length",
             "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:2" in r.err and "prompt" in r.err, r
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "x", "meta": '
                   '{"checks": [{"type": "no_such_check"}]}}\n')
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, bad, "--reward", "rules",
             "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:2" in r.err, r
    bad.write_text('{"id": "a", "prompt": "hi"\n')
    r = cli(["train-policy", "--method", "rloo", "--model", tiny_model, bad, "--reward", "length",
             "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:1" in r.err, r
    assert not (tmp_path / "m.partial").exists()


# --- interrupt, resume, LoRA -------------------------------------------------------------------

def test_sigterm_checkpoints_then_resume_finishes(cli, env, tiny_model, tmp_path):
    from transformers import Trainer
    original = Trainer.training_step

    def step(self, *a, **kw):
        if self.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **kw)

    out = tmp_path / "m"
    args = ["train-policy", "--method", "p3o", "--model", tiny_model, env["prompts"],
            "--reward", env["reward"], "-o", out, "--max-steps", 4, "--batch-size", 4,
            "--max-new-tokens", 8, "--sample-every", 1, "--lr", "1e-2"]
    Trainer.training_step = step
    try:
        r = cli(args)
    finally:
        Trainer.training_step = original
    assert r.code == 130, r
    ckpt = tmp_path / "m.partial" / "checkpoint-2"
    assert ckpt.is_dir() and (ckpt / "alignkit_online_state.json").exists()
    assert json.loads((ckpt / "alignkit_online_state.json").read_text())["reward_std"]["count"] == 4
    stale = {**samples(tmp_path / "m.partial")[0], "id": "stale", "step": 3}
    with open(tmp_path / "m.partial" / "samples.jsonl", "a") as f:  # as if sampled after the
        f.write(json.dumps(stale) + "\n")                          # checkpoint, then killed
    r = cli([*args, "--resume"])
    assert r.code == 0, r
    recs = samples(out)
    assert [x["step"] for x in recs] == [0, 0, 2, 2]  # one rollout every 2 steps (p3o), 2 prompts each
    assert len({x["id"] for x in recs}) == 4
    assert [row["step"] for row in metrics(out) if "loss" in row][-2:] == [3, 4]
    assert not (tmp_path / "m.partial").exists()


def test_lora_adapter_and_reference(env, tiny_model, tmp_path):
    out = tmp_path / "lora"
    assert run(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
                "--reward", env["reward"], "-o", out, "--max-steps", 2, "--batch-size", 8,
                "--max-new-tokens", 8, "--lora-r", 4, "--beta", "0.1", "--sample-every", 1]) == 0
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    man = json.loads((out / "alignkit.json").read_text())
    assert man["reference"]["kind"] == "base (adapter disabled)"
    rows = [r for r in metrics(out) if "kl" in r]
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # TRL's k3 KL
    step0 = [c for r in samples(out) if r["step"] == 0 for c in r["completions"]]
    assert all(c["logp"] == pytest.approx(c["logp_ref"], abs=1e-4) for c in step0)


def test_ref_model_folder_is_the_reference(env, tiny_model, tiny_model_b, tmp_path):
    out = tmp_path / "ref"
    assert run(["train-policy", "--method", "online-ipo", "--model", tiny_model, env["prompts"],
                "--reward", env["reward"], "-o", out, "--ref-model", tiny_model_b,
                "--max-steps", 1, "--batch-size", 4, "--max-new-tokens", 8,
                "--sample-every", 1]) == 0
    man = json.loads((out / "alignkit.json").read_text())
    assert man["reference"]["kind"] == "folder" and man["reference"]["spec"] == str(tiny_model_b)
    comps = [c for r in samples(out) for c in r["completions"]]
    kl = statistics.mean(c["logp"] - c["logp_ref"] for c in comps)
    assert metrics(out)[0]["kl_ref"] == pytest.approx(kl, abs=1e-4) and abs(kl) > 0.05


def test_hybrid_weighted_rewards_reach_the_samples(env, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "c0", "prompt": "Say hi", "meta": {"checks": [{"type": "max_words", "n": 100}]}},
        {"id": "n0", "prompt": "Say yo"}])
    out = tmp_path / "h"
    assert run(["train-policy", "--method", "rloo", "--model", tiny_model, src, "-o", out,
                "--reward", "rules,length", "--reward-weights", "2,1", "--hybrid",
                "--max-steps", 1, "--batch-size", 4, "--num-generations", 2,
                "--max-new-tokens", 6, "--sample-every", 1]) == 0
    scores = {r["prompt_id"]: [c["score"] for c in r["completions"]] for r in samples(out)}
    assert scores == {"c0": [2.0, 2.0], "n0": [0.0, 0.0]}  # 2 x rules; length (0 when short)


@pytest.mark.distributed
def test_accelerate_launch_two_cpu_processes(env, tiny_model, tmp_path):
    """GTPO's conflict weights gather whole groups over processes; samples from both."""
    import subprocess
    import sys
    out = tmp_path / "ddp"
    envv = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "alignkit", "train-policy", "--method", "gtpo",
           "--model", str(tiny_model), str(env["prompts"]), "--reward", env["reward"],
           "-o", str(out), "--max-steps", "2", "--batch-size", "2", "--num-generations", "4",
           "--max-new-tokens", "8", "--sample-every", "1", "--entropy-threshold", "10",
           "--lr", "1e-2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=envv,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    recs = samples(out)  # 2 steps x 1 prompt of 4 completions, sampled 2 by each process
    assert [r["step"] for r in recs] == [0, 1]
    assert [len(r["completions"]) for r in recs] == [4, 4]
    assert len({c["text"] if isinstance(c["text"], str) else c["text"][0]["content"]
                for c in recs[0]["completions"]}) == 4  # the processes sample different streams
    rows = [r for r in metrics(out) if "reward" in r]
    assert len(rows) == 2 and all("gtpo/conflict_tokens" in r for r in rows)


# --- real model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_grpo_on_smollm2_with_the_rules_reward(smollm2, tmp_path):
    checks = [{"type": "max_words", "n": 8}]
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"r{i}", "prompt": p, "meta": {"checks": checks}}
        for i, p in enumerate(["Name a fruit.", "Describe the sea.", "Say hello.", "Name a color."])])
    out = tmp_path / "grpo"
    assert run(["train-policy", "--method", "grpo", "--model", smollm2, src, "--reward", "rules",
                "-o", out, "--max-steps", 3, "--batch-size", 8, "--num-generations", 4,
                "--max-new-tokens", 24, "--lora-r", 8, "--lr", "1e-4", "--temperature", "0.8",
                "--sample-every", 1, "--beta", "0.04"]) == 0
    rows = [r for r in metrics(out) if "reward" in r]
    assert len(rows) == 3 and all(0.0 <= r["reward"] <= 1.0 for r in rows)
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["kl_ref"]) for r in rows)
    recs = samples(out)
    assert len(recs) == 3 * 2 and all(len(r["completions"]) == 4 for r in recs)
    texts = [c["text"] for r in recs for c in r["completions"]]
    assert all("<|im_end|>" not in t for t in texts)
    assert all(c["score"] in (0.0, 1.0) for r in recs for c in r["completions"])


def test_p3o_q_uses_the_current_policys_log_ratios_not_the_rollouts():
    """P3O's q = sg[(r1 - r2) - kappa (L1 - L2)] with L from the CURRENT policy (the paper
    and its authors' code); rollout-time log-probs enter only rho and the clip."""
    import torch

    from alignkit.policy import online_losses as L
    mask = torch.ones(2, 3)
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])       # L_old = 0, 0
    cur = torch.tensor([[-0.5, -0.5, -0.5], [-2.5, -2.5, -2.5]])       # L = 1.5, -1.5
    r = torch.tensor([1.0, 0.0])
    kappa = 0.1
    per, q, rho = L.p3o_pair_loss(cur, old, ref, mask, r, kappa, ratio_clip=10.0, eps=0.2)
    want_q = (1.0 - 0.0) - kappa * (1.5 - (-1.5))                      # 0.7 (rollout: 1.0)
    assert q.item() == pytest.approx(want_q)
    want_rho = math.exp((1.5 - 0.0) + (-1.5 - 0.0))                    # 1.0
    assert rho.item() == pytest.approx(want_rho)
    d, d_old = 3.0, 0.0
    clipped = max(min(d, d_old + 0.2), d_old - 0.2)
    assert per.item() == pytest.approx(max(-want_q * want_rho * d, -want_q * want_rho * clipped))
