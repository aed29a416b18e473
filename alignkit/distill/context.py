"""`context`: policy internalization (context distillation). Not in TRL.

The teacher is the model with a policy text (`--policy FILE`, e.g. a long system prompt
of rules) in its context: a system message in front of the prompt (prepended to an
existing one; plain text before the prompt for tokenizers without a chat template). The
student, which sees the prompt alone, learns the teacher's next-token distributions on
the response tokens: the token-level KL(teacher-with-policy ‖ student), averaged over the
batch's response tokens (`losses.context_loss`). Responses are sampled from the
teacher-with-policy (default) or given (`--responses given`: the records' completions).
The student defaults to a copy of the teacher. How closely it follows the policy is
reported as that KL on held-out prompts (`--eval-split`), before and after training.
"""
from __future__ import annotations

from .losses import context_loss, forward_kl


def objective(cfg, on_policy: bool):
    def fn(student, teachers, seg, n_rows):
        loss, st = context_loss(student, teachers["teacher"])
        return loss, {"kl": st["kl"]}
    return fn


def metric(cfg, on_policy: bool):
    return lambda student, teachers: forward_kl(student, teachers["teacher"])


METRIC_NAME = "kl(teacher_with_policy||student)"
