"""Relabel strategies: scored samples (or pairs) -> training records.

One registry entry per strategy (`STRATEGIES`, in `base`), each a `Strategy` class in
the module of its family, with its own parameters declared on the entry:

- `pairs`: `best-worst` (default), `all-pairs`, `top-k`, `sppo`;
- `augment`: `reward-augmented` (goal score in the prompt, each pair twice);
- `rankings`: `rank` (PRO rankings) and `unpaired` (KTO records);
- `filters`: `filter` (noisy-pair filtering of pairs);
- `driver`: `Relabeler` (validation, batching, dedupe, length balance) and `relabel`.

Every strategy reads records one batch at a time; the ones that need the whole input
(`unpaired` without `--threshold`, `filter --keep`, and `--length-balance` on any pair
output) buffer their *output* records until the end.

Scores come from `alignkit score`: a completion's `score` (the combined score). A
completion without `score` is skipped (counted as "unscored completion"); a samples
record none of whose completions was ever scored (no `score` and no `scores` key) is a
DataError: run `alignkit score` first.

A pair has `id` = `{samples_id}-{chosen_index}-{rejected_index}` (reward-augmented adds
`-a` / `-b`), `prompt`, `chosen`, `rejected`, `score_chosen`, `score_rejected`, `margin`,
`scores_chosen` / `scores_rejected` (the per-scorer dicts, when present),
`ref_logp_chosen` / `ref_logp_rejected` (the completions' `logp`, when both have one;
dropped by a strategy that rewrites the prompt or a completion, e.g. reward-augmented,
since they were computed for the old text: the trainer then computes them),
`finished_chosen` / `finished_rejected` (written when either sample was cut by
max_new_tokens: the trainers then add no eos to the cut side, so that it matches its
`logp` and does not teach the policy to stop mid-sentence), `meta`, and the samples
record's other keys (e.g. `gen`). Ties (margin 0) are always dropped; `min_margin`
drops pairs with a smaller margin; `min_chosen` drops pairs whose chosen scores below
it (only pairs whose chosen reaches a quality bar, e.g. passes every rules check).
"""
from __future__ import annotations

# The strategy modules register in this order (best-worst, the default, first).
from .base import STRATEGIES, RelabelOptions, Strategy, strategy  # isort: skip
from .pairs import SPPO, AllPairs, BestWorst, TopK  # isort: skip
from .augment import (GOAL_TEMPLATE, RewardAugmented, format_goal, goal_score,  # isort: skip
                      parse_scale, swap_sides, with_goal)
from .rankings import Rank, Unpaired, quantile  # isort: skip
from .filters import Filter, bt_loss  # isort: skip
from .driver import Relabeler, content_key, length_balance, relabel  # isort: skip

__all__ = ["STRATEGIES", "RelabelOptions", "Relabeler", "relabel", "Strategy", "strategy",
           "GOAL_TEMPLATE", "format_goal", "goal_score", "with_goal", "parse_scale",
           "swap_sides", "quantile", "bt_loss", "length_balance", "content_key",
           "BestWorst", "AllPairs", "TopK", "SPPO", "RewardAugmented", "Rank", "Unpaired",
           "Filter"]
