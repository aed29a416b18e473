"""`alignkit gen-rubrics`: contrastive rubric generation with a consistency filter."""
from __future__ import annotations

from typing import Optional

import typer

from alignkit.rubrics import RubricGenOptions  # light: a dataclass

from ._common import (allow_pickle_opt, dtype_opt, input_arg, output_opt, seed_opt, shard_opt,
                      trust_remote_code_opt, with_params)


@with_params(opts=RubricGenOptions)
def gen_rubrics(
    input: str = input_arg("Pair records (JSONL; '-' reads stdin)."),
    output: str = output_opt(),
    judge: str = typer.Option(..., "--judge", metavar="MODEL",
                              help="Chat model that writes and checks the rubrics: a folder, "
                                   "an adapter folder or an embedded name."),
    seed: int = seed_opt(),
    dtype: str = dtype_opt(),
    shard: Optional[str] = shard_opt(),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
    opts: RubricGenOptions = None,
) -> None:
    """Write rubrics (meta.rubric) for preference pairs, kept only when they explain the label.

    OpenRubrics-style contrastive rubric generation: the --judge model reads the
    prompt with the chosen and the rejected answer and writes a numbered list of hard
    rules and principles (yes/no-checkable criteria) saying why chosen is better. The
    same model, as the judge:MODEL scorer (P(yes) per item), then scores chosen and
    rejected under that rubric; the rubric is kept iff score(chosen) > score(rejected).
    Up to --tries samples per pair, each with its own seed (greedy --temperature 0
    makes one). Kept: meta.rubric (the list judge:MODEL reads), meta.rubric_margin;
    always meta.rubric_tries. A pair with no kept rubric is written without
    meta.rubric (--drop-unkept drops it); the counts go to stderr.

    Simplified against the paper: one model writes and checks (no fine-tuned rubric
    generator, no pairwise judge); the check is the pointwise judge score.

    Example:  alignkit gen-rubrics pairs.jsonl --judge smollm2-135m-instruct -o rp.jsonl
    """
    import time

    from alignkit import console
    from alignkit.io import (RecordWriter, check_output_file, in_shard, manifest, parse_shard,
                             write_manifest)
    from alignkit.recordset import checked, validated
    from alignkit.rubrics import RubricGenerator

    started = time.time()
    shard_spec = parse_shard(shard)
    if output != "-":
        check_output_file(output)  # before any record is read or a model loaded
    with validated(input, "pair") as reader:  # a bad line fails (exit 3) before the model loads
        gen = RubricGenerator(judge, opts, seed=seed, dtype=dtype, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code)
        located = ((rec, (reader.name, line)) for rec, _, line in checked(reader, "pair")
                   if in_shard(rec["id"], shard_spec))
        with RecordWriter(output) as out:
            out.write_all(gen.run(located))
    c = gen.counts
    (console.warn if c["unkept"] else console.info)(gen.summary_text())
    write_manifest(output, manifest(
        inputs={input: reader.sha256 or ""}, seed=seed, started=started,
        counts=dict(c), judge=judge, tries=gen.tries, to=opts.to,
        temperature=opts.temperature, max_new_tokens=opts.max_new_tokens,
        min_margin=opts.min_margin))


def register(app: typer.Typer) -> None:
    app.command("gen-rubrics")(gen_rubrics)
