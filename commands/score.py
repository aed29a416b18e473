"""`alignkit score`: add rewards to samples or pair records."""
from __future__ import annotations

from typing import List, Optional

import typer

from alignkit.scorers.options import ScorerOptions  # light: a dataclass

from ._common import (allow_pickle_opt, dtype_opt, input_arg, output_opt, shard_opt,
                      trust_remote_code_opt, with_params)


def scorer_opt(default=..., flag: str = "--scorer", short: str | None = "-s"):
    """The repeatable scorer-spec flag, its help generated from the scorer registry."""
    from alignkit.scorers import scorer_help
    return typer.Option(default, flag, *([short] if short else []), help=scorer_help(),
                        metavar="SPEC")


@with_params(scoring=ScorerOptions, aliases={"scorer_batch_size": ("--batch-size",),
                                             "scorer_max_length": ("--max-length",),
                                             "scorer_device": ("--device",)})
def score(
    input: str = input_arg(),
    output: str = output_opt(),
    scorer: List[str] = scorer_opt(),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="W,W",
                                          help="Comma-separated weights, one per --scorer (default 1 each)."),
    chunk: int = typer.Option(64, "--chunk", min=1, help="Records scored at a time (bounds memory)."),
    dtype: str = dtype_opt(),
    shard: Optional[str] = shard_opt(),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
    scoring: ScorerOptions = None,
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
    from alignkit.io import (RecordWriter, check_output_file, file_sha256, in_shard, manifest,
                             parse_shard, write_manifest)
    from alignkit.recordset import checked, stream, validated
    from alignkit.scorers import parse_spec, parse_weights

    started = time.time()
    shard_spec = parse_shard(shard)
    if output != "-":
        check_output_file(output)  # before any record is read or a model loaded

    def process(batch):
        return combined.score_records([rec for rec, _ in batch], [loc for _, loc in batch])

    parse_weights(weights, len(scorer))
    for spec in scorer:  # spec errors first, before the input is read
        parse_spec(spec)
    with validated(input, ("samples", "pair")) as reader:
        combined = scoring.build(scorer, weights, dtype=dtype, allow_pickle=allow_pickle,
                                 trust_remote_code=trust_remote_code)
        items = ((rec, (reader.name, line)) for rec, _, line in checked(reader, ("samples", "pair"))
                 if in_shard(rec["id"], shard_spec))
        with RecordWriter(output) as out, console.progress("scoring") as bar:
            n_records = stream(items, process, out.write_all, chunk=chunk, progress=bar.advance)

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
    if scoring.calibrate:
        inputs[scoring.calibrate] = file_sha256(scoring.calibrate)
    write_manifest(output, manifest(
        inputs=inputs, started=started,
        counts={"records": n_records, "completions": total, "unscored": stats["unscored"]},
        scorers=combined.names, weights=combined.weights, hybrid=scoring.hybrid,
        calibrate=scoring.calibrate, transform=scoring.transform,
        aggregate=scoring.aggregate or "min (the maxmin default)"))


def register(app: typer.Typer) -> None:
    app.command("score")(score)
