"""The reference log-prob cache: computed once, reused by reruns and other methods.

A cache file lives under `$ALIGNKIT_HOME/refcache/<key>.json`, where the key is the
sha256 of (reference model sha256, data sha256, tokenization fingerprint, precision).
Inside, each value is keyed by its token sequence (`data.seq_key`), so a method that
builds the same sequences from the same data (dpo, then sppo or copg on the same pairs)
finds them. Writes are atomic (a crash leaves the old file or none) and merge with what
is there.

`STATS["ref_batches"]` counts the reference forward passes (batches) run in this
process; tests use it to check that a second run skips the reference pass.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import console
from ..io import atomic_file

STATS = {"ref_batches": 0}
CACHE_VERSION = 1


def cache_dir() -> Path:
    from ..models import alignkit_home
    return alignkit_home() / "refcache"


def model_identity(spec) -> str:
    """sha256 of a model's weights; for a PEFT adapter, of the adapter and its base."""
    from ..models import adapter_base, model_sha256, resolve
    folder = resolve(spec)
    sha = model_sha256(folder)
    base = adapter_base(folder)
    if base:
        sha = hashlib.sha256(f"{sha}+{model_sha256(resolve(base))}".encode()).hexdigest()
    return sha


class RefCache:
    """Reference log-probs of one (model, data, tokenization, precision)."""

    def __init__(self, model_sha256: str, data_sha256: str, tokenization: str, precision: str,
                 enabled: bool = True):
        self.meta = {"version": CACHE_VERSION, "ref_model_sha256": model_sha256,
                     "data_sha256": data_sha256, "tokenization": tokenization,
                     "precision": precision}
        self.key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()
        self.enabled = enabled
        self.path = cache_dir() / f"{self.key}.json"

    def _read(self) -> dict[str, float]:
        if not self.enabled or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            console.warn(f"ignoring an unreadable reference cache {self.path}: {e}")
            return {}
        if {k: data.get(k) for k in self.meta} != self.meta:
            return {}
        return {k: float(v) for k, v in data.get("logps", {}).items()}

    def get(self, keys) -> dict[str, float]:
        """The cached values among `keys`."""
        have = self._read()
        return {k: have[k] for k in keys if k in have}

    def put(self, values: dict[str, float]) -> None:
        """Merge `values` into the cache file (atomic)."""
        if not self.enabled or not values:
            return
        merged = self._read()
        merged.update({k: float(v) for k, v in values.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as f:
            json.dump({**self.meta, "logps": merged}, f)
