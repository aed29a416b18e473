"""`length[:MAX[:CACHE]]`: the DAPO soft overlong penalty (ALGORITHMS.md Part B §8).

    R = 0                              if |y| <= MAX - CACHE
    R = ((MAX - CACHE) - |y|) / CACHE  if MAX - CACHE < |y| <= MAX
    R = -1                             if |y| > MAX

(TRL's `get_soft_overlong_punishment(MAX, CACHE)`.) It is an additive term: the
combination adds `weight * R` to the other scorers. Defaults: MAX=512, CACHE=128.

|y| is counted in **words** (alignkit.checks word tokens) by default, or in
**tokens** of the `--tokenizer` model (no special tokens) when one is given.
"""
from __future__ import annotations

from typing import Sequence

from ..checks import as_text, count_words
from ..errors import UsageError
from .base import Item, Scorer

DEFAULT_MAX, DEFAULT_CACHE = 512, 128


def soft_overlong(n: int, max_len: int, cache: int) -> float:
    if n <= max_len - cache:
        return 0.0
    if n <= max_len:
        return ((max_len - cache) - n) / cache
    return -1.0


class LengthScorer(Scorer):
    kind = "length"

    def __init__(self, name, arg, options):
        super().__init__(name, arg, options)
        parts = arg.split(":") if arg else []
        if len(parts) > 2:
            raise UsageError(f"scorer {name!r}: use length[:MAX[:CACHE]]")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"scorer {name!r}: MAX and CACHE must be integers") from None
        self.max_len = nums[0] if nums else DEFAULT_MAX
        self.cache = nums[1] if len(nums) > 1 else min(DEFAULT_CACHE, self.max_len)
        if self.max_len < 1 or not 0 <= self.cache <= self.max_len:
            raise UsageError(f"scorer {name!r}: need MAX >= 1 and 0 <= CACHE <= MAX")
        tok = options.get("tokenizer")
        if isinstance(tok, str):
            from ..models import load_tokenizer
            tok = load_tokenizer(tok)
        self.tokenizer = tok
        self.unit = "tokens" if tok is not None else "words"

    def length(self, completion) -> int:
        text = as_text(completion, "assistant")
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return count_words(text)

    def score(self, items: Sequence[Item]) -> list[float | None]:
        return [soft_overlong(self.length(it.completion), self.max_len, self.cache)
                for it in items]
