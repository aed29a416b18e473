"""Reading and writing records and artifacts, safely.

- `read_records`: one streaming reader for every input (JSONL, `.jsonl.gz`, `-` for
  stdin). Memory is constant in the file size (one line at a time, bounded length);
  every problem is a `DataError` with path, line and field.
- `RecordWriter` / `atomic_file` / `atomic_dir`: outputs are written under a temporary
  name in the target directory and renamed at the end, so a failed or interrupted run
  leaves nothing behind and never touches an existing output.
- `write_manifest`: the `<output>.alignkit.json` sidecar (or `alignkit.json` in a folder).
- `parse_shard` / `in_shard`: the `--shard I/N` helper of data commands.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError, UsageError
from .formats import to_trl_names
from .records import UNIQUE_ID_KINDS, validate

MAX_LINE_BYTES = int(float(os.environ.get("ALIGNKIT_MAX_LINE_MB", "16")) * 1024 * 1024)
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile(rb"\\u[dD][89abAB]")


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _open_binary(path: str):
    if path == "-":
        if stdin_is_terminal():
            raise UsageError("refusing to read records from a terminal: "
                             "give an input path or pipe data in (use '-' for stdin)")
        stream = sys.stdin.buffer
        return contextlib.nullcontext(stream)
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if p.is_dir():
        raise UsageError(f"{path}: is a directory, expected a JSONL file")
    if path.endswith(".gz"):
        return gzip.open(p, "rb")
    return open(p, "rb")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(s: str) -> float:
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {s} overflows to infinity")
    return v


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in object")
        out[k] = v
    return out


def parse_json_line(raw: bytes) -> Any:
    """Strict JSON of one line: UTF-8, finite numbers, no duplicate keys, valid
    unicode (no lone surrogate escapes). Raises DataError without a location."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                         object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:
        raise DataError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise DataError("invalid JSON: nesting too deep") from None
    if _SURROGATE.search(raw):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError("invalid JSON: string holds an unpaired UTF-16 surrogate") from None
    return obj


class RecordReader:
    """Iterate validated records of a JSONL file (or stdin, or .jsonl.gz).

    After iteration, `sha256` is the digest of the bytes read and `count` the number of
    records. BOM, CRLF line ends and blank lines are accepted; an input with no record
    is an error (`allow_empty=True` to accept it).
    """

    def __init__(self, path: str, kind: str | None = None, *, unique_ids: bool | None = None,
                 allow_empty: bool = False, max_line_bytes: int | None = None):
        self.path = path
        self.name = "<stdin>" if path == "-" else path
        self.kind = kind
        # ids are unique in prompt and samples files (records.UNIQUE_ID_KINDS) unless
        # the caller says otherwise
        self.unique_ids = (kind in UNIQUE_ID_KINDS) if unique_ids is None else unique_ids
        self.allow_empty = allow_empty
        self.max_line_bytes = max_line_bytes or MAX_LINE_BYTES
        self.sha256: str | None = None
        self.count = 0
        self.line = 0  # line number of the record last yielded (for located errors)
        self._table = table_format(path)  # Parquet / datasets folder, else JSONL
        self._stream = None if self._table else _open_binary(path)  # fail early: missing file, tty

    def __iter__(self) -> Iterator[dict]:
        digest = hashlib.sha256()
        seen: set[str] = set()
        rows = self._table_rows(digest) if self._table else self._json_lines(digest)
        for lineno, obj in rows:
            try:
                if self.kind is not None:
                    validate(obj, self.kind)
                elif not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {type(obj).__name__}")
            except DataError as e:
                raise e.at(self.name, lineno) from None
            if self.unique_ids and "id" in obj:
                rid = obj["id"]
                if rid in seen:
                    raise DataError(f"duplicate id {rid!r}", self.name, lineno, "id")
                seen.add(rid)
            self.count += 1
            self.line = lineno
            yield obj
        self.sha256 = digest.hexdigest()
        if self.count == 0 and not self.allow_empty:
            raise DataError("empty input: no records", self.name)

    def _json_lines(self, digest) -> Iterator[tuple[int, Any]]:
        limit = self.max_line_bytes
        with self._stream as f:
            lineno = 0
            while True:
                try:
                    raw = f.readline(limit + 1)
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise DataError(f"cannot read input: {e}", self.name, lineno + 1) from None
                if not raw:
                    break
                lineno += 1
                digest.update(raw)
                if len(raw) > limit and not raw.endswith(b"\n"):
                    raise DataError(
                        f"line longer than {limit // (1024 * 1024)} MiB "
                        "(set ALIGNKIT_MAX_LINE_MB to raise the limit)", self.name, lineno)
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                if not raw.strip():
                    continue
                try:
                    obj = parse_json_line(raw)
                except DataError as e:
                    raise e.at(self.name, lineno) from None
                yield lineno, obj

    def _table_rows(self, digest) -> Iterator[tuple[int, Any]]:
        """Rows of a Parquet file or a `Dataset.save_to_disk` folder, streamed in record
        batches; row numbers (1-based) stand in for line numbers in errors."""
        files = _table_files(Path(self.path), self._table)
        for f in files:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        row = 0
        try:
            for batch in _table_batches(files, self._table):
                for obj in batch.to_pylist():
                    row += 1
                    yield row, obj
        except DataError:
            raise
        except Exception as e:  # pyarrow's own errors: a truncated or foreign file
            raise DataError(f"cannot read {self._table} data: {e}", self.name, row + 1) from None


