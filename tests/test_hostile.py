"""Hostile inputs on every reader, before any work: for each record kind and each
command that reads it, a malformed record at line 3 (after two good ones) exits 3 with
`path:3:`, no traceback, and leaves nothing behind (no output, no OUT.partial, no temp
file). Table-driven: record kinds x hostile variants x commands."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

GOOD = {
    "prompt": {"id": "a", "prompt": "Say hi."},
    "samples": {"id": "a", "prompt": "Say hi.", "completions": [{"text": "hi"}, {"text": "hello"}]},
    "pair": {"id": "a", "prompt": "Say hi.", "chosen": "hi", "rejected": "go away"},
    "ranking": {"id": "a", "prompt": "Say hi.",
                "completions": [{"text": "hi", "score": 1.0}, {"text": "no", "score": 0.0}]},
    "unpaired": {"id": "a", "prompt": "Say hi.", "completion": "hi", "label": True},
    "completion": {"id": "a", "prompt": "Say hi.", "completion": "hi"},
}
TEXT_FIELDS = {"prompt": ["prompt"], "samples": ["prompt"], "pair": ["prompt", "chosen", "rejected"],
               "ranking": ["prompt"], "unpaired": ["prompt", "completion"],
               "completion": ["prompt", "completion"]}
UNIQUE = {"prompt", "samples"}  # kinds whose ids are unique within a file


def _lines(kind: str, n: int = 2) -> list[str]:
    out = []
    for i in range(n):
        rec = json.loads(json.dumps(GOOD[kind]))
        rec["id"] = f"r{i}"
        out.append(json.dumps(rec))
    return out


def variants(kind: str) -> list[tuple[str, bytes]]:
    """(name, file bytes) with the bad record on line 3."""
    good = _lines(kind)
    head = ("\n".join(good) + "\n").encode()
    out = []

    def rec(**change):
        r = json.loads(json.dumps(GOOD[kind]))
        r["id"] = "bad"
        for k, v in change.items():
            if v is _DROP:
                r.pop(k, None)
            else:
                r[k] = v
        return head + json.dumps(r).encode() + b"\n"

    for field in TEXT_FIELDS[kind]:
        for name, value in (("null", None), ("number", 3), ("object", {}), ("empty-list", []),
                            ("bad-message", [{"role": "user"}])):
            out.append((f"{field}-{name}", rec(**{field: value})))
        out.append((f"{field}-missing", rec(**{field: _DROP})))
    if kind in ("samples", "ranking"):
        out += [("completions-empty", rec(completions=[])),
                ("completions-null", rec(completions=None)),
                ("completion-text-number", rec(completions=[{"text": 5}, {"text": "x"}]))]
    if kind == "unpaired":
        out.append(("label-string", rec(label="yes")))
    if kind in UNIQUE:
        out.append(("duplicate-id", head + json.dumps({**json.loads(good[0])}).encode() + b"\n"))
    out += [
        ("id-number", rec(id=7)),
        ("checks-unknown-type", rec(meta={"checks": [{"type": "no_such_check"}]})),
        ("checks-not-a-list", rec(meta={"checks": "max_words"})),
        ("checks-bad-param", rec(meta={"checks": [{"type": "max_words", "n": "ten"}]})),
        ("nan", head + json.dumps(GOOD[kind])[:-1].encode() + b', "x": NaN}\n'),
        ("infinity", head + json.dumps(GOOD[kind])[:-1].encode() + b', "x": Infinity}\n'),
        ("invalid-utf8", head + b'{"id": "bad", "prompt": "\xff\xfe"}\n'),
        ("deep-nesting", head + b'{"id": "bad", "prompt": "p", "meta": {"x": ' + b"[" * 5000
         + b"]" * 5000 + b"}}\n"),
        ("not-an-object", head + b"[1, 2]\n"),
        ("truncated-json", head + json.dumps(GOOD[kind])[:12].encode() + b"\n"
         + good[0].encode() + b"\n"),
    ]
    return out


class _Drop:
    pass


_DROP = _Drop()

# command -> (kinds it reads, argv builder(input, out_dir) -> (args, output path))
COMMANDS = {
    "score": (("samples", "pair"),
              lambda f, o, m: (["score", "--scorer", "length", f, "-o", o / "out.jsonl"], o / "out.jsonl")),
    "gen-pairs": (("prompt",),
                  lambda f, o, m: (["gen-pairs", "--model", m, f, "-o", o / "out.jsonl"], o / "out.jsonl")),
    "eval-prompts": (("prompt",),
                     lambda f, o, m: (["eval", "--model", m, f, "--report", o / "rep"], o / "rep")),
    "eval-samples": (("samples",),
                     lambda f, o, m: (["eval", f, "--scorer", "length", "--report", o / "rep"], o / "rep")),
    "relabel": (("samples",),
                lambda f, o, m: (["relabel", f, "-o", o / "out.jsonl"], o / "out.jsonl")),
    "train-policy-dpo": (("pair",),
                         lambda f, o, m: (["train-policy", "--method", "dpo", "--model", m, f,
                                           "-o", o / "m"], o / "m")),
    "train-policy-pro": (("ranking",),
                         lambda f, o, m: (["train-policy", "--method", "pro", "--model", m, f,
                                           "-o", o / "m"], o / "m")),
    "train-policy-kto": (("unpaired",),
                         lambda f, o, m: (["train-policy", "--method", "kto", "--model", m, f,
                                           "-o", o / "m"], o / "m")),
    "train-policy-sft": (("completion",),
                         lambda f, o, m: (["train-policy", "--method", "sft", "--model", m, f,
                                           "-o", o / "m"], o / "m")),
    "train-policy-grpo": (("prompt",),
                          lambda f, o, m: (["train-policy", "--method", "grpo", "--model", m, f,
                                            "--reward", "length", "-o", o / "m"], o / "m")),
    "train-rm": (("pair",),
                 lambda f, o, m: (["train-rm", "--model", m, f, "-o", o / "m"], o / "m")),
    "distill": (("prompt",),
                lambda f, o, m: (["distill", "--method", "gkd", "--teacher", m, "--student", m, f,
                                  "-o", o / "m"], o / "m")),
}
CASES = [(cmd, kind, name) for cmd, (kinds, _) in COMMANDS.items() for kind in kinds
         for name, _ in variants(kind)]


def _run_case(cli, tmp_path, tiny_model, cmd, data: bytes, suffix=".jsonl"):
    work = tmp_path / "work"
    work.mkdir()
    src = tmp_path / f"in{suffix}"
    src.write_bytes(data)
    args, output = COMMANDS[cmd][1](src, work, tiny_model)
    r = cli(args)
    left = sorted(p.name for p in work.iterdir())
    return r, src, output, left


@pytest.mark.parametrize("cmd, kind, name", CASES)
def test_a_bad_line_3_exits_3_with_its_location_and_leaves_nothing(cli, tmp_path, tiny_model,
                                                                   cmd, kind, name):
    data = dict(variants(kind))[name]
    r, src, output, left = _run_case(cli, tmp_path, tiny_model, cmd, data)
    assert r.code == 3, (cmd, kind, name, r)
    assert f"{src}:3:" in r.err or f"{src}:4:" in r.err, (cmd, kind, name, r.err)
    assert "Traceback" not in r.err
    assert left == [], (cmd, kind, name, left)


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("what", ["empty", "blank-lines", "binary", "truncated-gzip"])
def test_unreadable_files_exit_3_and_leave_nothing(cli, tmp_path, tiny_model, cmd, what):
    kind = COMMANDS[cmd][0][0]
    good = ("\n".join(_lines(kind, 50)) + "\n").encode()
    data, suffix = {
        "empty": (b"", ".jsonl"),
        "blank-lines": (b"\n\n  \n", ".jsonl"),
        "binary": (bytes(range(256)) * 8, ".jsonl"),
        "truncated-gzip": (gzip.compress(good)[:-20], ".jsonl.gz"),
    }[what]
    r, src, output, left = _run_case(cli, tmp_path, tiny_model, cmd, data, suffix)
    assert r.code == 3, (cmd, what, r)
    assert str(src) in r.err and "Traceback" not in r.err
    assert left == [], (cmd, what, left)


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("bad", ["under-a-file", "existing"])
def test_bad_output_paths_fail_before_any_work(cli, tmp_path, tiny_model, cmd, bad):
    """An output path that cannot be written (or an existing output without --force)
    fails with exit 2 before a model is loaded or a record read: the input here is
    not even readable, so reading it first would give exit 3."""
    blocker = tmp_path / "file"
    blocker.write_text("keep\n")
    src = tmp_path / "in.jsonl"
    src.write_text("not json\n")
    work = tmp_path / "w"
    work.mkdir()
    args, output = COMMANDS[cmd][1](src, work, tiny_model)
    if bad == "under-a-file":
        args = [str(blocker / "out") if a == output else a for a in args]
    else:
        if output.suffix:
            if cmd.startswith("score") or cmd.startswith("gen") or cmd == "relabel":
                pytest.skip("file outputs are replaced atomically by design")
        output.mkdir()
        (output / "x").write_text("1")
    r = cli(args)
    assert r.code == 2, (cmd, bad, r)
    assert blocker.read_text() == "keep\n"
    assert not list(work.glob("*.partial"))
