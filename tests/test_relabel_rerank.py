"""`relabel --strategy rerank`: pairs from re-ranking by extracted answers, on hand-made
samples whose vote, majority and best-of-N selections are worked out in each test."""
from __future__ import annotations

import json

import pytest

from alignkit.errors import DataError
from alignkit.relabel import relabel
from conftest import write_jsonl


def samples(texts, scores, rid="r", meta=None):
    rec = {"id": rid, "prompt": "What is 2+2?",
           "completions": [{"text": t, "score": s} for t, s in zip(texts, scores)]}
    if meta is not None:
        rec["meta"] = meta
    return rec


def test_vote_picks_the_heaviest_answer_and_pairs_it_against_the_lowest_other():
    # answers 4 (0.9 + 0.2 = 1.1), 5 (0.8), none (0.1): the vote is 4; chosen = the best
    # completion saying 4 (c0), rejected = the lowest of the others (c3, no answer)
    rec = samples(["The answer is \\boxed{4}", "So 4.", "It is 5", "no idea"],
                  [0.9, 0.2, 0.8, 0.1], meta={"answer": 4})
    [pair] = relabel([rec], "rerank")
    assert (pair["id"], pair["chosen"], pair["rejected"]) == ("r-0-3", rec["completions"][0]["text"],
                                                              "no idea")
    assert pair["margin"] == pytest.approx(0.8)
    assert pair["meta"]["rerank"] == {"select": "vote", "answer": "4", "correct": True,
                                      "votes": {"4": pytest.approx(1.1), "5": 0.8}}
    assert pair["meta"]["answer"] == 4


def test_best_of_n_and_vote_disagree_and_the_margin_may_be_negative():
    # 5: 0.95 alone; 4: 0.5 + 0.5 + 0.1 = 1.1. best-of-N says 5 (c0 vs the lowest other, c3);
    # the vote says 4: chosen c1 (first of the tied 0.5s), rejected c0 (the only other)
    rec = samples(["\\boxed{5}", "4", "4", "4"], [0.95, 0.5, 0.5, 0.1])
    [best] = relabel([json.loads(json.dumps(rec))], "rerank", select="best")
    assert (best["id"], best["meta"]["rerank"]["answer"]) == ("r-0-3", "5")
    assert best["meta"]["rerank"]["votes"] == {"5": 1.0, "4": 3.0}
    [vote] = relabel([json.loads(json.dumps(rec))], "rerank")
    assert (vote["id"], vote["meta"]["rerank"]["answer"]) == ("r-1-0", "4")
    assert vote["margin"] == pytest.approx(-0.45)
    assert "correct" not in vote["meta"]["rerank"]  # no meta.answer: nothing to grade


def test_weighted_vote_and_majority_disagree():
    # 5: 0.9 + 0.9 = 1.8 against 4: 3 x 0.3 = 0.9; by count 4 wins 3 to 2
    rec = samples(["5", "5", "4", "4", "4"], [0.9, 0.9, 0.3, 0.3, 0.3], meta={"answer": "4"})
    [vote] = relabel([json.loads(json.dumps(rec))], "rerank", select="vote")
    [major] = relabel([json.loads(json.dumps(rec))], "rerank", select="majority")
    assert (vote["id"], vote["meta"]["rerank"]["correct"]) == ("r-0-2", False)
    assert (major["id"], major["meta"]["rerank"]["correct"]) == ("r-2-0", True)
    assert major["meta"]["rerank"]["votes"] == {"5": 2.0, "4": 3.0}


def test_no_pair_when_every_completion_agrees_or_none_answers():
    assert relabel([samples(["4", "\\boxed{4.0}"], [0.3, 0.9])], "rerank") == []
    assert relabel([samples(["yes", "no"], [0.3, 0.9])], "rerank") == []


def test_negative_weights_refuse_the_vote_but_not_best_of_n():
    rec = samples(["4", "5"], [-1.0, 0.5])
    with pytest.raises(DataError) as e:
        relabel([json.loads(json.dumps(rec))], "rerank")
    assert e.value.field == "completions[0].score"
    [pair] = relabel([rec], "rerank", select="best")
    assert pair["meta"]["rerank"]["answer"] == "5"


def test_cli_writes_the_pairs_and_refuses_a_bad_select(cli, tmp_path):
    recs = [samples(["\\boxed{5}", "4", "4", "4"], [0.95, 0.5, 0.5, 0.1], rid="a"),
            samples(["4", "4"], [0.1, 0.2], rid="b")]
    src = write_jsonl(tmp_path / "s.jsonl", recs)
    out = tmp_path / "p.jsonl"
    r = cli(["relabel", "--strategy", "rerank", "--select", "majority", src, "-o", out])
    assert r.code == 0, r
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["a-1-0"]
    r = cli(["relabel", "--strategy", "rerank", "--select", "median", src])
    assert r.code == 2 and "--select" in r.err
    bad = write_jsonl(tmp_path / "bad.jsonl", [recs[0], samples(["4", "5"], [-2.0, 1.0])])
    r = cli(["relabel", "--strategy", "rerank", bad, "-o", tmp_path / "x.jsonl"])
    assert r.code == 3 and "bad.jsonl:2" in r.err and "completions[0].score" in r.err
    assert not (tmp_path / "x.jsonl").exists()
