"""`alignkit score` and the scorer library: exact values for every scorer, the
combination, hybrid routing, calibration/transform, pairs, errors and exit codes."""
from __future__ import annotations

import json
import math

import pytest

from alignkit.errors import DataError, UsageError
from alignkit.scorers import (SCORERS, build_scorer, calibrated, parse_transform,
                              parse_weights)
from alignkit.scorers.judge import (NO, YES, answer_token_ids, judge_prompt, load_rubric_file,
                                    parse_rubric, rubric_score)
from alignkit.scorers.length import soft_overlong
from alignkit.scorers.pairwise import win_probabilities
from alignkit.scorers.rm import rm_inputs
from conftest import write_jsonl

CHECKS = [{"type": "max_words", "n": 3}, {"type": "include_keywords", "keywords": ["hi"]}]


def sig(x):
    return 1 / (1 + math.exp(-x))


def samples(rid="a", prompt="Say hi", texts=("hi there", "one two three four five",
                                             "hi one two three four"), meta=None, **extra):
    rec = {"id": rid, "prompt": prompt, "completions": [{"text": t} for t in texts], **extra}
    if meta is not None:
        rec["meta"] = meta
    return rec


@pytest.fixture(scope="module")
def rm_dir(tiny_model, tmp_path_factory):
    """A deterministic reward-model folder: the tiny Llama with a seeded score head."""
    import torch

    from alignkit.models import load_seq_cls
    out = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(0)
    model, tok = load_seq_cls(tiny_model, "float32")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def direct_rewards(rm_dir, pairs):
    """One unpadded forward pass per (prompt, completion): the reference values."""
    import torch

    from alignkit.models import load_seq_cls
    model, tok = load_seq_cls(rm_dir, "float32")
    out = []
    with torch.no_grad():
        for p, c in pairs:
            enc = tok(rm_inputs(tok, p, c), return_tensors="pt", add_special_tokens=False)
            out.append(model(**enc).logits[0, 0].item())
    return out


# --- registry, spec errors ---------------------------------------------------------------

def test_registry_names():
    assert set(SCORERS.names()) == {"rules", "rm", "pairwise", "judge", "python", "length", "aepo",
                                    "prm", "code", "mc-rollout", "prm-step"}


@pytest.mark.parametrize("specs,kw,msg", [
    (["nope"], {}, "unknown scorer 'nope'"),
    (["rm"], {}, "needs dir"),
    (["rm:/no/such/dir"], {}, "no such folder"),
    (["judge"], {}, "needs model"),
    (["python:nomodule_xyz:fn"], {}, "cannot import"),
    (["length:a:b"], {}, "integers"),
    (["length:10:20"], {}, "CACHE <= MAX"),
    (["rules:x"], {}, "takes no argument"),
    (["rules", "rules"], {}, "given twice"),
    (["rules", "length"], {"weights": "1"}, "1 value(s) for 2"),
    (["rules"], {"weights": "x"}, "comma-separated"),
    (["length"], {"hybrid": True}, "--hybrid needs the rules"),
    (["rules"], {"transform": "exp:2"}, "give --calibrate"),
    ([], {}, "at least one"),
])
def test_spec_errors(specs, kw, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        build_scorer(specs, **kw)


def test_parse_helpers():
    assert parse_weights("1,0.5", 2) == [1.0, 0.5]
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0]
    assert parse_transform("exp:2")(0.5) == pytest.approx(math.e)
    assert parse_transform("neg-exp:2")(0.5) == pytest.approx(-math.exp(-1))
    with pytest.raises(UsageError):
        parse_transform("log:2")
    with pytest.raises(UsageError):
        parse_transform("exp:x")


# --- rules ---------------------------------------------------------------------------------

