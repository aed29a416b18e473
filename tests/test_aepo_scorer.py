"""`aepo[:K]`: the AEPO adaptive exploration reward (ALGORITHMS.md Part D §7).

Expected values are computed here from the formula R = 1 + 1/sqrt(N*k) (hit at rank k),
1 - 1/N (miss), 0 (empty list), -1 (bad format or duplicate candidates)."""
from __future__ import annotations

import json
import math

import pytest

from alignkit.errors import DataError, UsageError
from alignkit.scorers import build_scorer
from alignkit.scorers.aepo import (aepo_reward, first_correct_rank, is_degenerate, normalise,
                                   parse_candidates)
from conftest import write_jsonl


# --- the formula ------------------------------------------------------------------------
def test_reward_first_candidate_right():
    assert aepo_reward([True]) == 2.0                       # N=1, k=1: 1 + 1/1
    assert aepo_reward([True, False, False], 5) == pytest.approx(1 + 1 / math.sqrt(3))


def test_reward_third_right():
    # N=4, first correct at rank 3 -> 1 + 1/sqrt(12) (a later correct one does not matter)
    assert aepo_reward([False, False, True, True], 5) == pytest.approx(1 + 1 / math.sqrt(12))
    assert first_correct_rank([False, False, True, True]) == 3


def test_reward_none_right():
    assert aepo_reward([False, False, False, False], 5) == pytest.approx(1 - 1 / 4)
    assert aepo_reward([False], 5) == 0.0                   # 1 - 1/1


def test_reward_more_than_k_candidates():
    # 7 flags with k=3: only the first 3 count (N=3); the hit at rank 5 is dropped
    assert aepo_reward([False] * 4 + [True] + [False] * 2, 3) == pytest.approx(1 - 1 / 3)
    assert aepo_reward([False, True] + [False] * 5, 3) == pytest.approx(1 + 1 / math.sqrt(6))
    assert first_correct_rank([False] * 4 + [True], 3) is None


def test_reward_empty_invalid_degenerate():
    assert aepo_reward([], 5) == 0.0                        # R_fmt 1 + R_acc -1
    assert aepo_reward([True], 5, valid=False) == -1.0
    assert aepo_reward([True, False], 5, degenerate=True) == -1.0
    with pytest.raises(ValueError):
        aepo_reward([True], 0)


# --- parsing ----------------------------------------------------------------------------
def test_normalise():
    assert normalise("  The   ANSWER. ") == "the answer"
    assert normalise('"$42$"') == "42"
    assert normalise("`Paris`!") == "paris"


@pytest.mark.parametrize("text, expected", [
    ('["Paris", "Lyon"]', ["Paris", "Lyon"]),
    ('<think>maybe [1] or 2</think>\nMy answers: ["4", 5]', ["4", "5"]),
    ("[]", []),
    ("Some thinking.\n1. Paris\n2) Lyon\nAnswer 3: Nice\nCandidate 4 - Lille\nbye",
     ["Paris", "Lyon", "Nice", "Lille"]),
    ("<think>1. wrong\n2. wronger</think>\nanswer 1: right", ["right"]),
    ("Paris, I think.", None),
    ("the list [not json", None),
    ("", None),
])
def test_parse_candidates(text, expected):
    assert parse_candidates(text) == expected


def test_is_degenerate():
    assert is_degenerate(["Paris", " paris. "])
    assert not is_degenerate(["Paris", "Lyon"])


# --- the scorer -------------------------------------------------------------------------
def _rec(texts, answer="Paris", rid="q"):
    meta = {} if answer is None else {"answer": answer}
    return {"id": rid, "prompt": "Capital of France?", "meta": meta,
            "completions": [{"text": t} for t in texts]}


def test_scorer_values_and_details():
    texts = ["1. paris", "1. Lyon\n2. Nice\n3. PARIS.", "1. Lyon\n2. Nice",
             "1. Paris\n2. paris", "no list here", "[]",
             "1. a\n2. b\n3. c\n4. Paris"]
    [out] = build_scorer(["aepo:3"]).score_records([_rec(texts)])
    got = [c["scores"]["aepo:3"] for c in out["completions"]]
    want = [2.0, 1 + 1 / math.sqrt(9), 1 - 1 / 2, -1.0, -1.0, 0.0, 1 - 1 / 3]
    assert got == pytest.approx(want)
    details = [c["aepo"] for c in out["completions"]]
    assert details[1] == {"n": 3, "rank": 3, "valid": True}
    assert details[3] == {"n": 2, "rank": None, "valid": False}
    assert details[6] == {"n": 3, "rank": None, "valid": True}   # truncated to K=3


