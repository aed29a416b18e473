"""`alignkit eval`: score models or samples and compare them, with intervals.

Two ways in:
- models + prompts: each `--model` (and the `--baseline`) generates completions for the
  prompts with the shared sampler (`alignkit.generation`), greedy by default;
- a samples file: its completions are scored as they are.

Then the shared scorers (`alignkit.scorers`) score every completion and this module
computes the metrics of ALGORITHMS.md Part C with the functions of `alignkit.stats`:
mean score per scorer with a 95% bootstrap interval; for `rules` the per-check pass
rates and IFEval prompt-/instruction-level strict accuracy; the win rate of each model
over the baseline (ties half) with its length-controlled variant; KL(M‖B) on M's samples
(sequence k1 and k3); the top-k entropy / mass over-optimisation indicators; distinct-n;
a best-of-N curve when a prompt has N >= 8 samples; reward-model accuracy on pairs.
"""
from __future__ import annotations

import math
from typing import Any

from . import console, stats
from .errors import UsageError
from .eval_options import KL_FORWARD_ROWS, EvalOptions
from .records import text_of


# --- generation and scoring ---------------------------------------------------------------

def generate(model_spec: str, prompts: list[dict], opts: EvalOptions, label: str) -> list[dict]:
    """Samples records for `prompts` from one model (greedy when temperature is 0), with
    alignkit's sampler or a vLLM engine (`opts.engines`; a vLLM sample's `logp` is the
    engine's raw log-probability of its sampled tokens, not re-scored as gen-pairs does)."""
    from .generation import SampleParams, sample
    from .models import load_causal_lm, load_tokenizer, model_sha256, resolve
    params = SampleParams(n=opts.n, temperature=opts.temperature, top_p=opts.top_p,
                          max_new_tokens=opts.max_new_tokens, seed=opts.seed,
                          batch_size=opts.batch_size)
    texts = [p["prompt"] for p in prompts]
    model = None
    if opts.engines.uses_vllm:
        from .engines import open_engine
        console.info(f"generating ({label}) with --engine {opts.engines.engine}")
        with open_engine(opts.engines, model_spec, load_tokenizer(model_spec), dtype=opts.dtype,
                         seed=opts.seed) as engine:
            groups = engine.sample(texts, params, system=opts.system,
                                   keys=[str(p["id"]) for p in prompts])
    else:
        model, tok = load_causal_lm(model_spec, opts.dtype, merged=True)
        guides = None
        if opts.value_guides and label != "baseline":  # VAS guides --model's sampling only
            from .reward_models.value import load_guides
            guides = load_guides(opts.value_guides, model, opts.dtype)
        groups = sample(model, tok, texts, params, system=opts.system,
                        progress_desc=f"generating ({label})", guides=guides)
    gen = {"model": str(model_spec), "model_sha256": model_sha256(resolve(model_spec)),
           "temperature": opts.temperature, "top_p": opts.top_p,
           "max_new_tokens": opts.max_new_tokens, "seed": opts.seed,
           "engine": opts.engines.record_name}
    if opts.value_guides and label != "baseline":
        gen["value_guides"] = [dict(g) for g in opts.value_guides]
    out = []
    for p, comps in zip(prompts, groups):
        out.append({**p, "completions": [{k: c[k] for k in c if k not in ("finished", "token_ids")}
                                         | {"finished": c.get("finished")}
                                         for c in comps], "gen": gen})
    del model
    return out


def score(records: list[dict], opts: EvalOptions) -> list[dict]:
    scorer = opts.scoring.build(opts.scorers, opts.weights, dtype=opts.dtype)
    return scorer.score_records(records)


# --- metrics -----------------------------------------------------------------------------