def test_rules_scores_and_checks():
    rec = samples(meta={"checks": CHECKS})
    [out] = build_scorer(["rules"]).score_records([rec])
    got = [(c["score"], c["scores"], [x["passed"] for x in c["checks"]]) for c in out["completions"]]
    assert got == [(1.0, {"rules": 1.0}, [True, True]),
                   (0.0, {"rules": 0.0}, [False, False]),
                   (0.5, {"rules": 0.5}, [False, True])]
    assert out["completions"][0]["checks"] == [{"type": "max_words", "passed": True},
                                              {"type": "include_keywords", "passed": True}]


def test_rules_without_checks_gets_no_score(cli, tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [samples(meta={"checks": CHECKS}),
                                             samples("b", texts=("x", "y"))])
    r = cli(["score", "--scorer", "rules", inp])
    assert r.code == 0, r
    a, b = r.records
    assert [c["score"] for c in a["completions"]] == [1.0, 0.0, 0.5]
    assert b["completions"] == [{"text": "x", "scores": {}}, {"text": "y", "scores": {}}]
    assert "2 of 5 completions got no 'rules' score (no meta.checks)" in r.err
    assert "2 of 5 completions got no combined score" in r.err


def test_rules_malformed_checks_exit_3_with_line(cli, tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [
        samples(meta={"checks": CHECKS}),
        samples("b", meta={"checks": [{"type": "max_words", "n": "three"}]})])
    r = cli(["score", "--scorer", "rules", inp])
    assert r.code == 3
    assert f"{inp}:2: meta.checks[0].n: must be an integer" in r.err
    assert r.out == ""  # stdout gets whole batches only; nothing half-written


def test_missing_field_and_wrong_kind_exit_3(cli, tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [samples(), {"id": "x", "prompt": "p", "completions": [{}]}])
    r = cli(["score", "-s", "rules", inp])
    assert r.code == 3 and f"{inp}:2: completions[0].text: missing required field" in r.err
    inp2 = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": "p"}])
    r = cli(["score", "-s", "rules", inp2])
    assert r.code == 3 and f"{inp2}:1: expected a samples or pair record" in r.err


def test_bad_scorer_exit_2(cli, tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [samples()])
    assert cli(["score", "--scorer", "bogus", inp]).code == 2
    assert cli(["score", "--scorer", "rm", inp]).code == 2
    assert cli(["score", "--scorer", "rules", "--weights", "1,2", inp]).code == 2


def test_rules_on_pairs():
    pair = {"id": "p", "prompt": "Say hi", "chosen": "hi there", "rejected": "no no no no",
            "meta": {"checks": CHECKS}}
    [out] = build_scorer(["rules"]).score_records([pair])
    assert out["score_chosen"] == 1.0 and out["score_rejected"] == 0.0
    assert out["scores_chosen"] == {"rules": 1.0} and out["scores_rejected"] == {"rules": 0.0}
    assert out["checks_chosen"] == [{"type": "max_words", "passed": True},
                                    {"type": "include_keywords", "passed": True}]
    assert [c["passed"] for c in out["checks_rejected"]] == [False, False]


# --- length and combination --------------------------------------------------------------

