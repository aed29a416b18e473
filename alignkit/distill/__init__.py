"""Distillation methods (`alignkit distill`): one registry, one module per method.

- `aligndistil`: the teacher is a DPO model and its reverse-DPO model or reference
  (`--teacher-ref`); per token (β/w_t)·KL(π_θ‖π*), π* the contrastive teacher with the
  token-adaptive weight w_t (ALGORITHMS.md Part B §9). Not in TRL.
- `tvdpp`: a (bigger) target model; the TVD++ loss on teacher-generated responses
  (§10). Not in TRL.
- `gkd`: any teacher; generalised JSD (`--beta`) with on-policy share `--lmbda`, through
  TRL's `trl.experimental.gkd.GKDTrainer`.
- `context`: the teacher with a policy text in its context (`--policy FILE`); the
  token-level KL(teacher-with-policy ‖ student). Not in TRL.

`METHODS` maps a name to a `Method` (imports nothing heavy); `Method.module` names the
module that builds its loss (`objective`, `metric`) or, for gkd, its trainer. Student and
teacher(s) must share a tokenizer; a fresh small student can be built from the teacher's
tokenizer (`--student-config hidden=64,layers=2`). `train()` (in `pipeline`) runs a method.

Responses the losses are computed on (`--responses`):
- `given`: the chosen side of pairs, or the `completion` of prompt records (off-policy);
- `teacher`: sampled once from the teacher before training (with the policy in its
  context for `context`);
- `student`: sampled from the current student at every step (on-policy; `--on-policy`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UsageError

RESPONSES = ("given", "teacher", "student")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    module: str              # alignkit.distill.<module>
    trl: str = ""            # the TRL trainer wrapped ("" = alignkit's loss)
    default_lr: float = 1e-5
    default_beta: float | None = None
    default_responses: str = "given"   # "given" falls back to "teacher" for prompt-only data
    needs_ref: bool = False
    needs_policy: bool = False
    on_policy: bool = True   # may train on student samples


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("aligndistil", "token-level distillation towards the DPO/reverse-DPO contrastive "
           "teacher with adaptive extrapolation (--teacher-ref, --contrast)", "aligndistil",
           default_lr=1e-6, default_beta=0.1, needs_ref=True),
    Method("tvdpp", "draft-model distillation with the TVD++ loss on teacher-generated "
           "responses", "tvdpp", default_lr=1e-5, default_responses="teacher"),
    Method("gkd", "generalized knowledge distillation (JSD --beta, on-policy share --lmbda)",
           "gkd", trl="experimental GKDTrainer", default_lr=1e-5, default_beta=0.5,
           on_policy=False),
    Method("context", "policy internalization: match the teacher with --policy in its context",
           "context", default_lr=1e-5, default_responses="teacher", needs_policy=True),
]}

FRESH_STUDENT_LR = 5e-4  # a randomly initialised --student-config student


@dataclass
class DistillConfig:
    """The distill flags beyond the shared training flags (TrainOptions)."""
    method: str = "aligndistil"
    teacher: str = ""
    teacher_ref: str | None = None
    student: str | None = None
    student_config: str | None = None
    responses: str | None = None      # None: the method's default
    contrast: str = "reverse"         # aligndistil
    beta: float | None = None         # aligndistil β / gkd JSD β (None: the method's)
    beta2: float | None = None        # aligndistil β2' (None: 10 off-policy, 15 on-policy)
    weight: float | None = None       # aligndistil: a fixed w instead of the adaptive one
    len_norm: bool = True             # aligndistil: divide each response's loss by its length
    kd_temperature: float = 1.0       # aligndistil: T of softmax(z*/T)
    lmbda: float = 0.5                # gkd: on-policy share
    policy: str | None = None         # context: the policy text file
    eval_split: float = 0.1
    temperature: float | None = None  # sampling (None: 0.9 for gkd as TRL, else 1.0)
    top_p: float = 1.0
    max_new_tokens: int = 128
    num_samples: int = 1              # teacher responses per prompt
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def get(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown --method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def table() -> list[str]:
    """One line per method, for `distill --list-methods`."""
    lines = [f"{'method':12} {'trainer':22} summary"]
    for m in METHODS.values():
        lines.append(f"{m.name:12} {m.trl or 'alignkit loss':22} {m.summary}")
    return lines


def train(data: str, out: str, opts, cfg: DistillConfig) -> dict:
    """Distil into the folder `out`; returns the held-out metrics (see pipeline.train)."""
    from .pipeline import train as _train
    return _train(data, out, opts, cfg)
