"""`alignkit score`: add rewards to samples or pair records."""
from __future__ import annotations

from typing import List, Optional

import typer

from ._common import (allow_pickle_opt, dtype_opt, input_arg, output_opt, shard_opt,
                      trust_remote_code_opt)

SCORER_HELP = (
    "Scorer spec, repeatable: rules | rm:DIR | pairwise:DIR | judge:MODEL | "
    "python:MODULE:FN (or python:FILE.py:FN) | length[:MAX[:CACHE]] (words, or tokens "
    "with --tokenizer; default 512:128).")


def score(
    input: str = input_arg(),
    output: str = output_opt(),
    scorer: List[str] = typer.Option(..., "--scorer", "-s", help=SCORER_HELP),
    weights: Optional[str] = typer.Option(None, "--weights",
                                          help="Comma-separated weights, one per --scorer (default 1 each)."),
    hybrid: bool = typer.Option(False, "--hybrid",
                                help="Records with meta.checks: rules only; others: the other scorers."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", metavar="REF_SAMPLES",
                                            help="InfAlign: replace each score by its quantile among "
                                                 "the reference samples' scores for the same prompt."),
    transform: Optional[str] = typer.Option(None, "--transform",
                                            help="After --calibrate: exp:T -> exp(T*u), neg-exp:T -> -exp(-T*u)."),
    rubric: Optional[str] = typer.Option(None, "--rubric",
                                         help="Judge rubric file for records without meta.rubric "
                                              "(JSON list, or one item per line, 'hard: ...' for hard rules)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="Model whose tokenizer counts tokens for the length scorer."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per model forward pass."),
    max_length: Optional[int] = typer.Option(None, "--max-length",
                                             help="Max tokens per model input (default 1024 rm/pairwise, 2048 judge)."),
    user: Optional[str] = typer.Option(None, "--user", help="User id for pluralistic (pal/maxmin) reward models when a record has no meta.user."),
    aggregate: str = typer.Option("mean", "--aggregate", help="maxmin reward models: min | mean | user."),
    chunk: int = typer.Option(64, "--chunk", help="Records scored at a time (bounds memory)."),
    dtype: str = dtype_opt(),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    shard: Optional[str] = shard_opt(),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
) -> None:
    """Add rewards to samples or pairs: scores[NAME] per scorer and a weighted score.

    Samples: scores, score (and checks, p_win, judge details) on every completion.

    Pairs: score_chosen, score_rejected, scores_chosen, scores_rejected.

    A completion that no scorer can score (e.g. rules without meta.checks) gets no
    score field; the counts go to stderr.

    Example:  alignkit score --scorer rules --scorer rm:rm_model --weights 1,0.5 samples.jsonl > scored.jsonl
    """
    import time

    from alignkit import console
    from alignkit.errors import DataError, UsageError
    from alignkit.io import (RecordWriter, file_sha256, in_shard, manifest, parse_shard,
                             read_records, write_manifest)
    from alignkit.records import detect_kind, validate
    from alignkit.scorers import build_scorer

    started = time.time()
    if batch_size < 1 or chunk < 1 or (max_length is not None and max_length < 1):
        raise UsageError("--batch-size, --chunk and --max-length must be >= 1")
    shard_spec = parse_shard(shard)
    reader = read_records(input)
    combined = build_scorer(
        scorer, weights, hybrid=hybrid, calibrate=calibrate, transform=transform,
        rubric=rubric, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
        dtype=dtype, device=device, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, user=user, aggregate=aggregate)

    n_records = 0
    batch: list[dict] = []
    where: list[tuple[str, int]] = []
    with RecordWriter(output) as out, console.progress("scoring") as bar:
        def flush():
            out.write_all(combined.score_records(batch, where))
            bar.advance(len(batch))
            batch.clear()
            where.clear()

        for rec in reader:
            loc = (reader.name, reader.line)
            kind = detect_kind(rec)
            try:
                if kind not in ("samples", "pair"):
                    raise DataError(f"expected a samples or pair record, got a {kind} record")
                validate(rec, kind)
            except DataError as e:
                raise e.at(*loc) from None
            if not in_shard(rec["id"], shard_spec):
                continue
            batch.append(rec)
            where.append(loc)
            n_records += 1
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()

    stats = combined.stats
    total = stats["completions"]
    for s in combined.scorers:
        missing = stats[f"missing:{s.name}"]
        if missing:
            console.warn(f"{missing} of {total} completions got no {s.name!r} score "
                         f"({s.missing_reason})")
    if stats["unscored"]:
        console.warn(f"{stats['unscored']} of {total} completions got no combined score "
                     "(no 'score' field written; relabel skips them)")
    console.info(f"scored {n_records} records ({total} completions) with "
                 f"{', '.join(combined.names)}")
    inputs = {input: reader.sha256 or ""}
    if calibrate:
        inputs[calibrate] = file_sha256(calibrate)
    write_manifest(output, manifest(
        inputs=inputs, started=started,
        counts={"records": n_records, "completions": total, "unscored": stats["unscored"]},
        scorers=combined.names, weights=combined.weights, hybrid=hybrid,
        calibrate=calibrate, transform=transform))


def register(app: typer.Typer) -> None:
    app.command("score")(score)