def test_soft_overlong_formula():
    # MAX=10, CACHE=4: 0 up to 6 words, linear to -1 at 10, -1 beyond.
    assert [soft_overlong(n, 10, 4) for n in (0, 6, 7, 8, 10, 11)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert [soft_overlong(n, 5, 0) for n in (5, 6)] == [0.0, -1.0]


def test_length_words_and_tokens(tiny_model):
    rec = samples(texts=("one two three four five six seven eight",))
    [out] = build_scorer(["length:10:4"]).score_records([rec])
    assert out["completions"][0]["scores"] == {"length:10:4": -0.5}  # 8 words
    from alignkit.models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    n_tok = len(tok.encode(rec["completions"][0]["text"], add_special_tokens=False))
    [out] = build_scorer(["length:10:4"], tokenizer=str(tiny_model)).score_records(
        [samples(texts=(rec["completions"][0]["text"],))])
    assert out["completions"][0]["score"] == soft_overlong(n_tok, 10, 4)


def test_weights_combination_exact():
    rec = samples(meta={"checks": CHECKS},
                  texts=("hi there", "hi a b c d e f g h i"))  # 2 words, 10 words
    [out] = build_scorer(["rules", "length:10:4"], "2,0.5").score_records([rec])
    c0, c1 = out["completions"]
    assert c0["scores"] == {"rules": 1.0, "length:10:4": 0.0} and c0["score"] == 2.0
    # 10 words: max_words fails, keyword passes -> 0.5; length -> -1.0
    assert c1["scores"] == {"rules": 0.5, "length:10:4": -1.0}
    assert c1["score"] == 2 * 0.5 + 0.5 * -1.0


def test_hybrid_routes_records():
    recs = [samples(meta={"checks": CHECKS}, texts=("hi there",)),
            samples("b", texts=("a b c d e f g h",))]
    scorer = build_scorer(["rules", "length:10:4"], "1,3", hybrid=True)
    a, b = scorer.score_records(recs)
    assert a["completions"][0]["scores"] == {"rules": 1.0} and a["completions"][0]["score"] == 1.0
    assert b["completions"][0]["scores"] == {"length:10:4": -0.5}
    assert b["completions"][0]["score"] == 3 * -0.5


# --- python ----------------------------------------------------------------------------------

@pytest.fixture
def user_fn(tmp_path):
    f = tmp_path / "myrewards.py"
    f.write_text(
        "def n_chars(prompts, completions, meta, **kw):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def uses_solution(prompts, completions, solution, **kw):\n"
        "    return [1.0 if s is not None and s in c else (None if s is None else 0.0)\n"
        "            for c, s in zip(completions, solution)]\n"
        "def wrong_len(prompts, completions, **kw):\n"
        "    return [1.0]\n")
    return f


def test_python_scorer_from_file(user_fn):
    recs = [samples(texts=("abc", "abcdef")),
            samples("b", texts=("the answer is 42", "41"), meta={"solution": "42"})]
    scorer = build_scorer([f"python:{user_fn}:n_chars", f"python:{user_fn}:uses_solution"])
    a, b = scorer.score_records(recs)
    name_len, name_sol = scorer.names
    assert [c["scores"] for c in a["completions"]] == [{name_len: 3.0}, {name_len: 6.0}]
    assert [c["scores"][name_sol] for c in b["completions"]] == [1.0, 0.0]
    assert [c["score"] for c in b["completions"]] == [17.0, 2.0]
    assert scorer.stats[f"missing:{name_sol}"] == 2  # no meta.solution in record a


def test_python_scorer_errors(cli, user_fn, tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [samples()])
    r = cli(["score", "-s", f"python:{user_fn}:wrong_len", inp])
    assert r.code == 1 and "returned 1 values for 3 completions" in r.err
    r = cli(["score", "-s", f"python:{user_fn}:nothere", inp])
    assert r.code == 2 and "has no function 'nothere'" in r.err
    r = cli(["score", "-s", "python:json:dumps_nope", inp])
    assert r.code == 2


def test_python_scorer_importable_module():
    scorer = build_scorer(["python:alignkit.records:derive_id"])
    assert scorer.scorers[0].fn.__name__ == "derive_id"


# --- rm and pairwise --------------------------------------------------------------------------

def test_rm_inputs_format(tiny_model):
    from alignkit.models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    assert rm_inputs(tok, "P", "C") == \
        "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\nC<|im_end|>\n"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}]
    assert rm_inputs(tok, msgs, "C").startswith("<|im_start|>system\nS<|im_end|>\n")

    class NoTemplate:
        chat_template = None
    assert rm_inputs(NoTemplate(), "P", "C") == "P\n\nC"
    assert rm_inputs(NoTemplate(), msgs, [{"role": "assistant", "content": "C"}]) == "S\n\nP\n\nC"


