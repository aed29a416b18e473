"""Step-level DAPO (arXiv 2412.18279, Skywork): the `mc-rollout` scorer's Monte-Carlo
step values (hand means on a toy rollout set with the sampler and verifier replaced),
step splitting, advantages and the actor loss on hand-made numbers, step log-probs
against the sampler's teacher forcing, the CLI chain on the tiny Llama (fields, same
seed -> same values, a model folder), bad input and the method listing."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import write_jsonl

from alignkit.policy.step_dapo import advantages, step_dapo_loss
from alignkit.reward_models.prm import split_steps
from alignkit.scorers import build_scorer
from alignkit.scorers.mc_rollout import mc_values, step_prefixes

ROOT = Path(__file__).resolve().parents[1]


# --- steps, targets, advantages, loss -------------------------------------------------------

def test_step_splitting_and_prefixes():
    steps = split_steps("Let x = 2.\n\n\n\nThen 2x = 4.\n\n  \n\nAnswer: 4\n\n", "\n\n")
    assert steps == ["Let x = 2.", "Then 2x = 4.", "Answer: 4"]
    assert step_prefixes(steps, "\n\n") == ["", "Let x = 2.\n\n", "Let x = 2.\n\nThen 2x = 4.\n\n"]
    assert split_steps("a|b", "|") == ["a", "b"]
    assert mc_values([1, 0, None, 1, 0.5, 0.5], 2) == [0.5, 0.5, 0.5]


def test_critic_targets_are_the_hand_monte_carlo_means():
    combined = build_scorer(["mc-rollout:unused-model"], rollouts=3)
    sc = combined.scorers[0]
    conts = {"": ["r1", "r2", "r3"], "A\n\n": ["s1", "s2", "s3"], "A\n\nC\n\n": ["t1", "t2", "t3"]}
    verdict = {"r1": 1, "r2": 0, "r3": 0, "A\n\ns1": 1, "A\n\ns2": 1, "A\n\ns3": 0,
               "A\n\nC\n\nt1": 0, "A\n\nC\n\nt2": 0, "A\n\nC\n\nt3": 0,
               "A\n\nB": 1, "A\n\nC\n\nD": 0}
    calls = []

    def fake_rollout(prompt, prefixes):
        calls.append(list(prefixes))
        return [conts[p] for p in prefixes]

    sc.rollout = fake_rollout
    sc.verify = lambda items: [verdict[it.completion] for it in items]
    rec = {"id": "r", "prompt": "Q", "completions": [{"text": "A\n\nB"}, {"text": "A\n\nC\n\nD"}]}
    combined.score_records([rec])
    assert calls == [["", "A\n\n", "A\n\nC\n\n"]]  # one call per record, s_0 shared
    a, b = (c["mc_rollout"] for c in rec["completions"])
    assert a["steps"] == ["A", "B"] and b["steps"] == ["A", "C", "D"]
    assert a["step_values"] == pytest.approx([1 / 3, 2 / 3])
    assert b["step_values"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert (a["outcome"], b["outcome"]) == (1.0, 0.0)
    assert [c["score"] for c in rec["completions"]] == [1.0, 0.0]


def test_advantages_from_values():
    assert advantages([1 / 3, 2 / 3], 1.0) == pytest.approx([1 / 3, 1 / 3])
    assert advantages([0.25, 0.75, 0.5], 0.0) == pytest.approx([0.5, -0.25, -0.5])
    assert advantages([], 1.0) == []


def test_actor_loss_on_hand_numbers():
    import torch
    pol = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0], [-2.0, 5.0]])
    adv = torch.tensor([[0.5, 0.0], [-0.25, 9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # (0.1*0.5 - 0.5)^2 = 0.2025, (0 - 0)^2 = 0, (0.1*(-1) + 0.25)^2 = 0.0225; mean of 3
    loss = step_dapo_loss(pol, ref, adv, mask, 0.1)
    assert loss.item() == pytest.approx((0.2025 + 0.0 + 0.0225) / 3)
    assert step_dapo_loss(pol, ref, adv, mask, 1.0).item() == pytest.approx(
        ((0.5 - 0.5) ** 2 + 0 + (-1 + 0.25) ** 2) / 3)


def test_step_logps_are_sums_of_token_logps(tiny_model):
    from alignkit.generation import token_logps
    from alignkit.models import load_causal_lm
    from alignkit.policy.step_dapo import step_logps
    model, _ = load_causal_lm(str(tiny_model), "float32")
    model.eval()
    prompts, comps = [[1, 5, 6], [1, 7]], [[8, 9, 10, 11], [12, 13]]
    spans = [[[0, 1], [1, 4]], [[0, 2]]]
    import torch
    with torch.no_grad():
        got = step_logps(model, prompts, comps, spans, 0, 2)
    tok = token_logps(model, list(zip(prompts, comps)))
    assert got[0].tolist() == pytest.approx([tok[0][0], sum(tok[0][1:4])], abs=1e-4)
    assert got[1].tolist() == pytest.approx([sum(tok[1]), 0.0], abs=1e-4)


# --- the commands ---------------------------------------------------------------------------

def _samples(path):
    checks = [{"type": "max_words", "n": 6}]
    return write_jsonl(path, [
        {"id": "p1", "prompt": "Add 2 and 2.", "meta": {"checks": checks},
         "completions": [{"text": "Two plus two.\n\nIt is four."},
                         {"text": "Think.\n\nMore words are here now.\n\nDone."}]},
        {"id": "p2", "prompt": "Name a colour.", "meta": {"checks": checks},
         "completions": [{"text": "Red."}]}])


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_scores_then_trains_and_is_seeded(cli, tiny_model, tmp_path):
    data = _samples(tmp_path / "s.jsonl")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"mc-{name}.jsonl"
        r = cli(["score", "-s", f"mc-rollout:{tiny_model}", "--rollouts", "2",
                 "--rollout-max-new-tokens", "4", "--rollout-seed", "7", str(data), "-o", str(out)])
        assert r.code == 0, r.err
        outs.append(_read(out))
    assert outs[0] == outs[1]
    rules = build_scorer(["rules"])
    src = _read(data)
    for rec, orig in zip(outs[0], src):
        expect = rules.score_records([orig])[0]["completions"]
        for comp, exp in zip(rec["completions"], expect):
            mc = comp["mc_rollout"]
            assert mc["steps"] == split_steps(comp["text"], "\n\n")
            assert len(mc["step_values"]) == len(mc["steps"])
            assert all(v in (0.0, 0.5, 1.0) for v in mc["step_values"])  # 0/1 verifier, M=2
            assert mc["outcome"] == exp["score"] == comp["score"]
    out = tmp_path / "policy"
    r = cli(["train-policy", "--method", "step-dapo", "--model", str(tiny_model),
             str(tmp_path / "mc-a.jsonl"), "-o", str(out), "--max-steps", "2", "--batch-size", "2",
             "--max-length", "64", "--lr", "1e-3"])
    assert r.code == 0, r.err
    info = json.loads((out / "alignkit.json").read_text())
    text = json.dumps(info)
    assert "step-dapo" in text and (out / "model.safetensors").exists()
    assert '"steps": 6' in text  # 2 + 3 + 1 steps trained


def test_missing_mc_rollout_is_a_data_error(cli, tiny_model, tmp_path):
    data = _samples(tmp_path / "s.jsonl")
    r = cli(["train-policy", "--method", "step-dapo", "--model", str(tiny_model), str(data),
             "-o", str(tmp_path / "p"), "--max-steps", "1"])
    assert r.code == 3
    assert "s.jsonl:1" in r.err and "mc_rollout" in r.err
    assert not (tmp_path / "p").exists()


def test_bad_verifier_is_a_usage_error():
    from alignkit.errors import UsageError
    with pytest.raises(UsageError):
        build_scorer(["mc-rollout:m"], verifier="mc-rollout:m")
    with pytest.raises(UsageError):
        build_scorer(["mc-rollout"])


def test_list_methods_names_the_paper(cli):
    r = cli(["train-policy", "--list-methods"])
    lines = [line for line in r.out.splitlines() if line.split()[:1] == ["step-dapo"]]
    assert len(lines) == 1 and "2412.18279" in lines[0] and "ByteDance" in lines[0]
    assert not any(line.split()[:1] == ["dapo"] for line in r.out.splitlines())


def test_makefile_example_parses():
    p = subprocess.run(["make", "-n", "-f", "examples/step-dapo.mk"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "score -s mc-rollout:" in p.stdout and "--method step-dapo" in p.stdout
    assert "train-rm --method prm" in p.stdout and "--critic" in p.stdout


def test_the_critic_trains_on_monte_carlo_values(cli, tiny_model, tmp_path):
    """train-rm --method prm reads mc-rollout samples: step k's soft label is v(s_{k+1})
    (the last step's, the outcome); the BCE first loss equals the hand value for logits 0."""
    import math

    from alignkit.errors import DataError
    from alignkit.reward_models import prm
    rec = {"id": "a", "prompt": "Q1", "completions": [
        {"text": "x\n\ny\n\nz", "mc_rollout": {"steps": ["x", "y", "z"],
                                                "step_values": [0.5, 0.25, 1.0], "outcome": 0.0}},
        {"text": "w"}]}  # no mc_rollout: not a critic record
    assert prm.mc_rollout_records(rec) == [{"prompt": "Q1", "steps": ["x", "y", "z"],
                                            "labels": [0.25, 1.0, 0.0]}]
    bad = {**rec, "completions": [{"text": "x", "mc_rollout": {"steps": ["x"], "step_values": [0.5],
                                                              "outcome": 2.0}}]}
    with pytest.raises(DataError) as e:
        prm.mc_rollout_records(bad)
    assert e.value.field == "completions[0].mc_rollout.outcome"
    # BCE with soft targets at logit 0: log 2 whatever the label
    import torch
    loss, _ = prm.step_loss(torch.zeros(1, 3), torch.tensor([[0.25, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(math.log(2))
    z = torch.tensor([[1.0, -2.0, 0.5]])
    y = torch.tensor([[0.25, 1.0, 0.0]])
    hand = sum(-(t * math.log(1 / (1 + math.exp(-v))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-v))))
               for v, t in zip([1.0, -2.0, 0.5], [0.25, 1.0, 0.0])) / 3
    assert prm.step_loss(z, y)[0].item() == pytest.approx(hand, rel=1e-6)
    data = write_jsonl(tmp_path / "mc.jsonl", [rec, {**rec, "id": "b"}])
    out = tmp_path / "critic"
    r = cli(["train-rm", "--method", "prm", "-m", tiny_model, data, "-o", out, "--max-steps", "2",
             "--eval-split", "0"])
    assert r.code == 0, r
    info = json.loads((out / "alignkit.json").read_text())
    assert info["counts"]["train_steps"] == 6
    probs = prm.load_folder(out).step_probs(["Q1"], [["x", "y", "z"]])
    assert len(probs[0]) == 3 and all(0.0 < p < 1.0 for p in probs[0])


def test_first_loss_is_mean_squared_advantage_and_weights_move(cli, tiny_model, tmp_path):
    from safetensors.torch import load_file
    # the policy starts as the reference: log-ratio 0, so the first loss is mean_k A_k^2
    data = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": "a", "prompt": "Q1", "completions": [
            {"text": "x\n\ny", "mc_rollout": {"steps": ["x", "y"], "step_values": [0.0, 0.5],
                                              "outcome": 1.0}}]},
        {"id": "b", "prompt": "Q2", "completions": [
            {"text": "z", "mc_rollout": {"steps": ["z"], "step_values": [0.25], "outcome": 0.0}}]}])
    out = tmp_path / "p"
    r = cli(["train-policy", "--method", "step-dapo", "--model", str(tiny_model), str(data),
             "-o", str(out), "--max-steps", "1", "--batch-size", "2", "--lr", "1e-2",
             "--beta", "0.5"])
    assert r.code == 0, r.err
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx((0.5 ** 2 + 0.5 ** 2 + 0.25 ** 2) / 3, rel=1e-4)
    assert first["step_dapo/log_ratio"] == pytest.approx(0.0, abs=1e-5)
    assert json.loads((out / "alignkit.json").read_text())["hyperparameters"]["beta"] == 0.5
    base, new = load_file(str(tiny_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not (base[k] == new[k]).all() for k in base if k in new)


def test_critic_values_replace_the_inner_states():
    from alignkit.policy.step_dapo import critic_values
    # v(s_0) from MC, v(s_1), v(s_2) = p_1, p_2 (p_3 is the step after the last state)
    assert critic_values([0.2, 0.4, 0.6], [0.9, 0.7, 0.5]) == [0.2, 0.9, 0.7]
    assert critic_values([0.2, 0.4, 0.6], [0.9]) == [0.2, 0.9, 0.6]  # critic cut short
    assert critic_values([0.3], [0.8]) == [0.3]


def test_cli_critic_gives_the_values(cli, tiny_model, tmp_path, monkeypatch):
    import alignkit.reward_models.prm as prm

    class FakePRM:
        def step_probs(self, prompts, steps):
            assert steps == [["x", "y"]]
            return [[0.75, 0.1]]

    seen = {}
    monkeypatch.setattr(prm, "load_folder", lambda f, **kw: seen.setdefault("f", f) and FakePRM())
    data = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": "a", "prompt": "Q1", "completions": [
            {"text": "x\n\ny", "mc_rollout": {"steps": ["x", "y"], "step_values": [0.0, 0.5],
                                              "outcome": 1.0}}]}])
    out = tmp_path / "p"
    r = cli(["train-policy", "--method", "step-dapo", "--model", str(tiny_model), str(data),
             "-o", str(out), "--max-steps", "1", "--batch-size", "1", "--critic", "crit"])
    assert r.code == 0, r.err
    assert seen["f"] == "crit"
    # values [0.0, 0.75] + outcome 1.0 -> A = [0.75, 0.25]; first loss = mean A^2
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx((0.75 ** 2 + 0.25 ** 2) / 2, rel=1e-4)


