"""`alignkit distill`: distil a teacher (or a DPO model pair, or a teacher with a policy
in its context) into a student model folder."""
from __future__ import annotations

from typing import Optional

import typer

from alignkit.distill import DISTILL, DistillConfig  # light: the registry only (no torch)

from ._common import allow_pickle_opt, input_arg, train_command, trust_remote_code_opt, with_params, check_training_output


@train_command
@with_params(cfg=DistillConfig, params=DISTILL)
def distill(
    data: str = input_arg("Prompts (string or chat; optional completion) or pairs (the chosen "
                          "side is the given completion); '-' reads stdin."),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help=" | ".join(DISTILL.names())
                                         + " (see --list-methods)."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Output student folder (written atomically)."),
    list_methods: bool = typer.Option(False, "--list-methods",
                                      help="Print the methods, then exit."),
    on_policy: bool = typer.Option(False, "--on-policy", help="Same as --responses student: "
                                   "sample from the student at every step."),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
    cfg: DistillConfig = None,
    params: dict = None,
    opts=None,
) -> None:
    """Distil a teacher into a student ({methods}).

    Student and teacher(s) must share a tokenizer (--student-config builds a fresh small
    student with the teacher's). Each method takes the flags listed after its name in
    --list-methods, and has its own defaults there. The held-out divergence to the
    teacher, before and after training, goes to stderr and OUT/alignkit.json;
    metrics.jsonl logs training.

    Example:  alignkit distill --method context --teacher smollm2-135m-instruct --policy rules.txt prompts.jsonl -o internalized
    """
    from alignkit import distill as distill_lib
    from alignkit.errors import UsageError

    if list_methods:
        for line in distill_lib.table():
            typer.echo(line)
        return
    if not method:
        raise UsageError("--method is required (see --list-methods)")
    DISTILL.get(method)  # an unknown name fails first, with a close match
    if not output:
        raise UsageError("--output/-o is required (the student folder to write)")
    check_training_output(output, opts)
    if on_policy:
        if cfg.responses not in (None, "student"):
            raise UsageError("--on-policy contradicts --responses " + cfg.responses)
        cfg.responses = "student"
    cfg.method, cfg.params = method, params
    cfg.allow_pickle, cfg.trust_remote_code = allow_pickle, trust_remote_code
    distill_lib.train(data, output, opts, cfg)


distill.__doc__ = distill.__doc__.replace("{methods}", ", ".join(DISTILL.names()))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
