"""URPO (train-policy --method urpo, relabel --strategy referee-tasks): verdict parsing and
the per-kind rewards by hand, the referee-tasks records (seeded A/B order, label follows
the swap), the self-judge score against the tiny model's own logits, a short mixed run
writing the judging accuracy before/after, and a bad judge label -> exit 3 at file:line."""
from __future__ import annotations

import json
import math

import pytest

from alignkit.policy import urpo_tasks as T
from conftest import write_jsonl


@pytest.mark.parametrize("text,verdict", [
    ("I think [[A]] is better.", "A"), ("[[A]] ... no wait, [[B]]", "B"),
    ("Answer: B", "B"), ("verdict is a", "A"), ("The better: (A) clearly", "A"),
    ("B", "B"), (" (A). ", "A"), ("so the better one is B.", "B"),
    ("both are fine", None), ("", None), ("I pick a", None), ("Bravo", None),
])
def test_parse_verdict(text, verdict):
    assert T.parse_verdict(text) == verdict


def test_judge_and_answer_rewards_by_hand():
    assert T.FORMAT_PENALTY == -0.5
    assert T.judge_reward("[[A]]", "A") == 1.0
    assert T.judge_reward("Answer: B", "A") == 0.0
    assert T.judge_reward("no idea", "B") == -0.5
    assert T.answer_reward("2+2 is\nThe answer: 4.", 4) == 1.0
    assert T.answer_reward("the answer is 5", "4") == 0.0
    assert T.answer_reward("I get\n$4$", "4") == 1.0
    assert T.p_yes(2.0, 0.5) == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert T.kind_of({"meta": {"urpo": {"kind": "judge", "label": "A"}}}) == "judge"
    assert T.kind_of({"meta": {"checks": [{"type": "max_words", "n": 3}]}}) == "verifiable"
    assert T.kind_of({"meta": {"answer": "4"}}) == "verifiable"
    assert T.kind_of({"prompt": "hi"}) == "open"


PAIRS = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": f"good {i}",
          "rejected": f"bad {i}", "meta": {"src": i}} for i in range(12)]


def _relabel(cli, tmp_path, seed, name):
    src = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / name
    r = cli(["relabel", "--strategy", "referee-tasks", src, "--seed", seed, "-o", out])
    assert r.code == 0, r
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_referee_tasks_records_seeded_order_and_label(cli, tmp_path):
    a = _relabel(cli, tmp_path, 0, "a.jsonl")
    assert a == _relabel(cli, tmp_path, 0, "b.jsonl")  # same seed, same records
    c = _relabel(cli, tmp_path, 1, "c.jsonl")
    assert [r["meta"]["urpo"]["label"] for r in a] != [r["meta"]["urpo"]["label"] for r in c]
    labels = {r["meta"]["urpo"]["label"] for r in a}
    assert labels == {"A", "B"}  # both orders occur
    for r, p in zip(a, PAIRS):
        u = r["meta"]["urpo"]
        assert r["id"] == p["id"] + "-judge" and u["kind"] == "judge" and r["meta"]["src"] == p["meta"]["src"]
        first, second = (p["rejected"], p["chosen"]) if u["label"] == "B" else (p["chosen"], p["rejected"])
        assert u["swapped"] == (u["label"] == "B")
        assert r["prompt"] == T.JUDGE_TEMPLATE.format(prompt=p["prompt"], a=first, b=second)
        assert r["prompt"].index(f"[Answer A]\n{first}") < r["prompt"].index(f"[Answer B]\n{second}")


