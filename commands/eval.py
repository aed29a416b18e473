"""`alignkit eval`: generate and score, compare to a baseline, write a report."""
from __future__ import annotations

import typer

from alignkit.engines import EngineOptions  # light: dataclasses
from alignkit.eval_options import EvalOptions
from alignkit.scorers.options import ScorerOptions

from ._common import dtype_opt, force_opt, input_arg, seed_opt, value_guide_opt, with_params
from .score import scorer_opt


@with_params(scoring=ScorerOptions, engines=EngineOptions)
def eval_cmd(
    data: str = input_arg("Prompts JSONL (with --model) or samples JSONL (without); '-' reads stdin."),
    model: list[str] = typer.Option(None, "--model", "-m", help="Model to evaluate (repeat for several checkpoints)."),
    baseline: str = typer.Option(None, "--baseline", "-b", help="Baseline model to compare against."),
    scorer: list[str] = scorer_opt(["rules"]),
    weights: str = typer.Option(None, "--weights", metavar="W,W", help="Comma-separated weights of the scorers."),
    baseline_samples: str = typer.Option(None, "--baseline-samples", help="Samples of the baseline on the same prompts (e.g. an earlier --samples-out): skips generating with it."),
    pairs: str = typer.Option(None, "--pairs", help="Pair records: report reward-model accuracy of the scorers on them."),
    num_samples: int = typer.Option(EvalOptions.n, "-n", "--num-samples", help="Completions per prompt."),
    temperature: float = typer.Option(EvalOptions.temperature, "--temperature", help="0 = greedy decoding."),
    top_p: float = typer.Option(EvalOptions.top_p, "--top-p"),
    max_new_tokens: int = typer.Option(EvalOptions.max_new_tokens, "--max-new-tokens"),
    batch_size: int = typer.Option(EvalOptions.batch_size, "--batch-size", min=1, help="Prompts the sampler decodes at once (its slots; a finished one takes the next prompt)."),
    system: str = typer.Option(None, "--system", help="System message for string prompts."),
    limit: int = typer.Option(0, "--limit", help="Evaluate only the first N prompts (0 = all)."),
    no_kl: bool = typer.Option(False, "--no-kl", help="Skip KL and entropy (saves sampling and a forward pass)."),
    kl_samples: int = typer.Option(EvalOptions.kl_samples, "--kl-samples", min=1, help="Completions per prompt drawn at temperature 1 for KL(model||baseline), whatever --temperature is."),
    n_boot: int = typer.Option(EvalOptions.n_boot, "--n-boot", help="Bootstrap resamples for intervals."),
    report: str = typer.Option(None, "--report", help="Write report.md, metrics.json and PNG plots here."),
    training_metrics: list[str] = typer.Option(None, "--training-metrics", help="metrics.jsonl to plot (repeatable)."),
    samples_out: str = typer.Option(None, "--samples-out", help="Also write the scored samples (JSONL; one file per model: PATH with the label inserted)."),
    seed: int = seed_opt(),
    dtype: str = dtype_opt(),
    force: bool = force_opt("Replace an existing non-empty --report folder."),
    value_guide: list[str] = value_guide_opt(),
    scoring: ScorerOptions = None,
    engines: EngineOptions = None,
) -> None:
    """Score models or samples and compare them: metrics JSON on stdout, a table on stderr.

    With --model (and optionally --baseline) it generates completions for the prompts, scores
    them, and reports mean scores with 95% bootstrap intervals, IFEval-style accuracies for
    `rules`, win rate and length-controlled win rate over the baseline, KL(model||baseline),
    top-k entropy/mass, distinct-n and best-of-N (N >= 8 samples per prompt).

    Example:  alignkit eval --model aligned --baseline smollm2-135m-instruct heldout.jsonl --scorer rules --report report/
    """
    import json
    import time

    from alignkit import console
    from alignkit.errors import UsageError
    from alignkit.evaluation import evaluate, rm_pairs_accuracy
    from alignkit.io import (RecordWriter, check_output_dir, check_output_file, load_records,
                             manifest, write_manifest)
    from alignkit.scorers import parse_weights
    from alignkit.reward_models.value import parse_guides
    from alignkit.report import write_report

    started = time.time()
    guides = parse_guides(value_guide)
    if guides and (not model or engines.uses_vllm):
        raise UsageError("--value-guide guides the sampling of --model, with --engine hf")
    w = parse_weights(weights, len(scorer)) if weights else None
    if (baseline or baseline_samples) and not model:
        raise UsageError("--baseline/--baseline-samples need --model")
    # every output path is checked before any model is loaded or any record read
    if report:
        check_output_dir(report, force, empty_ok=True)
    if samples_out:
        check_output_file(samples_out)
    opts = EvalOptions(scorers=list(scorer), weights=w, n=num_samples, temperature=temperature,
                       top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       seed=seed, dtype=dtype, system=system, n_boot=n_boot, kl=not no_kl, kl_samples=kl_samples,
                       scoring=scoring, engines=engines.check(), value_guides=guides)
    kind = "prompt" if model else "samples"
    records = load_records(data, kind, unique_ids=True)
    if limit:
        records = records[:limit]
    base_recs = load_records(baseline_samples, "samples") if baseline_samples else None
    pair_recs = load_records(pairs, "pair") if pairs else None  # every input read up front
    metrics, samples = evaluate(records, opts, list(model or []), baseline, base_recs)
    if pair_recs is not None:
        metrics["rm_accuracy"] = rm_pairs_accuracy(pair_recs, opts)
    inputs = _inputs(data, baseline_samples, pairs, samples)
    metrics["config"] = {"scorers": opts.scorers, "weights": w, "n": num_samples,
                         "temperature": temperature, "max_new_tokens": max_new_tokens,
                         "seed": seed, "dtype": dtype, "data": data}
    if samples_out:
        for label, recs in samples.items():
            path = samples_out if len(samples) == 1 else _labelled(samples_out, label)
            with RecordWriter(path) as wr:
                wr.write_all(recs)
            write_manifest(path, manifest(inputs=inputs, seed=seed, started=started,
                                          counts={"records": len(recs)}))
    if report:
        write_report(metrics, report, list(training_metrics or []), force=force,
                     manifest=manifest(inputs=inputs, seed=seed, started=started))
    _table(metrics)
    typer.echo(json.dumps(metrics, indent=2, default=float))
    if report:
        console.info(f"report: {report}/report.md")


