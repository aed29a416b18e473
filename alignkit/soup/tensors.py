"""safetensors without memory-mapping: header parsing and validation, positioned reads
of one tensor at a time, and a writer whose header is planned before the tensors are
computed (so each merged tensor is written as soon as it exists)."""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, UsageError

# --- reading safetensors without memory-mapping ------------------------------------------

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_MAX_HEADER = 100 * 1024 * 1024


def torch_dtype(st: str):
    import torch
    return getattr(torch, _ST_DTYPES[st])


def _st_code(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for code, n in _ST_DTYPES.items():
        if n == name:
            return code
    raise UsageError(f"cannot write tensors of dtype {dtype}")


@dataclass
class TensorInfo:
    path: Path
    dtype: str      # safetensors code, e.g. F32
    shape: tuple
    start: int      # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; tensors in file order."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DataError("not a safetensors file (too short)", str(path))
        n = struct.unpack("<Q", raw)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise DataError(f"not a safetensors file (header length {n})", str(path))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"corrupt safetensors header: {e}", str(path)) from None
    if not isinstance(header, dict):
        raise DataError("corrupt safetensors header: not an object", str(path))
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (b, end) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
            itemsize = torch_dtype(code).itemsize
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"corrupt safetensors header entry {name!r}", str(path)) from None
        if not (0 <= b <= end and 8 + n + end <= size and end - b == math.prod(shape) * itemsize):
            raise DataError(f"tensor {name}: data offsets {[b, end]} do not fit its shape or the file",
                            str(path))
        out[name] = TensorInfo(path, code, shape, 8 + n + b, end - b)
    return dict(sorted(out.items(), key=lambda kv: kv[1].start))


class TensorFiles:
    """The tensors of one or more safetensors files, read one tensor at a time."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None):
        self.entries: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if weight_map is not None and weight_map.get(name) != f.name:
                    continue
                if name in self.entries:
                    raise DataError(f"tensor {name} is stored twice", str(f))
                self.entries[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.entries:
                    raise DataError(f"index names tensor {name} in {fname}, which lacks it",
                                    str(files[0].parent / "model.safetensors.index.json"))
        self._fds: dict[Path, int] = {}

    def read(self, name: str):
        """The tensor in its stored dtype (a fresh buffer, no mmap)."""
        import torch
        info = self.entries[name]
        fd = self._fds.get(info.path)
        if fd is None:
            fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.start + done)
            if got <= 0:
                raise DataError(f"tensor {name}: file ends early", str(info.path))
            done += got
        return buf.view(torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def weight_files(folder: Path) -> TensorFiles:
    """A full model folder's weights: the index's shards, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / v for v in wmap.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"invalid index: {e}", str(index)) from None
        for f in files:
            if not f.exists():
                raise DataError(f"shard {f.name} is missing", str(index))
        return TensorFiles(files, wmap)
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" ({', '.join(pickles)} are pickles, which merge-soup never loads)" if pickles else ""
        raise UsageError(f"{folder}: no *.safetensors weights{hint}")
    return TensorFiles(files)



def plan_shards(specs: list[tuple[str, tuple, Any]], max_bytes: int) -> list[list]:
    """Greedy: fill each shard up to max_bytes (a tensor larger than that gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(path: Path, specs: list[tuple[str, tuple, Any]], produce: Callable[[str], Any],
                      on_tensor: Callable[[], None] = lambda: None) -> int:
    """Write a safetensors file whose header is known up front, computing each tensor
    with `produce(name)` only when its turn comes. Returns the data size in bytes."""
    import torch
    if sys.byteorder != "little":
        raise UsageError("writing safetensors needs a little-endian machine")
    specs = sorted(specs, key=lambda s: -s[2].itemsize)  # keeps every offset aligned
    header, off = {}, 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _st_code(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dtype in specs:
            t = produce(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise UsageError(f"tensor {name}: merged shape {list(t.shape)}, expected {list(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
            on_tensor()
    return off
