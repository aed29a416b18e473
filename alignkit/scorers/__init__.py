"""Scorers: registered reward units and their weighted combination.

One implementation serves `alignkit score`, online `train-policy` rewards (`reward_fn`)
and `eval`. Spec strings name a scorer kind and its argument:

    rules                 verifiable checks from meta.checks (fraction passed)
    rm:DIR                sequence-classification reward model
    pairwise:DIR          SPPO win probability within the group, from a reward model
    judge:MODEL           LLM judge with a rubric (P(yes) per rubric item)
    python:MOD:FN         user function, TRL reward-function convention (or FILE.py:FN)
    length[:MAX[:CACHE]]  DAPO soft overlong penalty (words, or tokens with a tokenizer)
    aepo[:K]              AEPO multi-answer reward 1+1/sqrt(N*rank) / 1-1/N (meta.answer)
    code[:all]            share of meta.tests asserts passed by the completion's code (sandboxed)
    prm:DIR               process reward model: per-step P(correct), aggregated (min|prod|last|mean)
    prm-step:DIR          PRM P(correct) of the last step of meta.steps_prefix + completion (PROPA)
    mc-rollout:MODEL      Monte-Carlo step values: mean --verifier score of --rollouts continuations

Each scorer writes `scores[SPEC]` per completion (the spec string as given is the key).

**Combination** (TRL GRPO's rule, ALGORITHMS.md Part B §1): `score = Σ_k w_k · s_k` over
the scorers that gave the completion a value (weights default to 1). A scorer that
cannot score a completion (None: `rules` without `meta.checks`, `judge` without a
rubric, a user function returning None) is left out of the sum and out of `scores`;
when no scorer gives a value the completion gets no `score` at all (the key is removed)
and is counted on stderr; `relabel` skips such completions.

**Hybrid** (`hybrid=True`, multi-aspect rewards, HARMO): a record with `meta.checks`
is scored by `rules` alone (`score = w_rules · rules`); any other record by the other
scorers (weighted sum), which are not run on records with checks.

**Calibration** (InfAlign, Part B §12; `calibrate=REF_SAMPLES`): the reference
samples are scored with the same scorers; each combined score r is replaced by
C = P[r_ref < r] + ½·P[r_ref = r] over the reference scores of the same prompt, looked
up by the record's `id`, then by the id derived from its prompt text
(`records.derive_id`). A prompt without reference scores is a DataError.
`transform="exp:T"` then applies Φ(u) = exp(T·u) (`neg-exp:T`: −exp(−T·u), the
worst-of-N form). The raw combined score is kept as `score_raw`.

**Pairs**: chosen and rejected are a group of two; results go to `score_chosen`,
`score_rejected`, `scores_chosen`, `scores_rejected` (and `checks_chosen`,
`judge_chosen`, ...; pairwise win probabilities as `p_win: {"chosen", "rejected"}` plus
`p_win_chosen` / `p_win_rejected`).
"""
from __future__ import annotations

import bisect
import json
import math
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from ..errors import DataError, UsageError
from ..records import derive_id, detect_kind
from ..registry import Registry
from ..reward_models.inference import rm_inputs, rm_rewards
from .base import Item, Scorer
from .pairwise import win_probabilities
from .rules import RulesScorer, has_checks

__all__ = ["SCORERS", "Item", "Scorer", "CombinedScorer", "build_scorer", "parse_spec",
           "parse_weights", "parse_transform", "calibrated", "rm_inputs", "rm_rewards",
           "win_probabilities"]

