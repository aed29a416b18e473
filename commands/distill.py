"""`alignkit distill`: distil a teacher (or a DPO model pair, or a teacher with a policy
in its context) into a student model folder."""
from __future__ import annotations

import typer

from ._common import allow_pickle_opt, input_arg, train_command, trust_remote_code_opt


@train_command
def distill(
    data: str = input_arg("Prompts (string or chat; optional completion) or pairs (the chosen "
                          "side is the given completion); '-' reads stdin."),
    method: str = typer.Option(None, "--method", "-m",
                               help="aligndistil | tvdpp | gkd | context (see --list-methods)."),
    teacher: str = typer.Option(None, "--teacher", "-t", help="Teacher: a model folder or an "
                                "embedded name (aligndistil: the DPO model)."),
    teacher_ref: str = typer.Option(None, "--teacher-ref", help="aligndistil: the reverse-DPO "
                                    "model (--contrast reverse) or the DPO reference "
                                    "(--contrast reference)."),
    student: str = typer.Option(None, "--student", "-s", help="Student: a model folder or an "
                                "embedded name sharing the teacher's tokenizer (context: "
                                "default the teacher)."),
    student_config: str = typer.Option(None, "--student-config", help="Build a fresh tiny "
                                       "student with the teacher's tokenizer, e.g. "
                                       "hidden=64,layers=2[,heads=4,intermediate=128]."),
    output: str = typer.Option(None, "--output", "-o", help="Output student folder (written atomically)."),
    list_methods: bool = typer.Option(False, "--list-methods", help="Print the methods, then exit."),
    responses: str = typer.Option(None, "--responses", help="given | teacher | student: the "
                                  "responses the loss is computed on (default: the method's; "
                                  "given falls back to teacher for prompt-only data)."),
    on_policy: bool = typer.Option(False, "--on-policy", help="Same as --responses student: "
                                   "sample from the student at every step."),
    contrast: str = typer.Option("reverse", "--contrast", help="aligndistil: reverse | reference."),
    beta: float = typer.Option(None, "--beta", help="aligndistil: beta (0.1); gkd: the JSD "
                               "interpolation in [0, 1] (0.5)."),
    beta2: float = typer.Option(None, "--beta2", help="aligndistil: beta2' of the adaptive "
                                "weight (10 off-policy, 15 on-policy)."),
    weight: float = typer.Option(None, "--weight", help="aligndistil: a fixed extrapolation "
                                 "weight w instead of the token-adaptive one."),
    len_norm: bool = typer.Option(True, "--len-norm/--no-len-norm", help="aligndistil: divide "
                                  "each response's loss by its length."),
    kd_temperature: float = typer.Option(1.0, "--kd-temperature", help="aligndistil: T of the "
                                         "target softmax(z*/T)."),
    lmbda: float = typer.Option(0.5, "--lmbda", help="gkd: share of steps trained on "
                                "student-generated responses."),
    policy: str = typer.Option(None, "--policy", help="context: a text file the teacher sees "
                               "in its context (e.g. a system prompt of rules)."),
    eval_split: float = typer.Option(0.1, "--eval-split", help="Share of the records held out "
                                     "to measure the divergence to the teacher before/after."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature of "
                                      "teacher/student responses (gkd 0.9, else 1.0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling top-p."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Sampled response length limit."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Teacher responses per prompt."),
    allow_pickle: bool = allow_pickle_opt(),
    trust_remote_code: bool = trust_remote_code_opt(),
    opts=None,
) -> None:
    """Distil a teacher into a student (aligndistil, tvdpp, gkd, context).

    Student and teacher(s) must share a tokenizer (--student-config builds a fresh small
    student with the teacher's). The held-out divergence to the teacher, before and after
    training, goes to stderr and OUT/alignkit.json; metrics.jsonl logs training.

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
    distill_lib.get(method)
    if not output:
        raise UsageError("--output/-o is required (the student folder to write)")
    if on_policy:
        if responses not in (None, "student"):
            raise UsageError("--on-policy contradicts --responses " + responses)
        responses = "student"
    cfg = distill_lib.DistillConfig(
        method=method, teacher=teacher or "", teacher_ref=teacher_ref, student=student,
        student_config=student_config, responses=responses, contrast=contrast, beta=beta,
        beta2=beta2, weight=weight, len_norm=len_norm, kd_temperature=kd_temperature,
        lmbda=lmbda, policy=policy, eval_split=eval_split, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, num_samples=num_samples,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    distill_lib.train(data, output, opts, cfg)


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
