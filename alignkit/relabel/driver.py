"""The relabel driver: validate each record for the strategy, run the strategy one batch
at a time, then the post-processing every strategy shares.

Reference values: a strategy that rewrites a prompt or completion text
(`Strategy.rewrites_text`, e.g. reward-augmented) gets its outputs' reference values
(`ref_logp_*`, `ref_logp`) dropped here, since they were computed for the input's text.

Ids: a samples record's id is unique in its file (records.UNIQUE_ID_KINDS: one record
per prompt); a repeated one is a DataError at its line (pairs may repeat ids).

Post-processing: `dedupe` drops a record whose content repeats an earlier one
((prompt, chosen, rejected) for pairs; (prompt, completion, label) for unpaired;
(prompt, completion texts) for rankings). `length_balance=SHARE` (pair outputs): let
N be the kept pairs and L those whose chosen has more words than rejected
(alignkit.checks word count); the smallest number d of L-pairs is dropped such that
(|L| − d) ≤ SHARE·(N − d), the d pairs drawn uniformly from L with `random.Random(seed)`;
output order is kept. A strategy that buffers (or `length_balance`) holds its output
records until the end.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any, Iterable, Iterator

from ..checks import as_text, count_words
from ..errors import DataError, UsageError
from ..records import UNIQUE_ID_KINDS, validate
from ..registry import params_of
from .base import (KEPT, STRATEGIES, RelabelOptions, Where, is_cut, without_kept,
                   without_references)

KIND_PLURAL = {"pair": "pairs", "ranking": "rankings", "unpaired": "unpaired records",
               "prompt": "prompt records"}  # prompt: referee-tasks (referee.py)
PAIR_ONLY = ("length_balance", "min_chosen")  # shared options that need pair outputs


def length_balance(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """Drop randomly chosen pairs whose chosen is longer (in words) until such pairs are
    at most `share` of the kept ones; returns (kept pairs in order, number dropped)."""
    longer = [i for i, p in enumerate(pairs)
              if count_words(as_text(p["chosen"])) > count_words(as_text(p["rejected"]))]
    n, d = len(pairs), 0
    while len(longer) - d > share * (n - d) + 1e-12:
        d += 1
    drop = set(random.Random(seed).sample(longer, d))
    return [p for i, p in enumerate(pairs) if i not in drop], d


def content_key(rec: dict) -> str:
    if "chosen" in rec:
        parts = [rec["prompt"], rec["chosen"], rec["rejected"]]
    elif "completion" in rec:
        parts = [rec["prompt"], rec["completion"], rec.get("label")]
    else:
        parts = [rec["prompt"], [c["text"] for c in rec["completions"]]]
    canon = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


class Relabeler:
    """Run one strategy over records; `summary` counts what was kept and dropped."""

    def __init__(self, strategy: str = "best-worst", options: RelabelOptions | None = None,
                 batch_records: int = 64):
        entry = STRATEGIES.get(strategy)
        cls = entry.load()
        self.opts = o = options or RelabelOptions()
        shared = {p.name: p for p in params_of(RelabelOptions)}
        for p in shared.values():  # the shared options, validated as their flags are
            p.coerce(getattr(o, p.name))
        params = entry.options(cls.given(o.params))  # another strategy's flag: UsageError
        self.summary: Counter = Counter()
        self.strategy = cls(o, self.summary, params)
        self.batch_records = batch_records
        if self.strategy.output != "pair":
            for name in PAIR_ONLY:
                if getattr(o, name) is not None:
                    raise UsageError(f"{shared[name].flag_name} applies to pair outputs, "
                                     f"not {strategy}")
        self.strategy.check_options()
        self._ids: set[str] = set()

    def _validated(self, rec: Any, where: Where) -> dict:
        inputs = self.strategy.inputs
        kind = "pair" if isinstance(rec, dict) and ("chosen" in rec or "rejected" in rec) \
            else "samples"
        if kind not in inputs:
            raise DataError(f"strategy {self.strategy.name!r} reads "
                            f"{' or '.join(inputs)} records, got a {kind} record", *where)
        try:
            validate(rec, kind)
            if kind in UNIQUE_ID_KINDS:
                if rec["id"] in self._ids:
                    raise DataError(f"duplicate id {rec['id']!r} (a {kind} file holds one "
                                    "record per prompt)", field="id")
                self._ids.add(rec["id"])
            return rec
        except DataError as e:
            raise e.at(*where) from None

    def run(self, records: Iterable[dict | tuple[dict, Where]]) -> Iterator[dict]:
        """Yield output records. Items are records or (record, (path, line)) tuples."""
        buffered = self.strategy.buffered or self.opts.length_balance is not None
        seen: set[str] = set()
        held: list[dict] = []
        batch: list[tuple[dict, Where]] = []

        def flush():
            outs = self.strategy.process(batch)
            batch.clear()
            for out in outs:
                out = without_kept(out)  # the one place the bookkeeping key leaves
                if self.strategy.rewrites_text:
                    out = without_references(out)
                if self.opts.dedupe:
                    key = content_key(out)
                    if key in seen:
                        self.summary["duplicate"] += 1
                        continue
                    seen.add(key)
                if buffered:
                    held.append(out)
                else:
                    self.summary["_written"] += 1
                    yield out

        for item in records:
            rec, where = item if isinstance(item, tuple) else (item, (None, None))
            rec = self._validated(rec, where)
            self.summary["_read"] += 1
            rec = without_kept(rec)  # the bookkeeping key is ours, never the input's
            if self.opts.finished_only and isinstance(rec.get("completions"), list):
                idx = [i for i, c in enumerate(rec["completions"]) if not is_cut(c)]
                self.summary["cut completions"] += len(rec["completions"]) - len(idx)
                if not idx:
                    self.summary["records with every completion cut"] += 1
                    continue
                rec = {**rec, "completions": [rec["completions"][i] for i in idx], KEPT: idx}
            batch.append((rec, where))
            if len(batch) >= self.batch_records:
                yield from flush()
        if batch:
            yield from flush()
        if buffered:
            outs = self.strategy.finish(held)
            if self.opts.length_balance is not None:
                outs, d = length_balance(outs, self.opts.length_balance, self.opts.seed)
                self.summary["length-balance"] += d
            self.summary["_written"] += len(outs)
            yield from outs

    def summary_text(self) -> str:
        s = self.summary
        text = (f"relabel {self.strategy.name}: read {s['_read']} records, wrote "
                f"{s['_written']} {KIND_PLURAL[self.strategy.output]}")
        text += self.strategy.summary_note()
        dropped = [f"{k} {v}" for k, v in sorted(s.items()) if not k.startswith("_") and v]
        text += "; dropped: " + (", ".join(dropped) if dropped else "nothing")
        return text


def relabel(records: Iterable[dict], strategy: str = "best-worst", **options) -> list[dict]:
    """Convenience: run a strategy over in-memory records; options as RelabelOptions
    (the shared ones and the strategy's own parameters)."""
    return list(Relabeler(strategy, RelabelOptions(**options)).run(records))
