"""`alignkit relabel`: every strategy with exact outputs, margins/ties, dedupe,
length balance, filters, errors, and the score | relabel pipeline."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from alignkit.errors import DataError, UsageError
from alignkit.relabel import (GOAL_TEMPLATE, STRATEGIES, RelabelOptions, Relabeler, bt_loss,
                              format_goal, goal_score, length_balance, quantile, relabel,
                              with_goal)
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def sig(x):
    return 1 / (1 + math.exp(-x))


def scored(rid, scores, texts=None, prompt="P", logps=None, meta=None, **extra):
    texts = texts or [f"c{i}" for i in range(len(scores))]
    comps = []
    for i, (t, s) in enumerate(zip(texts, scores)):
        c = {"text": t, "scores": {"rules": s} if s is not None else {}}
        if s is not None:
            c["score"] = s
        if logps:
            c["logp"] = logps[i]
        comps.append(c)
    rec = {"id": rid, "prompt": prompt, "completions": comps, **extra}
    if meta is not None:
        rec["meta"] = meta
    return rec


def goal(g):
    return GOAL_TEMPLATE.format(g=g)


def test_registry():
    assert set(STRATEGIES.names()) == {"best-worst", "all-pairs", "top-k", "reward-augmented",
                                       "rank", "unpaired", "sppo", "filter", "referee-tasks",
                                       "exec-trace", "rerank", "step-prompts", "near-miss"}
    assert STRATEGIES.names()[0] == "best-worst"  # the default comes first


def _flags(text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def test_help_lists_every_strategy_and_its_flags(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    r = cli(["relabel", "--help"])
    assert r.code == 0, r
    flags = _flags(r.out)
    for e in STRATEGIES:
        assert re.search(rf"(?<![\w-]){re.escape(e.name)}(?![\w-])", r.out), e.name
        for p in e.params:
            assert p.flag_name in flags, (e.name, p.flag_name)
    # the scorer flags of the shared group, and the old spellings of two of them
    assert {"--scorer-batch-size", "--batch-size", "--scorer-max-length", "--max-length",
            "--aggregate", "--user"} <= flags


def test_unknown_strategy_and_flags_of_another_strategy_exit_2(cli, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [scored("a", [1.0, 0.0])])
    r = cli(["relabel", "--strategy", "best-wrst", path])
    assert r.code == 2 and "did you mean 'best-worst'" in r.err
    r = cli(["relabel", "--k", "2", path])  # --k is top-k's
    assert r.code == 2 and "--k does not apply to relabel strategy 'best-worst'" in r.err
    r = cli(["relabel", "--strategy", "top-k", "--k", "0", path])
    assert r.code == 2 and "--k must be >= 1" in r.err
    with pytest.raises(UsageError, match="--threshold does not apply"):
        Relabeler("rank", RelabelOptions(threshold=0.5))


def test_scorer_options_reach_the_filter_scorers(tmp_path, monkeypatch):
    """--agree scorers are built from the shared scorer options (and the old
    score_options spelling still maps onto them)."""
    from alignkit.scorers.options import ScorerOptions
    seen = []

    def build(self, specs, weights=None, *, dtype="auto", **kw):
        seen.append((list(specs), self.scorer_batch_size, self.user, dtype))
        raise UsageError("stop")

    monkeypatch.setattr(ScorerOptions, "build", build)
    with pytest.raises(UsageError, match="stop"):
        relabel(_pairs(), "filter", agree=["rules"], scoring=ScorerOptions(user="u1"),
                dtype="float32")
    with pytest.raises(UsageError, match="stop"):
        relabel(_pairs(), "filter", agree="rules", score_options={"batch_size": 3})
    assert seen == [(["rules"], 8, "u1", "float32"), (["rules"], 3, None, "auto")]


# --- pair strategies ---------------------------------------------------------------------

def test_best_worst_exact_record():
    rec = scored("s1", [0.5, 1.0, 0.0, 1.0], logps=[-1.0, -2.0, -3.0, -4.0],
                 meta={"checks": []}, gen={"model": "m"})
    [pair] = relabel([rec])
    assert pair == {
        "id": "s1-1-2", "prompt": "P", "chosen": "c1", "rejected": "c2",
        "score_chosen": 1.0, "score_rejected": 0.0, "margin": 1.0,
        "scores_chosen": {"rules": 1.0}, "scores_rejected": {"rules": 0.0},
        "ref_logp_chosen": -2.0, "ref_logp_rejected": -3.0,
        "gen": {"model": "m"}, "meta": {"checks": []}}


def test_ties_min_margin_and_unscored():
    recs = [scored("tie", [0.3, 0.3]), scored("small", [0.3, 0.25]),
            scored("ok", [0.0, None, 0.5]), scored("one", [0.9, None])]
    r = Relabeler("best-worst", RelabelOptions(min_margin=0.1))
    out = list(r.run(recs))
    assert [p["id"] for p in out] == ["ok-2-0"]
    assert "ref_logp_chosen" not in out[0]
    s = r.summary
    assert (s["tie"], s["below min-margin"], s["unscored completion"],
            s["fewer than 2 scored completions"]) == (1, 1, 2, 1)
    assert r.summary_text() == (
        "relabel best-worst: read 4 records, wrote 1 pairs; dropped: below min-margin 1, "
        "fewer than 2 scored completions 1, tie 1, unscored completion 2")


def test_min_chosen_keeps_only_pairs_whose_chosen_reaches_the_bar(cli, tmp_path):
    recs = [scored("good", [1.0, 0.2]), scored("meh", [0.6, 0.1]), scored("both", [1.0, 0.9, 0.0])]
    r = Relabeler("all-pairs", RelabelOptions(min_chosen=1.0))
    out = list(r.run(recs))
    assert [p["id"] for p in out] == ["good-0-1", "both-0-1", "both-0-2"]
    assert r.summary["chosen below min-chosen"] == 2  # meh-0-1 and both-1-2
    path = write_jsonl(tmp_path / "s.jsonl", recs)
    res = cli(["relabel", "--min-chosen", "0.95", path])
    assert res.code == 0 and [p["id"] for p in res.records] == ["good-0-1", "both-0-2"]
    assert "chosen below min-chosen 1" in res.err
    for bad in (["--min-chosen", "nan"], ["--strategy", "rank", "--min-chosen", "1"]):
        res = cli(["relabel", *bad, path])
        assert res.code == 2 and "--min-chosen" in res.err


def test_finished_only_pairs_only_completions_that_ended(cli, tmp_path):
    """A cut sample (finished: false) is neither chosen nor rejected with --finished-only;
    a record whose every sample was cut gives no pair; without it the cut one is rejected."""
    rec = scored("x", [1.0, 0.0, 0.5], texts=["good", "cut", "fair"])
    rec["completions"][1]["finished"] = False
    rec["completions"][0]["finished"] = True
    allcut = scored("y", [1.0, 0.0])
    for c in allcut["completions"]:
        c["finished"] = False
    r = Relabeler("best-worst", RelabelOptions(finished_only=True))
    out = list(r.run([rec, allcut]))
    assert [(p["chosen"], p["rejected"]) for p in out] == [("good", "fair")]
    assert r.summary["cut completions"] == 3 and r.summary["records with every completion cut"] == 1
    # ids name the input's completions (fair is completion 2), and no bookkeeping leaks out
    assert out[0]["id"] == "x-0-2" and not [k for k in out[0] if k.startswith("_")]
    ranked = list(Relabeler("rank", RelabelOptions(finished_only=True)).run([rec]))
    assert [c["text"] for c in ranked[0]["completions"]] == ["good", "fair"]
    assert not [k for k in ranked[0] if k.startswith("_")]
    unp = relabel([rec], "unpaired", finished_only=True, threshold=0.7)
    assert [u["id"] for u in unp] == ["x-0", "x-2"]
    # an input record that carries the bookkeeping key itself does not steer the ids
    forged = {**rec, "_kept_completions": [7, 8, 9]}
    assert [p["id"] for p in relabel([forged], "best-worst")] == ["x-0-1"]
    assert [p["id"] for p in relabel([forged], "best-worst", finished_only=True)] == ["x-0-2"]
    assert [(p["chosen"], p["rejected"]) for p in Relabeler("best-worst", RelabelOptions()).run(
        [rec])] == [("good", "cut")]
    path = write_jsonl(tmp_path / "s.jsonl", [rec, allcut])
    res = cli(["relabel", "--finished-only", path])
    assert res.code == 0 and [p["rejected"] for p in res.records] == ["fair"]
    assert "read 2 records" in res.err and "cut completions 3" in res.err


def test_a_finished_flag_that_is_not_a_boolean_is_a_data_error(cli, tmp_path):
    """`"finished": "no"` would count as finished under --finished-only; it is refused
    with its line and field, exit 3, and no output is written."""
    good = scored("a", [1.0, 0.0])
    bad = scored("b", [1.0, 0.0])
    bad["completions"][1]["finished"] = "no"
    path = write_jsonl(tmp_path / "s.jsonl", [good, bad])
    out = tmp_path / "pairs.jsonl"
    res = cli(["relabel", "--finished-only", path, "-o", str(out)])
    assert res.code == 3 and ":2:" in res.err and "completions[1].finished" in res.err
    assert "expected boolean" in res.err and not out.exists()


def test_all_pairs():
    out = relabel([scored("s", [0.2, 0.8, 0.2, 0.5])], "all-pairs")
    assert [(p["id"], p["margin"]) for p in out] == [
        ("s-1-0", pytest.approx(0.6)), ("s-3-0", pytest.approx(0.3)), ("s-1-2", pytest.approx(0.6)),
        ("s-1-3", pytest.approx(0.3)), ("s-3-2", pytest.approx(0.3))]  # 0-2 is a tie


def test_top_k():
    rec = scored("s", [0.1, 0.9, 0.5, 0.7, 0.3])
    out = relabel([rec], "top-k", k=2)
    assert [p["id"] for p in out] == ["s-1-0", "s-3-4"]
    assert [p["id"] for p in relabel([rec], "top-k", k=9)] == ["s-1-0", "s-3-4"]  # k <= n // 2
    assert [p["id"] for p in relabel([rec], "top-k", k=1)] == \
        [p["id"] for p in relabel([rec], "best-worst")]
    with pytest.raises(UsageError):
        Relabeler("top-k", RelabelOptions(k=0))


def test_sppo_from_scores_and_from_pairwise():
    s = [1.0, 0.0, 2.0]
    [pair] = relabel([scored("s", s)], "sppo")
    p = [sum(sig(si - sj) for sj in s) / 3 for si in s]
    assert pair["id"] == "s-2-1"
    assert pair["p_win"] == {"chosen": pytest.approx(p[2]), "rejected": pytest.approx(p[1])}
    assert (pair["p_win_chosen"], pair["p_win_rejected"]) == (pair["p_win"]["chosen"],
                                                               pair["p_win"]["rejected"])
    rec = scored("t", s)
    for c, pw in zip(rec["completions"], [0.4, 0.1, 0.5]):
        c["p_win"] = pw
    [pair] = relabel([rec], "sppo")
    assert pair["p_win"] == {"chosen": 0.5, "rejected": 0.1}


# --- reward-augmented --------------------------------------------------------------------

def test_goal_formatting_and_scale():
    assert format_goal(7) == "7" and format_goal(7.0) == "7" and format_goal(7.5) == "7.5"
    assert goal_score(8.0, None) == 8 and isinstance(goal_score(8.0, None), int)
    assert goal_score(0.5, (0, 1)) == 5.5
    assert goal_score(1.0, (0, 1)) == 10 and goal_score(0.0, (0, 1)) == 1
    assert goal_score(2.0, (0, 1)) == 10  # clamped
    assert goal_score(0.3, (0, 1)) == 3.7


def test_reward_augmented_system_variant():
    """The samples' logp were computed under the prompt without the goal sentence: the
    augmented records carry no ref_logp_* (the trainer computes the reference)."""
    rec = scored("s", [8.0, 3.5], texts=["good", "bad"], logps=[-1.0, -2.0], meta={"u": 1})
    a, b = relabel([rec], "reward-augmented")
    assert a == {"id": "s-0-1-a",
                 "prompt": [{"role": "system", "content": goal("8")},
                            {"role": "user", "content": "P"}],
                 "chosen": "good", "rejected": "bad", "score_chosen": 8.0, "score_rejected": 3.5,
                 "scores_chosen": {"rules": 8.0}, "scores_rejected": {"rules": 3.5},
                 "meta": {"u": 1}, "goal": 8}
    assert b == {"id": "s-0-1-b",
                 "prompt": [{"role": "system", "content": goal("3.5")},
                            {"role": "user", "content": "P"}],
                 "chosen": "bad", "rejected": "good", "score_chosen": 3.5, "score_rejected": 8.0,
                 "scores_chosen": {"rules": 3.5}, "scores_rejected": {"rules": 8.0},
                 "meta": {"u": 1}, "goal": 3.5}
    assert goal("8").endswith("(on a scale of 1-10, where 1 is lowest and 10 is highest):\n"
                              "Overall score: 8.")


def test_reward_augmented_no_system_scale_and_pairs(cli, tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert with_goal(msgs, 5, False)[0] == {"role": "system", "content": goal("5") + "\n\nS"}
    assert with_goal(msgs, 5, True) == [{"role": "system", "content": "S"},
                                         {"role": "user", "content": goal("5") + "\n\nQ"}]
    pairs = [{"id": "p1", "prompt": "Q", "chosen": "A", "rejected": "B",
              "score_chosen": 1.0, "score_rejected": 0.5, "p_win": {"chosen": 0.6, "rejected": 0.4}},
             {"id": "p2", "prompt": "Q", "chosen": "A", "rejected": "B"}]
    inp = write_jsonl(tmp_path / "pairs.jsonl", pairs[:1])
    r = cli(["relabel", "--strategy", "reward-augmented", "--no-system", "--scale", "0:1", inp])
    assert r.code == 0, r
    a, b = r.records
    assert a["prompt"] == goal("10") + "\n\nQ" and a["goal"] == 10
    assert b["prompt"] == goal("5.5") + "\n\nQ" and b["goal"] == 5.5
    assert (b["chosen"], b["rejected"], b["p_win"]) == ("B", "A", {"chosen": 0.4, "rejected": 0.6})
    assert "margin" not in a and "margin" not in b
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs)
    r = cli(["relabel", "--strategy", "reward-augmented", bad])
    assert r.code == 3 and f"{bad}:2: score_chosen: missing required field" in r.err
    assert cli(["relabel", "--strategy", "reward-augmented", "--scale", "1:1", inp]).code == 2
    assert cli(["relabel", "--strategy", "reward-augmented", "--scale", "a:b", inp]).code == 2


def test_reward_augmented_drops_stale_reference_values_keeps_cut_flags(cli, tmp_path):
    """Pairs in (e.g. from gen-pairs) with ref_logp_* and a cut side: the reference values
    were computed under the old prompt and go; finished_* describe the (unchanged)
    completions and stay, swapped with their side in the -b record."""
    pair = {"id": "p", "prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 7.0,
            "score_rejected": 2.0, "margin": 5.0, "ref_logp_chosen": -1.5,
            "ref_logp_rejected": -4.0, "finished_chosen": True, "finished_rejected": False,
            "gen": {"model_sha256": "abc"}}
    r = cli(["relabel", "--strategy", "reward-augmented",
             write_jsonl(tmp_path / "p.jsonl", [pair])])
    assert r.code == 0, r
    a, b = r.records
    for rec in (a, b):
        assert not [k for k in rec if k.startswith("ref_")], rec
        assert rec["gen"] == {"model_sha256": "abc"} and rec["prompt"] != "Q"
    assert (a["chosen"], a["finished_chosen"], a["finished_rejected"]) == ("A", True, False)
    assert (b["chosen"], b["finished_chosen"], b["finished_rejected"]) == ("B", False, True)


def _ref_source(rec_in):
    """{(prompt, completion text): logp} of a samples record (or a pair's two sides)."""
    if "completions" in rec_in:
        return {(json.dumps(rec_in["prompt"]), json.dumps(c["text"])): c["logp"]
                for c in rec_in["completions"] if "logp" in c}
    return {(json.dumps(rec_in["prompt"]), json.dumps(rec_in[s])): rec_in[f"ref_logp_{s}"]
            for s in ("chosen", "rejected") if f"ref_logp_{s}" in rec_in}


def _ref_claims(out):
    """[((prompt, completion text), reference value)] that an output record vouches for."""
    p = json.dumps(out["prompt"])
    claims = [((p, json.dumps(out[s])), out[f"ref_logp_{s}"]) for s in ("chosen", "rejected")
              if f"ref_logp_{s}" in out]
    if "ref_logp" in out:
        claims.append(((p, json.dumps(out["completion"])), out["ref_logp"]))
    for c in out.get("completions", []):  # a ranking keeps its completions' logp
        if "logp" in c:
            claims.append(((p, json.dumps(c["text"])), c["logp"]))
    return claims


@pytest.mark.parametrize("name", sorted(e.name for e in STRATEGIES  # prompt writers carry no texts
                                         if e.name != "filter" and e.writes != "prompt"))
def test_no_strategy_keeps_a_reference_value_for_text_it_changed(name):
    """Every reference value in any strategy's output was computed for exactly that
    (prompt, completion) text in the input; the strategies that keep the texts keep the
    values (so the check is not vacuous)."""
    samples = scored("s", [0.9, 0.1, 0.5, 0.3], logps=[-1.0, -2.0, -3.0, -4.0],
                     prompt=[{"role": "user", "content": "P"}])
    pair = {"id": "p", "prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 0.8,
            "score_rejected": 0.2, "ref_logp_chosen": -1.0, "ref_logp_rejected": -2.0}
    entry = STRATEGIES.get(name)
    extra = {"threshold": 0.4} if name == "unpaired" else {}
    inputs = [samples] if "samples" in entry.reads else []
    inputs += [pair] if "pair" in entry.reads else []
    claimed = 0
    for rec in inputs:
        source = _ref_source(rec)
        outs = relabel([json.loads(json.dumps(rec))], name, **extra)
        assert outs
        for out in outs:
            for key, value in _ref_claims(out):
                assert source.get(key) == value, (name, key, value)
                claimed += 1
    if name == "reward-augmented":
        assert claimed == 0
    else:
        assert claimed > 0


def test_filter_keeps_texts_and_their_reference_values():
    pairs = [{"id": f"p{i}", "prompt": "Q", "chosen": f"A{i}", "rejected": "B",
              "score_chosen": float(i), "score_rejected": 0.0, "ref_logp_chosen": -1.0 - i,
              "ref_logp_rejected": -9.0} for i in (1, 2, 3)]
    out = relabel(json.loads(json.dumps(pairs)), "filter", keep=0.5)
    assert out == [p for p in pairs if p["id"] in ("p2", "p3")]


def test_samples_with_a_duplicate_id_exit_3_at_its_line(cli, tmp_path):
    """A samples file holds one record per prompt: a repeated id is an error at its line,
    before any pair is written (pairs may repeat ids)."""
    recs = [scored("a", [1.0, 0.0]), scored("b", [1.0, 0.0]), scored("a", [0.5, 0.0])]
    path = write_jsonl(tmp_path / "dup.jsonl", recs)
    out = tmp_path / "out.jsonl"
    r = cli(["relabel", path, "-o", out])
    assert r.code == 3 and f"{path}:3: id: duplicate id 'a'" in r.err, r
    assert not out.exists()
    with pytest.raises(DataError, match="duplicate id 'a'"):
        relabel(recs)
    pairs = [{"id": "x", "prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 1.0,
              "score_rejected": 0.0}] * 2
    assert len(relabel(pairs, "reward-augmented")) == 4


# --- rank, unpaired ------------------------------------------------------------------------

def test_rank():
    rec = scored("s", [0.2, None, 0.9, 0.2])
    [out] = relabel([rec], "rank")
    assert [c["text"] for c in out["completions"]] == ["c2", "c0", "c3"]
    assert out["id"] == "s" and all("score" in c for c in out["completions"])
    assert relabel([scored("x", [0.1, None])], "rank") == []


def test_unpaired_threshold_and_quantile(cli, tmp_path):
    recs = [scored("a", [0.1, 0.9], logps=[-1.0, -2.0], meta={"k": 1}), scored("b", [0.5, 0.3])]
    out = relabel(recs, "unpaired", threshold=0.5)
    assert out[0] == {"id": "a-0", "prompt": "P", "completion": "c0", "label": False,
                      "score": 0.1, "ref_logp": -1.0, "meta": {"k": 1}}
    assert [(u["id"], u["label"]) for u in out] == [("a-0", False), ("a-1", True),
                                                    ("b-0", True), ("b-1", False)]
    # quantile 0.25 of [0.1, 0.3, 0.5, 0.9] (linear) = 0.1 + 0.75 * 0.2 = 0.25
    assert quantile([0.9, 0.1, 0.5, 0.3], 0.25) == pytest.approx(0.25)
    out = relabel(recs, "unpaired", quantile=0.25)
    assert [u["label"] for u in out] == [False, True, True, True]
    out = relabel(recs, "unpaired")  # default: median 0.4
    assert [u["label"] for u in out] == [False, True, True, False]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    r = cli(["relabel", "--strategy", "unpaired", "--quantile", "0.25", inp])
    assert r.code == 0 and "threshold 0.25" in r.err and "3 desirable, 1 undesirable" in r.err
    assert cli(["relabel", "--strategy", "unpaired", "--quantile", "0.2", "--threshold", "1",
                inp]).code == 2
    assert cli(["relabel", "--strategy", "unpaired", "--quantile", "2", inp]).code == 2


# --- filter ------------------------------------------------------------------------------

def _pairs():
    return [
        {"id": "p0", "prompt": "Q", "chosen": "a b", "rejected": "a b c d",
         "score_chosen": 1.0, "score_rejected": 0.0},
        {"id": "p1", "prompt": "Q", "chosen": "a b c d e", "rejected": "a",
         "score_chosen": 0.6, "score_rejected": 0.5},
        {"id": "p2", "prompt": "Q", "chosen": "a", "rejected": "a b",
         "score_chosen": 2.0, "score_rejected": -1.0},
        {"id": "p3", "prompt": "Q", "chosen": "x", "rejected": "y",
         "score_chosen": 0.0, "score_rejected": 0.4},
    ]


def test_filter_keep_by_own_scores():
    assert bt_loss(0.0) == pytest.approx(math.log(2))
    assert bt_loss(-800.0) == pytest.approx(800.0) and bt_loss(800.0) == pytest.approx(0.0)
    out = relabel(_pairs(), "filter", keep=0.5)
    assert [p["id"] for p in out] == ["p0", "p2"]  # margins 1 and 3: smallest BT loss
    assert all("_bt_loss" not in p for p in out)
    assert [p["id"] for p in relabel(_pairs(), "filter", keep=0.6)] == ["p0", "p1", "p2"]  # ceil(2.4)


def test_filter_agree_computes_and_reuses_scores(tmp_path):
    f = tmp_path / "lenrw.py"
    f.write_text("def shorter(prompts, completions, **kw):\n"
                 "    return [-float(len(c.split())) for c in completions]\n")
    spec = f"python:{f}:shorter"
    pairs = _pairs()
    # stored scores are reused (not recomputed): p1's stored verdict says chosen wins
    pairs[1]["scores_chosen"], pairs[1]["scores_rejected"] = {spec: 5.0}, {spec: 0.0}
    r = Relabeler("filter", RelabelOptions(agree=[spec]))
    assert [p["id"] for p in r.run(pairs)] == ["p0", "p1", "p2"]
    assert r.summary["scorers disagree"] == 1
    r = Relabeler("filter", RelabelOptions(agree=[spec, "rules"]))
    assert list(r.run(_pairs())) == []  # rules cannot score pairs without meta.checks
    assert r.summary["no score from an --agree scorer"] == 4
    out = relabel(_pairs(), "filter", agree=[spec])
    assert [p["id"] for p in out] == ["p0", "p2"]
    assert out[0]["scores_chosen"] == {spec: -2.0} and out[0]["scores_rejected"] == {spec: -4.0}
    out = relabel(_pairs(), "filter", agree=[spec], keep=0.5)
    assert [p["id"] for p in out] == ["p2"]
    with pytest.raises(UsageError):
        Relabeler("filter", RelabelOptions())
    with pytest.raises(UsageError):
        Relabeler("filter", RelabelOptions(agree=["nope:x"]))


def test_filter_keep_with_rm(tmp_path, tiny_model):
    import torch

    from alignkit.models import load_seq_cls
    from alignkit.scorers.rm import rm_inputs
    rm = tmp_path / "rm"
    torch.manual_seed(0)
    model, tok = load_seq_cls(tiny_model, "float32")
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    pairs = _pairs()
    with torch.no_grad():
        r = {t: model(**tok(rm_inputs(tok, "Q", t), return_tensors="pt",
                            add_special_tokens=False)).logits[0, 0].item()
             for p in pairs for t in (p["chosen"], p["rejected"])}
    losses = [bt_loss(r[p["chosen"]] - r[p["rejected"]]) for p in pairs]
    want = sorted(range(4), key=lambda i: (losses[i], i))[:2]
    out = relabel(pairs, "filter", keep=0.5, rm=str(rm), score_options={"dtype": "float32"})
    assert [p["id"] for p in out] == [f"p{i}" for i in sorted(want)]
    assert out[0]["scores_chosen"][f"rm:{rm}"] == pytest.approx(r[out[0]["chosen"]], abs=1e-5)


# --- dedupe, length balance ----------------------------------------------------------------

def test_dedupe():
    recs = [scored("a", [1.0, 0.0], texts=["x", "y"]), scored("b", [0.7, 0.1], texts=["x", "y"]),
            scored("c", [0.7, 0.1], texts=["x", "z"])]
    r = Relabeler("best-worst", RelabelOptions(dedupe=True))
    assert [p["id"] for p in r.run(recs)] == ["a-0-1", "c-0-1"]
    assert r.summary["duplicate"] == 1


def test_length_balance_rule_and_seed(cli, tmp_path):
    # chosen longer in 3 of 4 pairs; share 0.5: (3 - d) <= 0.5 (4 - d) -> d = 2
    recs = [scored(f"s{i}", [1.0, 0.0], texts=[c, r]) for i, (c, r) in enumerate(
        [("a b c", "a"), ("a b", "a"), ("a", "a b"), ("a b c d", "a b")])]
    pairs = relabel(recs)
    kept, d = length_balance(pairs, 0.5, seed=3)
    dropped = set(random.Random(3).sample([0, 1, 3], 2))
    assert d == 2 and [p["id"] for p in kept] == [p["id"] for i, p in enumerate(pairs)
                                                  if i not in dropped]
    assert length_balance(pairs, 1.0, 0)[1] == 0
    assert [p["id"] for p in length_balance(pairs, 0.0, 0)[0]] == ["s2-0-1"]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    out1, out2 = tmp_path / "o1.jsonl", tmp_path / "o2.jsonl"
    for out in (out1, out2):
        r = cli(["relabel", "--length-balance", "0.5", "--seed", "3", inp, "-o", out])
        assert r.code == 0 and "length-balance 2" in r.err
    assert out1.read_bytes() == out2.read_bytes()
    assert [json.loads(x)["id"] for x in out1.read_text().splitlines()] == [p["id"] for p in kept]
    man = json.loads((tmp_path / "o1.jsonl.alignkit.json").read_text())
    assert man["seed"] == 3 and man["counts"] == {"read": 4, "written": 2}
    assert cli(["relabel", "--strategy", "rank", "--length-balance", "0.5", inp]).code == 2


# --- errors ---------------------------------------------------------------------------------

def test_errors_exit_codes(cli, tmp_path):
    unscored = write_jsonl(tmp_path / "u.jsonl", [scored("a", [1.0, 0.0]),
                                                  {"id": "b", "prompt": "P",
                                                   "completions": [{"text": "x"}, {"text": "y"}]}])
    r = cli(["relabel", unscored])
    assert r.code == 3 and f"{unscored}:2: completions[0].score: missing required field" in r.err
    pair_in = write_jsonl(tmp_path / "p.jsonl", [_pairs()[0]])
    r = cli(["relabel", "--strategy", "best-worst", pair_in])
    assert r.code == 3 and "reads samples records, got a pair record" in r.err
    samples_in = write_jsonl(tmp_path / "s.jsonl", [scored("a", [1.0, 0.0])])
    r = cli(["relabel", "--strategy", "filter", "--keep", "0.5", samples_in])
    assert r.code == 3 and f"{samples_in}:1:" in r.err
    bad_score = write_jsonl(tmp_path / "b.jsonl", [{"id": "a", "prompt": "P",
                                                    "completions": [{"text": "x", "score": "hi"}]}])
    r = cli(["relabel", bad_score])
    assert r.code == 3 and "completions[0].score: expected number" in r.err
    assert cli(["relabel", "--strategy", "nope", samples_in]).code == 2
    assert cli(["relabel", "--strategy", "filter", "--keep", "0", pair_in]).code == 2
    assert cli(["relabel", "--length-balance", "2", samples_in]).code == 2
    with pytest.raises(DataError):
        relabel([{"id": "x", "prompt": "P"}], "filter", keep=0.5)


# --- pipelines -------------------------------------------------------------------------------

def test_score_then_relabel_pipe(cli, tmp_path):
    checks = [{"type": "max_words", "n": 3}, {"type": "include_keywords", "keywords": ["hi"]}]
    recs = [{"id": "a", "prompt": "Say hi", "meta": {"checks": checks},
             "completions": [{"text": "hi there", "logp": -3.0},
                             {"text": "one two three four five", "logp": -5.5},
                             {"text": "hi one two three four", "logp": -4.0}]}]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    scored_out = cli(["score", "--scorer", "rules", inp])
    assert scored_out.code == 0
    r = cli(["relabel"], stdin=scored_out.out)
    assert r.code == 0
    [pair] = r.records
    assert (pair["id"], pair["chosen"], pair["rejected"], pair["margin"]) == \
        ("a-0-1", "hi there", "one two three four five", 1.0)
    assert (pair["ref_logp_chosen"], pair["ref_logp_rejected"]) == (-3.0, -5.5)


@pytest.mark.skipif(not (ROOT / "commands" / "gen_pairs.py").exists(),
                    reason="gen-pairs is not written yet")
def test_full_pipeline_models_gen_pairs_score_relabel(cli, tmp_path):
    m = tmp_path / "m"
    assert cli(["models", "tiny", "--out", m]).code == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "p1", "prompt": "Say hi", "meta": {"checks": [{"type": "max_words", "n": 5}]}},
        {"id": "p2", "prompt": "Write one word",
         "meta": {"checks": [{"type": "max_words", "n": 20}, {"type": "no_commas"}]}}])
    g = cli(["gen-pairs", "--model", m, "-n", "4", "--max-new-tokens", "12", prompts])
    assert g.code == 0, g
    s = cli(["score", "--scorer", "rules"], stdin=g.out)
    assert s.code == 0, s
    for rec in s.records:
        assert len(rec["completions"]) == 4
        for c in rec["completions"]:
            assert c["score"] == sum(x["passed"] for x in c["checks"]) / len(c["checks"])
    r = cli(["relabel"], stdin=s.out)
    assert r.code == 0, r
    for pair in r.records:
        assert pair["score_chosen"] > pair["score_rejected"]
        assert pair["id"].split("-")[0] in ("p1", "p2")


