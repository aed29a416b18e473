"""Value Augmented Sampling: the value model's TD(λ) targets, the guided logit
adjustment, `train-rm --method value` and `--value-guide` in the sampler."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl

PROMPTS = ["Tell me about rice.", "Hi there", "What is 2+2?", "A poem", "Sing", "Why?"]


# --- pure functions ------------------------------------------------------------------------

def test_td_lambda_targets_hand_computed():
    from alignkit.reward_models.value import td_lambda_targets
    v = [0.5, 0.2, -0.1]
    # γ=1, λ=0.95: δ2 = 1 + 0 + 0.1 = 1.1, R2 = 1.1 - 0.1 = 1.0;
    # δ1 = -0.1 - 0.2 = -0.3, A1 = -0.3 + 0.95*1.1 = 0.745, R1 = 0.945;
    # δ0 = 0.2 - 0.5 = -0.3, A0 = -0.3 + 0.95*0.745 = 0.40775, R0 = 0.90775
    assert td_lambda_targets(v, 1.0, 1.0, 0.95) == pytest.approx([0.90775, 0.945, 1.0])
    # γ=0.9, λ=0.5: δ1 = 0.9*-0.1 - 0.2 = -0.29, A1 = -0.29 + 0.45*1.1 = 0.205;
    # δ0 = 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.45*0.205 = -0.22775
    assert td_lambda_targets(v, 1.0, 0.9, 0.5) == pytest.approx([0.27225, 0.405, 1.0])
    # λ = 1, γ = 1: the Monte-Carlo return (the score) everywhere; λ = 0: one-step TD
    assert td_lambda_targets(v, 2.0, 1.0, 1.0) == pytest.approx([2.0, 2.0, 2.0])
    assert td_lambda_targets(v, 2.0, 1.0, 0.0) == pytest.approx([0.2, -0.1, 2.0])


def test_vas_adjust_hand_computed():
    import torch
    from alignkit.generation import vas_adjust
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx = torch.tensor([[0, 1, 2]])
    v1, v2 = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    # guide 1 (β=2): mean 1 -> [0, -2, 2]; guide 2 (β=0.5): mean 1 -> [-0.5, 1, -0.5]
    out = vas_adjust(z, idx, [v1, v2], [2.0, 0.5])
    assert out[0].tolist() == pytest.approx([1.5, 0.0, 1.5, -1.0])
    assert z.tolist() == [[2.0, 1.0, 0.0, -1.0]]  # input untouched


class RuleGuide:
    """A hand-built value function: V(s·a) = value if a is in `tokens`, else 0."""

    def __init__(self, tokens, value=1.0, beta=1.0):
        self.tokens, self.value, self.beta = set(tokens), value, beta
        self.seen = []

    def start(self, ids, mask, pos, rep):
        pass

    def values(self, cand, mask, pos):
        import torch
        self.seen.append(cand.shape)
        hit = torch.tensor([[int(c) in self.tokens for c in row] for row in cand.tolist()])
        return hit.float() * self.value

    def advance(self, tok, mask, pos):
        pass

    def keep(self, idx):
        pass


def test_guided_only_top10_move():
    import torch
    from alignkit.generation import VAS_TOP_K, _guided
    z = torch.arange(12, dtype=torch.float32)[None]  # top-10: tokens 2..11
    g = RuleGuide({0, 11}, value=5.0, beta=2.0)  # token 0 is outside the top-10
    out = _guided(z, [g], torch.ones(1, 3, dtype=torch.long), torch.tensor([2]))
    assert VAS_TOP_K == 10 and g.seen == [(1, 10)]
    # token 11: +2*(5 - 0.5) = 9; tokens 2..10: 2*(0 - 0.5) = -1; 0 and 1 keep z
    want = [0.0, 1.0] + [float(i) - 1.0 for i in range(2, 11)] + [11.0 + 9.0]
    assert out[0].tolist() == pytest.approx(want)


# --- the sampler ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tiny_model):
    """The tiny model with one extra stop token X: the token it most often ranks first
    at temperature 0.1 (so stopping is frequent, and within VAS's top-10 reach)."""
    import torch
    from alignkit.generation import SampleParams, sample
    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(str(tiny_model), "float32")
    res = sample(model, tok, PROMPTS, SampleParams(n=2, temperature=0.1, max_new_tokens=16),
                 return_ids=True)
    counts: dict[int, int] = {}
    with torch.inference_mode():
        for p, group in zip(PROMPTS, res):
            for s in group:
                ids = tok(p)["input_ids"] + s["token_ids"]
                for t in model(torch.tensor([ids])).logits[0].argmax(-1).tolist():
                    counts[t] = counts.get(t, 0) + 1
    x = max(counts, key=counts.get)
    model.generation_config.eos_token_id = [tok.eos_token_id, x]
    return model, tok, x


def _run(model, tok, guides=None, seed=0, temperature=0.1):
    from alignkit.generation import SampleParams, sample
    return sample(model, tok, PROMPTS, SampleParams(n=4, temperature=temperature,
                                                    max_new_tokens=16, seed=seed, batch_size=3),
                  return_ids=True, guides=guides)


def _mean_len(res):
    return sum(s["n_tokens"] for g in res for s in g) / sum(len(g) for g in res)


def test_guide_shifts_length_and_keeps_base_logp(base, monkeypatch):
    from alignkit.generation import encode_prompt, render_prompt, token_logps
    model, tok, x = base
    stops = {tok.eos_token_id, x}
    plain = _run(model, tok)
    longer = _run(model, tok, [RuleGuide(stops, value=-1.0)])   # EOS avoidance: V = -1 at a stop
    shorter = _run(model, tok, [RuleGuide(stops, value=1.0)])   # V = +1 at a stop
    assert _mean_len(shorter) + 1 < _mean_len(plain) < _mean_len(longer) - 4
    # logp is the base model's (temperature 1), by teacher forcing on the same ids
    pairs, logps = [], []
    for p, group in zip(PROMPTS, longer):
        pid = encode_prompt(tok, render_prompt(tok, p))
        for s in group:
            pairs.append((pid, s["token_ids"]))
            logps.append(s["logp"])
    forced = [sum(r) for r in token_logps(model, pairs)]
    assert forced == pytest.approx(logps, abs=1e-4)


def test_unguided_unchanged(base, monkeypatch):
    model, tok, x = base
    slots = _run(model, tok, temperature=1.0)  # the slot decoder (not touched by guides)
    monkeypatch.setenv("ALIGNKIT_SLOTS", "0")
    loop = _run(model, tok, temperature=1.0)
    zero = _run(model, tok, [RuleGuide({x}, value=1.0, beta=0.0)], temperature=1.0)  # β = 0
    texts = lambda res: [[s["text"] for s in g] for g in res]  # noqa: E731
    assert texts(loop) == texts(slots) == texts(zero)
    assert [s["logp"] for g in zero for s in g] == pytest.approx(
        [s["logp"] for g in loop for s in g], abs=1e-5)


# --- train-rm --method value and --value-guide ----------------------------------------------

def _samples(tmp_path, n=6):
    recs = [{"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)],
             "completions": [{"text": "word " * (1 + j + i % 3), "score": float(1 + j + i % 3),
                              "scores": {"len": -float(j)}, "finished": j != 1}
                             for j in range(3)]} for i in range(n)]
    return write_jsonl(tmp_path / "samples.jsonl", recs)


@pytest.fixture(scope="module")
def value_dir(tiny_model, tmp_path_factory):
    from alignkit.reward_models import RMConfig, train
    from alignkit.training import TrainOptions
    tmp = tmp_path_factory.mktemp("vas")
    out = tmp / "v"
    opts = TrainOptions(max_steps=3, batch_size=4, epochs=2.0)
    train("value", str(_samples(tmp)), str(tiny_model), out, opts, RMConfig(method="value"))
    return out


def test_train_rm_value_cli(cli, tiny_model, tmp_path):
    out = tmp_path / "v"
    r = cli(["train-rm", "--method", "value", "-m", tiny_model, _samples(tmp_path), "-o", out,
             "--max-steps", "2", "--lam", "0.9", "--reward-key", "len"])
    assert r.code == 0, r
    info = json.loads((out / "alignkit.json").read_text())
    assert info["rm_method"] == "value"
    assert info["targets"] == {"kind": "gae", "gamma": 1.0, "lam": 0.9, "reward": "len"}
    assert (out / "value_head.safetensors").exists() and (out / "backbone" / "config.json").exists()
    assert info["metrics"]["train"]["steps"] == 2
    from alignkit.reward_models import load_reward_model
    scores = load_reward_model(out).score(["Hi"], ["word word"])
    assert len(scores) == 1 and isinstance(scores[0], float)


def test_train_rm_value_bad_records(cli, tiny_model, tmp_path):
    good = {"id": "a", "prompt": "Hi", "completions": [{"text": "x", "score": 1.0}]}
    bad = {"id": "b", "prompt": "Hi", "completions": [{"text": "x", "score": 1.0}, {"text": "y"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    r = cli(["train-rm", "--method", "value", "-m", tiny_model, path, "-o", tmp_path / "o"])
    assert r.code == 3 and "bad.jsonl:2: completions[1].score" in r.err, r
    r = cli(["train-rm", "--method", "value", "-m", tiny_model, path, "-o", tmp_path / "o",
             "--reward-key", "len"])
    assert r.code == 3 and "bad.jsonl:1: completions[0].scores.len" in r.err, r
    assert not (tmp_path / "o").exists()


def test_value_guide_cache_matches_full_forward(value_dir, base):
    """V(s·a) from the guide's batched KV cache equals a full forward of prefix + a."""
    import torch
    from alignkit.generation import left_pad
    from alignkit.reward_models.value import load_guides
    model, tok, _ = base
    g = load_guides([{"dir": str(value_dir), "beta": 1.0}], model)[0]
    prompts = [tok("Hi there")["input_ids"], tok("A poem about rice")["input_ids"]]
    ids, mask, pos = left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.inference_mode():
        g.start(ids, mask, pos, torch.arange(2))
        cand = torch.tensor([[5, 7, 9], [11, 13, 15]])
        m1 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got = g.values(cand, m1, pos[:, -1] + 1)
        g.advance(torch.tensor([7, 99]), m1, pos[:, -1] + 1)  # 99: not a candidate
        got2 = g.values(cand, torch.cat([m1, torch.ones(2, 1, dtype=torch.long)], 1),
                        pos[:, -1] + 2)
        for b, p in enumerate(prompts):
            for j, a in enumerate(cand[b].tolist()):
                v, _ = g.model(torch.tensor([p + [a]]))
                assert float(got[b, j]) == pytest.approx(float(v[0, -1]), abs=1e-4)
                nxt = [7, 99][b]
                v, _ = g.model(torch.tensor([p + [nxt, a]]))
                assert float(got2[b, j]) == pytest.approx(float(v[0, -1]), abs=1e-4)


def test_gen_pairs_value_guide(cli, tiny_model, value_dir, tmp_path):
    from alignkit.generation import completion_logps, render_prompt
    from alignkit.models import load_causal_lm
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": p}
                                                  for i, p in enumerate(PROMPTS[:3])])
    args = ["gen-pairs", prompts, "-m", tiny_model, "-n", "2", "--max-new-tokens", "8",
            "--temperature", "1"]
    plain = cli(args)
    r = cli(args + ["--value-guide", f"{value_dir}:2.5", "--value-guide", str(value_dir)])
    assert plain.code == 0 and r.code == 0, r
    assert "value_guides" not in plain.records[0]["gen"]
    assert r.records[0]["gen"]["value_guides"] == [{"dir": str(value_dir), "beta": 2.5},
                                                   {"dir": str(value_dir), "beta": 1.0}]
    model, tok = load_causal_lm(str(tiny_model), "float32")
    comps = [(render_prompt(tok, rec["prompt"]), c) for rec in r.records for c in rec["completions"]]
    forced = completion_logps(model, tok, [p for p, _ in comps], [c["text"] for _, c in comps],
                              add_eos=[c["finished"] for _, c in comps])
    assert forced == pytest.approx([c["logp"] for _, c in comps], abs=1e-4)


@pytest.mark.parametrize("spec, needle", [("{dir}:abc", "BETA must be a number"),
                                          ("{dir}:inf", "BETA must be finite"),
                                          ("{tmp}/nope:2", "not a value-model folder"),
                                          ("{tmp}/nope", "not a value-model folder")])
def test_bad_value_guide_exit_2(cli, tiny_model, value_dir, tmp_path, spec, needle):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "Hi"}])
    flag = spec.format(dir=value_dir, tmp=tmp_path)
    for cmd in (["gen-pairs", prompts, "-m", tiny_model], ["eval", prompts, "-m", tiny_model]):
        r = cli(cmd + ["--value-guide", flag])
        assert r.code == 2 and "--value-guide" in r.err and needle in r.err, r


