"""`alignkit train-rm`: train a reward model from preference pairs."""
from __future__ import annotations

from typing import Optional

import typer

from alignkit.reward_models import RM_METHODS, RMConfig  # light: the registry only (no torch)

from ._common import input_arg, train_command, with_params, check_training_output


@train_command
@with_params(cfg=RMConfig, params=RM_METHODS)
def train_rm(
    pairs: str = input_arg("Training JSONL; '-' reads stdin. bt/pal/maxmin/crm: pairs "
                           "(prompt, chosen, rejected; optional margin (used with --margin), "
                           "meta.user, meta.subset); value: scored samples; prm: step-labelled "
                           "records (prompt, completions as steps, labels)."),
    method: str = typer.Option("bt", "--method",
                               help=" | ".join(RM_METHODS.names()) + " (see --list-methods)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Backbone: a model folder or an embedded name "
                                             "(minilm-l6, smollm2-135m-instruct, tiny-llama). "
                                             "With --adapt-users: a folder of the method."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Output reward-model folder (written atomically)."),
    list_methods: bool = typer.Option(False, "--list-methods",
                                      help="Print the methods, then exit."),
    cfg: RMConfig = None,
    params: dict = None,
    opts=None,
) -> None:
    """Train a reward model ({methods}) for `score --scorer rm:OUT`.

    bt: TRL's RewardTrainer (--center-rewards). Plain Bradley-Terry by default,
    even when the pairs carry `margin` (relabel writes one on every pair);
    --margin (bt, maxmin, crm) trains −log σ(r_c − r_r − margin) instead.
    OUT/alignkit.json says which ("margin_used").

    pal, maxmin: per-user preferences from meta.user (K prototypes, K models).
    maxmin runs at most --em-iters EM rounds: {em_iters} by default, as in the
    MaxMin-RLHF paper.

    crm: two peers that filter each other's noisy pairs (--noise-rate); the
    peer with the better held-out accuracy is written (ties: model A), the
    other goes to OUT/peer/.

    prm: a process reward model, P(step correct) at each step's last token
    (TRL's PRM format); `score -s prm:OUT --aggregate min|prod|last|mean`.
    value: a VAS value model on scored samples of the frozen policy (TD(λ)
    targets, --gamma, --lam), for `gen-pairs`/`eval --value-guide OUT[:BETA]`.

    Each method takes the flags listed after its name in --list-methods; a flag of
    another method is ignored with a warning.

    Held-out accuracy (ties wrong; per meta.subset, per user) and mean margin
    go to stderr and OUT/alignkit.json; training logs to OUT/metrics.jsonl.

    Example:  alignkit train-rm --method bt --model minilm-l6 pairs.jsonl -o rm
    """
    from alignkit import reward_models
    from alignkit.errors import UsageError

    if list_methods:
        for line in reward_models.table():
            typer.echo(line)
        return
    RM_METHODS.get(method)  # an unknown name fails first, with a close match
    if not model:
        raise UsageError("--model/-m is required (a backbone, or with --adapt-users a folder)")
    if not output:
        raise UsageError("--output/-o is required (the reward-model folder to write)")
    check_training_output(output, opts)
    cfg.method, cfg.params = method, params
    reward_models.train(method, pairs, model, output, opts, cfg)


train_rm.__doc__ = train_rm.__doc__.replace("{methods}", ", ".join(RM_METHODS.names())).replace(
    "{em_iters}", str(RM_METHODS.params()["em_iters"].default))


def register(app: typer.Typer) -> None:
    app.command("train-rm")(train_rm)
