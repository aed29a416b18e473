"""`alignkit train-policy`: train a policy model from preference records (or prompts)."""
from __future__ import annotations

import typer

from ._common import allow_pickle_opt, input_arg, train_command, trust_remote_code_opt


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
def train_policy(
    data: str = input_arg("Training records: pairs, ranking or samples, unpaired, or "
                          "prompt+completion, or prompts (online methods), as the method needs "
                          "(see --list-methods)."),
    method: str = typer.Option(None, "--method", "-m", help="Training method (see --list-methods)."),
    model: str = typer.Option(None, "--model", help="Base model: a folder, a PEFT adapter folder "
                              "or an embedded model name."),
    output: str = typer.Option(None, "--output", "-o", help="Output model folder (written atomically)."),
    list_methods: bool = typer.Option(False, "--list-methods",
                                      help="Print every method with its data type, then exit."),
    beta: float = typer.Option(None, "--beta", help="The method's beta (default: the method's; "
                               "for IPO it is tau, for SPPO eta = 1/beta)."),
    loss: str = typer.Option(None, "--loss", help="dpo: a TRL DPO loss or a comma list (sigmoid, ipo, "
                             "hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo_zero, "
                             "apo_down, discopop, sigmoid_norm, sft, ...); sppo: sppo | sppo_single; "
                             "grpo/earl: grpo | dr_grpo | dapo (default) | bnpo | cispo."),
    loss_weights: str = typer.Option(None, "--loss-weights", help="Weights of a multi-loss, e.g. 1,0.1."),
    label_smoothing: float = typer.Option(None, "--label-smoothing",
                                          help="cDPO label-flip probability with --loss sigmoid "
                                               "(also robust, exo_pair, aot)."),
    sft_weight: float = typer.Option(None, "--sft-weight", help="pro: weight of the SFT term (default 0.05)."),
    grao_lambda: float = typer.Option(None, "--grao-lambda", help="grao: lambda (default 0.6)."),
    simpo_gamma: float = typer.Option(None, "--simpo-gamma", help="simpo: target margin gamma (default 0.5)."),
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
                                       help="Online: weights of the --reward scorers, e.g. 1,0.5."),
    hybrid: bool = typer.Option(False, "--hybrid",
                                help="Online: records with meta.checks are scored by rules only."),
    calibrate: str = typer.Option(None, "--calibrate", metavar="REF_SAMPLES",
                                  help="Online: InfAlign-calibrated rewards against reference samples."),
    transform: str = typer.Option(None, "--transform",
                                  help="Online, with --calibrate: exp:T or neg-exp:T."),
    num_generations: int = typer.Option(None, "--num-generations",
                                        help="grpo/gtpo/earl/rloo: samples per prompt (default 4)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens",
                                       help="Online: max sampled tokens (default 128)."),
    temperature: float = typer.Option(None, "--temperature",
                                      help="Online: sampling temperature (default 1.0)."),
    scale_rewards: str = typer.Option(None, "--scale-rewards", help="grpo/earl: group | batch | none."),
    epsilon: float = typer.Option(None, "--epsilon", help="grpo/earl/rloo/p3o: clip range (default 0.2)."),
    epsilon_high: float = typer.Option(None, "--epsilon-high",
                                       help="grpo/earl/rloo: upper clip (DAPO: 0.28)."),
    importance_sampling: str = typer.Option(None, "--importance-sampling",
                                            help="grpo/earl: token | sequence (GSPO)."),
    mask_truncated: bool = typer.Option(False, "--mask-truncated",
                                        help="Online: no loss on completions cut by --max-new-tokens."),
    entropy_quantile: float = typer.Option(None, "--entropy-quantile",
                                           help="earl: share of highest-entropy tokens kept (default 0.2)."),
    entropy_scope: str = typer.Option(None, "--entropy-scope", help="earl: batch | response."),
    entropy_threshold: float = typer.Option(None, "--entropy-threshold",
                                            help="gtpo: completions with a higher mean token entropy "
                                                 "get no update (default 0.7)."),
    clip: str = typer.Option(None, "--clip", help="p3o: pair (joint) | token."),
    alpha: float = typer.Option(None, "--alpha",
                                help="ipo-md: reference weight of the mixture (default 0.5)."),
    sample_every: int = typer.Option(None, "--sample-every",
                                     help="Online: write the sampled completions to samples.jsonl "
                                          "every N steps (default 10; 0: never)."),
    opt: list[str] = typer.Option(None, "--opt", help="KEY=VALUE: any setting of the TRL config "
                                  "class (repeatable; JSON values), e.g. --opt discopop_tau=0.05."),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
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
    m = policy.get(method)
    from alignkit.policy.data import load
    records = load(data, m.data)
    if opts.lr is None:
        opts.lr = m.default_lr * (10 if opts.lora_r > 0 else 1)
    options = dict(beta=beta, ref_model=ref_model, ref_cache=not no_ref_cache,
                   record_ref=not no_record_ref, rewards=list(reward or []),
                   allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                   config=_parse_opts(opt))
    own = dict(loss=loss, loss_weights=loss_weights, label_smoothing=label_smoothing,
               sft_weight=sft_weight, grao_lambda=grao_lambda, simpo_gamma=simpo_gamma,
               reward_weights=reward_weights, hybrid=hybrid or None, calibrate=calibrate,
               transform=transform, num_generations=num_generations, max_new_tokens=max_new_tokens,
               temperature=temperature, scale_rewards=scale_rewards, epsilon=epsilon,
               epsilon_high=epsilon_high, importance_sampling=importance_sampling,
               mask_truncated=mask_truncated or None, entropy_quantile=entropy_quantile,
               entropy_scope=entropy_scope, entropy_threshold=entropy_threshold, clip=clip, alpha=alpha, sample_every=sample_every)
    for k, v in own.items():
        if v is not None:
            if k not in m.options:
                raise UsageError(f"--{k.replace('_', '-')} does not apply to --method {m.name}")
            options[k] = v
    console.debug(f"train-policy {m.name}: {len(records.records)} records, lr {opts.lr}")
    m.train(model, records, output, opts, **options)


def register(app: typer.Typer) -> None:
    app.command("train-policy")(train_policy)
