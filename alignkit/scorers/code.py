"""`code[:all]`: execution reward for code completions (CodeRL+'s RLVR reward,
ALGORITHMS.md Part D §8): run the completion's Python code against the record's tests
in a sandboxed subprocess; the reward is the share of tests passed (`code:all`: 1 only
when every test passes, 0 otherwise, the paper's binary pass-all reward).

**Record shape.** A samples (or pair) record with `meta.tests`:
- a list of strings, each one test: Python statement(s) such as `assert f(2) == 4`;
  a test passes when it runs without raising;
- or one string holding several statements: it is parsed and split into one test per
  top-level `assert`; the non-assert statements (imports, assignments) before an assert
  belong to that test (setup), any after the last assert to the last test; a string
  without asserts (or that does not parse) is one test.
`meta.tests` absent, null, `[]` or a blank string: no `code` score (None, "not
scorable", like `rules` without checks). Any other value (a number, a list holding a
non-string) is a DataError located at the record's line.

**The code** of a completion (after `</think>` if any): the last ```python (or ```py,
```python3) fenced block; else the last ``` fenced block of any language; else the
whole text. An unclosed final fence (a truncated completion) runs to the end of the
text. Blank code scores 0 with status "no_code" (no subprocess is started).

**Execution.** One subprocess per completion, `python -I -S -c HARNESS` (isolated: no
site-packages, no PYTHON* variables, no user site), environment reduced to
`PATH=/usr/bin:/bin`, cwd a fresh temporary folder removed afterwards, its own session
(`start_new_session`), stdin/stdout/stderr of the code sent to /dev/null. The harness,
before the user code, sets resource limits (RLIMIT_AS = --code-memory-mb, RLIMIT_CPU =
ceil(--code-timeout)+1 s, RLIMIT_FSIZE = 16 MiB, RLIMIT_NPROC = 1, no core files) and
replaces `socket.socket`/`create_connection`/`getaddrinfo`, the fork/exec/spawn/kill
functions of `os`/`posix`, `os.system`/`os.popen`, `subprocess.Popen` and
`_posixsubprocess.fork_exec` by functions raising PermissionError. It then runs the code
as module `solution` (`if __name__ == "__main__":` blocks are skipped, as when a test
runner imports it) and each test in the code's namespace, in order, each in its own
try/except, and streams one JSON result line per test (tagged with a random nonce) on a
private pipe. The whole file has one wall-clock timeout (--code-timeout); on timeout the
whole process group is killed and the tests that reported before it still count.
`execute` also returns what a test puts in the global `__report__` (JSON values): the
exec-trace relabel strategy (`alignkit/relabel/exec_trace.py`) reads variables this way.

**Statuses** (`"code": {"passed", "total", "status"}` on each completion): ok (the
tests ran; passed may be < total), no_code, syntax_error, error (the code raised at
import time: 0, as a test runner failing to import the module), memory (MemoryError at
import time), timeout (wall clock or CPU limit), crash (the process died without a final
result, e.g. a signal or os._exit). Every failure is a score, never an exception.

**Not a security boundary.** This is best-effort isolation from the stdlib only: ctypes,
an inherited file descriptor or reloaded modules can get around the patches, and when
alignkit runs as root the kernel does not enforce RLIMIT_NPROC and nothing stops writes
outside the temporary folder. Run untrusted completions in a container or VM.

Simplifications: CodeRL+ scores with LiveCodeBench's stdin/stdout and call-based tests;
here tests are assert statements only, and the default reward is the partial share.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..checks import as_text
from ..errors import DataError, UsageError
from .base import Item, Scorer

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_MB = 512
DEFAULT_WORKERS = 2
FSIZE_LIMIT = 16 * 1024 * 1024
STATUSES = ("ok", "no_code", "syntax_error", "error", "memory", "timeout", "crash")

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3"}

# The trusted part run in the child before the user code (see the module docstring).
HARNESS = r'''
import json, os, sys, resource, signal
p = json.loads(sys.stdin.read())
def _lim(res, v):
    try:
        resource.setrlimit(res, (v, v))
    except (ValueError, OSError):
        pass
_lim(resource.RLIMIT_AS, p["memory"])
_lim(resource.RLIMIT_CPU, p["cpu"])
_lim(resource.RLIMIT_FSIZE, p["fsize"])
_lim(resource.RLIMIT_CORE, 0)
_lim(resource.RLIMIT_NPROC, 1)
_out = os.fdopen(os.dup(1), "w")
_null = os.open(os.devnull, os.O_RDWR)
for _fd in (0, 1, 2):
    os.dup2(_null, _fd)
_nonce = p.pop("nonce")
def _emit(**kw):
    _out.write(_nonce + json.dumps(kw) + "\n")
    _out.flush()
def _blocked(*a, **k):
    raise PermissionError("blocked by the alignkit code sandbox")
import socket, posix, subprocess, _posixsubprocess
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        _blocked()
socket.socket = socket.SocketType = _NoSocket
for _n in ("create_connection", "create_server", "getaddrinfo", "socketpair", "fromfd",
           "gethostbyname", "gethostbyname_ex"):
    setattr(socket, _n, _blocked)
for _m in (os, posix):
    for _n in ("fork", "forkpty", "system", "popen", "kill", "killpg", "posix_spawn",
               "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
               "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
               "spawnlpe", "spawnvp", "spawnvpe", "setsid", "setpgid"):
        if hasattr(_m, _n):
            setattr(_m, _n, _blocked)
subprocess.Popen = _blocked
_posixsubprocess.fork_exec = _blocked
_g = {"__name__": "solution", "__builtins__": __builtins__}
try:
    _code = compile(p["code"], "<solution>", "exec")
except BaseException:
    _emit(status="syntax_error")
    os._exit(0)
try:
    exec(_code, _g)
except MemoryError:
    _emit(status="memory")
    os._exit(0)
except BaseException:
    _emit(status="error")
    os._exit(0)
for _i, _t in enumerate(p["tests"]):
    try:
        exec(compile(_t, "<test %d>" % _i, "exec"), _g)
        _ok = True
    except BaseException:
        _ok = False
    _r = _g.pop("__report__", None)
    try:
        _emit(test=_i, passed=_ok, report=_r)
    except BaseException:
        _emit(test=_i, passed=_ok)
_emit(status="ok")
os._exit(0)
'''


def extract_code(text: str) -> str:
    """The code of a completion: last ```python block, else last ``` block, else the text."""
    body = text.rsplit("</think>", 1)[-1]
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(body)]
    py = [code for tag, code in blocks if tag in _PY_TAGS]
    if py:
        return py[-1]
    if blocks:
        return blocks[-1][1]
    return body


def split_tests(text: str) -> list[str]:
    """A string of statements -> one test per top-level assert (setup attached)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return [text]
    tests: list[str] = []
    pending: list[str] = []
    for node in tree.body:
        pending.append(ast.get_source_segment(text, node) or ast.unparse(node))
        if isinstance(node, ast.Assert):
            tests.append("\n".join(pending))
            pending = []
    if not tests:
        return [text]
    if pending:
        tests[-1] += "\n" + "\n".join(pending)
    return tests


