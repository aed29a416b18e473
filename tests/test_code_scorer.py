"""`code[:all]`: the sandboxed execution reward (ALGORITHMS.md Part D §8, CodeRL+).

Expected rewards are hand-computed shares: passed tests / total tests."""
from __future__ import annotations

import json
import time

import pytest

from alignkit.errors import DataError, UsageError
from alignkit.scorers import build_scorer
from alignkit.scorers.code import extract_code, parse_tests, run_tests, split_tests
from conftest import write_jsonl

TESTS = ["assert f(2) == 4", "assert f(3) == 9"]
FAST = {"code_timeout": 1.5, "code_memory_mb": 256, "code_workers": 2}


def _rec(texts, tests=TESTS, rid="q"):
    meta = {} if tests is None else {"tests": tests}
    return {"id": rid, "prompt": "Write f(x) = x squared.", "meta": meta,
            "completions": [{"text": t} for t in texts]}


def _score(texts, tests=TESTS, spec="code"):
    [out] = build_scorer([spec], **FAST).score_records([_rec(texts, tests)])
    return [c["scores"].get(spec) for c in out["completions"]], [c.get("code") for c in
                                                               out["completions"]]


# --- extraction and test parsing --------------------------------------------------------
@pytest.mark.parametrize("text, code", [
    ("Here:\n```python\ndef f(x): return 1\n```\nbetter:\n```python\ndef f(x): return 2\n```",
     "def f(x): return 2\n"),
    ("```py\nA\n```\n```bash\nB\n```", "A\n"),                   # python block wins
    ("```\nA\n```\ntext\n```js\nB\n```", "B\n"),                  # else the last block
    ("def f(x): return x", "def f(x): return x"),                # else the whole text
    ("<think>```python\nX\n```</think>```python\nY", "Y"),       # unclosed last fence
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_parse_tests_forms():
    assert parse_tests({"tests": TESTS}) == TESTS
    assert split_tests("import math\nx = 2\nassert f(x) == 4\nassert f(3) == 9\ny = 1") == [
        "import math\nx = 2\nassert f(x) == 4", "assert f(3) == 9\ny = 1"]
    assert split_tests("f(2)") == ["f(2)"]                       # no assert: one test
    assert split_tests("assert (") == ["assert ("]               # unparsable: one test
    for empty in ({}, {"tests": None}, {"tests": []}, {"tests": "  "}):
        assert parse_tests(empty) is None
    for bad in (3, [1], {"a": 1}, ["ok", None]):
        with pytest.raises(DataError, match="meta.tests: must be a list of strings"):
            parse_tests({"tests": bad})


# --- rewards ----------------------------------------------------------------------------
def test_correct_half_and_syntax_error():
    texts = ["```python\ndef f(x):\n    return x * x\n```",   # 2/2
             "def f(x):\n    return 2 * x",                    # f(2)=4 ok, f(3)=6: 1/2
             "```python\ndef f(x) return x\n```",              # syntax error
             "I cannot do it.",                                # prose: syntax error
             "```python\n\n```"]                               # blank block: no code
    values, details = _score(texts)
    assert values == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert details[0] == {"passed": 2, "total": 2, "status": "ok"}
    assert details[1] == {"passed": 1, "total": 2, "status": "ok"}
    assert details[2]["status"] == "syntax_error" and details[3]["status"] == "syntax_error"
    assert details[4] == {"passed": 0, "total": 2, "status": "no_code"}


def test_string_tests_and_binary_reward():
    tests = "x = 3\nassert f(x) == 9\nassert f(1) == 1\nassert f(0) == 5"
    values, details = _score(["def f(x): return x * x"], tests)
    assert values == [pytest.approx(2 / 3)] and details[0]["total"] == 3
    values, _ = _score(["def f(x): return x * x", "def f(x): return 2 * x"], spec="code:all")
    assert values == [1.0, 0.0]


def test_failing_test_does_not_hide_others_and_main_guard_skipped():
    code = ("def f(x):\n    if x == 2: raise ValueError\n    return x * x\n"
            "if __name__ == '__main__':\n    print(f(int(input())))")
    values, details = _score([code], ["assert f(2) == 4", "assert f(3) == 9",
                                      "import sys; sys.exit(1)", "assert f(4) == 16"])
    assert values == [0.5] and details[0]["passed"] == 2       # tests 2 and 4


def test_import_time_error_scores_zero():
    values, details = _score(["def f(x): return x * x\nraise RuntimeError('boom')"])
    assert values == [0.0] and details[0]["status"] == "error"


# --- hostile code -----------------------------------------------------------------------
@pytest.mark.parametrize("code, status", [
    ("while True: pass", "timeout"),
    ("import os\nwhile True: os.fork()", "error"),
    ("x = bytearray(2*1024**3)", "memory"),
    ('import os; os.system("echo hi > pwned")', "error"),
    ("import subprocess; subprocess.run(['touch', 'pwned'])", "error"),
    ("import socket; socket.create_connection(('127.0.0.1', 9))", "error"),
    ("import os; os._exit(3)", "crash"),
])
def test_hostile_code_is_a_score(code, status, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    result = run_tests(code, TESTS, timeout=1.0, memory_mb=256)
    assert time.monotonic() - start < 4.0
    assert result == {"passed": 0, "total": 2, "status": status}
    assert list(tmp_path.iterdir()) == []                      # nothing written here


def test_timeout_keeps_tests_that_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "def f(x): return x * x\ndef g():\n    while True: pass"
    result = run_tests(code, ["assert f(2) == 4", "g()", "assert f(3) == 9"], timeout=1.0)
    assert result == {"passed": 1, "total": 3, "status": "timeout"}


def test_temp_dir_removed_env_clean_network_blocked(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.setenv("ALIGNKIT_SECRET", "x")
    code = ("import os, socket\nopen('out.txt', 'w').write('hi')\nhere = os.listdir('.')\n"
            "env = set(os.environ)\ntry:\n    socket.socket()\n    net = True\n"
            "except PermissionError:\n    net = False\n")
    tests = ["assert here == ['out.txt']", "assert 'ALIGNKIT_SECRET' not in env",
             "assert env <= {'PATH', 'LC_CTYPE'}", "assert not net"]
    result = run_tests(code, tests, timeout=2.0)
    assert result == {"passed": 4, "total": 4, "status": "ok"}
    assert list(scratch.iterdir()) == []                       # the work dir is gone


# --- records, errors, CLI ---------------------------------------------------------------
def test_no_tests_unscored_and_bad_tests_located():
    [out] = build_scorer(["code"], **FAST).score_records([_rec(["def f(x): pass"], None)])
    comp = out["completions"][0]
    assert comp["scores"] == {} and "score" not in comp and "code" not in comp
    with pytest.raises(DataError, match=r"f.jsonl:4: meta.tests: must be a list"):
        build_scorer(["code"], **FAST).score_records([_rec(["x"], 7)], [("f.jsonl", 4)])
    with pytest.raises(UsageError, match="only argument is 'all'"):
        build_scorer(["code:x"])


def test_cli_score_code(cli, tmp_path):
    recs = [_rec(["```python\ndef f(x): return x*x\n```", "def f(x): return x+x",
                  "while True: pass"], rid="a"),
            _rec(["def f(x): return x"], None, rid="b")]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    out = tmp_path / "o.jsonl"
    r = cli(["score", "-s", "code", "--code-timeout", "1", "--code-memory-mb", "256",
             "--code-workers", "2", str(inp), "-o", str(out)])
    assert r.code == 0, r
    a, b = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["score"] for c in a["completions"]] == [1.0, 0.5, 0.0]
    assert [c["scores"]["code"] for c in a["completions"]] == [1.0, 0.5, 0.0]
    assert [c["code"]["status"] for c in a["completions"]] == ["ok", "ok", "timeout"]
    assert a["completions"][1]["code"] == {"passed": 1, "total": 2, "status": "ok"}
    assert "score" not in b["completions"][0] and "code" not in b["completions"][0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [_rec(["x"], rid="ok"), _rec(["x"], 3)])
    r = cli(["score", "-s", "code", str(bad)])
    assert r.code == 3 and "bad.jsonl:2" in r.err and "meta.tests" in r.err
    r = cli(["score", "-s", "code", "--code-timeout", "0", str(inp)])
    assert r.code == 2 and "--code-timeout" in r.err


def test_reward_fn_for_train_policy():
    fn = build_scorer(["code"], **FAST).reward_fn()
    metas = [{"tests": TESTS}, {"tests": TESTS}, {}]
    got = fn(["p", "p", "q"], ["def f(x): return x*x", "def f(x): return 4", "x"], meta=metas)
    assert got == [1.0, 0.5, None]                             # f(3)=4 fails; no tests


# --- exec-trace tasks (CodeRL+ execution semantics) ---------------------------------------
TRACE_CODE = ("```python\ndef f(x):\n    acc = []\n    total = 0\n    for i in range(x):\n"
              "        acc.append(i)\n        total += i\n    seen = {2, 1}\n    return total\n```")


def _trace_rec():
    return {"id": "s1", "prompt": "p", "meta": {"tests": ["assert f(3) == 9", "assert f(1) == 1"]},
            "completions": [{"text": TRACE_CODE, "code": {"passed": 0, "total": 2, "status": "ok"}},
                            {"text": "def f(x): return x*x",
                             "code": {"passed": 2, "total": 2, "status": "ok"}},
                            {"text": "def f(x): raise ValueError"},
                            {"text": TRACE_CODE}]}                      # same code: once


@pytest.fixture
def exec_trace(monkeypatch):
    """The exec_trace module, its strategy registered into a copy of STRATEGIES' entries
    (restored after the test) unless STRATEGIES' module list already loads it."""
    import importlib
    import sys

    from alignkit.relabel import STRATEGIES
    STRATEGIES.names()  # load the listed modules first
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    name = "alignkit.relabel.exec_trace"
    if name not in sys.modules:
        return importlib.import_module(name)
    return sys.modules[name] if "exec-trace" in STRATEGIES else importlib.reload(
        sys.modules[name])


def test_exec_trace_records_hand_traced(exec_trace):
    exec_trace_records, first_call = exec_trace.exec_trace_records, exec_trace.first_call
    summary = {}
    out = exec_trace_records(_trace_rec(), summary=summary, timeout=2.0)
    # f(3): total = 0+1+2 = 3, i ends at 2, seen = {1, 2}; locals x, acc, total, i, seen
    assert [(r["id"], r["meta"]["answer"]) for r in out] == [
        ("s1-0-return", "3"), ("s1-0-total", "3"), ("s1-0-i", "2"), ("s1-0-seen", "[1, 2]")]
    assert summary == {"trace failed": 1}                   # the raising completion
    assert out[3]["meta"]["checks"] == [{"type": "exact", "answer": "[1, 2]"}]
    assert "f(3)" in out[3]["prompt"] and "`seen`" in out[3]["prompt"]
    more = exec_trace_records(_trace_rec(), max_vars=1, include_passing=True, timeout=2.0)
    assert [(r["id"], r["meta"]["answer"]) for r in more] == [
        ("s1-0-return", "3"), ("s1-0-seen", "[1, 2]"), ("s1-1-return", "9"), ("s1-1-x", "3")]
    assert first_call(["x = 1"]) is None and first_call(["assert g.h(2, y=1) > 0"]) == (
        "g.h(2, y=1)", "h")


def test_exec_trace_strategy_checked_by_rules(exec_trace):
    from alignkit.relabel import STRATEGIES, relabel
    assert "exec-trace" in STRATEGIES
    out = relabel([_trace_rec()], "exec-trace", max_vars=1)
    assert [r["id"] for r in out] == ["s1-0-return", "s1-0-seen"]
    task = out[1]
    rec = {"id": "t", "prompt": task["prompt"], "meta": task["meta"],
           "completions": [{"text": "It is a set of 1 and 2.\n[1, 2]"}, {"text": "[2, 1]"}]}
    [scored] = build_scorer(["rules"]).score_records([rec])
    assert [c["score"] for c in scored["completions"]] == [1.0, 0.0]


@pytest.mark.slow
def test_smollm2_writes_code_that_the_scorer_runs(cli, smollm2, tmp_path):
    """SmolLM2 answers two coding prompts; every completion gets a score in [0, 1] equal
    to its passed/total, and a hand-written correct answer in the same file scores 1."""
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "add", "prompt": "Write a Python function add(a, b) that returns a + b. "
                                "Answer with one ```python code block.", "meta": {"tests": tests}},
        {"id": "add2", "prompt": "In Python, define add(a, b) returning the sum of a and b.",
         "meta": {"tests": tests}}])
    samples = tmp_path / "s.jsonl"
    r = cli(["gen-pairs", prompts, "-m", smollm2, "-n", "2", "--max-new-tokens", "64",
             "--temperature", "0.7", "--seed", "0", "-o", samples])
    assert r.code == 0, r
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    recs[0]["completions"].append({"text": "```python\ndef add(a, b):\n    return a + b\n```"})
    samples.write_text("".join(json.dumps(x) + "\n" for x in recs))
    out = tmp_path / "o.jsonl"
    r = cli(["score", "-s", "code", "--code-timeout", "3", samples, "-o", out])
    assert r.code == 0, r
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    comps = [c for rec in scored for c in rec["completions"]]
    assert len(comps) == 5
    for c in comps:
        assert c["code"]["total"] == 2 and c["score"] == c["code"]["passed"] / 2
    assert comps[2]["score"] == 1.0 and comps[2]["code"]["status"] == "ok"
