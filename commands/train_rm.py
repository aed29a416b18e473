"""`alignkit train-rm`: train a reward model from preference pairs."""
from __future__ import annotations

import typer

from ._common import input_arg, out_dir_opt, train_command

METHOD_NAMES = ("bt", "pal", "maxmin", "crm")


@train_command
def train_rm(
    pairs: str = input_arg("Pairs JSONL (prompt, chosen, rejected; optional margin, "
                           "meta.user, meta.subset); '-' reads stdin."),
    method: str = typer.Option("bt", "--method", help="bt | pal | maxmin | crm."),
    model: str = typer.Option(..., "--model", "-m",
                              help="Backbone: a model folder or an embedded name (minilm-l6, "
                                   "smollm2-135m-instruct, tiny-llama). With --adapt-users: a "
                                   "pal folder."),
    output: str = out_dir_opt("Output reward-model folder (written atomically)."),
    eval_split: float = typer.Option(0.1, "--eval-split",
                                     help="Share of each user's pairs held out for metrics."),
    eval_pairs: str = typer.Option(None, "--eval-pairs",
                                   help="Held-out pairs file (replaces --eval-split)."),
    center_rewards: float = typer.Option(0.0, "--center-rewards",
                                         help="Reward-centering coefficient λ (0: off; 0.01 "
                                              "recommended)."),
    k: int = typer.Option(2, "--k", help="pal: preference prototypes; maxmin: reward models."),
    adapt_users: bool = typer.Option(False, "--adapt-users",
                                     help="pal: fit only the weights of new users (backbone "
                                          "frozen); --model is a pal folder."),
    em_iters: int = typer.Option(3, "--em-iters", help="maxmin: EM rounds."),
    noise_rate: float = typer.Option(0.2, "--noise-rate",
                                     help="crm: prior label-noise rate η (share of each batch "
                                          "a peer drops)."),
    curriculum: bool = typer.Option(True, "--curriculum/--no-curriculum",
                                    help="crm: easy->hard order by peer margin."),
    pal_dim: int = typer.Option(512, "--pal-dim", help="pal: preference-embedding size."),
    head_lr: float = typer.Option(1e-3, "--head-lr", help="pal: projector learning rate."),
    user_lr: float = typer.Option(0.2, "--user-lr", help="pal: user-weight learning rate."),
    opts=None,
) -> None:
    """Train a reward model (bt, pal, maxmin, crm) for `score --scorer rm:OUT`.

    bt: TRL's RewardTrainer (optional per-pair margin, --center-rewards).

    pal, maxmin: per-user preferences from meta.user (K prototypes, K models).

    crm: two peers that filter each other's noisy pairs (--noise-rate).

    Held-out accuracy (ties wrong; per meta.subset, per user) and mean margin
    go to stderr and OUT/alignkit.json; training logs to OUT/metrics.jsonl.

    Example:  alignkit train-rm --method bt --model minilm-l6 pairs.jsonl -o rm
    """
    from alignkit.errors import UsageError
    from alignkit.reward_models import RMConfig, train

    if method not in METHOD_NAMES:
        raise UsageError(f"--method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    if eval_pairs is None and not 0.0 <= eval_split < 1.0:
        raise UsageError(f"--eval-split must be in [0, 1), got {eval_split}")
    if center_rewards < 0:
        raise UsageError(f"--center-rewards must be >= 0, got {center_rewards}")
    if pal_dim < 1 or head_lr <= 0 or user_lr <= 0:
        raise UsageError("--pal-dim, --head-lr and --user-lr must be positive")
    cfg = RMConfig(method=method, eval_split=eval_split, eval_pairs=eval_pairs,
                   center_rewards=center_rewards, k=k, adapt_users=adapt_users,
                   em_iters=em_iters, noise_rate=noise_rate, curriculum=curriculum,
                   pal_dim=pal_dim, head_lr=head_lr, user_lr=user_lr)
    train(method, pairs, model, output, opts.with_lr(1e-4), cfg)


def register(app: typer.Typer) -> None:
    app.command("train-rm")(train_rm)
