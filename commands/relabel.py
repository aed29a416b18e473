"""`alignkit relabel`: turn scored samples (or pairs) into training records."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import dtype_opt, input_arg, output_opt, seed_opt, shard_opt

STRATEGY_HELP = ("best-worst | all-pairs | top-k | reward-augmented | rank | unpaired | "
                 "sppo | filter (see `alignkit relabel --help`).")


def _scale(text: Optional[str]):
    from alignkit.errors import UsageError
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        return float(lo), float(hi)
    except ValueError:
        raise UsageError(f"--scale must look like MIN:MAX, got {text!r}") from None


def relabel(
    input: str = input_arg(),
    output: str = output_opt(),
    strategy: str = typer.Option("best-worst", "--strategy", help=STRATEGY_HELP),
    k: int = typer.Option(1, "--k", help="top-k: pairs (i-th best, i-th worst) for i < k."),
    min_margin: float = typer.Option(0.0, "--min-margin",
                                     help="Drop pairs whose score margin is smaller (ties always dropped)."),
    min_chosen: Optional[float] = typer.Option(
        None, "--min-chosen", metavar="SCORE",
        help="Drop pairs whose chosen scores below SCORE (e.g. keep only chosen answers that pass every check)."),
    length_balance: Optional[float] = typer.Option(
        None, "--length-balance", metavar="SHARE",
        help="Drop random pairs whose chosen is longer (words) until they are at most SHARE of the kept pairs."),
    seed: int = seed_opt(),
    no_system: bool = typer.Option(False, "--no-system",
                                   help="reward-augmented: goal in front of the first user turn, not a system message."),
    scale: Optional[str] = typer.Option(None, "--scale", metavar="MIN:MAX",
                                        help="reward-augmented: map scores MIN..MAX onto the 1-10 goal scale."),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="unpaired: label = score >= THRESHOLD."),
    quantile: Optional[float] = typer.Option(None, "--quantile",
                                             help="unpaired: threshold = this quantile of all scores (default 0.5)."),
    agree: Optional[str] = typer.Option(None, "--agree", metavar="SPECS",
                                        help="filter: comma-separated scorer specs that must all rank chosen above rejected."),
    keep: Optional[float] = typer.Option(None, "--keep", metavar="SHARE",
                                         help="filter: keep this share of pairs with the smallest BT loss."),
    rm: Optional[str] = typer.Option(None, "--rm", metavar="DIR",
                                     help="filter --keep: reward model for the BT loss (default: the pairs' scores)."),
    dedupe: bool = typer.Option(False, "--dedupe", help="Drop records whose (prompt, chosen, rejected) repeats."),
    batch_size: int = typer.Option(8, "--batch-size", help="filter: texts per model forward pass."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="filter: max tokens per model input."),
    dtype: str = dtype_opt(),
    shard: Optional[str] = shard_opt(),
) -> None:
    """Turn scored samples into pairs, rankings (PRO), unpaired (KTO) or filtered pairs.

    Pairs: best-worst (default), all-pairs, top-k (--k), sppo (with p_win).

    reward-augmented: each pair becomes two, with the goal score in the prompt.

    rank: rankings; unpaired: KTO records by --threshold or --quantile.

    filter (pairs in): --agree SPECS and/or --keep SHARE [--rm DIR].

    A summary of what was kept and dropped goes to stderr.

    Example:  alignkit relabel --strategy best-worst --min-margin 0.1 scored.jsonl > pairs.jsonl
    """
    import time

    from alignkit import console
    from alignkit.io import RecordWriter, in_shard, manifest, parse_shard, read_records, write_manifest
    from alignkit.relabel import RelabelOptions, Relabeler

    started = time.time()
    opts = RelabelOptions(
        k=k, min_margin=min_margin, min_chosen=min_chosen, length_balance=length_balance, seed=seed,
        no_system=no_system, scale=_scale(scale), threshold=threshold, quantile=quantile,
        agree=[s.strip() for s in agree.split(",") if s.strip()] if agree else [],
        keep=keep, rm=rm, dedupe=dedupe,
        score_options={"batch_size": batch_size, "max_length": max_length, "dtype": dtype})
    relabeler = Relabeler(strategy, opts)
    shard_spec = parse_shard(shard)
    reader = read_records(input)

    def located():
        for rec in reader:
            if in_shard(str(rec.get("id", "")), shard_spec):
                yield rec, (reader.name, reader.line)

    with RecordWriter(output) as out:
        out.write_all(relabeler.run(located()))
    console.info(relabeler.summary_text())
    write_manifest(output, manifest(
        inputs={input: reader.sha256 or ""}, seed=seed, started=started,
        counts={"read": relabeler.summary["_read"], "written": out.count},
        strategy=strategy, summary={k: v for k, v in relabeler.summary.items()
                                    if not k.startswith("_")}))


def register(app: typer.Typer) -> None:
    app.command("relabel")(relabel)