# The scorer kinds: the implementation (a Scorer subclass) is imported on first use.
SCORERS = Registry("scorer", "--scorer")
for _name, _usage, _cls, _summary in [
    ("rules", "rules", "rules:RulesScorer", "verifiable checks from meta.checks (fraction passed)"),
    ("rm", "rm:DIR", "rm:RewardModelScorer", "reward-model folder from train-rm (pal/maxmin "
     "folders take --user/--aggregate)"),
    ("pairwise", "pairwise:DIR", "pairwise:PairwiseScorer", "SPPO win probability within the "
     "group, from a reward model"),
    ("judge", "judge:MODEL", "judge:JudgeScorer", "LLM judge: P(yes) per rubric item "
     "(meta.rubric or --rubric)"),
    ("python", "python:MODULE:FN", "python_fn:PythonScorer", "user function, TRL reward-function "
     "convention (or python:FILE.py:FN)"),
    ("length", "length[:MAX[:CACHE]]", "length:LengthScorer", "DAPO soft overlong penalty (words, "
     "or tokens with --tokenizer; default 512:128)"),
    ("aepo", "aepo[:K]", "aepo:AEPOScorer", "AEPO exploration reward, text adaptation: up to "
     "K candidates vs meta.answer, exact match; duplicates -> -1 (default K=5)"),
    ("code", "code[:all]", "code:CodeScorer", "CodeRL+ execution reward: share of meta.tests "
     "asserts the completion's code passes in a sandboxed subprocess (code:all: 1 iff all pass)"),
    ("prm", "prm:DIR", "prm:PRMScorer", "process reward model from train-rm --method prm: "
     "P(correct) per step, combined by --aggregate min|prod|last|mean (default min)"),
    ("prm-step", "prm-step:DIR", "prm:PRMStepScorer", "PROPA step reward: PRM P(correct) of "
     "the last step of meta.steps_prefix + the completion (one step on step prompts)"),
    ("mc-rollout", "mc-rollout:MODEL", "mc_rollout:MCRolloutScorer", "step-level DAPO "
     "(arXiv 2412.18279) stage A: per step prefix, mean --verifier score of --rollouts "
     "continuations from MODEL (writes mc_rollout.step_values)"),
]:
    SCORERS.add(_name, _summary, f"{__name__}.{_cls}", usage=_usage)


def scorer_help() -> str:
    """The --scorer/--reward help, from the registry."""
    return "Scorer spec, repeatable: " + " | ".join(e.usage for e in SCORERS) + "."


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`KIND[:ARG]` -> (kind, arg). Raises UsageError for an unknown kind."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("empty scorer spec")
    kind, sep, arg = spec.strip().partition(":")
    SCORERS.get(kind)
    return kind, (arg if sep else None)


def parse_weights(text: str | Sequence[float] | None, n: int) -> list[float]:
    """`"1,0.5"` (or a list) -> n finite floats; None -> all 1."""
    if text is None or text == "":
        return [1.0] * n
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        weights = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise UsageError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} value(s) for {n} scorer(s)")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("--weights must be finite")
    return weights


def parse_transform(text: str | None) -> Callable[[float], float] | None:
    """`exp:T` -> u ↦ exp(T·u); `neg-exp:T` -> u ↦ −exp(−T·u); None -> None."""
    if not text:
        return None
    name, _, arg = text.partition(":")
    try:
        t = float(arg)
    except ValueError:
        t = float("nan")
    if name not in ("exp", "neg-exp") or not math.isfinite(t):
        raise UsageError(f"--transform must be exp:T or neg-exp:T with a number T, got {text!r}")
    if name == "exp":
        return lambda u: math.exp(t * u)
    return lambda u: -math.exp(-t * u)


def calibrated(r: float, ref_sorted: Sequence[float]) -> float:
    """C = P[r_ref < r] + ½ P[r_ref = r] over sorted reference scores."""
    lo = bisect.bisect_left(ref_sorted, r)
    hi = bisect.bisect_right(ref_sorted, r)
    return (lo + 0.5 * (hi - lo)) / len(ref_sorted)