def parse_tests(meta: dict) -> list[str] | None:
    """The tests of `meta.tests` (see the module docstring); None when there are none."""
    value = meta.get("tests")
    if value is None or value == [] or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return split_tests(value)
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value)
    raise DataError("must be a list of strings (Python test statements such as "
                    f"'assert f(2) == 4') or one string of asserts, got {value!r:.80}",
                    field="meta.tests")


def run_tests(code: str, tests: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
              memory_mb: int = DEFAULT_MEMORY_MB) -> dict[str, Any]:
    """Run `code` then each test in a sandboxed subprocess -> {passed, total, status}.

    Never raises for anything the code does (see the module docstring)."""
    result = execute(code, tests, timeout=timeout, memory_mb=memory_mb)
    return {"passed": len(result["passed"]), "total": len(tests), "status": result["status"]}


def execute(code: str, tests: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
            memory_mb: int = DEFAULT_MEMORY_MB) -> dict[str, Any]:
    """`run_tests` with the details: {"status", "passed": set of test indices,
    "reports": {test index: value}}; a test that sets the global `__report__` to a
    JSON-serialisable value reports it (the exec-trace task reads variables this way)."""
    total = len(tests)
    if not code.strip():
        return {"passed": set(), "reports": {}, "status": "no_code"}
    nonce = secrets.token_hex(8)
    payload = json.dumps({"code": code, "tests": list(tests), "nonce": nonce,
                          "memory": int(memory_mb) * 1024 * 1024,
                          "cpu": int(math.ceil(timeout)) + 1, "fsize": FSIZE_LIMIT})
    workdir = tempfile.mkdtemp(prefix="alignkit-code-")
    timed_out = False
    out = b""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", HARNESS], cwd=workdir,
            env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        try:
            out, _ = proc.communicate(payload.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                out, _ = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                out = b""
                proc.wait()
        returncode = proc.returncode
    except OSError:  # could not start the interpreter at all
        return {"passed": set(), "reports": {}, "status": "crash"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _summarise(out, nonce, total, timed_out, returncode)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _summarise(out: bytes, nonce: str, total: int, timed_out: bool, returncode) -> dict:
    passed: set[int] = set()
    reports: dict[int, Any] = {}
    status = None
    for line in out.decode("utf-8", "replace").splitlines():
        if not line.startswith(nonce):
            continue
        try:
            event = json.loads(line[len(nonce):])
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("status") in STATUSES:
            status = event["status"]
        elif isinstance(event.get("test"), int) and 0 <= event["test"] < total:
            if event.get("passed") is True:
                passed.add(event["test"])
            if event.get("report") is not None:
                reports[event["test"]] = event["report"]
    if status is None:
        xcpu = returncode is not None and returncode == -getattr(signal, "SIGXCPU", -1)
        status = "timeout" if timed_out or xcpu else "crash"
    if status != "ok" and status not in ("timeout", "crash"):
        passed = set()
    return {"passed": passed, "reports": reports, "status": status}


class CodeScorer(Scorer):
    kind = "code"
    missing_reason = "no meta.tests"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        if arg not in (None, "all"):
            raise UsageError(f"scorer {name!r}: the only argument is 'all' (code or code:all)")
        self.binary = arg == "all"
        self.timeout = float(options.get("code_timeout") or DEFAULT_TIMEOUT)
        self.memory_mb = int(options.get("code_memory_mb") or DEFAULT_MEMORY_MB)
        self.workers = int(options.get("code_workers") or DEFAULT_WORKERS)
        if self.timeout <= 0 or self.memory_mb < 1 or self.workers < 1:
            raise UsageError("--code-timeout must be > 0, --code-memory-mb and "
                             "--code-workers >= 1")

    def value(self, result: dict) -> float:
        if self.binary:
            return float(result["passed"] == result["total"] and result["status"] == "ok")
        return result["passed"] / result["total"]

    def score(self, items: Sequence[Item]) -> list[float | None]:
        jobs = []  # (index, code, tests), validated before anything runs
        for i, item in enumerate(items):
            try:
                tests = parse_tests(item.meta)
            except DataError as e:
                raise item.located(e) from None
            if tests is not None:
                jobs.append((i, extract_code(as_text(item.completion, "assistant")), tests))
        out: list[float | None] = [None] * len(items)

        def run(job):
            return run_tests(job[1], job[2], timeout=self.timeout, memory_mb=self.memory_mb)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for (i, _, _), result in zip(jobs, pool.map(run, jobs)):
                items[i].extra["code"] = result
                out[i] = self.value(result)
        return out