def table_format(path: str) -> str | None:
    """'parquet' for a .parquet file, 'arrow' for a `datasets` save_to_disk folder."""
    if path == "-":
        return None
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        return "parquet"
    if p.is_dir() and (p / "state.json").is_file():
        return "arrow"
    return None


def _table_files(folder: Path, fmt: str) -> list[Path]:
    if fmt == "parquet":
        return [folder]
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"not a datasets folder ({folder / 'state.json'}: {e})", str(folder)) from None
    return [folder / n for n in names]


def _table_batches(files: list[Path], fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for f in files:
        if fmt == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=1024)
        else:
            with pa.memory_map(str(f)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)
                    continue
                yield from reader


def read_records(path: str, kind: str | None = None, **kw) -> RecordReader:
    """Shorthand for `RecordReader(path, kind, **kw)`."""
    return RecordReader(path, kind, **kw)


def load_records(path: str, kind: str | None = None, **kw) -> list[dict]:
    """Read a whole (small) file into a list; use `read_records` to stream."""
    return list(RecordReader(path, kind, **kw))


def dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


# --- atomic outputs --------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def sweep_stale_temps(target: str | os.PathLike) -> int:
    """Remove the temp files/folders an earlier run killed with SIGKILL left beside
    `target` (`.NAME.PID.xxxx.tmp` whose PID is no longer running); their count."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    pat = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^/]*\.tmp$")
    n = 0
    try:
        entries = list(parent.iterdir())
    except OSError:
        return 0
    for e in entries:
        m = pat.match(e.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    e.unlink()
            n += 1
    return n


def discard_folder(folder: str | os.PathLike, target: str | os.PathLike) -> None:
    """Remove `folder`, a finished run's work folder (`OUT.partial/`) now that `target`
    (OUT) is published, so that no kill leaves it half-deleted under its own name: it is
    first renamed, in one step, to a temp name beside `target`
    (`.NAME.PID.done.tmp`), which `sweep_stale_temps` removes if a kill interrupts the
    deletion."""
    folder, target = Path(folder), Path(target)
    if not folder.exists():
        return
    parent = target.parent if str(target.parent) else Path(".")
    trash = parent / f"{_temp_prefix(target)}done.tmp"
    try:
        os.rename(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_special(path: str | os.PathLike) -> bool:
    """Whether `path` names something that is not a regular file nor absent: a device
    (`/dev/null`), a FIFO, a socket, or `/dev/stdout`-style links to one. Those are
    written in place, never replaced by a rename."""
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return False
    except OSError:
        return False
    import stat
    return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))


def check_output_file(path: str | os.PathLike) -> Path:
    """Check that a file output can be written (before any work); returns the path to
    write: the file a symlink points to, so the link itself stays. UsageError for a
    folder, a missing or unwritable parent folder."""
    path = Path(path)
    if path.is_symlink() and not is_special(path):
        path = Path(os.path.realpath(path))
    if is_special(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path}: not writable")
        return path
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Write a file under a temp name in its directory; rename on success only.

    The final file gets the permissions a plain `open()` would give (0666 less the
    umask). A device, FIFO or socket (`/dev/null`, `/dev/stdout`) is written in place
    and never replaced; a symlink to a regular file replaces the file it points to.
    """
    target = check_output_file(path)
    text_kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    if is_special(target):
        with open(target, mode, **text_kw) as f:
            yield f
        return
    try:
        sweep_stale_temps(target)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    except OSError as e:
        e.filename = str(path)  # the CLI names the user's path, not the temp file
        raise
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        if str(target).endswith(".gz") and "b" not in mode:
            # mtime=0: same records -> byte-identical file (determinism).
            raw = open(tmp, "wb")
            f = io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="wb", mtime=0),
                                 encoding="utf-8", newline="\n")
        else:
            raw = None
            f = open(tmp, mode, **text_kw)
        with f:
            yield f
        if raw is not None:
            raw.close()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class RecordWriter:
    """Write records as JSONL to a path (atomically) or to stdout (`-`). Reference
    log-probs are written under alignkit's and TRL's names (`formats.to_trl_names`).

    Use as a context manager; `count` holds the number written. A `BrokenPipeError`
    on stdout is left to the CLI, which ends quietly.
    """

    def __init__(self, path: str = "-"):
        self.path = path
        self.count = 0
        self._cm = None
        self._f = None

    def __enter__(self) -> "RecordWriter":
        if self.path == "-":
            self._f = sys.stdout
        else:
            self._cm = atomic_file(self.path)
            self._f = self._cm.__enter__()
        return self

    def write(self, record: dict) -> None:
        # reference log-probs also under TRL's names, so TRL's DPOTrainer reuses them
        self._f.write(dumps(to_trl_names(record)) + "\n")
        self.count += 1

    def write_all(self, records: Iterable[dict]) -> None:
        for r in records:
            self.write(r)

    def __exit__(self, exc_type, exc, tb):
        if self._cm is not None:
            return self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._f.flush()
        return False


