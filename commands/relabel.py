"""`alignkit relabel`: turn scored samples (or pairs) into training records."""
from __future__ import annotations

from typing import Optional

import typer

from alignkit.relabel import STRATEGIES, RelabelOptions  # light: no torch
from alignkit.scorers.options import ScorerOptions  # light: a dataclass

from ._common import dtype_opt, input_arg, output_opt, seed_opt, shard_opt, with_params


@with_params(common=RelabelOptions, params=STRATEGIES, scoring=ScorerOptions,
             aliases={"scorer_batch_size": ("--batch-size",),
                      "scorer_max_length": ("--max-length",)})
def relabel(
    input: str = input_arg(),
    output: str = output_opt(),
    strategy: str = typer.Option("best-worst", "--strategy",
                                 help=" | ".join(STRATEGIES.names()) + " (see above)."),
    seed: int = seed_opt(),
    dtype: str = dtype_opt(),
    shard: Optional[str] = shard_opt(),
    common: RelabelOptions = None,
    params: dict = None,
    scoring: ScorerOptions = None,
) -> None:
    """Turn scored samples into pairs, rankings (PRO), unpaired (KTO) or filtered pairs."""
    import time

    from alignkit import console
    from alignkit.io import RecordWriter, check_output_file, in_shard, manifest, parse_shard, read_records, write_manifest
    from alignkit.relabel import Relabeler

    started = time.time()
    opts = common
    opts.params, opts.scoring, opts.seed, opts.dtype = params, scoring, seed, dtype
    if output != "-":
        check_output_file(output)  # before any record is read or a scorer loaded
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


def _doc() -> str:
    """The command's help: one line per strategy, from the registry."""
    lines = [relabel.__doc__, ""]
    for e in STRATEGIES:
        flags = " ".join(p.flag_name for p in e.params)
        lines += [f"{e.name} ({e.reads} -> {e.writes}{'; ' + flags if flags else ''}): "
                  f"{e.summary}.", ""]
    lines += ["The scorer flags apply to the scorers filter builds (--agree, --rm). A summary "
              "of what was kept and dropped goes to stderr.", "",
              "Example:  alignkit relabel --strategy best-worst --min-margin 0.1 scored.jsonl "
              "> pairs.jsonl"]
    return "\n".join(lines)


relabel.__doc__ = _doc()


def register(app: typer.Typer) -> None:
    app.command("relabel")(relabel)
