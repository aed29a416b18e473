"""The reader, the writer and atomic outputs: hostile inputs give exit 3 with
path:line: field: problem, and nothing is half-written."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from alignkit.errors import DataError, UsageError
from alignkit.io import (RecordWriter, atomic_dir, atomic_file, in_shard, load_records,
                         parse_shard, read_records)
from alignkit.records import derive_id, validate


def _bad(tmp_path, raw: bytes, kind="prompt", **kw):
    p = tmp_path / "in.jsonl"
    p.write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_records(str(p), kind, **kw)
    return e.value


GOOD = b'{"id": "a", "prompt": "hi"}\n'


@pytest.mark.parametrize("raw,line,needle", [
    (GOOD + b'{"id": "b", "prompt": \n', 2, "invalid JSON"),
    (GOOD + b'[1, 2]\n', 2, "expected a JSON object"),
    (GOOD + b'{"id": "b"}\n', 2, "missing required field"),
    (GOOD + b'{"id": "b", "prompt": 5}\n', 2, "expected string or array"),
    (GOOD + b'{"id": "b", "prompt": "x\xff"}\n', 2, "invalid UTF-8"),
    (GOOD + b'{"id": "b", "prompt": "x", "meta": {"v": NaN}}\n', 2, "NaN"),
    (GOOD + b'{"id": "b", "prompt": "x", "meta": {"v": Infinity}}\n', 2, "Infinity"),
    (GOOD + b'{"id": "b", "prompt": "x", "meta": {"v": 1e999}}\n', 2, "infinity"),
    (GOOD + b'{"id": "b", "id": "c", "prompt": "x"}\n', 2, "duplicate key"),
    (GOOD + b'{"id": "b", "prompt": "\\ud800"}\n', 2, "surrogate"),
    (GOOD + b'{"id": "b", "prompt": [{"role": "bot", "content": "x"}]}\n', 2, "must be one of"),
    (b'[' * 100000 + b']' * 100000 + b'\n', 1, "nesting"),
])
def test_bad_lines_name_line_and_problem(tmp_path, raw, line, needle):
    err = _bad(tmp_path, raw)
    assert err.line == line
    assert needle.lower() in str(err).lower()
    assert str(err).startswith(f"{tmp_path / 'in.jsonl'}:{line}: ")


def test_field_is_named(tmp_path):
    err = _bad(tmp_path, b'{"id": "a", "prompt": "p", "completions": [{"text": 3}]}\n', "samples")
    assert err.field == "completions[0].text"
    assert "completions[0].text: expected string or array, got number" in str(err)


def test_empty_file_is_an_error(tmp_path):
    err = _bad(tmp_path, b"")
    assert "empty" in str(err)
    err = _bad(tmp_path, b"\n\n  \n")
    assert "empty" in str(err)


def test_duplicate_ids(tmp_path):
    err = _bad(tmp_path, GOOD + GOOD, unique_ids=True)
    assert err.line == 2 and err.field == "id" and "duplicate id 'a'" in str(err)


def test_long_line_is_refused_in_bounded_memory(tmp_path):
    p = tmp_path / "in.jsonl"
    with open(p, "wb") as f:
        f.write(GOOD)
        f.write(b'{"id": "b", "prompt": "' + b"x" * (50 * 1024 * 1024) + b'"}\n')
    with pytest.raises(DataError) as e:
        load_records(str(p), "prompt")
    assert e.value.line == 2 and "longer than" in str(e.value)


def test_bom_crlf_blank_lines_accepted(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\r\n\r\n\n{"prompt": "y"}\r\n')
    recs = load_records(str(p), "prompt")
    assert [r["prompt"] for r in recs] == ["x", "y"]
    assert recs[1]["id"] == derive_id("y")


def test_gzip_roundtrip_and_sha(tmp_path):
    out = tmp_path / "o.jsonl.gz"
    with RecordWriter(str(out)) as w:
        w.write({"id": "a", "prompt": "é"})
    with gzip.open(out, "rt", encoding="utf-8") as f:
        assert json.loads(f.readline()) == {"id": "a", "prompt": "é"}
    r = read_records(str(out), "prompt")
    assert list(r)[0]["prompt"] == "é"
    assert r.count == 1 and len(r.sha256) == 64


def test_derived_ids_are_stable_and_distinct():
    assert derive_id("hello") == derive_id("hello")
    assert derive_id("hello") != derive_id("hello ")
    assert derive_id([{"role": "user", "content": "a"}]) == derive_id([{"content": "a", "role": "user"}])


def test_unknown_keys_preserved():
    rec = validate({"id": "x", "prompt": "p", "extra": {"k": [1]}}, "prompt")
    assert rec["extra"] == {"k": [1]}


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as w:
            w.write({"id": "1"})
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_atomic_file_on_keyboard_interrupt(tmp_path):
    target = tmp_path / "new.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_dir(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(UsageError, match="already exists"):
        with atomic_dir(target):
            pass
    with pytest.raises(ValueError):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError
    assert sorted(os.listdir(target)) == ["a.txt"]
    with atomic_dir(target, force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_shards_partition_ids():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    ids = [f"id{i}" for i in range(300)]
    parts = [[i for i in ids if in_shard(i, (k, 3))] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert all(50 < len(p) < 150 for p in parts)


# --- outputs that are not regular files, links and permissions ----------------------------

def test_a_character_device_is_written_in_place_never_replaced(tmp_path):
    import stat
    from alignkit.io import RecordWriter, write_manifest
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    with RecordWriter(str(dev)) as w:
        w.write({"id": "a"})
    write_manifest(str(dev), {"x": 1})
    assert stat.S_ISCHR(os.stat(dev).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no temp file, no manifest


def test_a_fifo_is_streamed_into(tmp_path):
    import stat
    import threading
    from alignkit.io import RecordWriter
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo).read()))
    t.start()
    with RecordWriter(str(fifo)) as w:
        w.write({"id": "a"})
    t.join(10)
    assert got == ['{"id": "a"}\n'] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlink_replaces_the_file_it_points_to(tmp_path):
    from alignkit.io import RecordWriter
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    with RecordWriter(str(link)) as w:
        w.write({"id": "b"})
    assert link.is_symlink() and real.read_text() == '{"id": "b"}\n'


def test_outputs_follow_the_umask(tmp_path):
    from alignkit.io import RecordWriter, atomic_dir
    old = os.umask(0o022)
    try:
        with RecordWriter(str(tmp_path / "o.jsonl")) as w:
            w.write({"id": "a"})
        with atomic_dir(tmp_path / "folder") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("make, msg", [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: None, "does not exist"),
])
def test_bad_output_paths_are_usage_errors_naming_the_path(tmp_path, make, msg):
    from alignkit.errors import UsageError
    from alignkit.io import RecordWriter
    target = tmp_path / "out.jsonl" if msg != "does not exist" else tmp_path / "no" / "o.jsonl"
    make(target)
    with pytest.raises(UsageError, match=msg):
        with RecordWriter(str(target)) as w:
            w.write({"id": "a"})


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    from alignkit.errors import UsageError
    from alignkit.io import atomic_dir
    f = tmp_path / "data.jsonl"
    f.write_text("keep\n")
    with pytest.raises(UsageError, match="not a folder"):
        with atomic_dir(f, force=True):
            pass
    assert f.read_text() == "keep\n"


def test_a_finished_work_folder_is_discarded_under_a_swept_temp_name(tmp_path, monkeypatch):
    """discard_folder renames OUT.partial/ away in one step before deleting it: a deletion
    cut short (here: a kill simulated by a no-op rmtree, under a dead PID) leaves no
    OUT.partial/, only a `.OUT.PID.done.tmp` that the next write to OUT sweeps."""
    import alignkit.io as akio
    from alignkit.io import discard_folder, sweep_stale_temps
    out, work = tmp_path / "model", tmp_path / "model.partial"
    out.mkdir()
    (work / "checkpoint-3").mkdir(parents=True)
    (work / "checkpoint-3" / "w.bin").write_bytes(b"x" * 100)
    discard_folder(work, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (work / "checkpoint-3").mkdir(parents=True)
    dead = 2 ** 22 + 12345  # above any pid_max this machine uses
    monkeypatch.setattr(akio.os, "getpid", lambda: dead)
    monkeypatch.setattr(akio.shutil, "rmtree", lambda *a, **k: None)
    discard_folder(work, out)
    monkeypatch.undo()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".model.{dead}.done.tmp", "model"]
    assert sweep_stale_temps(out) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    discard_folder(tmp_path / "absent.partial", out)  # nothing to discard: no error
