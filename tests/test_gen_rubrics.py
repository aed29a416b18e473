"""`alignkit gen-rubrics`: the list parser on hand-made judge answers, the consistency
filter with stubbed proposer/judge (kept iff score(chosen) > score(rejected), tries,
per-try seeds), and the command on the tiny model (fields, kept rubrics reproduce the
label under `score -s judge:`, errors, determinism)."""
from __future__ import annotations

import hashlib
import json

import pytest

from alignkit.records import validate
from alignkit.rubrics import (PREFILL, Outcome, apply_outcome, consistency_filter,
                              contrastive_prompt, parse_rubric_list, try_seed)
from alignkit.scorers.judge import parse_rubric
from conftest import write_jsonl

TEXTS = ["Cats are small furry animals that purr.", "Dogs bark.",
         "The capital of France is Paris.", "I do not know.", "Two plus two is four.",
         "Water boils at 100 C at sea level.", "Here is a poem about the sea.", "No."]


def pairs(n=6):
    return [{"id": f"p{i}", "prompt": f"Question {i}: tell me something.",
             "chosen": TEXTS[i % 8], "rejected": TEXTS[(i * 3 + 1) % 8],
             "meta": {"src": i}} for i in range(n)]


# --- the parser ------------------------------------------------------------------------

def test_parse_numbered_with_kinds_and_preamble():
    text = ("Here is the rubric:\n"
            "1. Hard rule: The answer is under 50 words.\n"
            "2) **Principle:** Explains the reasoning step by step.\n"
            "  3.   Uses a   polite tone  \n"
            "(4) [Hard rule] - Names the capital city.\n"
            "\nI hope this helps!")
    assert parse_rubric_list(text) == [
        {"text": "The answer is under 50 words.", "kind": "hard"},
        {"text": "Explains the reasoning step by step.", "kind": "principle"},
        {"text": "Uses a polite tone", "kind": "principle"},
        {"text": "Names the capital city.", "kind": "hard"}]


def test_parse_bullets_under_headings_dedupes_and_caps():
    text = ("**Hard rules:**\n- Mentions Paris\n* Answers in one sentence\n"
            "Principles:\n\u2022 Is factually correct\n- mentions paris\n"
            "- Hard-working tone is not a kind prefix\n")
    assert parse_rubric_list(text) == [
        {"text": "Mentions Paris", "kind": "hard"},
        {"text": "Answers in one sentence", "kind": "hard"},
        {"text": "Is factually correct", "kind": "principle"},
        {"text": "Hard-working tone is not a kind prefix", "kind": "principle"}]
    assert [r["text"] for r in parse_rubric_list(text, max_items=2)] == [
        "Mentions Paris", "Answers in one sentence"]


def test_parse_prefilled_answer_and_junk():
    # the sampler's answer starts right after the "1." prefill, often without a space
    assert parse_rubric_list(PREFILL + "Gives\x07 a \ufffdnumber\n2.Is short") == [
        {"text": "Gives a number", "kind": "principle"},
        {"text": "Is short", "kind": "principle"}]
    for junk in ["", "   \n", "I think response A is better.", "1.\n2. ??\n- 42\n-",
                 "1.5 is the answer", "3.14159", "1. " + "long " * 80, "-no space bullet"]:
        assert parse_rubric_list(junk) == [], junk
    # every parsed list is a rubric the judge scorer accepts
    assert parse_rubric(parse_rubric_list("1. Hard rule: a b\n2. c d")) == [
        {"text": "a b", "kind": "hard"}, {"text": "c d", "kind": "principle"}]


