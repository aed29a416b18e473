"""`aligndistil`: AlignDistil (ACL 2025; ALGORITHMS.md Part B §9). Not in TRL.

Teachers: `teacher` is the DPO model π_d, `teacher_ref` (`--teacher-ref`) is the
reverse-DPO model (`--contrast reverse`, the paper's default) or the DPO reference model
(`--contrast reference`, the paper's theorem-1 form). Per response token the student
minimises (β/w_t)·KL(π_θ ‖ π*), π* = softmax(z*/T) with
z* = z_d + w_t(z_d − z_r) (reverse) or z* = w_t·z_d + (1 − w_t)·z_ref (reference), and
the token-adaptive weight w_t = β2'·Σ_v |π_d − π_r| + 1e-3 (`--weight W` fixes it);
summed over the response, divided by its length (`--no-len-norm` keeps the sum),
averaged over the batch (`losses.aligndistil_loss`). The defaults of β, β2' (off- and
on-policy), T and the learning rate are the paper's scripts' (on the method's `DISTILL`
entry; `distill --list-methods`).

Off-policy it trains on the chosen side of pairs; `--on-policy` samples one response per
prompt from the current student at each step (the default temperature is the paper's).
Unlike the reference code, which scores the logits at the completion tokens' own
positions, the logits here are the ones that predict each completion token.
"""
from __future__ import annotations

from .losses import aligndistil_loss, aligndistil_teacher, reverse_kl


def _settings(cfg, on_policy: bool) -> dict:
    """The loss settings (cfg.beta2 is resolved by the pipeline from the entry's defaults,
    off- or on-policy)."""
    return dict(beta2=cfg.beta2, contrast=cfg.contrast, weight=cfg.weight,
                temperature=cfg.kd_temperature)


def objective(cfg, on_policy: bool):
    kw = _settings(cfg, on_policy)

    def fn(student, teachers, seg, n_rows):
        loss, st = aligndistil_loss(student, teachers["teacher"], teachers["teacher_ref"], seg,
                                    n_rows, beta=cfg.beta, len_norm=cfg.len_norm, **kw)
        return loss, {"kl_to_target": st["kl"], "weight": st["weight"]}
    return fn


def metric(cfg, on_policy: bool):
    """Per-token KL(π_θ ‖ π*) to the AlignDistil target distribution."""
    kw = _settings(cfg, on_policy)

    def fn(student, teachers):
        lp_star, _ = aligndistil_teacher(teachers["teacher"], teachers["teacher_ref"], **kw)
        return reverse_kl(student, lp_star)
    return fn


METRIC_NAME = "kl(student||aligndistil_target)"