def _inputs(data: str, baseline_samples, pairs, samples: dict) -> dict:
    """The manifest's inputs: the files read (sha256) and the models sampled."""
    from alignkit.io import file_sha256
    out = {p: file_sha256(p) for p in (data, baseline_samples, pairs) if p and p != "-"}
    for recs in samples.values():
        gen = (recs[0].get("gen") or {}) if recs else {}
        if gen.get("model") and gen.get("model_sha256"):
            out[f"model:{gen['model']}"] = gen["model_sha256"]
    return out


def _labelled(path: str, label: str) -> str:
    for ext in (".jsonl.gz", ".jsonl"):
        if path.endswith(ext):
            return path[: -len(ext)] + f".{label}{ext}"
    return f"{path}.{label}"


def _table(metrics: dict) -> None:
    from alignkit import console
    if console.VERBOSITY < 1:
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title="alignkit eval")
    for col in ("model", "prompts", "mean score", "prompt acc", "instr acc", "words"):
        t.add_column(col)
    for label, m in metrics["models"].items():
        s = m.get("score") or {}
        r = m.get("rules") or {}
        t.add_row(label, str(m["n_prompts"]),
                  f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]" if s else "n/a",
                  f"{100 * r['prompt_level']:.1f}%" if r else "n/a",
                  f"{100 * r['instruction_level']:.1f}%" if r else "n/a",
                  f"{m['mean_length_words']:.1f}")
    Console(stderr=True).print(t)
    for label, c in (metrics.get("comparisons") or {}).items():
        parts = []
        if c.get("prompt_level_diff"):
            d = c["prompt_level_diff"]
            parts.append(f"prompt acc {100 * d['diff']:+.1f} pts [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]")
        if c.get("win_rate"):
            parts.append(f"win rate {100 * c['win_rate']['win_rate']:.1f}%")
        if c.get("kl"):
            parts.append(f"KL {c['kl'].get('exact_mean', c['kl']['k3_mean']):.3f} nats (T=1 samples)")
        console.info(f"{label} vs baseline: " + ", ".join(parts))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
