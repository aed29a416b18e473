"""Step-level GRPO (PROPA's text-only core, ALGORITHMS.md Part D §2): `relabel
--strategy step-prompts`, the step-prompt rendering and one-step cut of the online
trainers (alignkit/policy/steps.py), the `prm-step:DIR` reward, and the CLI path
train-policy --method grpo --reward prm-step:DIR on step prompts.
"""
from __future__ import annotations

import hashlib
import json
import random

import pytest

from alignkit.errors import DataError
from conftest import write_jsonl

PROMPT = "Add the numbers."


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main([str(a) for a in args])


def h8(prefix) -> str:
    return hashlib.sha256(json.dumps(prefix, ensure_ascii=False).encode()).hexdigest()[:8]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, tiny_model):
    """A tiny PRM (TRL format, separator a blank line), a few steps."""
    d = tmp_path_factory.mktemp("prm_step")
    rng = random.Random(0)
    recs = []
    for _ in range(16):
        a = [rng.randint(1, 3) for _ in range(2)]
        oks = [rng.random() < 0.5 for _ in a]
        recs.append({"prompt": PROMPT, "completions": [f"{x}+{x}={2 * x + (not ok)}"
                                                       for x, ok in zip(a, oks)],
                     "labels": oks})
    data = write_jsonl(d / "train.jsonl", recs)
    out = d / "prm"
    assert run(["train-rm", "--method", "prm", "-m", tiny_model, data, "-o", out,
                "--max-steps", 2, "--lr", "3e-3", "--batch-size", 8, "--max-length", 64]) == 0
    return out


# --- relabel --strategy step-prompts ------------------------------------------------------------

SAMPLES = [
    {"id": "r1", "prompt": PROMPT, "meta": {"reference": "4"},
     "completions": [{"text": "a\n\nb\n\nc"}, {"text": "a\n\nx"}, {"text": "  "}]},
    {"id": "r2", "prompt": PROMPT, "completions": [{"text": "a\n\nb\n\nz\n\n"}]},
    {"id": "r3", "prompt": "Other.", "completions": [{"text": "a|b"}]},
]