def test_parse_inline_lists_names_of_a_b_and_cut_answers():
    # `1. X 2. Y` on one line is split, only at the next numbers in order
    assert [r["text"] for r in parse_rubric_list(
        "1. Is short. 2. Costs 5. dollars or less. 4. Never. 3. Is polite.")] == [
        "Is short.", "Costs 5. dollars or less. 4. Never.", "Is polite."]
    # a criterion naming Response A/B cannot be checked on one response
    assert [r["text"] for r in parse_rubric_list(
        "1. Response A is shorter than Response B\n2. The response a bit long\n"
        "3. A is better here\n4. Mentions the source")] == [
        "The response a bit long", "Mentions the source"]
    # an answer cut at max_new_tokens loses its last (cut) line
    text = "1. Gives the year\n2. Names the cit"
    assert [r["text"] for r in parse_rubric_list(text)] == ["Gives the year", "Names the cit"]
    assert [r["text"] for r in parse_rubric_list(text, truncated=True)] == ["Gives the year"]
    assert parse_rubric_list("1. Names the cit", truncated=True) == []


def test_contrastive_prompt_shows_both_answers():
    rec = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "GOOD", "rejected": "BAD"}
    text = contrastive_prompt(rec, max_items=5)
    assert "user: Q?" in text and "up to 5 criteria" in text
    assert text.index("GOOD") < text.index("BAD")


# --- the consistency filter ------------------------------------------------------------

def hand_seed(seed, t):
    d = hashlib.sha256(f"{seed}\x00gen-rubrics\x00{t}".encode()).digest()
    return int.from_bytes(d[:8], "big") & ((1 << 63) - 1)


# per rubric text: (score of chosen, score of rejected)
SCORES = {"good": (0.9, 0.1), "bad": (0.2, 0.8), "tie": (0.5, 0.5)}
ANSWERS = {"A": ["1. good"] * 3, "B": ["no list here", "1. bad", "1. good"], "C": ["1. tie"] * 3}


def stubs():
    calls = {"propose": [], "judge": []}

    def propose(records, seed):
        t = len(calls["propose"])
        calls["propose"].append(([r["id"] for r in records], seed))
        return [ANSWERS[r["id"]][t] for r in records]

    def judge(triples):
        calls["judge"].append(len(triples))
        return [SCORES[r[0]["text"]][0 if c == "chosen" else 1] for _, c, r in triples]
    return propose, judge, calls


def test_filter_keeps_iff_chosen_beats_rejected_and_counts_tries():
    recs = [{"id": k, "prompt": "P", "chosen": "chosen", "rejected": "rejected"} for k in "ABC"]
    propose, judge, calls = stubs()
    out = consistency_filter(recs, propose, judge, tries=3, seed=5)
    a, b, c = out
    assert a.rubric == [{"text": "good", "kind": "principle"}] and a.tries == 1
    assert a.margin == pytest.approx(0.9 - 0.1) and a.scores == (0.9, 0.1)
    assert b.rubric == [{"text": "good", "kind": "principle"}] and b.tries == 3  # junk, bad, good
    assert c.rubric is None and c.tries == 3 and c.margin is None  # a tie is not kept
    # each try samples the still-open pairs with its own seed
    assert calls["propose"] == [(["A", "B", "C"], hand_seed(5, 0)),
                                (["B", "C"], hand_seed(5, 1)), (["B", "C"], hand_seed(5, 2))]
    assert len({s for _, s in calls["propose"]}) == 3 and try_seed(5, 0) == hand_seed(5, 0)
    # the judge sees chosen and rejected of every parsed candidate; junk costs no call
    assert calls["judge"] == [4, 4, 4]
    # --min-margin: "good" wins by 0.8, so it is kept above 0.7 and not above 0.85
    for m, kept in ((0.7, [True, True, False]), (0.85, [False, False, False])):
        propose, judge, _ = stubs()
        assert [o.rubric is not None for o in consistency_filter(
            recs, propose, judge, tries=3, min_margin=m)] == kept
    # an unfinished answer (text, False) loses its last item before the judge sees it
    seen = []
    out = consistency_filter(recs[:1], lambda rs, seed: [("1. good\n2. tie", False)],
                             lambda tr: seen.append(tr[0][2]) or [0.9, 0.1], tries=2)
    assert seen == [[{"text": "good", "kind": "principle"}]] and out[0].tries == 1
    # one try only: B's junk answer fails it
    propose, judge, _ = stubs()
    assert [o.tries for o in consistency_filter(recs, propose, judge, tries=1)] == [1, 1, 1]
    propose, judge, _ = stubs()
    assert [o.rubric is not None for o in consistency_filter(recs, propose, judge, tries=1)] \
        == [True, False, False]


