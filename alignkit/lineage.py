"""Provenance you can follow: walk an artifact's manifests back to its origins.

Every alignkit output has a manifest: `FILE.alignkit.json` beside a records file,
`alignkit.json` inside a model folder. A manifest names the command that made the
artifact and its inputs with their sha256 (`inputs`: path or `model:SPEC` -> sha256,
and blocks such as `data`, `base`, `reference` holding `path`/`spec` and `sha256`).
`trace(artifact)` follows those inputs recursively and returns a tree of nodes:

    {"artifact": path, "kind": "records" | "model" | "embedded model" | "missing" | ...,
     "sha256": ..., "command": ..., "created_by": manifest path, "status": "ok" |
     "changed" (the file's sha256 no longer matches the one its consumer recorded) |
     "missing" | "no manifest", "inputs": [child nodes]}

A relative input path is looked up as recorded (relative to where the command ran),
then beside the artifact. Cycles and repeated inputs are shown once ("seen").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["trace", "render", "manifest_of"]

_BLOCKS = ("data", "base", "reference", "ref", "teacher", "teacher_ref", "student", "eval_pairs")


def manifest_of(path: Path) -> Path | None:
    """The manifest of an artifact (a records file or a model folder), if any."""
    if path.is_dir():
        m = path / "alignkit.json"
    else:
        m = path.parent / f"{path.name}.alignkit.json"
    return m if m.is_file() else None


def _sha256(path: Path) -> str | None:
    from .io import file_sha256
    try:
        return file_sha256(path) if path.is_file() else None
    except OSError:
        return None


def _inputs(man: dict) -> list[tuple[str, str | None, str]]:
    """(reference, recorded sha256, role) for every input a manifest names."""
    out, seen = [], set()
    for key, sha in (man.get("inputs") or {}).items():
        role = "input"
        if isinstance(key, str) and ":" in key and key.split(":", 1)[0] in ("model", "ref"):
            role, key = key.split(":", 1)
        if key in seen or key == "data":  # `data` (a bare sha256) is named by the data block
            continue
        seen.add(key)
        out.append((str(key), sha if isinstance(sha, str) else None, role))
    for block in _BLOCKS:
        b = man.get(block)
        if isinstance(b, dict):
            ref = b.get("path") or b.get("spec")
            if isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                out.append((ref, b.get("sha256"), block))
    return out


def _locate(ref: str, beside: Path) -> Path | None:
    p = Path(ref)
    if p.exists():
        return p
    if not p.is_absolute() and (beside / p).exists():
        return beside / p
    if (beside / p.name).exists():
        return beside / p.name
    return None


def trace(artifact: str | Path, _seen: set | None = None, _want: str | None = None,
          _role: str = "artifact") -> dict:
    """The provenance tree of `artifact` (see the module docstring)."""
    seen = set() if _seen is None else _seen
    path = Path(artifact)
    node: dict[str, Any] = {"artifact": str(artifact), "role": _role}
    if not path.exists():
        from .models import EMBEDDED
        if str(artifact) in EMBEDDED:
            node.update(kind="embedded model", status="ok", inputs=[])
        else:
            node.update(kind="missing", status="missing", inputs=[])
        if _want:
            node["sha256"] = _want
        return node
    key = str(path.resolve())
    node["kind"] = "model" if path.is_dir() else "records"
    sha = _sha256(path) if path.is_file() else _want
    node["sha256"] = sha
    node["status"] = "changed" if (_want and path.is_file() and sha != _want) else "ok"
    if key in seen:
        node.update(status="seen", inputs=[])
        return node
    seen.add(key)
    man_path = manifest_of(path)
    if man_path is None:
        node.update(inputs=[])
        if node["status"] == "ok":
            node["status"] = "no manifest"
        return node
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{man_path}: not a readable manifest ({e})") from None
    if not isinstance(man, dict):
        raise UsageError(f"{man_path}: not a manifest (expected a JSON object)")
    node["command"] = man.get("command")
    node["created_by"] = str(man_path)
    if man.get("seed") is not None:
        node["seed"] = man["seed"]
    beside = path.parent if path.is_file() else path.parent
    children = []
    for ref, want, role in _inputs(man):
        found = _locate(ref, beside)
        children.append(trace(found if found is not None else ref, seen, want, role))
    node["inputs"] = children
    return node


def render(node: dict, indent: str = "") -> list[str]:
    """The tree as text lines: artifact, status, the command that made it."""
    status = "" if node["status"] == "ok" else f" [{node['status']}]"
    role = "" if node.get("role") in ("artifact", "input") else f" ({node['role']})"
    lines = [f"{indent}{node['artifact']}{role}{status}"]
    if node.get("command"):
        lines.append(f"{indent}  $ {node['command']}")
    kids = node.get("inputs") or []
    for i, child in enumerate(kids):
        last = i == len(kids) - 1
        sub = render(child, indent + ("   " if last else "|  "))
        sub[0] = indent + ("`- " if last else "|- ") + sub[0][len(indent) + 3:]
        lines += sub
    return lines
