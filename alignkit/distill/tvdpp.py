"""`tvdpp`: draft-model distillation with TVD++ (arXiv 2403.00858; ALGORITHMS.md Part B
§10). Not in TRL, and the paper has no public code.

A small student (the draft) learns a bigger teacher (the target) that shares its
tokenizer, on responses the teacher generates (`--responses teacher`, the default: one
sample per prompt, `--num-samples` more). The loss and our reading of the UNVERIFIED
points (exact expectation over the vocabulary per position; R normalised over the
batch's valid positions × vocabulary weighted by q) are in `losses.tvdpp_loss`. The
logged and reported metric is the mean per-token TVD(p, q).
"""
from __future__ import annotations

from .losses import tvd, tvdpp_loss


def objective(cfg, on_policy: bool):
    def fn(student, teachers, seg, n_rows):
        loss, st = tvdpp_loss(student, teachers["teacher"])
        return loss, {"tvd": st["tvd"], "sigma": st["sigma"]}
    return fn


def metric(cfg, on_policy: bool):
    return lambda student, teachers: tvd(student, teachers["teacher"])


METRIC_NAME = "tvd(teacher, student)"
