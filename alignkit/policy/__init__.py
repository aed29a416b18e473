"""Policy-training methods: one registry (`POLICY`), offline and online.

Each method is an entry of `POLICY` (`alignkit.registry`), declared with `add` in the
module that implements it, next to its parameters (`registry.Param`, one declaration per
flag, shared by the entries that take it):

    trl_methods.py  sft, simpo, orpo, kto   TRL's own trainers
    pairs.py        dpo, sppo, copg         pairs through AlignkitDPOTrainer (dpo_trainer.py)
    groups.py       pro, grao               listwise records through AlignkitDPOTrainer
    online.py       grpo, gtpo, earl, rloo, p3o, online-ipo, ipo-md   prompts + --reward
    essa.py         essa                    prompts + --reward: ES on an SFT LoRA's singular values

Those modules import nothing heavy at module level, so listing the methods (`--help`,
`--list-methods`, docs, completions) imports no torch. An entry's implementation has the
signature `fn(run: common.PolicyRun) -> Path`; `run.options` holds the entry's own
parameters (`Entry.options`: the declared defaults, overridden by the flags given), the
rest of the run (beta, reference, rewards, scorer options, `--opt`) its other fields.

Every entry carries these info fields (`add`'s keywords): `trl` (the TRL trainer wrapped,
"" for alignkit's own losses), `default_lr` (full fine-tuning; x10 with LoRA),
`default_beta`, `needs_ref`, `online`, `no_beta` (the message for a method without a
--beta) and `zero_beta_ok` (beta 0 allowed); each family adds its own (see its module).
Data kinds (`reads`): "pairs", "samples", "ranking", "unpaired", "sft", "prompts"
(`data.DATA_KINDS`).
"""
from __future__ import annotations

from ..registry import Entry, Registry

POLICY = Registry("policy method", "--method", modules=(
    "alignkit.policy.trl_methods", "alignkit.policy.pairs", "alignkit.policy.groups",
    "alignkit.policy.online", "alignkit.policy.seppo", "alignkit.policy.essa",
    "alignkit.policy.step_dapo", "alignkit.policy.urpo"))

__all__ = ["POLICY", "add", "get", "table", "train"]


def add(name: str, summary: str, target: str, *, reads: str, params=(), trl: str = "",
        default_lr: float = 1e-6, default_beta: float | None = None, needs_ref: bool = False,
        online: bool = False, no_beta: str = "", zero_beta_ok: bool = False, **info) -> Entry:
    """Register a policy method (every entry gets the info fields of the module docstring)."""
    return POLICY.add(name, summary, target, params=params, reads=reads, writes="model",
                      trl=trl, default_lr=default_lr, default_beta=default_beta,
                      needs_ref=needs_ref, online=online, no_beta=no_beta,
                      zero_beta_ok=zero_beta_ok, **info)


def get(name: str) -> Entry:
    return POLICY.get(name)


def trainer_of(entry: Entry) -> str:
    """What trains the method, for --list-methods."""
    if entry.trl:
        return entry.trl
    return entry.info.get("trainer") or ("online" if entry.online else "alignkit loss (DPOTrainer)")


def table() -> list[str]:
    """One line per method, for `train-policy --list-methods`."""
    return POLICY.table((("data", lambda e: e.reads), ("trainer", trainer_of)))


def train(run):
    """Train `run.method` (a `common.PolicyRun`); returns the output folder."""
    return run.method.load()(run)