def test_rm_matches_direct_computation(rm_dir):
    recs = [samples(texts=("hi there", "one two three four five", "hi")),
            samples("b", prompt=[{"role": "user", "content": "Explain the sky"}],
                    texts=("blue light scatters more",))]
    scorer = build_scorer([f"rm:{rm_dir}"], batch_size=2)
    out = scorer.score_records(recs)
    got = [c["scores"][f"rm:{rm_dir}"] for r in out for c in r["completions"]]
    expected = direct_rewards(rm_dir, [(r["prompt"], c["text"]) for r in recs for c in r["completions"]])
    assert got == pytest.approx(expected, abs=1e-5)
    assert [c["score"] for r in out for c in r["completions"]] == got
    assert len(set(round(g, 6) for g in got)) == 4  # the head is not constant


def test_pairwise_win_probabilities(rm_dir):
    assert win_probabilities([0.0]) == [0.5]
    assert win_probabilities([1.0, 0.0]) == pytest.approx([(0.5 + sig(1)) / 2, (0.5 + sig(-1)) / 2])
    recs = [samples(texts=("hi there", "one two three four five", "hi"))]
    name = f"pairwise:{rm_dir}"
    [out] = build_scorer([name, f"rm:{rm_dir}"], "1,0").score_records(recs)
    r = [c["scores"][f"rm:{rm_dir}"] for c in out["completions"]]
    expected = [sum(sig(ri - rj) for rj in r) / 3 for ri in r]
    assert [c["p_win"] for c in out["completions"]] == pytest.approx(expected, abs=1e-12)
    assert [c["scores"][name] for c in out["completions"]] == [c["p_win"] for c in out["completions"]]
    # on a pair: the group is {chosen, rejected}
    pair = {"id": "p", "prompt": "Say hi", "chosen": "hi there", "rejected": "hi"}
    [po] = build_scorer([name]).score_records([pair])
    rc, rr = direct_rewards(rm_dir, [("Say hi", "hi there"), ("Say hi", "hi")])
    pw = (0.5 + sig(rc - rr)) / 2
    assert po["p_win"]["chosen"] == pytest.approx(pw, abs=1e-5)
    assert po["p_win_rejected"] == pytest.approx(1 - pw, abs=1e-5)
    assert po["score_chosen"] == po["p_win_chosen"]


def test_rm_cli_same_output_twice_and_chunking(cli, rm_dir, tmp_path):
    recs = [samples(str(i), texts=(f"answer {i}", "hi")) for i in range(5)]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    out = tmp_path / "o.jsonl"
    r1 = cli(["score", "-s", f"rm:{rm_dir}", "-s", "length:3:1", inp, "-o", out, "--batch-size", "3"])
    assert r1.code == 0, r1
    first = out.read_text()
    again = cli(["score", "-s", f"rm:{rm_dir}", "-s", "length:3:1", inp, "--batch-size", "3"])
    assert again.out == first  # same inputs -> identical records
    r2 = cli(["score", "-s", f"rm:{rm_dir}", "-s", "length:3:1", inp, "--chunk", "2"])
    a = [c["score"] for rec in map(json.loads, first.splitlines()) for c in rec["completions"]]
    b = [c["score"] for rec in r2.records for c in rec["completions"]]
    assert a == pytest.approx(b, abs=1e-5)
    man = json.loads((tmp_path / "o.jsonl.alignkit.json").read_text())
    assert man["counts"] == {"records": 5, "completions": 10, "unscored": 0}
    assert man["scorers"] == [f"rm:{rm_dir}", "length:3:1"]


# --- judge -----------------------------------------------------------------------------------