def test_ref_logp_and_finished_flags_travel_with_the_samples(cli, tmp_path):
    """A cut sample's logp has no eos term: it is copied with finished_* false, so that the
    trainers score it without an eos too; pairs of finished samples carry no flags."""
    rec = {"id": "s", "prompt": "p", "completions": [
        {"text": "good", "score": 1.0, "logp": -3.0, "finished": True},
        {"text": "bad", "score": 0.0, "logp": -5.0, "finished": True},
        {"text": "cut", "score": 0.5, "logp": -9.0, "finished": False}]}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    r = cli(["relabel", "--strategy", "all-pairs", path])
    assert r.code == 0, r
    by = {(p["chosen"], p["rejected"]): p for p in r.records}
    assert by[("good", "bad")]["ref_logp_chosen"] == -3.0
    assert by[("good", "bad")]["ref_logp_rejected"] == -5.0
    assert "finished_chosen" not in by[("good", "bad")]
    assert by[("good", "cut")]["ref_logp_rejected"] == -9.0
    assert (by[("good", "cut")]["finished_chosen"], by[("good", "cut")]["finished_rejected"]) \
        == (True, False)
    assert (by[("cut", "bad")]["finished_chosen"], by[("cut", "bad")]["finished_rejected"]) \
        == (False, True)
    r = cli(["relabel", "--strategy", "unpaired", "--threshold", "0.5", path])
    by = {u["completion"]: u for u in r.records}
    assert by["cut"]["finished"] is False and by["cut"]["ref_logp"] == -9.0
    assert "finished" not in by["good"]
