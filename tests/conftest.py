"""Shared fixtures: an isolated ALIGNKIT_HOME, tiny models built once per session, and a
helper that runs the CLI in-process and returns (exit code, stdout, stderr)."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_TQDM", "1")
# Tiny models are dominated by per-op overhead: one thread is faster, and it avoids
# OpenMP spin-waiting when other processes share the cores. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def alignkit_home(tmp_path_factory):
    """Every test run gets its own model cache; the real SmolLM2 cache is shared via
    ALIGNKIT_TEST_REAL_HOME for slow tests only."""
    home = tmp_path_factory.mktemp("alignkit_home")
    old = os.environ.get("ALIGNKIT_HOME")
    os.environ["ALIGNKIT_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("ALIGNKIT_HOME", None)
    else:
        os.environ["ALIGNKIT_HOME"] = old


@pytest.fixture(scope="session")
def smollm2():
    """The materialised SmolLM2 folder, for slow tests: from ALIGNKIT_TEST_REAL_HOME (or
    the default cache) when it is there, else converted once into this session's home."""
    from pathlib import Path

    from alignkit.models import pull
    home = os.environ.get("ALIGNKIT_TEST_REAL_HOME") or Path.home() / ".cache" / "alignkit"
    folder = Path(home) / "models" / "smollm2-135m-instruct"
    return folder if (folder / "config.json").exists() else pull("smollm2-135m-instruct")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for the whole run, even when OMP_NUM_THREADS was preset:
    on a shared 2-core machine torch's second thread mostly spin-waits."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama folder (seed 0), built once per session."""
    from alignkit.models import build_tiny
    out = tmp_path_factory.mktemp("tiny") / "m"
    out.mkdir()
    return build_tiny(out, seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> Path:
    """A second tiny Llama (seed 1): same tokenizer, different weights."""
    from alignkit.models import build_tiny
    out = tmp_path_factory.mktemp("tiny_b") / "m"
    out.mkdir()
    return build_tiny(out, seed=1)


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    @property
    def records(self):
        return [json.loads(l) for l in self.out.splitlines() if l.strip()]

    def __repr__(self):
        return f"CliResult(code={self.code}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(monkeypatch):
    """Run `alignkit ARGS` in-process: cli(["score", ...], stdin=str|bytes)."""
    from alignkit import cli as cli_mod

    def run(args, stdin: str | bytes | None = None) -> CliResult:
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        fake_in = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
        out_buf, err_buf = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdin", fake_in)
        monkeypatch.setattr(sys, "stdout", out_buf)
        monkeypatch.setattr(sys, "stderr", err_buf)
        try:
            code = cli_mod.main([str(a) for a in args])
        finally:
            monkeypatch.undo()
        return CliResult(code, out_buf.getvalue(), err_buf.getvalue())

    return run


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def metrics(folder) -> list[dict]:
    """The rows of a training folder's metrics.jsonl."""
    return [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def vtiny(tmp_path_factory) -> Path:
    """A tiny random Llama whose head size (32) vLLM's CPU attention supports (the
    `tiny_model` fixture's 16 it does not): the engine tests' model."""
    from alignkit.models import build_tiny
    out = tmp_path_factory.mktemp("vtiny") / "m"
    out.mkdir()
    return build_tiny(out, seed=0, hidden=64, heads=2)