def test_rubric_parsing_and_score():
    assert parse_rubric(["Be kind", {"text": "No commas", "kind": "hard"}]) == [
        {"text": "Be kind", "kind": "principle"}, {"text": "No commas", "kind": "hard"}]
    with pytest.raises(DataError, match=r"meta.rubric\[0\].kind"):
        parse_rubric([{"text": "x", "kind": "soft"}])
    with pytest.raises(DataError, match=r"meta.rubric\[1\]"):
        parse_rubric(["ok", 3])
    with pytest.raises(DataError, match="meta.rubric"):
        parse_rubric("just a string")
    R = lambda k, p: {"text": "t", "kind": k, "p_yes": p}  # noqa: E731
    assert rubric_score([R("hard", 0.49), R("principle", 0.9)]) == 0.0
    assert rubric_score([R("hard", 0.5), R("principle", 0.9), R("principle", 0.6)]) == pytest.approx(0.75)
    assert rubric_score([R("hard", 0.7)]) == 1.0
    assert rubric_score([]) is None


def test_rubric_file_formats(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("# comment\nhard: No commas\n\nBe polite\nprinciple: Be brief\n")
    assert load_rubric_file(str(f)) == [{"text": "No commas", "kind": "hard"},
                                        {"text": "Be polite", "kind": "principle"},
                                        {"text": "Be brief", "kind": "principle"}]
    j = tmp_path / "r.json"
    j.write_text(json.dumps([{"text": "x", "kind": "hard"}]))
    assert load_rubric_file(str(j)) == [{"text": "x", "kind": "hard"}]
    j.write_text(json.dumps([{"text": ""}]))
    with pytest.raises(UsageError, match="non-empty"):
        load_rubric_file(str(j))


def test_judge_matches_direct_computation(tiny_model, tmp_path):
    import torch

    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(tiny_model, "float32")
    yes, no = answer_token_ids(tok)
    assert yes == sorted({tok.encode(v, add_special_tokens=False)[0] for v in YES
                          if len(tok.encode(v, add_special_tokens=False)) == 1})
    assert no and not set(yes) & set(no)
    assert all(v in NO for v in ("no", " no"))
    rubric_file = tmp_path / "rubric.txt"
    rubric_file.write_text("hard: The response is short.\nThe response is polite.\n")
    own = [{"text": "Mentions the sky", "kind": "principle"}]
    recs = [samples(texts=("hi there", "one two three four five")),
            samples("b", prompt="Explain the sky", texts=("blue",), meta={"rubric": own})]
    scorer = build_scorer([f"judge:{tiny_model}"], rubric=str(rubric_file), batch_size=3)
    out = scorer.score_records(recs)

    def direct(prompt, completion, item):
        text = judge_prompt(tok, prompt, completion, item)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0, -1].double(), -1)
        return (probs[yes].sum() / (probs[yes].sum() + probs[no].sum())).item()

    file_items = load_rubric_file(str(rubric_file))
    for comp in out[0]["completions"]:
        ps = [direct("Say hi", comp["text"], it) for it in file_items]
        assert [j["p_yes"] for j in comp["judge"]] == pytest.approx(ps, abs=1e-5)
        assert [j["kind"] for j in comp["judge"]] == ["hard", "principle"]
        want = 0.0 if ps[0] < 0.5 else ps[1]
        assert comp["score"] == pytest.approx(want, abs=1e-5)
    # meta.rubric takes precedence over --rubric
    [jb] = out[1]["completions"][0]["judge"]
    assert jb["text"] == "Mentions the sky"
    assert jb["p_yes"] == pytest.approx(direct("Explain the sky", "blue", own[0]), abs=1e-5)
    assert out[1]["completions"][0]["score"] == pytest.approx(jb["p_yes"], abs=1e-9)
    text = judge_prompt(tok, "Say hi", "hi there", file_items[1])
    assert "Question: Does the response satisfy this principle: The response is polite." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_judge_without_rubric_and_bad_rubric(tiny_model, cli, tmp_path):
    scorer = build_scorer([f"judge:{tiny_model}"])
    [out] = scorer.score_records([samples(texts=("x",))])
    assert "score" not in out["completions"][0]
    assert scorer.stats[f"missing:judge:{tiny_model}"] == 1
    inp = write_jsonl(tmp_path / "s.jsonl", [samples(texts=("x",), meta={"rubric": [{"kind": "hard"}]})])
    r = cli(["score", "-s", f"judge:{tiny_model}", inp])
    assert r.code == 3 and f"{inp}:1: meta.rubric[0].text" in r.err


