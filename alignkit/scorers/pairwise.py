"""`pairwise:DIR`: win probabilities within a group, from a reward model (SPPO's estimate).

Each completion i of a group (the completions of one samples record, or chosen and
rejected of a pair) gets a reward r_i from the reward model (same input format and
batching as `rm:DIR`). With P(i beats j) = σ(r_i − r_j), its score is

    p_win_i = (1/K) Σ_j σ(r_i − r_j)      (j over all K completions, self-term 0.5 included)

as in ALGORITHMS.md Part A §2 (uclaml/SPPO `compute_prob`). The value is stored as
`scores["pairwise:DIR"]` and as `p_win` on the completion.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

from .base import Item
from .rm import RewardModelScorer


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def win_probabilities(scores: Sequence[float]) -> list[float]:
    """p_i = mean_j σ(s_i − s_j) over all j (self-term 0.5 included)."""
    k = len(scores)
    return [sum(sigmoid(si - sj) for sj in scores) / k for si in scores]


class PairwiseScorer(RewardModelScorer):
    kind = "pairwise"

    def score(self, items: Sequence[Item]) -> list[float | None]:
        rewards = self.rewards(items)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[it.group].append(i)
        out: list[float | None] = [None] * len(items)
        for idx in groups.values():
            for i, p in zip(idx, win_probabilities([rewards[i] for i in idx])):
                out[i] = p
                items[i].extra["p_win"] = p
        return out