def test_step_prompts_write_each_distinct_prefix_once(cli, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", SAMPLES)
    r = cli(["relabel", "--strategy", "step-prompts", path])
    assert r.code == 0, r
    got = [(x["id"], x["prompt"], x["meta"]["steps_prefix"], x["meta"]["step_index"])
           for x in r.records]
    # r1: [] [a] [a,b] (the second completion's [] and [a] repeat; "  " has no step);
    # r2 (same prompt): its prefixes [] [a] [a,b] were all written for r1; r3 (another
    # prompt, no "\n\n"): one step -> the empty prefix only
    assert got == [("r1-s0-" + h8([]), PROMPT, [], 0), ("r1-s1-" + h8(["a"]), PROMPT, ["a"], 1),
                   ("r1-s2-" + h8(["a", "b"]), PROMPT, ["a", "b"], 2),
                   ("r3-s0-" + h8([]), "Other.", [], 0)]
    assert r.records[0]["meta"]["reference"] == "4"  # the record's meta is kept
    assert r.records[0]["meta"]["step_separator"] == "\n\n"
    r = cli(["relabel", "--strategy", "step-prompts", "--step-separator", "|", path])
    assert [x["meta"]["steps_prefix"] for x in r.records if x["id"].startswith("r3")] == [[], ["a"]]


def test_max_prefixes_is_a_seeded_draw_in_order(cli, tmp_path):
    steps = [f"s{i}" for i in range(6)]
    path = write_jsonl(tmp_path / "s.jsonl", [{"id": "r", "prompt": PROMPT,
                                               "completions": [{"text": "\n\n".join(steps)}]}])
    outs = {}
    for seed in (1, 1, 2):
        r = cli(["relabel", "--strategy", "step-prompts", "--max-prefixes", 3, "--seed", seed, path])
        assert r.code == 0, r
        outs.setdefault(seed, []).append([x["meta"]["step_index"] for x in r.records])
    assert outs[1][0] == outs[1][1]  # same seed, same draw
    rng = random.Random("1\x00r")   # the documented draw: (seed, record id) over k = 0..5
    assert outs[1][0] == sorted(rng.sample(range(6), 3))
    assert outs[2][0] == sorted(random.Random("2\x00r").sample(range(6), 3))


# --- rendering and the one-step cut -------------------------------------------------------------

class _Data:
    def __init__(self, records, path="p.jsonl"):
        self.records, self.path, self.lines = records, path, list(range(1, len(records) + 1))


def test_rendering_appends_the_prefix_and_separator(tiny_model):
    from alignkit.generation import render_prompt
    from alignkit.models import load_tokenizer
    from alignkit.policy.online import prompt_rows
    tok = load_tokenizer(tiny_model)
    recs = [{"id": "a", "prompt": PROMPT},
            {"id": "b", "prompt": PROMPT, "meta": {"steps_prefix": ["1+1=2", "2+2=4"]}},
            {"id": "c", "prompt": PROMPT, "meta": {"steps_prefix": ["x"], "step_separator": "|"}},
            {"id": "d", "prompt": PROMPT, "meta": {"steps_prefix": []}}]
    rows, dropped = prompt_rows(_Data(recs), tok, 4, 512)
    chat = render_prompt(tok, PROMPT)
    assert dropped == 0 and [r["row"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["prompt"] == chat  # no steps_prefix: unchanged
    assert rows[1]["prompt"] == chat + "1+1=2\n\n2+2=4\n\n"
    assert rows[2]["prompt"] == chat + "x|"
    assert rows[3]["prompt"] == chat
    rows, _ = prompt_rows(_Data(recs), tok, 4, 512, separator="\\n")  # the flag wins
    assert rows[1]["prompt"] == chat + "1+1=2\n2+2=4\n" and rows[2]["prompt"] == chat + "x\n"
    from alignkit.policy.steps import stop_map
    assert stop_map(_Data(recs), rows, "\\n") == {rows[i]["prompt"]: "\n" for i in (1, 2, 3)}


def test_cut_at_the_first_separator(tiny_model):
    from alignkit.models import load_tokenizer
    from alignkit.policy.steps import cut_ids
    tok = load_tokenizer(tiny_model)
    ids = tok.encode("2+2=4\n\n3+3=6\n\nend", add_special_tokens=False)
    kept, text = cut_ids(tok, ids, "\n\n")
    assert text == "2+2=4"
    assert tok.decode(kept).startswith("2+2=4\n\n") and not tok.decode(kept[:-1]).endswith("\n\n")
    assert kept == ids[:len(kept)]
    assert cut_ids(tok, tok.encode("no sep", add_special_tokens=False), "\n\n") is None


def test_cut_rows_recomputes_logp_on_the_kept_tokens(tiny_model):
    from alignkit.generation import token_logps
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_tokenizer
    from alignkit.policy.steps import cut_rows
    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    p = tok.encode("Q:", add_special_tokens=False)
    ids = tok.encode("ab\n\ncd", add_special_tokens=False)
    rows = [{"token_ids": list(ids), "text": "ab\n\ncd", "logp": 0.0, "n_tokens": len(ids),
             "finished": False} for _ in range(2)]
    n = cut_rows(rows, ["step", "plain"], {"step": "\n\n"}, tok, [p, p], model)
    assert n == 1 and rows[1]["token_ids"] == ids and rows[1]["logp"] == 0.0  # not a step prompt
    kept = rows[0]["token_ids"]
    assert rows[0]["text"] == "ab" and rows[0]["finished"] and rows[0]["n_tokens"] == len(kept)
    assert rows[0]["logp"] == pytest.approx(sum(token_logps(model, [(p, kept)])[0]))


def test_malformed_steps_prefix_is_a_located_data_error():
    from alignkit.policy.steps import prompt_suffix
    for bad in ("a", ["a", 3], {"x": 1}):
        with pytest.raises(DataError) as e:
            prompt_suffix(_Data([{"id": "a", "prompt": "x"},
                                 {"id": "b", "prompt": "x", "meta": {"steps_prefix": bad}}]), 1)
        assert "p.jsonl:2" in str(e.value) and "meta.steps_prefix" in str(e.value)


# --- prm-step:DIR ------------------------------------------------------------------------------

def test_prm_step_scores_the_last_step_of_prefix_plus_step(prm_dir):
    from alignkit.reward_models.prm import load_folder
    from alignkit.scorers import build_scorer
    prm = load_folder(prm_dir)
    prefix = ["1+1=2", "2+2=5"]
    steps = ["3+3=6", "3+3=7", "3+3=6\n\n"]
    want = [prm.step_scores([PROMPT], ["\n\n".join(prefix + [s])])[0][-1] for s in steps]
    want.append(prm.step_scores([PROMPT], ["1+1=3"])[0][-1])  # no prefix: the step alone
    fn = build_scorer([f"prm-step:{prm_dir}"]).reward_fn()
    got = fn([PROMPT] * 4, steps + ["1+1=3"],
             meta=[{"steps_prefix": prefix}] * 3 + [{}])
    assert got == pytest.approx(want, abs=1e-6)
    assert got[0] == pytest.approx(got[2], abs=1e-6)  # a trailing separator is no new step
    assert len(set(round(x, 6) for x in got[:2])) == 2


def test_prm_step_on_scored_samples_and_bad_meta(prm_dir, cli, tmp_path):
    from alignkit.reward_models.prm import load_folder
    prm = load_folder(prm_dir)
    recs = [{"id": "a", "prompt": PROMPT, "meta": {"steps_prefix": ["1+1=2"]},
             "completions": [{"text": "2+2=4"}, {"text": ""}]}]
    path = write_jsonl(tmp_path / "s.jsonl", recs)
    r = cli(["score", "-s", f"prm-step:{prm_dir}", path])
    assert r.code == 0, r
    comps = r.records[0]["completions"]
    assert comps[0]["score"] == pytest.approx(
        prm.step_scores([PROMPT], ["1+1=2\n\n2+2=4"])[0][-1], abs=1e-6)
    assert "score" not in comps[1]  # an empty step gets no value
    recs.append({"id": "b", "prompt": PROMPT, "meta": {"steps_prefix": "1+1=2"},
                 "completions": [{"text": "2+2=4"}]})
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    r = cli(["score", "-s", f"prm-step:{prm_dir}", path])
    assert r.code == 3 and f"{path}:2" in r.err and "meta.steps_prefix" in r.err, r


def test_online_reward_sees_the_text_so_far(prm_dir, tmp_path):
    from alignkit.policy.online import reward_fn
    from alignkit.reward_models.prm import load_folder
    from alignkit.scorers import build_scorer
    (tmp_path / "echo.py").write_text("def n(prompts, completions, **kw):\n"
                                      "    return [float(len(c)) for c in completions]\n")
    recs = [{"id": "a", "prompt": PROMPT, "meta": {"steps_prefix": ["1+1=2", "2+2=5"]}},
            {"id": "b", "prompt": PROMPT, "meta": {"steps_prefix": ["x"], "step_separator": "|"}},
            {"id": "c", "prompt": PROMPT}]
    fn = reward_fn(build_scorer([f"python:{tmp_path / 'echo.py'}:n"]), recs)
    got = fn([None] * 5, ["3+3=6\n\nmore", "   ", "ab|cd", "ab|cd", "free"], row=[0, 0, 1, 2, 2])
    assert got == [len("1+1=2\n\n2+2=5\n\n3+3=6"), 0.0, len("x|ab"), len("ab|cd"), 4.0]
    prm = load_folder(prm_dir)
    want = prm.step_scores([PROMPT], ["1+1=2\n\n2+2=5\n\n3+3=6"])[0][-1]
    fn = reward_fn(build_scorer([f"prm-step:{prm_dir}"]), recs)
    assert fn([None], ["3+3=6\n\n"], row=[0]) == pytest.approx([want], abs=1e-6)


# --- the CLI: grpo on step prompts -------------------------------------------------------------

@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_on_step_prompts_with_the_prm_step_reward(prm_dir, tiny_model, cli, tmp_path,
                                                         method):
    samples = [{"id": f"q{i}", "prompt": p, "completions": [{"text": t}]}
               for i, (p, t) in enumerate([(PROMPT, "1 1 2 3"), ("Add two numbers.", "2 2 4")])]
    src = write_jsonl(tmp_path / "s.jsonl", samples)
    r = cli(["relabel", "--strategy", "step-prompts", "--step-separator", " ", src])
    assert r.code == 0 and len(r.records) == 7, r
    prompts = write_jsonl(tmp_path / "p.jsonl", r.records)
    out = tmp_path / "pol"
    r = cli(["train-policy", "--method", method, "--model", tiny_model, prompts,
             "--reward", f"prm-step:{prm_dir}", "-o", out, "--max-steps", 2,
             "--batch-size", 4, "--max-new-tokens", 16, "--sample-every", 1])
    assert r.code == 0, r
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {x["step"] for x in recs} == {0, 1}
    comps = [c for x in recs for c in x["completions"]]
    assert len(comps) == 8 and all(" " not in c["text"] for c in comps)
    assert any(c["finished"] and c["n_tokens"] < 16 for c in comps)
    assert all(x["meta"]["steps_prefix"] is not None for x in recs)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v for x in rows if "reward" in x for v in [x["reward"]] if 0.0 <= v <= 1.0]


def test_train_policy_bad_steps_prefix_exits_3(prm_dir, tiny_model, cli, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "prompt": PROMPT, "meta": {"steps_prefix": ["x"]}},
        {"id": "b", "prompt": PROMPT, "meta": {"steps_prefix": [1, 2]}}])
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, bad,
             "--reward", "length", "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:2" in r.err and "meta.steps_prefix" in r.err, r
    assert not (tmp_path / "m.partial").exists()