def test_self_judge_score_equals_the_tiny_models_logits(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from alignkit.policy.urpo_trainer import self_judge_scores
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    got = self_judge_scores(model, tok, ["Say hi", "Name a color"], ["hello", "blue"])
    from alignkit.text import encode_prompt, render_prompt
    y = tok(" yes", add_special_tokens=False)["input_ids"][0]
    n = tok(" no", add_special_tokens=False)["input_ids"][0]
    assert y != n
    for p, a, g in zip(["Say hi", "Name a color"], ["hello", "blue"], got):
        text = ("You are a referee. Is the answer below a good answer to the question? Reply "
                f"yes or no.\n\n[Question]\n{p}\n\n[Answer]\n{a}\n\nGood answer (yes or no):")
        ids = torch.tensor([encode_prompt(tok, render_prompt(tok, text))])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        expect = math.exp(logits[y]) / (math.exp(logits[y]) + math.exp(logits[n]))
        assert g == pytest.approx(expect, rel=1e-5)
    assert got[0] != got[1]


def _mixed(tmp_path):
    judge = [T.judge_record(p, 0, str) for p in PAIRS[:10]]
    recs = ([{"id": "v0", "prompt": "Say one word", "meta": {"checks": [{"type": "max_words", "n": 3}]}},
             {"id": "v1", "prompt": "What is 2+2?", "meta": {"answer": "4"}},
             {"id": "o0", "prompt": "Tell me a joke"}, {"id": "o1", "prompt": "Describe the sea"}]
            + judge)
    return write_jsonl(tmp_path / "mixed.jsonl", recs)


def test_urpo_cli_trains_a_mixed_file_and_writes_judging_accuracy(cli, tiny_model, tmp_path):
    src, out = _mixed(tmp_path), tmp_path / "m"
    r = cli(["train-policy", "--method", "urpo", "--model", tiny_model, src, "-o", out,
             "--max-steps", 2, "--batch-size", 8, "--num-generations", 4, "--max-new-tokens", 6,
             "--held-out", 0.2, "--seed", 0, "--sample-every", 1])
    assert r.code == 0, r
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = [x for x in rows if "urpo/judge_acc_before" in x]
    assert len(acc) == 1 and acc[0]["urpo/judge_eval_n"] == 2
    for k in ("urpo/judge_acc_before", "urpo/judge_acc_after"):
        assert acc[0][k] in (0.0, 0.5, 1.0)
    assert any("reward" in x for x in rows)
    man = json.loads((out / "alignkit.json").read_text())
    assert man["method"] == "urpo" and "urpo/judge_acc_after" in man["final_metrics"]
    assert man["data"]["records"] == 14 - 2  # the held-out judge tasks are not trained on
    assert "judging accuracy" in r.err
    # step 0's rewards per kind, recomputed here: the judge verdict reward, the rules
    # check, and the open rows' P(yes) of the (still initial) live policy
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from alignkit.policy.urpo_trainer import self_judge_scores
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    seen = set()
    for rec in recs:  # the open rows: the live policy after <= 1 step of lr 1e-6
        rel = 1e-4 if rec["step"] == 0 else 1e-2
        kind = T.kind_of(rec)
        seen.add(kind)
        texts = [c["text"] for c in rec["completions"]]
        scores = [c["score"] for c in rec["completions"]]
        if kind == "judge":
            assert scores == [T.judge_reward(t, rec["meta"]["urpo"]["label"]) for t in texts]
        elif kind == "open":
            assert scores == pytest.approx(self_judge_scores(model, tok, [rec["prompt"]] * 4, texts),
                                           rel=rel)
            assert all(0.0 < s < 1.0 for s in scores)
        elif "answer" in rec["meta"]:
            assert scores == [T.answer_reward(t, "4") for t in texts]
        else:
            assert scores == [1.0 if len(t.split()) <= 3 else 0.0 for t in texts]
    assert "judge" in seen, seen


def test_eval_pairs_file_gives_the_accuracy_set(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "o0", "prompt": "Tell me a joke"},
                                             {"id": "o1", "prompt": "Say hi"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    out = tmp_path / "m"
    r = cli(["train-policy", "--method", "urpo", "--model", tiny_model, src, "-o", out,
             "--max-steps", 1, "--batch-size", 8, "--max-new-tokens", 4, "--eval-pairs", pairs,
             "--sample-every", 1])
    assert r.code == 0, r
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from alignkit.policy.urpo_trainer import self_judge_scores
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(x["step"] == 0 for x in recs)
    for rec in recs:  # step 0: the open rows' rewards are the initial policy's own P(yes)
        texts = [c["text"] for c in rec["completions"]]
        assert [c["score"] for c in rec["completions"]] == pytest.approx(
            self_judge_scores(model, tok, [rec["prompt"]] * len(texts), texts), rel=1e-5)
    man = json.loads((out / "alignkit.json").read_text())
    assert man["final_metrics"]["urpo/judge_eval_n"] == 3 and man["data"]["records"] == 2


def test_bad_judge_label_is_a_data_error_at_file_line(cli, tiny_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "prompt": "hi"},
        {"id": "b", "prompt": "judge this", "meta": {"urpo": {"kind": "judge", "label": "C"}}}])
    r = cli(["train-policy", "--method", "urpo", "--model", tiny_model, bad, "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:2" in r.err and "meta.urpo.label" in r.err, r


@pytest.mark.slow
def test_urpo_on_smollm2_mixed_kinds(smollm2, cli, tmp_path):
    src, out = _mixed(tmp_path), tmp_path / "m"
    r = cli(["train-policy", "--method", "urpo", "--model", smollm2, src, "-o", out,
             "--max-steps", 2, "--batch-size", 8, "--num-generations", 4, "--max-new-tokens", 16,
             "--lora-r", 8, "--lr", "1e-4", "--held-out", 0.2, "--sample-every", 1])
    assert r.code == 0, r
    man = json.loads((out / "alignkit.json").read_text())
    m = man["final_metrics"]
    assert m["urpo/judge_eval_n"] == 2 and 0.0 <= m["urpo/judge_acc_after"] <= 1.0
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for rec in recs:
        for c in rec["completions"]:
            if T.kind_of(rec) == "open":
                assert 0.0 < c["score"] < 1.0
            elif T.kind_of(rec) == "judge":
                assert c["score"] in (1.0, 0.0, T.FORMAT_PENALTY)