class CombinedScorer:
    """Several scorers with weights (and optional hybrid routing and calibration)."""

    def __init__(self, scorers: list[Scorer], weights: list[float], *, hybrid: bool = False,
                 transform: Callable[[float], float] | None = None):
        self.scorers = scorers
        self.weights = weights
        self.names = [s.name for s in scorers]
        self.hybrid = hybrid
        self.transform = transform
        self.reference: dict[str, list[float]] | None = None
        self.stats: Counter = Counter()  # "completions", "unscored", "missing:NAME"

    # --- core -------------------------------------------------------------------------
    def _raw(self, items: list[Item]) -> tuple[list[dict[str, float]], list[float | None]]:
        """Per-item {name: value} (None left out) and the weighted combination."""
        per = [dict() for _ in items]
        total: list[float | None] = [None] * len(items)
        for scorer, w in zip(self.scorers, self.weights):
            if self.hybrid:
                rules = isinstance(scorer, RulesScorer)
                idx = [i for i, it in enumerate(items) if has_checks(it.meta) == rules]
            else:
                idx = list(range(len(items)))
            values = scorer.score([items[i] for i in idx]) if idx else []
            for i, v in zip(idx, values):
                if v is None:
                    self.stats[f"missing:{scorer.name}"] += 1
                    continue
                per[i][scorer.name] = v
                total[i] = (total[i] or 0.0) + w * v
        self.stats["completions"] += len(items)
        self.stats["unscored"] += sum(t is None for t in total)
        return per, total

    def _finish(self, raw: float | None, key_ids: Sequence[str]) -> float | None:
        if raw is None or self.reference is None:
            return raw
        ref = next((self.reference[k] for k in key_ids if k in self.reference), None)
        if ref is None:
            raise DataError(f"no reference scores for prompt id {key_ids[0]!r} (--calibrate)",
                            field="id")
        u = calibrated(raw, ref)
        return self.transform(u) if self.transform else u

    # --- records ----------------------------------------------------------------------
    def score_records(self, records: list[dict],
                      locations: Sequence[tuple[str | None, int | None]] | None = None
                      ) -> list[dict]:
        """Score samples or pair records in place (fields added); returns them.

        `locations[i]` = (path, line) of records[i], used in DataError messages.
        """
        items: list[Item] = []
        owners: list[tuple[int, Any]] = []  # (record index, completion index | side)
        for r, rec in enumerate(records):
            where = locations[r] if locations else (None, None)
            kind = detect_kind(rec) if isinstance(rec, dict) else None
            if kind not in ("samples", "pair"):
                raise DataError("expected a samples record (completions) or a pair record "
                                "(chosen, rejected)").at(*where)
            meta = rec.get("meta") or {}
            if kind == "samples":
                for c, comp in enumerate(rec["completions"]):
                    items.append(Item(rec["prompt"], comp["text"], meta, r, where))
                    owners.append((r, c))
            else:
                for side in ("chosen", "rejected"):
                    items.append(Item(rec["prompt"], rec[side], meta, r, where))
                    owners.append((r, side))
        per, raw = self._raw(items)
        for item, (r, slot), scores, value in zip(items, owners, per, raw):
            rec = records[r]
            try:
                final = self._finish(value, [rec["id"], derive_id(rec["prompt"])])
            except DataError as e:
                raise item.located(e) from None
            if isinstance(slot, int):
                self._write_completion(rec["completions"][slot], scores, value, final, item.extra)
            else:
                self._write_side(rec, slot, scores, value, final, item.extra)
        return records

    def _write_completion(self, comp: dict, scores: dict, raw, final, extra: dict) -> None:
        old = comp.get("scores") if isinstance(comp.get("scores"), dict) else {}
        comp["scores"] = {**{k: v for k, v in old.items() if k not in self.names}, **scores}
        self._set(comp, "score", final)
        if self.reference is not None:
            self._set(comp, "score_raw", raw)
        comp.update(extra)

    def _write_side(self, rec: dict, side: str, scores: dict, raw, final, extra: dict) -> None:
        key = f"scores_{side}"
        old = rec.get(key) if isinstance(rec.get(key), dict) else {}
        rec[key] = {**{k: v for k, v in old.items() if k not in self.names}, **scores}
        self._set(rec, f"score_{side}", final)
        if self.reference is not None:
            self._set(rec, f"score_raw_{side}", raw)
        for k, v in extra.items():
            if k == "p_win":
                pw = rec["p_win"] if isinstance(rec.get("p_win"), dict) else {}
                rec["p_win"] = {**pw, side: v}
            rec[f"{k}_{side}"] = v

    @staticmethod
    def _set(d: dict, key: str, value) -> None:
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value

    # --- TRL reward function ------------------------------------------------------------
    def reward_fn(self):
        """A TRL-style reward function `fn(prompts, completions, **kw) -> list[float|None]`.

        `kw["meta"]` (one dict per row) feeds rules/judge/python scorers; `kw["id"]`
        (optional) is the prompt id used for calibration. Completions with the same
        prompt form a group (pairwise). None means "no score" (TRL treats it as NaN).
        """
        def fn(prompts, completions, **kw):
            n = len(completions)
            metas = kw.get("meta") or [None] * n
            ids = kw.get("id") or [None] * n
            groups: dict[str, int] = {}
            items = []
            for p, c, m in zip(prompts, completions, metas):
                g = groups.setdefault(json.dumps(p, sort_keys=True), len(groups))
                items.append(Item(p, c, m or {}, g))
            _, raw = self._raw(items)
            out = []
            for p, rid, value in zip(prompts, ids, raw):
                keys = ([rid] if rid else []) + [derive_id(p)]
                out.append(self._finish(value, keys))
            return out

        fn.__name__ = "alignkit_" + "+".join(self.names)
        return fn

    # --- calibration --------------------------------------------------------------------
    def load_reference(self, path: str, batch_records: int = 64) -> None:
        """Score the reference samples at `path` with these scorers; keep the sorted
        combined scores per prompt id (and per prompt-derived id)."""
        from ..io import read_records
        from ..records import validate
        ref: dict[str, list[float]] = defaultdict(list)
        reader = read_records(path)
        batch, locs = [], []

        def flush():
            saved, self.reference = self.reference, None
            self.score_records(batch, locs)
            self.reference = saved
            for rec in batch:
                vals = [c["score"] for c in rec["completions"] if "score" in c]
                for key in {rec["id"], derive_id(rec["prompt"])}:
                    ref[key].extend(vals)
            batch.clear()
            locs.clear()

        for rec in reader:
            try:
                validate(rec, "samples")
            except DataError as e:
                raise e.at(reader.name, reader.line) from None
            batch.append(rec)
            locs.append((reader.name, reader.line))
            if len(batch) >= batch_records:
                flush()
        if batch:
            flush()
        self.stats = Counter()  # reference scoring does not count in the run's stats
        self.reference = {k: sorted(v) for k, v in ref.items() if v}