def test_eval_value_guide(cli, tiny_model, value_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "Hi"}])
    out = tmp_path / "s.jsonl"
    r = cli(["eval", prompts, "-m", tiny_model, "--max-new-tokens", "4", "--no-kl",
             "--value-guide", f"{value_dir}:0.5", "--samples-out", out])
    assert r.code == 0, r
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["gen"]["value_guides"] == [{"dir": str(value_dir), "beta": 0.5}]


@pytest.mark.slow
def test_smollm2_value_model_guides_sampling_and_keeps_base_logp(cli, smollm2, tmp_path):
    """A SmolLM2 value model trained on a few scored samples loads as a guide; guided
    samples keep the base model's teacher-forced logp and record the guide."""
    from alignkit.generation import completion_logps, render_prompt
    from alignkit.models import load_causal_lm
    texts = ["Yes.", "Rice is a grain eaten all over the world.", "No", "It is a cereal."]
    recs = [{"id": f"s{i}", "prompt": p, "completions": [
        {"text": t, "score": float(len(t.split()))} for t in texts]} for i, p in enumerate(PROMPTS[:4])]
    vm = tmp_path / "vm"
    r = cli(["train-rm", "--method", "value", "-m", smollm2, write_jsonl(tmp_path / "s.jsonl", recs),
             "-o", vm, "--max-steps", "4", "--batch-size", "4", "--max-length", "64"])
    assert r.code == 0, r
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": p}
                                                  for i, p in enumerate(PROMPTS[:2])])
    r = cli(["gen-pairs", prompts, "-m", smollm2, "-n", "2", "--max-new-tokens", "12",
             "--temperature", "1", "--seed", "0", "--value-guide", f"{vm}:2"])
    assert r.code == 0, r
    assert r.records[0]["gen"]["value_guides"] == [{"dir": str(vm), "beta": 2.0}]
    model, tok = load_causal_lm(str(smollm2), "float32")
    comps = [(render_prompt(tok, rec["prompt"]), c) for rec in r.records for c in rec["completions"]]
    forced = completion_logps(model, tok, [p for p, _ in comps], [c["text"] for _, c in comps],
                              add_eos=[c["finished"] for _, c in comps])
    assert forced == pytest.approx([c["logp"] for _, c in comps], abs=2e-2)