# --- calibration -------------------------------------------------------------------------------

def test_calibrated_formula():
    ref = [0.0, 1.0, 1.0, 3.0]
    assert calibrated(1.0, ref) == (1 + 0.5 * 2) / 4
    assert calibrated(5.0, ref) == 1.0
    assert calibrated(-1.0, ref) == 0.0
    assert calibrated(2.0, ref) == 0.75


def test_calibrate_and_transform(cli, tmp_path):
    # length:10:4 on word counts -> reference scores per prompt
    w = lambda n: " ".join(["w"] * n)  # noqa: E731
    ref = write_jsonl(tmp_path / "ref.jsonl", [
        samples("a", texts=(w(2), w(7), w(8), w(12))),       # 0, -0.25, -0.5, -1
        samples("other-id", prompt="Q2", texts=(w(9), w(9))),  # -0.75 twice (found by prompt)
    ])
    recs = [samples("a", texts=(w(7), w(1), w(11))), samples("b", prompt="Q2", texts=(w(9),))]
    scorer = build_scorer(["length:10:4"], calibrate=str(ref))
    a, b = scorer.score_records([json.loads(json.dumps(r)) for r in recs])
    # -0.25 among [-1, -0.5, -0.25, 0]: below 2, tie 1 -> (2 + 0.5) / 4
    assert [c["score"] for c in a["completions"]] == [2.5 / 4, 3.5 / 4, 0.5 / 4]
    assert [c["score_raw"] for c in a["completions"]] == [-0.25, 0.0, -1.0]
    assert b["completions"][0]["score"] == 0.5
    t = build_scorer(["length:10:4"], calibrate=str(ref), transform="exp:2")
    a2, _ = t.score_records([json.loads(json.dumps(r)) for r in recs])
    assert [c["score"] for c in a2["completions"]] == pytest.approx(
        [math.exp(2 * 2.5 / 4), math.exp(2 * 3.5 / 4), math.exp(2 * 0.5 / 4)])
    fn = t.reward_fn()
    assert fn(prompts=["Say hi"], completions=[w(7)]) == pytest.approx([math.exp(2 * 2.5 / 4)])
    # CLI: a prompt without reference scores -> exit 3 with the line
    inp = write_jsonl(tmp_path / "s.jsonl", [samples("a"), samples("zz", prompt="unseen")])
    r = cli(["score", "-s", "length:10:4", "--calibrate", ref, inp])
    assert r.code == 3 and f"{inp}:2: id: no reference scores for prompt id 'zz'" in r.err
    r = cli(["score", "-s", "length:10:4", "--calibrate", ref, "--transform", "exp:1", inp,
             "--shard", "0/1"])
    assert r.code == 3


# --- reward_fn ---------------------------------------------------------------------------------

def test_reward_fn(rm_dir):
    scorer = build_scorer(["rules", "length:10:4"], "1,2")
    fn = scorer.reward_fn()
    assert fn.__name__ == "alignkit_rules+length:10:4"
    meta = {"checks": [{"type": "max_words", "n": 3}]}
    got = fn(prompts=["p", "p", "q"], completions=["a b", "a b c d e f g h", "x"],
             meta=[meta, meta, None])
    assert got == [1.0, 0.0 + 2 * -0.5, 0.0]
    only_rules = build_scorer(["rules"]).reward_fn()
    assert only_rules(prompts=["q"], completions=["x"]) == [None]
    # pairwise groups completions by prompt
    pw = build_scorer([f"pairwise:{rm_dir}"]).reward_fn()
    conv = [[{"role": "assistant", "content": t}] for t in ("hi", "hi there", "x")]
    vals = pw(prompts=["p", "p", "q"], completions=conv)
    assert vals[0] + vals[1] == pytest.approx(1.0) and vals[2] == 0.5
