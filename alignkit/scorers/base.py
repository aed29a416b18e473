"""What every scorer shares: the unit of work (`Item`), the `Scorer` base class, and
small helpers (text rendering, tokenising a batch, choosing a device).

A scorer receives a list of `Item`s (one per completion, with its prompt, the record's
`meta`, the index of its group and its file location) and returns one value per item:
a float, or None when the item cannot be scored by that scorer (e.g. `rules` on a
record without `meta.checks`). A scorer may also put per-item details into
`item.extra` (e.g. `"checks"` for rules, `"p_win"` for pairwise); the combination copies
them onto the completion. Nothing here imports torch at module level.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..errors import DataError, UsageError
from ..text import as_messages, encode, has_chat_template, transcript as plain  # noqa: F401  (the text layer)


@dataclass
class Item:
    """One completion to score."""
    prompt: Any                       # str or chat message list
    completion: Any                   # str or chat message list
    meta: dict
    group: int = 0                    # completions of one group share this (pairwise)
    where: tuple[str | None, int | None] = (None, None)  # (path, line) for errors
    extra: dict = field(default_factory=dict)

    def located(self, err: DataError) -> DataError:
        return err.at(*self.where)


class Scorer:
    """Base class of a registered scorer kind.

    `name` is the key written into `scores` (the spec as given, e.g. `rm:models/rm`).
    Subclasses parse their spec arguments in `__init__` (raising UsageError) and
    implement `score`.
    """

    kind: ClassVar[str] = ""
    # Why an item may get no score (for the warning count on stderr).
    missing_reason: ClassVar[str] = "not scorable"

    def __init__(self, name: str, arg: str | None, options: dict):
        self.name = name
        self.arg = arg
        self.options = options

    def score(self, items: Sequence[Item]) -> list[float | None]:  # pragma: no cover
        raise NotImplementedError


def need_arg(kind: str, arg: str | None, what: str) -> str:
    if not arg:
        raise UsageError(f"scorer {kind!r} needs {what}: use {kind}:{what.upper()}")
    return arg


def device_of(options: dict) -> str:
    dev = options.get("device")
    if dev:
        return dev
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def batches(seq: Sequence, size: int):
    for i in range(0, len(seq), max(1, size)):
        yield i, seq[i:i + size]


def load_model(options: dict, spec: str, kind: str):
    """(model, tokenizer) of a "seq_cls" (reward model) or "causal" (judge) model on the
    scoring device, loaded once per build_scorer call (rm:DIR and pairwise:DIR share it)."""
    cache = options.setdefault("_models", {})
    if (kind, spec) not in cache:
        from .. import models
        loader = models.load_seq_cls if kind == "seq_cls" else models.load_causal_lm
        model, tok = loader(spec, options.get("dtype") or "auto",
                            allow_pickle=options.get("allow_pickle", False),
                            trust_remote_code=options.get("trust_remote_code", False))
        model.to(device_of(options))
        cache[(kind, spec)] = model, tok
    return cache[(kind, spec)]