def test_scorer_answer_list_reference_and_default_k():
    texts = ["1. Lutetia", "\n".join(f"{i}. x{i}" for i in range(1, 7)) + "\n7. Paris"]
    [out] = build_scorer(["aepo"]).score_records([_rec(texts, ["Paris", "lutetia"])])
    got = [c["scores"]["aepo"] for c in out["completions"]]
    assert got == pytest.approx([2.0, 1 - 1 / 5])           # default K=5 keeps x1..x5
    rec = _rec(["1. Paris"], None)
    rec["meta"] = {"reference": "paris"}
    [out] = build_scorer(["aepo"]).score_records([rec])
    assert out["completions"][0]["scores"] == {"aepo": 2.0}


def test_scorer_no_answer_is_unscored():
    [out] = build_scorer(["aepo"]).score_records([_rec(["1. Paris"], None)])
    comp = out["completions"][0]
    assert comp["scores"] == {} and "score" not in comp and "aepo" not in comp


def test_bad_spec_and_bad_answer():
    for spec, msg in [("aepo:x", "integer"), ("aepo:0", ">= 1")]:
        with pytest.raises(UsageError, match=msg):
            build_scorer([spec])
    with pytest.raises(DataError, match=r"f.jsonl:7: meta.answer: must be a string"):
        build_scorer(["aepo"]).score_records([_rec(["1. a"], {"x": 1})], [("f.jsonl", 7)])


def test_cli_score_aepo(cli, tmp_path):
    recs = [_rec(["1. Lyon\n2. Paris", "[\"Rome\"]"], rid="a"),
            _rec(["1. Paris"], answer=None, rid="b")]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    out = tmp_path / "o.jsonl"
    r = cli(["score", "--scorer", "aepo:2", str(inp), "-o", str(out)])
    assert r.code == 0, r
    a, b = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["scores"]["aepo:2"] for c in a["completions"]] == pytest.approx(
        [1 + 1 / math.sqrt(4), 0.0])                        # N=2,k=2 ; miss N=1
    assert [c["score"] for c in a["completions"]] == pytest.approx([1.5, 0.0])
    assert b["completions"][0].get("scores", {}) == {} and "score" not in b["completions"][0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [_rec(["1. a"], answer=[])])
    r = cli(["score", "--scorer", "aepo", str(bad)])
    assert r.code == 3 and "bad.jsonl:1" in r.err and "meta.answer" in r.err


@pytest.mark.slow
def test_smollm2_candidate_lists_get_the_formula_values(cli, smollm2, tmp_path):
    """SmolLM2 proposes candidate answers; each score is one of the values the formula
    allows for its own (N, rank): 1 + 1/sqrt(N*k), 1 - 1/N, 0 or -1."""
    import math
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "cap", "prompt": "List up to three guesses, one per numbered line (1., 2., 3.), "
                                "for the capital of France.", "meta": {"answer": "Paris"}},
        {"id": "num", "prompt": "Give up to three candidate answers as a numbered list: what "
                                "is 6 times 7?", "meta": {"answer": "42"}}])
    samples, out = tmp_path / "s.jsonl", tmp_path / "o.jsonl"
    r = cli(["gen-pairs", prompts, "-m", smollm2, "-n", "2", "--max-new-tokens", "48",
             "--temperature", "0.7", "--seed", "0", "-o", samples])
    assert r.code == 0, r
    r = cli(["score", "-s", "aepo:3", samples, "-o", out])
    assert r.code == 0, r
    for rec in map(json.loads, out.read_text().splitlines()):
        for c in rec["completions"]:
            a, s = c["aepo"], c["score"]
            if not a["valid"]:
                assert s == -1.0
            elif a["n"] == 0:
                assert s == 0.0
            elif a["rank"]:
                assert 1 <= a["rank"] <= a["n"] <= 3
                assert s == pytest.approx(1 + 1 / math.sqrt(a["n"] * a["rank"]))
            else:
                assert s == pytest.approx(1 - 1 / a["n"])
