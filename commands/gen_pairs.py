"""`alignkit gen-pairs`: sample N completions per prompt, or build pairs in a pairing mode."""
from __future__ import annotations

import typer

from alignkit.engines import EngineOptions  # light: dataclasses
from alignkit.generation import SampleParams

from ._common import (allow_pickle_opt, dtype_opt, input_arg, output_opt, seed_opt,
                      shard_opt, trust_remote_code_opt, value_guide_opt, with_params)


@with_params(engines=EngineOptions)
def gen_pairs(
    input: str = input_arg("Prompt records (JSONL; '-' reads stdin)."),
    output: str = output_opt(),
    model: str = typer.Option(None, "--model", "-m",
                              help="Sampling model: a folder, an adapter folder or an embedded name."),
    num_samples: int = typer.Option(None, "--num-samples", "-n",
                                    help="Completions per prompt (default 4; 1 in pairing modes, "
                                         "where each sample makes one pair)."),
    temperature: float = typer.Option(SampleParams.temperature, "--temperature", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(SampleParams.top_p, "--top-p", help="Nucleus sampling mass (1: off)."),
    top_k: int = typer.Option(SampleParams.top_k, "--top-k", help="Keep the k most likely tokens (0: off)."),
    max_new_tokens: int = typer.Option(SampleParams.max_new_tokens, "--max-new-tokens", help="Tokens per completion, at most."),
    seed: int = seed_opt(),
    batch_size: int = typer.Option(SampleParams.batch_size, "--batch-size", min=1,
                                   help="Prompts decoded at once (each N rows; a finished "
                                        "prompt's rows take the next prompt). Lower it for "
                                        "big models on little memory."),
    dtype: str = dtype_opt(),
    system: str = typer.Option(None, "--system", help="System message for string prompts."),
    raw: bool = typer.Option(False, "--raw", help="Use string prompts as raw text (no chat template)."),
    pair_with_reference: str = typer.Option(
        None, "--pair-with-reference", metavar="REF",
        help="SPIN-style pairs: chosen = the record's given answer (meta.chosen or chosen), "
             "rejected = a sample from REF (which replaces --model); ref_logp_* under REF. "
             "(Not SePPO: no past checkpoints, no adaptive flip.)"),
    mixture: str = typer.Option(
        None, "--mixture", metavar="REF",
        help="Nash-MD / IPO-MD: sample from softmax((1-A)*logits_model + A*logits_REF)."),
    alpha: float = typer.Option(None, "--alpha", help="Mixture weight A of REF (default 0.5)."),
    contrast_prompt: str = typer.Option(
        None, "--contrast-prompt", metavar="FIELD",
        help="Pairs: rejected = a sample with the context meta.FIELD cut out of the prompt, chosen "
             "= a sample with the full prompt (or the given answer); both scored under the full prompt."),
    shard: str = shard_opt(),
    resume_from: str = typer.Option(
        None, "--resume-from", metavar="FILE",
        help="Copy FILE's complete records to the output and sample only the prompts it lacks "
             "(a truncated last line is ignored; FILE may be the -o path)."),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
    value_guide: list[str] = value_guide_opt(),
    engines: EngineOptions = None,
) -> None:
    """Sample N completions per prompt (samples records), or pairs in a pairing mode.

    Each completion has `logp` (summed log-probability of its text's tokens, EOS
    included when it finished, under the sampling model at temperature 1),
    `n_tokens` and `finished` (false: cut at --max-new-tokens). A sample whose
    token ids are not its text's own tokenization is re-scored on the text's
    tokens, as trainers will see it.
    String prompts go through the chat template (unless --raw); message
    lists always do. Records keep every key of the prompt record and gain a
    `gen` block (model, model_sha256, sampling settings).

    Same inputs, flags and --seed give identical records; a prompt's samples
    do not depend on batching, --shard or --resume-from. Records are flushed
    chunk by chunk, so `> out.jsonl` keeps the work of a stopped run and
    `--resume-from out.jsonl` picks up from there. Flags can also come from
    --config FILE.

    Example:  alignkit gen-pairs prompts.jsonl -m smollm2-135m-instruct -n 4 -o s.jsonl
    """
    from alignkit.gen_pairs import GenPairsOptions, run_gen_pairs
    from alignkit.io import parse_shard
    from alignkit.reward_models.value import parse_guides

    pairing = bool(pair_with_reference or contrast_prompt)
    params = SampleParams(
        n=num_samples if num_samples is not None else (1 if pairing else 4),
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        seed=seed, batch_size=batch_size)
    opts = GenPairsOptions(
        model=model, params=params, dtype=dtype, system=system, raw=raw, engines=engines,
        pair_with_reference=pair_with_reference, mixture=mixture, alpha=alpha,
        contrast_prompt=contrast_prompt, shard=parse_shard(shard), resume_from=resume_from,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        value_guides=parse_guides(value_guide))
    run_gen_pairs(input, output, opts)


def register(app: typer.Typer) -> None:
    app.command("gen-pairs")(gen_pairs)
