"""`exec-trace`: CodeRL+'s execution-semantics tasks (ALGORITHMS.md Part D §8,
`recipe/code_extractor.py`), built offline from samples records with `meta.tests`.

For each completion that did not pass every test (its `code` detail from
`alignkit score -s code` says passed < total; a completion without that detail is used
too; `--include-passing` uses all), the code (extracted as the `code` scorer does) is
run in the same sandbox on the input of the record's **first** test (CodeRL+'s
MAX_TEST_CASES = 1): the call on the left of `assert CALL == ...` (a test that is not
`assert <call> <op> ...` gives no task). A profiler hook records the locals of the
called function when its outermost call returns. Then one prompt record per question:

- "what does `CALL` return?" (the `return` task), and
- "what is the final value of variable X in `FN`?" for the last `--max-vars` (default
  3, as CodeRL+) local variables of simple type (None, bool, int, float, str and lists,
  tuples, sets, dicts of those; tuples and sets become JSON lists, sets sorted), names
  starting with `_` left out.

The target is what the (wrong) code actually does, not the expected output. Each record
is `{"id": "{samples_id}-{completion}-{var}", "prompt", "meta": {"answer",
"checks": [{"type": "exact", "answer"}], "variable", "call", "source_id"}}` where
`answer` is the value as compact JSON (`json.dumps`); the prompt asks for that JSON
alone on the last line, so `alignkit score -s rules` checks it (exact match of the last
line, whitespace and case folded). Identical code within one record gives its tasks once.

Simplifications: CodeRL+ asks for stdout and the variables in one JSON answer with the
reward 0.1 + 0.9·correct/(1+|vars|) and captures module-level `locals()`; here each
value is its own question, checked exactly by `rules`, and the variables are those of
the tested function. The cyclomatic-complexity filter and the non-empty-stdout condition
are not applied (a call that raises or returns a non-simple value gives no task).
"""
from __future__ import annotations

import ast
import json

from ..checks import as_text
from ..errors import DataError
from ..registry import Param
from ..scorers.code import (DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT, execute, extract_code,
                            parse_tests)
from .base import Strategy, completion_index, strategy

MAX_VARS = Param("max_vars", int, 3, "exec-trace: questions on at most the last N local "
                 "variables of the tested function (CodeRL+: 3).", low=1, metavar="N")
INCLUDE_PASSING = Param("include_passing", bool, False, "exec-trace: also use completions "
                        "that pass every test (CodeRL+ uses only failed ones).")
MAX_ANSWER_CHARS = 200  # longer values make no task

# Run after the code, as a "test" reporting its trace through `__report__`.
_TRACE = r'''
import sys as _sys, json as _json, math as _math
_seen = []
def _prof(frame, event, arg):
    if event == "return" and frame.f_code.co_name == {name!r}:
        _seen.append((dict(frame.f_locals), arg))
def _simple(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not _math.isfinite(v):
            raise TypeError
        return v
    if isinstance(v, (list, tuple)):
        return [_simple(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted(_simple(x) for x in v)
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {{k: _simple(x) for k, x in v.items()}}
    raise TypeError
_sys.setprofile(_prof)
try:
    _out = {call}
finally:
    _sys.setprofile(None)
_rep = {{"return": _simple(_out), "variables": []}}
if _seen:
    for _k, _v in _seen[-1][0].items():
        if _k.startswith("_"):
            continue
        try:
            _rep["variables"].append([_k, _simple(_v)])
        except (TypeError, RecursionError):
            pass
__report__ = _rep
'''

PROMPT = ("Here is a Python program:\n\n```python\n{code}\n```\n\n{question} Reason step "
          "by step, then give the value as JSON (e.g. 3, \"abc\", [1, 2], true, null) "
          "alone on the last line.")


def first_call(tests: list[str]) -> tuple[str, str] | None:
    """(call source, called function's name) of `assert CALL <op> ...` in the first
    test, or None."""
    try:
        tree = ast.parse(tests[0])
    except (SyntaxError, ValueError):
        return None
    node = next((n for n in tree.body if isinstance(n, ast.Assert)), None)
    test = node.test if node else None
    call = test.left if isinstance(test, ast.Compare) else test
    if not isinstance(call, ast.Call):
        return None
    fn = call.func
    name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) \
        else None
    return (ast.unparse(call), name) if name else None


def trace(code: str, call: str, name: str, *, timeout: float = DEFAULT_TIMEOUT,
          memory_mb: int = DEFAULT_MEMORY_MB) -> dict | None:
    """{"return": value, "variables": [[name, value], ...]} of running `call` after
    `code` in the sandbox, or None when it fails or gives a non-simple value."""
    result = execute(code, [_TRACE.format(name=name, call=call)], timeout=timeout,
                     memory_mb=memory_mb)
    report = result["reports"].get(0)
    if result["status"] != "ok" or not isinstance(report, dict) or "return" not in report:
        return None
    return report


def failed(comp: dict) -> bool:
    detail = comp.get("code")
    if not isinstance(detail, dict):
        return True
    return not (detail.get("status") == "ok" and detail.get("passed") == detail.get("total"))


def exec_trace_records(rec: dict, *, max_vars: int = 3, include_passing: bool = False,
                       timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB,
                       summary=None) -> list[dict]:
    """The prompt records of one samples record (see the module docstring)."""
    count = summary if summary is not None else {}
    tests = parse_tests(rec.get("meta") or {})
    target = first_call(tests) if tests else None
    if target is None:
        count["no assert-call test"] = count.get("no assert-call test", 0) + 1
        return []
    call, name = target
    out, seen = [], set()
    for ci, comp in enumerate(rec["completions"]):
        if not include_passing and not failed(comp):
            continue
        code = extract_code(as_text(comp["text"], "assistant"))
        if not code.strip() or code in seen:
            continue
        seen.add(code)
        report = trace(code, call, name, timeout=timeout, memory_mb=memory_mb)
        if report is None:
            count["trace failed"] = count.get("trace failed", 0) + 1
            continue
        questions = [("return", f"What does the call `{call}` return?", report["return"])]
        for var, value in report["variables"][-max_vars:]:
            questions.append((var, f"The program is run with the call `{call}`. What is the "
                              f"final value of the variable `{var}` in `{name}` when that "
                              "call returns?", value))
        for var, question, value in questions:
            answer = json.dumps(value, ensure_ascii=False)
            if len(answer) > MAX_ANSWER_CHARS:
                continue
            out.append({"id": f"{rec['id']}-{completion_index(rec, ci)}-{var}",
                        "prompt": PROMPT.format(code=code.strip("\n"), question=question),
                        "meta": {"answer": answer,
                                 "checks": [{"type": "exact", "answer": answer}],
                                 "variable": var, "call": call, "source_id": rec["id"]}})
    return out


@strategy("exec-trace", "CodeRL+ execution-semantics tasks: prompts asking what the "
          "completion's code returns / leaves in its variables on the first test input "
          "(meta.answer + an exact check)", params=(MAX_VARS, INCLUDE_PASSING))
class ExecTrace(Strategy):
    output = "prompt"
    min_scored = 0

    def record(self, rec, where):
        try:
            return exec_trace_records(
                rec, max_vars=self.params["max_vars"],
                include_passing=self.params["include_passing"],
                timeout=self.opts.scoring.code_timeout,
                memory_mb=self.opts.scoring.code_memory_mb, summary=self.summary)
        except DataError as e:
            raise e.at(*where) from None
