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

`DISTILL` holds one entry per method (declaring nothing heavy): its parameters (the
flags only it takes, each declared once below) and its `info`; the implementation is
the method's module (imported on use), which builds its loss (`objective`, `metric`,
`METRIC_NAME`) or, for gkd, its trainer (`make_trainer`). The info keys:

    trainer          what trains it (TRL's trainer, or alignkit's loss)
    default_lr       the learning rate when --lr is not given (x10 with --lora-r)
    method_defaults  the method's value of a parameter declared without a default
                     (beta, beta2, temperature)
    student_defaults the same, on student-sampled (on-policy) responses
    ranges           {parameter: (low, high)}: the method's stricter range
    requires         parameters the method cannot run without
    responses        the default --responses ("given" falls back to "teacher" for
                     prompt-only data)
    on_policy        whether --responses student (--on-policy) applies
    student_is_teacher  whether the student defaults to a copy of the teacher

Student and teacher(s) must share a tokenizer; a fresh small student can be built from
the teacher's tokenizer (`--student-config hidden=64,layers=2`). `train()` (in
`pipeline`) runs a method.

Responses the losses are computed on (`--responses`):
- `given`: the chosen side of pairs, or the `completion` of prompt records (off-policy);
- `teacher`: sampled once from the teacher before training (with the policy in its
  context for `context`);
- `student`: sampled from the current student at every step (on-policy; `--on-policy`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..registry import Param, Registry, opt

RESPONSES = ("given", "teacher", "student")
FRESH_STUDENT_LR = 5e-4  # a randomly initialised --student-config student

DISTILL = Registry("distill method", "--method")

TEACHER_REF = Param("teacher_ref", str, None, "The reverse-DPO model (--contrast reverse) or "
                    "the DPO reference (--contrast reference).", metavar="MODEL")
CONTRAST = Param("contrast", str, "reverse", "What --teacher-ref is: the reverse-DPO model "
                 "(reverse) or the DPO reference (reference).", choices=("reverse", "reference"))
BETA = Param("beta", float, None, "aligndistil: β, the scale of the per-token KL; gkd: the "
             "JSD interpolation (0: KL(teacher‖student), 1: KL(student‖teacher)).")
BETA2 = Param("beta2", float, None, "β2' of the token-adaptive weight.", low=0.0, low_open=True)
WEIGHT = Param("weight", float, None, "A fixed extrapolation weight w instead of the "
               "token-adaptive one.", low=0.0, low_open=True)
LEN_NORM = Param("len_norm", bool, True, "Divide each response's loss by its length.",
                 negatable=True)
KD_TEMPERATURE = Param("kd_temperature", float, 1.0, "T of the target softmax(z*/T).",
                       low=0.0, low_open=True)
LMBDA = Param("lmbda", float, 0.5, "Share of steps trained on student-generated responses.",
              low=0.0, high=1.0)
POLICY = Param("policy", str, None, "A text file the teacher sees in its context (e.g. a "
               "system prompt of rules).", metavar="FILE")

# what every entry's info has unless it says otherwise (method_defaults: merged)
_INFO = dict(trainer="alignkit loss", default_lr=1e-5, method_defaults={"temperature": 1.0},
             student_defaults={}, ranges={}, requires=(), responses="given", on_policy=True,
             student_is_teacher=False)


def _add(name: str, summary: str, *, params=(), **info) -> None:
    unknown = set(info) - set(_INFO)
    if unknown:
        raise TypeError(f"unknown distill-method info: {', '.join(sorted(unknown))}")
    info["method_defaults"] = {**_INFO["method_defaults"], **info.get("method_defaults", {})}
    DISTILL.add(name, summary, f"{__name__}.{name}", params=params, reads="prompt | pair",
                writes="model", **{**_INFO, **info})


_add("aligndistil", "token-level distillation towards the DPO/reverse-DPO contrastive "
     "teacher with adaptive extrapolation (--teacher-ref, --contrast)",
     params=(TEACHER_REF, CONTRAST, BETA, BETA2, WEIGHT, LEN_NORM, KD_TEMPERATURE),
     default_lr=1e-6, requires=("teacher_ref",),
     method_defaults={"beta": 0.1, "beta2": 10.0},  # the paper's scripts
     student_defaults={"beta2": 15.0})
_add("tvdpp", "draft-model distillation with the TVD++ loss on teacher-generated responses",
     responses="teacher")
_add("gkd", "generalized knowledge distillation (JSD --beta, on-policy share --lmbda)",
     params=(BETA, LMBDA), trainer="TRL experimental GKDTrainer",
     method_defaults={"beta": 0.5, "temperature": 0.9},  # TRL's GKDConfig defaults
     ranges={"beta": (0.0, 1.0)}, on_policy=False)
_add("context", "policy internalization: match the teacher with --policy in its context",
     params=(POLICY,), requires=("policy",), responses="teacher", student_is_teacher=True)


@dataclass
class DistillConfig:
    """The distill options beyond the shared training flags (TrainOptions): the models,
    the responses and their sampling (one flag per field with help), and the method's
    parameters (`params`, read as attributes: `cfg.beta`). `pipeline.resolve_config`
    fills `params` with every declared parameter: the method's values (given, else its
    defaults), the declared default for the others."""

    method: str = ""
    teacher: str = opt("", "Teacher: a model folder or an embedded name (aligndistil: the "
                       "DPO model).", short="-t", metavar="MODEL")
    student: Optional[str] = opt(None, "Student: a model folder or an embedded name sharing "
                                 "the teacher's tokenizer (context: default the teacher).",
                                 short="-s", metavar="MODEL")
    student_config: Optional[str] = opt(None, "Build a fresh tiny student with the teacher's "
                                        "tokenizer, e.g. hidden=64,layers=2[,heads=4,"
                                        "intermediate=128].", metavar="SPEC")
    responses: Optional[str] = opt(None, "The responses the loss is computed on (default: the "
                                   "method's; given falls back to teacher for prompt-only "
                                   "data).", choices=RESPONSES)
    eval_split: float = opt(0.1, "Share of the records held out to measure the divergence to "
                            "the teacher before/after (< 1).", low=0.0, high=1.0)
    temperature: Optional[float] = opt(None, "Sampling temperature of teacher/student "
                                       "responses (default: the method's, see "
                                       "--list-methods).", low=0.0)
    top_p: float = opt(1.0, "Sampling top-p.", low=0.0, high=1.0, low_open=True)
    max_new_tokens: int = opt(128, "Sampled response length limit.", low=1)
    num_samples: int = opt(1, "Teacher responses per prompt.", low=1, short="-n")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    params: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # the method's parameters read as attributes
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("params"))
        return out


def _defaults(e) -> str:
    vals = {**e.method_defaults, **{f"{k} (on-policy)": v for k, v in e.student_defaults.items()}}
    return ", ".join(f"{k} {v:g}" for k, v in vals.items())


def table() -> list[str]:
    """One line per method, for `distill --list-methods`."""
    return DISTILL.table((
        ("trainer", lambda e: e.trainer),
        ("lr", lambda e: f"{e.default_lr:g}"),
        ("responses", lambda e: e.responses),
        ("flags", lambda e: " ".join(p.flag_name for p in e.params) or "-"),
        ("defaults", _defaults)))


def train(data: str, out: str, opts, cfg: DistillConfig) -> dict:
    """Distil into the folder `out`; returns the held-out metrics (see pipeline.train)."""
    from .pipeline import train as _train
    return _train(data, out, opts, cfg)