def _flat(records, key):
    """Per-prompt mean of a per-completion value (skipping None)."""
    out = []
    for r in records:
        vals = [c.get(key) for c in r["completions"] if c.get(key) is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _ci(values, opts: EvalOptions, seed_offset: int = 0) -> dict | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    est, lo, hi = stats.bootstrap_ci(vals, n_boot=opts.n_boot, seed=opts.seed + seed_offset)
    return {"mean": est, "lo": lo, "hi": hi, "n": len(vals)}


def _words(text) -> int:
    return len(text_of(text).split())


def rules_metrics(records: list[dict], opts: EvalOptions) -> dict | None:
    """IFEval's four accuracies on the first completion of each prompt: prompt-level and
    instruction-level, strict (the response as is) and loose (`checks.loose_variants`),
    each with a 95% bootstrap interval over prompts; and the strict pass rate per check
    type."""
    from .checks import run_checks
    strict, loose, per_type = [], [], {}
    for r in records:
        first = r["completions"][0]
        checks = first.get("checks")
        if checks is None:
            continue
        strict.append([c["passed"] for c in checks])
        meta = r.get("meta") or {}
        if meta.get("checks"):
            loose.append([c["passed"] for c in run_checks(first["text"], None, r["prompt"],
                                                          meta, loose=True)])
        else:  # checks computed elsewhere: loose = strict
            loose.append(strict[-1])
        for c in checks:
            per_type.setdefault(c["type"], []).append(c["passed"])
    if not strict:
        return None
    acc = stats.prompt_and_instruction_accuracy(strict)
    lo = stats.prompt_and_instruction_accuracy(loose)
    acc["prompt_level_loose"] = lo["prompt_level"]
    acc["instruction_level_loose"] = lo["instruction_level"]
    acc["prompt_level_ci"] = _ci([float(all(r)) for r in strict], opts, 1)
    acc["prompt_level_loose_ci"] = _ci([float(all(r)) for r in loose], opts, 2)
    acc["instruction_level_ci"] = _instruction_ci(strict, opts, 3)
    acc["instruction_level_loose_ci"] = _instruction_ci(loose, opts, 4)
    acc["per_check"] = {t: {"pass_rate": sum(v) / len(v), "n": len(v)}
                        for t, v in sorted(per_type.items())}
    return acc


def _instruction_ci(results: list[list[bool]], opts: EvalOptions, seed_offset: int) -> dict:
    """Instruction-level accuracy (passed / all checks) with a bootstrap over prompts."""
    import numpy as np
    passed = np.array([sum(r) for r in results], dtype=float)
    n = np.array([len(r) for r in results], dtype=float)
    idx = np.arange(len(results), dtype=float)
    est, lo, hi = stats.bootstrap_ci(
        idx, stat=lambda i: passed[i.astype(int)].sum() / max(n[i.astype(int)].sum(), 1.0),
        n_boot=opts.n_boot, seed=opts.seed + seed_offset)
    return {"mean": est, "lo": lo, "hi": hi, "n": int(n.sum())}


def model_metrics(records: list[dict], opts: EvalOptions) -> dict:
    out: dict[str, Any] = {"n_prompts": len(records)}
    out["score"] = _ci(_flat(records, "score"), opts)
    names = sorted({k for r in records for c in r["completions"] for k in (c.get("scores") or {})})
    out["scores"] = {}
    for i, name in enumerate(names):
        vals = []
        for r in records:
            v = [c["scores"][name] for c in r["completions"]
                 if c.get("scores", {}).get(name) is not None]
            vals.append(sum(v) / len(v) if v else None)
        out["scores"][name] = _ci(vals, opts, 10 + i)
    rules = rules_metrics(records, opts)
    if rules:
        out["rules"] = rules
    lengths = [_words(c["text"]) for r in records for c in r["completions"]]
    out["mean_length_words"] = sum(lengths) / len(lengths) if lengths else 0.0
    groups = [[text_of(c["text"]) for c in r["completions"]] for r in records]
    if any(len(g) > 1 for g in groups):
        out["distinct_1"] = sum(stats.distinct_n(g, 1) for g in groups) / len(groups)
        out["distinct_2"] = sum(stats.distinct_n(g, 2) for g in groups) / len(groups)
    sizes = [len(r["completions"]) for r in records]
    if sizes and min(sizes) >= 8 and all(c.get("score") is not None for r in records for c in r["completions"]):
        out["best_of_n"] = stats.best_of_n_curve(
            [[c["score"] for c in r["completions"]] for r in records])
    from .rerank import rerank_metrics  # best-of-N / weighted vote against meta.answer
    rerank = rerank_metrics(records)
    if rerank:
        out["rerank"] = rerank
    return out


def compare(model_recs: list[dict], base_recs: list[dict], opts: EvalOptions) -> dict:
    """Win rate (+LC) of a model over the baseline, and the accuracy difference."""
    by_id = {r["id"]: r for r in base_recs}
    sm, sb, lm, lb, am, ab = [], [], [], [], [], []
    for r in model_recs:
        b = by_id.get(r["id"])
        if b is None:
            continue
        cm, cb = r["completions"][0], b["completions"][0]
        if cm.get("score") is None or cb.get("score") is None:
            continue
        sm.append(cm["score"]); sb.append(cb["score"])
        lm.append(len(text_of(cm["text"]))); lb.append(len(text_of(cb["text"])))
        if cm.get("checks") is not None and cb.get("checks") is not None:
            am.append(float(all(c["passed"] for c in cm["checks"])))
            ab.append(float(all(c["passed"] for c in cb["checks"])))
    if not sm:
        return {}
    out = {"win_rate": stats.win_rate(sm, sb, seed=opts.seed, n_boot=opts.n_boot),
           "lc_win_rate": stats.length_controlled_win_rate(sm, sb, lm, lb),
           "mean_length_chars": {"model": sum(lm) / len(lm), "baseline": sum(lb) / len(lb)}}
    if am:
        d, lo, hi = stats.paired_diff_ci(am, ab, n_boot=opts.n_boot, seed=opts.seed)
        out["prompt_level_diff"] = {"diff": d, "lo": lo, "hi": hi, "n": len(am)}
    return out


KL_SEED_OFFSET = 104729  # the KL samples' seed is --seed + this: a stream of their own


def kl_and_topk(model_spec: str, base_spec: str, prompts: list[dict], opts: EvalOptions) -> dict:
    """KL(model ‖ baseline) per sequence, on samples drawn for it, plus the model's top-k
    entropy and mass on those samples.

    The k1/k3 estimators estimate KL(π‖π_ref) only on sequences drawn from π itself at
    temperature 1 without top-p/top-k, so this draws its own seeded sample set
    (`--kl-samples` per prompt, seed `--seed + KL_SEED_OFFSET`, up to `--max-new-tokens`),
    whatever the evaluation's decoding was (greedy by default). On the same sequences it
    also reports `exact`: the exact per-token KL Σ_v π(v|·) log(π(v|·)/π_ref(v|·)),
    summed along each sampled sequence: an unbiased estimate of the same sequence KL
    with lower variance than k1 or k3. A sequence cut at max_new_tokens counts the
    tokens it has (the KL of the truncated sequence distribution). All in nats.
    """
    from .generation import SampleParams, pad_id, sample
    from .models import load_causal_lm
    from .text import encode_prompt, render_prompt
    model, tok = load_causal_lm(model_spec, opts.dtype, merged=True)
    base, _ = load_causal_lm(base_spec, opts.dtype, merged=True)
    params = SampleParams(n=opts.kl_samples, temperature=1.0, top_p=1.0, top_k=0,
                          max_new_tokens=opts.max_new_tokens, seed=opts.seed + KL_SEED_OFFSET,
                          batch_size=opts.batch_size)
    groups = sample(model, tok, [p["prompt"] for p in prompts], params, system=opts.system,
                    keys=[str(p.get("id", i)) for i, p in enumerate(prompts)],
                    return_ids=True, progress_desc="KL samples (temperature 1)")
    items = []
    for p, group in zip(prompts, groups):
        p_ids = encode_prompt(tok, render_prompt(tok, p["prompt"], system=opts.system))
        items += [(p_ids, list(c["token_ids"])) for c in group if c["token_ids"]]
    with console.progress("KL and entropy", total=len(items)) as prog:
        lp_m, lp_b, exact, topk = sequence_kl(model, base, items, pad_id(tok), topk=opts.topk,
                                              advance=prog.advance)
    del model, base
    kl = stats.kl_estimates(lp_m, lp_b)
    mean, se = stats.mean_se(exact)
    kl.update(exact_mean=mean, exact_se=se, samples_per_prompt=opts.kl_samples,
              what="KL(model || baseline) per sequence in nats, on samples drawn from the "
                   "model at temperature 1 (no top-p/top-k); exact = summed per-token KL")
    out = {"kl": kl}
    if topk is not None:
        out["topk_entropy_bits"], out["topk_mass"] = topk
    return out


def sequence_kl(model, base, items: list[tuple[list[int], list[int]]], pad: int, *,
                topk: bool = True, advance=None):
    """Teacher-forced comparison of two models on (prompt ids, completion ids) items.

    Returns (per-token logp under `model`, per-token logp under `base`, the exact KL
    Σ_t Σ_v π(v|·) log(π(v|·)/π_ref(v|·)) summed over each completion, and
    (top-k entropy bits, top-k mass) of `model` over all completion tokens, or None).

    Items are batched by length (`generation.completion_logits`, `KL_FORWARD_ROWS` per
    forward) and only the completion positions' logits are computed and taken to fp32:
    the prompt positions and the padding never reach the full-vocabulary log-softmax.
    Lists come back in the items' order; an item with an empty completion gets empty
    lists and an exact KL of 0.
    """
    import torch

    from .generation import completion_logits
    n = len(items)
    lp_m: list = [[] for _ in range(n)]
    lp_b: list = [[] for _ in range(n)]
    exact = [0.0] * n
    chosen = []  # (top-k entropy, top-k mass, positions) of each batch, for the weighted mean
    with torch.inference_mode():
        for idx, (out_m, out_b), tgt in completion_logits([model, base], items, pad_id=pad,
                                                          batch_size=KL_FORWARD_ROWS):
            logq_m = torch.log_softmax(out_m.float(), -1)   # [tokens, V], items in order
            logq_b = torch.log_softmax(out_b.float(), -1)
            tok_m = logq_m.gather(-1, tgt[:, None])[:, 0].double().cpu()
            tok_b = logq_b.gather(-1, tgt[:, None])[:, 0].double().cpu()
            per_pos = (logq_m.exp() * (logq_m - logq_b)).sum(-1).double().cpu()
            at = 0
            for i in idx:
                c = len(items[i][1])
                lp_m[i], lp_b[i] = tok_m[at:at + c].tolist(), tok_b[at:at + c].tolist()
                exact[i] = float(per_pos[at:at + c].sum())
                at += c
            if topk:
                h, mm = stats.topk_entropy_mass(logq_m, k=10)
                chosen.append((h, mm, logq_m.shape[0]))
            if advance is not None:
                advance(len(idx))
    if not chosen:
        return lp_m, lp_b, exact, None
    total = sum(c[2] for c in chosen)
    return (lp_m, lp_b, exact, (sum(h * c for h, _, c in chosen) / total,
                                sum(m * c for _, m, c in chosen) / total))


def rm_pairs_accuracy(pairs: list[dict], opts: EvalOptions) -> dict:
    scored = score(pairs, opts)
    rows = [(p["score_chosen"], p["score_rejected"], (p.get("meta") or {}).get("subset"))
            for p in scored if p.get("score_chosen") is not None and p.get("score_rejected") is not None]
    if not rows:
        raise UsageError("--pairs: no pair got a score from the scorers")
    return stats.rm_accuracy(rows)


def evaluate(prompts_or_samples: list[dict], opts: EvalOptions, models: list[str],
             baseline: str | None, baseline_samples: list[dict] | None = None
             ) -> tuple[dict, dict[str, list[dict]]]:
    """Run the whole evaluation; returns (metrics, scored samples per label).

    `baseline_samples` (samples records of the baseline on the same prompts) replaces
    generating with the baseline; the baseline model is still used for KL."""
    samples: dict[str, list[dict]] = {}
    if models:
        for i, m in enumerate(models):
            label = "model" if len(models) == 1 else f"model{i + 1}"
            samples[label] = score(generate(m, prompts_or_samples, opts, label), opts)
        if baseline_samples is not None:
            ids = {p["id"] for p in prompts_or_samples}
            samples["baseline"] = score([r for r in baseline_samples if r["id"] in ids], opts)
        elif baseline:
            samples["baseline"] = score(generate(baseline, prompts_or_samples, opts, "baseline"), opts)
    else:
        samples["samples"] = score(prompts_or_samples, opts)
    metrics: dict[str, Any] = {"models": {}}
    for label, recs in samples.items():
        metrics["models"][label] = model_metrics(recs, opts)
        metrics["models"][label]["spec"] = (models[int(label[5:]) - 1] if label.startswith("model") and label != "model"
                                            else models[0] if label == "model"
                                            else baseline if label == "baseline" else "samples")
    if "baseline" in samples and models:
        metrics["comparisons"] = {}
        for i, m in enumerate(models):
            label = "model" if len(models) == 1 else f"model{i + 1}"
            cmp_ = compare(samples[label], samples["baseline"], opts)
            if opts.kl and baseline:
                cmp_.update(kl_and_topk(m, baseline, prompts_or_samples, opts))
            metrics["comparisons"][label] = cmp_
    return metrics, samples