def test_apply_outcome_fields_and_prompt_records():
    rec = {"id": "x", "prompt": "P", "chosen": "a", "rejected": "b", "score_chosen": 1.0,
           "meta": {"rubric": ["stale"], "checks": []}}
    kept = Outcome([{"text": "t", "kind": "hard"}], 2, 0.25, (0.5, 0.25))
    assert apply_outcome(rec, kept) == {**rec, "meta": {
        "checks": [], "rubric": [{"text": "t", "kind": "hard"}], "rubric_margin": 0.25,
        "rubric_tries": 2}}
    assert apply_outcome(rec, Outcome(None, 3))["meta"] == {"checks": [], "rubric_tries": 3}
    p = apply_outcome(rec, kept, "prompts")
    assert set(p) == {"id", "prompt", "meta"} and p["meta"]["rubric"] == kept.rubric
    validate(p, "prompt")


# --- the command on the tiny model -------------------------------------------------------

ARGS = ["--max-new-tokens", "16", "--seed", "0"]


def test_cli_writes_pairs_and_kept_rubrics_reproduce_the_label(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    out = tmp_path / "out.jsonl"
    r = cli(["gen-rubrics", src, "--judge", tiny_model, "-o", out, *ARGS])
    assert r.code == 0, r
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == [p["id"] for p in pairs()]
    kept = [x for x in recs if "rubric" in x["meta"]]
    assert kept and len(kept) < len(recs)  # seed 0: some kept, some not (the checks below bite)
    assert f"{len(kept)} of 6 pairs got a rubric" in r.err
    assert f"{6 - len(kept)} without (written without meta.rubric)" in r.err
    manifest = json.loads((tmp_path / "out.jsonl.alignkit.json").read_text())
    assert manifest["counts"] == {"read": 6, "kept": len(kept), "unkept": 6 - len(kept),
                                  "written": 6}
    for x, p in zip(recs, pairs()):
        validate(x, "pair")
        assert x["meta"]["src"] == p["meta"]["src"]  # other meta kept
        assert 1 <= x["meta"]["rubric_tries"] <= 3
        if "rubric" in x["meta"]:
            assert parse_rubric(x["meta"]["rubric"]) == x["meta"]["rubric"]
            assert x["meta"]["rubric_margin"] > 0
        else:
            assert x["meta"]["rubric_tries"] == 3 and "rubric_margin" not in x["meta"]
    # the check: re-scored by the judge scorer, every kept rubric reproduces its label
    s = cli(["score", "-s", f"judge:{tiny_model}", out])
    assert s.code == 0, s
    for x, y in zip(recs, s.records):
        if "rubric" in x["meta"]:
            assert y["score_chosen"] > y["score_rejected"]
            assert y["score_chosen"] - y["score_rejected"] == pytest.approx(
                x["meta"]["rubric_margin"], abs=1e-5)
        else:
            assert "score_chosen" not in y  # no rubric, no judge score
    # same seed, same output (stdout this time)
    again = cli(["gen-rubrics", src, "--judge", tiny_model, *ARGS])
    assert again.code == 0 and again.out == out.read_text()


def test_cli_prompts_drop_unkept_and_greedy_one_try(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    full = cli(["gen-rubrics", src, "--judge", tiny_model, *ARGS]).records
    r = cli(["gen-rubrics", "-", "--judge", tiny_model, "--to", "prompts", "--drop-unkept",
             *ARGS], stdin=src.read_text())
    assert r.code == 0, r
    want = [x for x in full if "rubric" in x["meta"]]
    assert [p["id"] for p in r.records] == [x["id"] for x in want]
    for p, x in zip(r.records, want):
        validate(p, "prompt")
        assert set(p) == {"id", "prompt", "meta"} and p["prompt"] == x["prompt"]
        assert p["meta"]["rubric"] == x["meta"]["rubric"]
    assert "(dropped)" in r.err
    # shards: a record's rubric does not depend on which records share its batch
    shards = [cli(["gen-rubrics", src, "--judge", tiny_model, "--shard", f"{i}/2", *ARGS])
              for i in (0, 1)]
    assert all(x.code == 0 for x in shards) and all(x.records for x in shards)
    by_id = {x["id"]: x for sh in shards for x in sh.records}
    assert sorted(by_id) == sorted(x["id"] for x in full)
    for x in full:  # identical up to the float round-off of other padding
        y = by_id[x["id"]]
        assert y["meta"].pop("rubric_margin", 0) == pytest.approx(
            x["meta"].get("rubric_margin", 0), abs=1e-6)
        assert y["meta"] == {k: v for k, v in x["meta"].items() if k != "rubric_margin"}
    g = cli(["gen-rubrics", src, "--judge", tiny_model, "--temperature", "0", *ARGS])
    assert g.code == 0, g
    assert [x["meta"]["rubric_tries"] for x in g.records] == [1] * 6


def test_cli_errors(cli, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(pairs(1)[0]) + "\n" + json.dumps({"id": "q", "prompt": "P",
                                                                   "chosen": "a"}) + "\n")
    out = tmp_path / "o.jsonl"
    r = cli(["gen-rubrics", bad, "--judge", tiny_model, "-o", out])
    assert r.code == 3 and "bad.jsonl:2:" in r.err, r
    assert not out.exists()
    dup = write_jsonl(tmp_path / "dup.jsonl", [pairs(1)[0], pairs(1)[0]])
    r = cli(["gen-rubrics", dup, "--judge", tiny_model, "--to", "prompts", "-o", out, *ARGS])
    assert r.code == 3 and "dup.jsonl:2: id: duplicate id 'p0'" in r.err, r
    assert not out.exists()
    src = write_jsonl(tmp_path / "p.jsonl", pairs(1))
    r = cli(["gen-rubrics", src, "--judge", tiny_model, "--tries", "0"])
    assert r.code == 2 and "--tries must be >= 1" in r.err, r
    r = cli(["gen-rubrics", src, "--judge", tiny_model, "--to", "samples"])
    assert r.code == 2, r
    r = cli(["gen-rubrics", src])
    assert r.code == 2 and "--judge" in r.err
    h = cli(["gen-rubrics", "--help"])
    assert h.code == 0 and "Example:" in h.out and "--tries" in h.out


# --- a real chat model -------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_writes_checkable_rubrics(cli, tmp_path, smollm2):
    judge = smollm2
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "fr", "prompt": "What is the capital of France? Answer in one word.",
         "chosen": "Paris", "rejected": "The capital of France is a big city in Europe."},
        {"id": "add", "prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.",
         "rejected": "2 + 2 = 5."}])
    r = cli(["gen-rubrics", src, "--judge", judge, "--max-new-tokens", "96", "--seed", "1"])
    assert r.code == 0, r
    recs = r.records
    assert len(recs) == 2
    kept = [x for x in recs if "rubric" in x["meta"]]
    assert kept, r.err  # a real chat model writes at least one list that explains a label
    for x in kept:
        items = x["meta"]["rubric"]
        assert 1 <= len(items) <= 8 and all(len(i["text"].split()) >= 2 for i in items)
    s = cli(["score", "-s", f"judge:{judge}", "-"], stdin="".join(json.dumps(x) + "\n"
                                                                  for x in kept))
    assert s.code == 0, s
    assert all(y["score_chosen"] > y["score_rejected"] for y in s.records)