def test_malformed_mc_rollout_names_the_field(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "prompt": "Q", "completions": [
            {"text": "x", "mc_rollout": {"steps": ["x"], "step_values": [0.5], "outcome": 1}}]},
        {"id": "b", "prompt": "Q", "completions": [
            {"text": "x\n\ny", "mc_rollout": {"steps": ["x", "y"], "step_values": [0.5],
                                              "outcome": 1}}]}])
    r = cli(["train-policy", "--method", "step-dapo", "--model", str(tiny_model), str(data),
             "-o", str(tmp_path / "p")])
    assert r.code == 3 and "bad.jsonl:2" in r.err and "step_values" in r.err


@pytest.mark.slow
def test_smollm2_scores_and_trains(cli, tmp_path):
    data = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "p1", "prompt": "What is 2+2? Answer in at most 5 words.",
         "meta": {"checks": [{"type": "max_words", "n": 5}]},
         "completions": [{"text": "2+2 is 4.\n\nThe answer is 4."}]}])
    mc = tmp_path / "mc.jsonl"
    r = cli(["score", "-s", "mc-rollout:smollm2-135m-instruct", "--rollouts", "2",
             "--rollout-max-new-tokens", "8", str(data), "-o", str(mc)])
    assert r.code == 0, r.err
    comp = _read(mc)[0]["completions"][0]
    assert len(comp["mc_rollout"]["step_values"]) == 2
    r = cli(["train-policy", "--method", "step-dapo", "--model", "smollm2-135m-instruct", str(mc),
             "-o", str(tmp_path / "p"), "--max-steps", "1", "--batch-size", "1", "--lora-r", "4"])
    assert r.code == 0, r.err
    assert (tmp_path / "p" / "alignkit.json").exists()
