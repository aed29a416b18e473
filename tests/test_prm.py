"""Process reward models: `train-rm --method prm` and the `prm:DIR` scorer.

Aggregation and step splitting on hand-made values; the token positions the labels
sit on; a PRM trained on a synthetic step-labelled set (steps "a+a=2a" true, "a+a=2a+1"
false, seeded) ranking wrong steps below right ones on held-out items; the CLI path
train-rm -> score (documented fields, every --aggregate, rm:DIR, train-policy's reward
function); malformed input (exit 3 with file:line: field); same seed -> same weights.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from alignkit.errors import DataError, UsageError
from alignkit.reward_models import prm
from conftest import write_jsonl

PROMPT = "Add the numbers."
FAST = ["--lr", "3e-3", "--batch-size", "8", "--max-length", "64"]


def step(a: int, ok: bool) -> str:
    return f"{a}+{a}={2 * a if ok else 2 * a + 1}"


def step_records(n: int, seed: int, form: str = "trl") -> list[dict]:
    """n records of 3 steps, each right or wrong at random (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        oks = [rng.random() < 0.5 for _ in range(3)]
        steps = [step(rng.randint(1, 3), ok) for ok in oks]
        if form == "trl":
            out.append({"prompt": PROMPT, "completions": steps, "labels": oks})
        else:
            out.append({"prompt": PROMPT, "completion": "\n\n".join(steps), "labels": oks})
    return out


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main([str(a) for a in args])


def tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A PRM trained once on 96 TRL-format records (8 epochs, 10% held out)."""
    d = tmp_path_factory.mktemp("prm")
    data = write_jsonl(d / "train.jsonl", step_records(96, seed=0))
    out = d / "prm"
    assert run(["train-rm", "--method", "prm", "-m", tiny_model, data, "-o", out,
                "--epochs", 8, *FAST]) == 0
    return {"dir": d, "out": out, "data": data}


# --- pure functions ---------------------------------------------------------------------

def test_aggregates_on_hand_made_step_scores():
    s = [0.9, 0.5, 0.8]
    assert prm.aggregate(s, "min") == 0.5
    assert prm.aggregate(s, "prod") == pytest.approx(0.9 * 0.5 * 0.8)  # 0.36
    assert prm.aggregate(s, "last") == 0.8
    assert prm.aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert prm.aggregate([0.3], "prod") == 0.3
    assert prm.check_aggregate(None) == "min"  # Easy-to-Hard's default
    with pytest.raises(UsageError, match="min | prod | last | mean"):
        prm.check_aggregate("user")  # maxmin's choice, not a prm one
    with pytest.raises(ValueError):
        prm.aggregate([], "min")


def test_step_splitting_and_separator_escapes():
    assert prm.split_steps("a\n\nb\n\n\n\n  \n\nc\n\n") == ["a", "b", "c"]
    assert prm.split_steps("x\ny\n\nz", "\n") == ["x", "y", "z"]
    assert prm.split_steps("one step") == ["one step"]
    assert prm.decode_separator("\\n\\n") == "\n\n"
    assert prm.decode_separator(" ;;; ") == " ;;; "
    assert prm.decode_separator("a\\\\n") == "a\\n"  # an escaped backslash stays one
    with pytest.raises(UsageError):
        prm.decode_separator("")


def test_both_formats_parse_to_the_same_steps():
    trl = {"prompt": "q", "completions": ["2+2=4", "3+3=7"], "labels": [True, False]}
    own = {"prompt": "q", "completion": "2+2=4\n\n3+3=7\n\n", "labels": [True, False]}
    want = {"prompt": "q", "steps": ["2+2=4", "3+3=7"], "labels": [True, False]}
    assert prm.parse_record(trl, "\n\n") == want == prm.parse_record(own, "\n\n")
    assert prm.parse_record({**own, "completion": "2+2=4;3+3=7"}, ";")["steps"] == want["steps"]


def test_labels_sit_on_each_steps_last_token(tiny_model):
    from alignkit.models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    ids, ends = prm.encode_steps(tok, PROMPT, ["2+2=4", "3+3=7"], "\n\n", 512)
    prefix = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                     add_generation_prompt=True)
    n0 = len(tok(prefix, add_special_tokens=False)["input_ids"])
    p1 = tok("2+2=4\n\n", add_special_tokens=False)["input_ids"]
    p2 = tok("3+3=7\n\n", add_special_tokens=False)["input_ids"]
    assert ends == [n0 + len(p1) - 1, n0 + len(p1) + len(p2) - 1] and ends[-1] == len(ids) - 1
    assert tok.decode(ids[n0:ends[0] + 1]) == "2+2=4\n\n"
    # a step that does not fit is left out (and gets no score)
    ids2, ends2 = prm.encode_steps(tok, PROMPT, ["2+2=4", "3+3=7"], "\n\n", ends[0] + 2)
    assert ends2 == ends[:1] and len(ids2) == ends[0] + 1
    rows = prm.training_rows(tok, [{"prompt": PROMPT, "steps": ["2+2=4", "3+3=7"],
                                    "labels": [True, False]}], "\n\n", 512)
    labels = rows[0]["labels"]
    assert [i for i, v in enumerate(labels) if v != prm.IGNORE] == ends
    assert [labels[t] for t in ends] == [1, 0]


def test_step_loss_is_bce_at_the_labelled_positions_only():
    import torch
    logits = torch.tensor([[5.0, 0.0, 2.0], [-1.0, 9.0, 0.0]])
    labels = torch.tensor([[-100, 1, 0], [1, -100, -100]])
    loss, acc = prm.step_loss(logits, labels)
    sp = lambda x: math.log1p(math.exp(x))  # BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    assert loss.item() == pytest.approx((sp(-0.0) + sp(2.0) + sp(1.0)) / 3, rel=1e-5)
    assert acc.item() == pytest.approx(0.0)  # z=0 -> no, 2 -> yes (label 0), -1 -> no (label 1)


# --- training and scoring ----------------------------------------------------------------

def test_trained_prm_ranks_wrong_steps_below_right_ones(trained):
    info = json.loads((trained["out"] / "alignkit.json").read_text())
    assert info["rm_method"] == "prm" and info["step_separator"] == "\n\n"
    assert info["aggregate"] == "min" and info["counts"]["heldout"] == 10
    h = info["metrics"]["heldout"]
    assert h["n_steps"] == 30 and h["step_accuracy"] >= 0.9
    assert h["mean_p_correct"] > h["mean_p_wrong"]
    # held-out items: fresh records (seed 7), and each fact alone
    model = prm.load_folder(trained["out"])
    fresh = step_records(20, seed=7)
    probs = model.step_probs([r["prompt"] for r in fresh], [r["completions"] for r in fresh])
    right = [p for ps, r in zip(probs, fresh) for p, lab in zip(ps, r["labels"]) if lab]
    wrong = [p for ps, r in zip(probs, fresh) for p, lab in zip(ps, r["labels"]) if not lab]
    assert max(wrong) < min(right)
    for a in (1, 2, 3):
        good, bad = model.step_scores([PROMPT] * 2, [step(a, True), step(a, False)])
        assert good[0] > 0.5 > bad[0]


def test_score_cli_writes_step_scores_and_each_aggregate(trained, cli):
    d = trained["dir"]
    texts = ["1+1=2\n\n2+2=4", "1+1=2\n\n2+2=5", "3+3=7\n\n3+3=6\n\n", ""]
    samples = write_jsonl(d / "s.jsonl", [{"id": "a", "prompt": PROMPT,
                                           "completions": [{"text": t} for t in texts]}])
    spec = f"prm:{trained['out']}"
    by = {}
    for how in ("min", "prod", "last", "mean", None):
        r = cli(["score", "-s", spec, samples] + (["--aggregate", how] if how else []))
        assert r.code == 0, r
        by[how] = r.records[0]["completions"]
    comps = by["min"]
    assert [len(c["prm"]["steps"]) for c in comps[:3]] == [2, 2, 2]
    assert "score" not in comps[3] and "prm" not in comps[3]  # no step: unscored
    right, wrong = comps[0]["prm"]["steps"][1], comps[1]["prm"]["steps"][1]
    assert right > 0.5 > wrong
    for how, fn in (("min", min), ("prod", math.prod), ("last", lambda s: s[-1]),
                    ("mean", lambda s: sum(s) / len(s)), (None, min)):
        for c in by[how][:3]:
            assert c["prm"]["aggregate"] == (how or "min")
            assert c["score"] == pytest.approx(fn(c["prm"]["steps"]), abs=1e-5)
            assert c["scores"][spec] == c["score"]
    assert comps[0]["score"] > comps[1]["score"] and comps[0]["score"] > comps[2]["score"]
    # rm:DIR loads the folder too (the same aggregate, no per-step field)
    r = cli(["score", "-s", f"rm:{trained['out']}", "--aggregate", "last", samples])
    assert r.code == 0, r
    c = r.records[0]["completions"]
    assert "prm" not in c[0]
    assert [x["score"] for x in c[:3]] == pytest.approx([x["score"] for x in by["last"][:3]],
                                                        abs=1e-6)
    bad = cli(["score", "-s", spec, "--aggregate", "user", samples])
    assert bad.code == 2 and "min | prod | last | mean" in bad.err
    # train-policy --reward prm:DIR uses the same scorer through its reward function
    from alignkit.scorers import build_scorer
    fn = build_scorer([spec]).reward_fn()
    assert fn([PROMPT] * 3, texts[:3]) == pytest.approx([x["score"] for x in comps[:3]])


def test_train_policy_takes_a_prm_reward(trained, tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "q0", "prompt": PROMPT},
                                                 {"id": "q1", "prompt": "Add two numbers."}])
    out = tmp_path / "pol"
    assert run(["train-policy", "--method", "grpo", "--model", tiny_model, prompts,
                "--reward", f"prm:{trained['out']}", "-o", out, "--max-steps", 1,
                "--batch-size", 4, "--max-new-tokens", 6]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert rewards and all(0.0 <= v <= 1.0 for v in rewards)  # min of probabilities


def test_own_format_with_a_declared_separator_and_same_seed_same_weights(tiny_model, tmp_path):
    recs = step_records(16, seed=3, form="own")
    for r in recs:
        r["completion"] = r["completion"].replace("\n\n", "\n")
    data = write_jsonl(tmp_path / "own.jsonl", recs)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run(["train-rm", "--method", "prm", "-m", tiny_model, data, "-o", out,
                    "--step-separator", "\\n", "--max-steps", 3, "--seed", 5, *FAST]) == 0
        outs.append(out)
    info = json.loads((outs[0] / "alignkit.json").read_text())
    assert info["step_separator"] == "\n" and info["counts"]["train_steps"] == 3 * 14
    a, b = (tensors(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    from transformers import AutoModelForTokenClassification  # a plain transformers folder
    assert AutoModelForTokenClassification.from_pretrained(outs[0]).config.num_labels == 1


@pytest.mark.parametrize("bad,field", [
    ({"prompt": PROMPT, "completions": ["2+2=4", "3+3=6"], "labels": [True]}, "labels"),
    ({"prompt": PROMPT, "completions": ["2+2=4", "3+3=6"], "labels": [True, 1.5]}, "labels[1]"),
    ({"prompt": PROMPT, "completion": "2+2=4\n\n3+3=6", "labels": [True]}, "labels"),
    ({"prompt": PROMPT, "completions": ["2+2=4", 7], "labels": [True, True]}, "completions[1]"),
    ({"prompt": PROMPT, "labels": [True]}, "completions"),
    ({"completions": ["2+2=4"], "labels": [True]}, "prompt"),
])
def test_malformed_records_exit_3_with_file_line_field(cli, tiny_model, tmp_path, bad, field):
    good = step_records(1, seed=0)[0]
    data = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    r = cli(["train-rm", "--method", "prm", "-m", tiny_model, data, "-o", tmp_path / "o"])
    assert r.code == 3, r
    assert f"{data}:2: {field}:" in r.err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    with pytest.raises(DataError):
        prm.parse_record(bad, "\n\n")


# --- re-ranking with a verifiable answer ------------------------------------------------

def test_answer_extraction_and_normalisation():
    from alignkit.rerank import extract_answer
    assert extract_answer("so 2+2=4, then 4*3 = 12") == "12"  # the last number
    assert extract_answer("x = \\boxed{\\frac{1}{2}} and 7 more") == "\\frac{1}{2}"  # boxed wins
    assert extract_answer("\\boxed{3} then \\boxed{ 1,000.0 }") == "1000"  # the last box
    assert extract_answer("4.50 apples") == "4.5" and extract_answer("no digits") is None
    assert extract_answer([{"role": "assistant", "content": "it is 9"}]) == "9"


def test_best_of_n_and_weighted_votes_by_hand():
    from alignkit.rerank import best_of_n, rerank_metrics, weighted_vote
    answers = ["4", "5", "5", None, "4"]
    scores = [0.9, 0.3, 0.4, 0.99, 0.1]
    assert best_of_n(answers, scores) == None  # noqa: E711  (the top completion has no answer)
    assert weighted_vote(answers, scores) == "4"  # 0.9+0.1=1.0 > 0.3+0.4=0.7
    assert weighted_vote(answers, [1] * 5) == "4"  # tie 2-2: the answer seen first
    assert weighted_vote([None], [1.0]) is None
    comps = lambda texts, s: [{"text": t, "score": v} for t, v in zip(texts, s)]
    recs = [  # prompt 1: bon right, weighted right, majority wrong
        {"meta": {"answer": 4}, "completions": comps(["=4", "=5", "=5", "=5"], [0.9, .2, .2, .2])},
        # prompt 2: bon wrong (7), weighted 6 (0.5+0.4 > 0.8), majority 6, pass@N
        {"meta": {"answer": "6.0"}, "completions": comps(["\\boxed{7}", "6", "6"], [0.8, .5, .4])},
        # prompt 3: all wrong
        {"meta": {"answer": [1, 2]}, "completions": comps(["3", "3"], [0.5, 0.5])},
        {"meta": {}, "completions": comps(["3", "3"], [0.5, 0.5])},  # no answer: left out
        {"meta": {"answer": 3}, "completions": comps(["3"], [0.5])},  # one sample: left out
    ]
    m = rerank_metrics(recs)
    assert m["n_prompts"] == 3 and m["mean_n"] == pytest.approx(3.0)
    assert m["best_of_n_accuracy"] == pytest.approx(1 / 3)
    assert m["weighted_vote_accuracy"] == pytest.approx(2 / 3)
    assert m["majority_vote_accuracy"] == pytest.approx(1 / 3)
    assert m["pass_at_n"] == pytest.approx(2 / 3)
    assert rerank_metrics(recs[3:]) is None


def test_eval_reports_prm_reranking(trained, cli):
    # each prompt: 1 right solution, 2 with a wrong step and the wrong final answer
    recs = []
    for i, a in enumerate((1, 2, 3)):
        right = f"{a}+{a}={2 * a}\n\n{2 * a}+{2 * a}={4 * a}"
        wrong = f"{a}+{a}={2 * a + 1}\n\n{2 * a + 1}+{2 * a + 1}={4 * a + 3}"
        recs.append({"id": f"q{i}", "prompt": PROMPT, "meta": {"answer": 4 * a},
                     "completions": [{"text": wrong}, {"text": wrong}, {"text": right}]})
    samples = write_jsonl(trained["dir"] / "vote.jsonl", recs)
    r = cli(["eval", samples, "-s", f"prm:{trained['out']}", "--no-kl"])
    assert r.code == 0, r
    metrics = json.loads(r.out)
    rr = next(iter(metrics["models"].values()))["rerank"]
    assert rr["n_prompts"] == 3 and rr["pass_at_n"] == 1.0
    assert rr["best_of_n_accuracy"] == 1.0 and rr["majority_vote_accuracy"] == 0.0
    assert rr["weighted_vote_accuracy"] == 1.0  # one p~1 outweighs two p~0


@pytest.mark.slow
def test_prm_on_smollm2_with_lora(cli, tmp_path, smollm2):
    """SmolLM2 + LoRA (TOKEN_CLS: the head is trained in full): the merged folder is plain
    transformers, and the trained PRM puts right steps above wrong ones."""

    data = write_jsonl(tmp_path / "t.jsonl", step_records(48, seed=11))
    out = tmp_path / "prm"
    r = cli(["train-rm", "--method", "prm", "-m", smollm2, data, "-o", out, "--lora-r", "8",
             "--lr", "1e-3", "--max-steps", "16", "--batch-size", "4", "--max-length", "96",
             "--eval-split", "0.25"])
    assert r.code == 0, r
    assert not (out / "adapter_config.json").exists()
    info = json.loads((out / "alignkit.json").read_text())
    h = info["metrics"]["heldout"]
    assert h["n_steps"] == 36 and h["mean_p_correct"] > h["mean_p_wrong"]
    model = prm.load_folder(out)
    good, bad = model.step_scores([PROMPT] * 2, [step(2, True), step(2, False)])
    assert good[0] > bad[0]


def test_lora_and_eval_file_write_a_merged_plain_folder(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", step_records(8, seed=2))
    held = write_jsonl(tmp_path / "h.jsonl", step_records(4, seed=9, form="own"))
    out = tmp_path / "lora"
    assert run(["train-rm", "--method", "prm", "-m", tiny_model, data, "-o", out,
                "--lora-r", "4", "--max-steps", 2, "--eval-pairs", held, *FAST]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    info = json.loads((out / "alignkit.json").read_text())
    assert info["counts"]["train"] == 8 and info["counts"]["heldout"] == 4  # no split
    assert info["metrics"]["heldout"]["n_steps"] == 12
    assert str(held) in info["inputs"]
    assert len(prm.load_folder(out).step_scores([PROMPT], ["1+1=2\n\n2+2=4"])[0]) == 2