@pytest.mark.slow
def test_smollm2_step_grpo_with_a_smollm2_prm(cli, smollm2, tmp_path):
    """The whole PROPA core on SmolLM2: a PRM trained on step-labelled sums, step prompts
    from rollouts, one GRPO step whose rewards are the PRM's P(correct) of each sampled step."""
    import random
    rng = random.Random(3)
    steps = []
    for _ in range(24):
        a, ok = rng.randint(1, 4), rng.random() < 0.5
        steps.append({"prompt": "Add the numbers step by step.",
                      "completions": [f"{a}+{a}={2 * a if ok else 2 * a + 1}", "Done."],
                      "labels": [ok, ok]})
    prm = tmp_path / "prm"
    r = cli(["train-rm", "--method", "prm", "-m", smollm2, write_jsonl(tmp_path / "t.jsonl", steps),
             "-o", prm, "--lora-r", "8", "--lr", "1e-3", "--max-steps", "6", "--batch-size", "4",
             "--max-length", "64", "--eval-split", "0"])
    assert r.code == 0, r
    rollouts = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "q", "prompt": "Add the numbers step by step.",
         "completions": [{"text": "1+1=2\n\n2+2=4\n\nDone."}]}])
    r = cli(["relabel", "--strategy", "step-prompts", rollouts])
    assert r.code == 0 and [x["meta"]["step_index"] for x in r.records] == [0, 1, 2], r
    out = tmp_path / "pol"
    r = cli(["train-policy", "--method", "grpo", "--model", smollm2,
             write_jsonl(tmp_path / "p.jsonl", r.records), "--reward", f"prm-step:{prm}",
             "-o", out, "--max-steps", "1", "--batch-size", "4", "--max-new-tokens", "24",
             "--lora-r", "4", "--sample-every", "1"])
    assert r.code == 0, r
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    comps = [c for x in recs for c in x["completions"]]
    assert comps and all("\n\n" not in c["text"] for c in comps)
    assert all(0.0 <= c["score"] <= 1.0 for c in comps if c.get("score") is not None)
