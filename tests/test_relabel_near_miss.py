"""`relabel --strategy near-miss`: the rejected is one constraint away from the chosen."""
from __future__ import annotations

from alignkit.relabel import RelabelOptions, Relabeler, relabel
from conftest import write_jsonl


def comp(text, score, passed=None, finished=True):
    c = {"text": text, "score": score, "scores": {"rules": score}, "finished": finished}
    if passed is not None:
        c["checks"] = [{"type": f"t{i}", "passed": p} for i, p in enumerate(passed)]
    return c


def rec(rid, comps):
    return {"id": rid, "prompt": "P", "completions": comps}


def test_rejected_fails_fewest_checks_the_chosen_passes_then_closest_length():
    r = rec("a", [
        comp("w " * 40, 0.0, [False, False, False]),         # 0: fails all three
        comp("w " * 10, 1.0, [True, True, True]),            # 1: the best
        comp("w " * 30, 2 / 3, [False, True, True]),         # 2: one check apart, 20 words off
        comp("w " * 12, 1 / 3, [False, False, True]),        # 3: two apart, close in length
        comp("w " * 11, 0.75, [True, True, True], False),    # 4: passes all, cut: no miss
        comp("w " * 13, 2 / 3, [True, False, True]),         # 5: one apart, 3 words off
    ])
    [pair] = relabel([r], "near-miss")
    assert pair["id"] == "a-1-5"
    assert (pair["score_chosen"], pair["score_rejected"]) == (1.0, 2 / 3)
    # best-worst on the same record takes the completion that fails everything
    assert relabel([r], "best-worst")[0]["id"] == "a-1-0"


def test_length_and_score_break_ties_and_a_record_without_a_miss_gives_nothing():
    same = rec("b", [comp("x y", 1.0, [True, True]), comp("x y z", 0.5, [True, False]),
                     comp("x", 0.5, [False, True]), comp("p q r s", 0.5, [False, True])])
    # 1 and 2 are both one check apart and one word off: the first index wins
    assert relabel([same], "near-miss")[0]["id"] == "b-0-1"
    nomiss = rec("c", [comp("a", 1.0, [True]), comp("a b", 0.75, [True], False)])
    r = Relabeler("near-miss", RelabelOptions())
    assert list(r.run([nomiss])) == []
    assert r.summary["no lower completion fails a check the best passes"] == 1
    tie = rec("d", [comp("a", 1.0, [True]), comp("b", 1.0, [True])])
    r = Relabeler("near-miss", RelabelOptions())
    assert list(r.run([tie])) == [] and r.summary["tie"] == 1


def test_without_check_results_the_nearest_lower_score():
    r = rec("e", [comp("a", 0.9), comp("b", 0.1), comp("c", 0.7), comp("d", 1.0)])
    assert relabel([r], "near-miss")[0]["id"] == "e-3-0"
    assert relabel([r], "near-miss", min_margin=0.2) == []  # the nearest is 0.1 below


def test_cli_with_finished_only_and_min_chosen(cli, tmp_path):
    rows = [rec("f", [comp("w " * 5, 1.0, [True, True]), comp("w " * 6, 0.5, [True, False], False),
                      comp("w " * 20, 0.5, [False, True])]),
            rec("g", [comp("a", 0.5, [True, False]), comp("b", 0.0, [False, False])])]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    res = cli(["relabel", "--strategy", "near-miss", path])
    assert res.code == 0 and [p["id"] for p in res.records] == ["f-0-1", "g-0-1"]
    res = cli(["relabel", "--strategy", "near-miss", "--finished-only", "--min-chosen", "1",
               path])
    assert res.code == 0 and [p["rejected"] for p in res.records] == ["w " * 20]
    assert "chosen below min-chosen 1" in res.err
