"""`alignkit train-policy`: train a policy model from preference records (or prompts)."""
from __future__ import annotations

import typer

from alignkit.policy import POLICY  # light: the registry and its declared parameters
from alignkit.scorers.options import ScorerOptions  # light: a dataclass

from ._common import (allow_pickle_opt, check_training_output, input_arg, train_command,
                      trust_remote_code_opt, with_params)


def _parse_opts(items: list[str] | None) -> dict:
    import json

    from alignkit.errors import UsageError
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--opt expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


@train_command
@with_params(method_options=POLICY, scoring=ScorerOptions)
def train_policy(
    data: str = input_arg("Training records: pairs, ranking or samples, unpaired, or "
                          "prompt+completion, or prompts (online methods), as the method needs "
                          "(see --list-methods)."),
    method: str = typer.Option(None, "--method", "-m",
                               help=f"Training method: {' | '.join(POLICY.names())} (each "
                                    "method's data kind and trainer: --list-methods)."),
    model: str = typer.Option(None, "--model", help="Base model: a folder, a PEFT adapter folder "
                              "or an embedded model name."),
    output: str = typer.Option(None, "--output", "-o", help="Output model folder (written atomically)."),
    list_methods: bool = typer.Option(False, "--list-methods",
                                      help="Print every method with its data type, then exit."),
    beta: float = typer.Option(None, "--beta", help="The method's beta (default: the method's; "
                               "for IPO it is tau, for SPPO eta = 1/beta)."),
    ref_model: str = typer.Option(None, "--ref-model", help="Reference model folder (default: the "
                                  "base; with LoRA the base with the adapter disabled)."),
    no_ref_cache: bool = typer.Option(False, "--no-ref-cache",
                                      help="Do not read or write the reference log-prob cache."),
    no_record_ref: bool = typer.Option(False, "--no-record-ref",
                                       help="Ignore ref_logp_chosen/ref_logp_rejected in the records."),
    reward: list[str] = typer.Option(None, "--reward", help="Online methods: scorer specs of `alignkit "
                                     "score` (rules, rm:DIR, judge:MODEL, python:MOD:FN, length...; "
                                     "repeatable or a comma list)."),
    reward_weights: str = typer.Option(None, "--reward-weights",
                                       help="Online: weights of the --reward scorers, e.g. 1,0.5; or "
                                            "learn:PRIMARY (grpo, earl, gtpo: BARFI learns the other "
                                            "rewards' weights, see --blend-lr)."),
    opt: list[str] = typer.Option(None, "--opt", help="KEY=VALUE: any setting of the TRL config "
                                  "class (repeatable; JSON values), e.g. --opt discopop_tau=0.05."),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
    method_options: dict = None,
    scoring: ScorerOptions = None,
    opts=None,
) -> None:
    """Train a policy (full weights, or a LoRA adapter with --lora-r) from records.

    Offline methods read the records that relabel and gen-pairs write.
    String prompts go through the chat template.
    Reference log-probs come from the records, else $ALIGNKIT_HOME/refcache, else one pass.
    The folder loads in plain transformers/peft; it holds alignkit.json and metrics.jsonl.

    Example:  alignkit train-policy --method dpo --model smollm2-135m-instruct --lora-r 16 --dtype bfloat16 pairs.jsonl -o dpo-model
    """
    from alignkit import console, policy
    from alignkit.errors import UsageError

    if list_methods:
        for line in policy.table():
            typer.echo(line)
        return
    if not method:
        raise UsageError("--method is required (see --list-methods)")
    if not model:
        raise UsageError("--model is required")
    if not output:
        raise UsageError("--output/-o is required (the model folder to write)")
    check_training_output(output, opts)
    m = policy.get(method)
    from alignkit.policy.common import PolicyRun
    from alignkit.policy.data import load
    records = load(data, m.reads)
    run = PolicyRun(
        method=m, model=model, data=records, out=output,
        opts=opts.with_lr(m.default_lr * (10 if opts.lora_r > 0 else 1)),
        options=m.options(method_options), beta=beta, ref_model=ref_model,
        ref_cache=not no_ref_cache, record_ref=not no_record_ref, rewards=list(reward or []),
        reward_weights=reward_weights, scoring=scoring, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, config=_parse_opts(opt))
    console.debug(f"train-policy {m.name}: {len(records.records)} records, lr {run.opts.lr}")
    policy.train(run)


def register(app: typer.Typer) -> None:
    app.command("train-policy")(train_policy)