def build_scorer(specs: list[str], weights: list[float] | str | None = None, *,
                 hybrid: bool = False, calibrate: str | None = None,
                 transform: str | None = None, **options) -> CombinedScorer:
    """Build the combined scorer of `specs` (see the module docstring).

    Options: batch_size (model batch, default 8), max_length (tokens, default 1024 for
    rm/pairwise, 2048 for judge), dtype ("auto"), device, rubric (a file path or a list
    of items, for judge), tokenizer (a model spec or tokenizer, for length),
    allow_pickle, trust_remote_code. Spec errors raise UsageError.
    """
    if not specs:
        raise UsageError("give at least one --scorer")
    specs = [s.strip() if isinstance(s, str) else s for s in specs]
    parsed = [parse_spec(s) for s in specs]
    dup = [s for s, n in Counter(specs).items() if n > 1]
    if dup:
        raise UsageError(f"scorer {dup[0]!r} given twice")
    w = parse_weights(weights, len(specs))
    if hybrid:
        kinds = [k for k, _ in parsed]
        if "rules" not in kinds or len(kinds) < 2:
            raise UsageError("--hybrid needs the rules scorer and at least one other scorer")
    fn = parse_transform(transform)
    if fn is not None and not calibrate:
        raise UsageError("--transform applies to calibrated scores: give --calibrate too")
    scorers = [SCORERS.get(kind).load()(spec, arg, options)
               for spec, (kind, arg) in zip(specs, parsed)]
    combined = CombinedScorer(scorers, w, hybrid=hybrid, transform=fn)
    if calibrate:
        combined.load_reference(calibrate)
    return combined