def check_output_dir(path: str | os.PathLike, force: bool = False, *,
                     empty_ok: bool = False) -> Path:
    """Check a folder output before any work: an existing file is never replaced by a
    folder; an existing folder needs `force` (or, with `empty_ok`, to be empty); the
    nearest existing parent must be a writable folder. UsageError otherwise."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a folder: refusing to replace a file "
                             "with a folder")
        if not force and not (empty_ok and not any(path.iterdir())):
            raise UsageError(f"{path} already exists (use --force to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: folder {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False):
    """Build a folder under a temp name beside `path`; move it into place on success.

    An existing `path` is refused unless `force`; with `force` it is replaced only
    after the new folder is complete. On error or Ctrl-C the temp folder is removed.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder: refusing to replace a file "
                         "with a folder")
    try:
        sweep_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent))
    except OSError as e:
        e.filename = str(path)
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            old = parent / f".{path.name}.{os.getpid()}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- manifests -------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """alignkit's and the stack's versions, without importing the libraries."""
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for dist in ("alignkit", "torch", "transformers", "trl", "peft", "datasets",
                 "accelerate", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def manifest(*, inputs: dict[str, str] | None = None, seed: int | None = None,
             counts: dict[str, int] | None = None, started: float | None = None,
             **extra) -> dict:
    """The provenance record of an output (DESIGN.md "Model folders")."""
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "versions": versions(),
        "inputs": inputs or {},
        "seed": seed,
        "counts": counts or {},
        "wall_time_s": round(time.time() - started, 3) if started else None,
        **extra,
    }


def write_manifest(output: str, data: dict) -> None:
    """Write `<output>.alignkit.json` beside a file output (skipped for stdout)."""
    if output == "-" or is_special(output):
        return
    with atomic_file(f"{output}.alignkit.json") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


# --- sharding ---------------------------------------------------------------------------

def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """Parse `I/N` (0 <= I < N) into (I, N)."""
    if not spec:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise UsageError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def in_shard(record_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether a record belongs to a shard: by a hash of its id, so a record keeps its
    shard when the input grows (cron refreshes) and `cat` of all shards is complete."""
    if shard is None:
        return True
    i, n = shard
    h = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big")
    return h % n == i
