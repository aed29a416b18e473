"""URPO: one model as player and referee in one GRPO loop (ALGORITHMS.md Part D §5;
arXiv 2507.17515; no code was found, so this is a reading of the abstract and a summary).

`train-policy --method urpo` trains on a prompts file mixing three kinds of records
(`urpo_tasks.kind_of`): verifiable prompts (`meta.checks`: the `--reward` scorers,
default `rules`; `meta.answer`: `urpo_tasks.answer_reward`), judge tasks (preference
pairs recast by `relabel --strategy referee-tasks`; reward 1 / 0 / FORMAT_PENALTY -0.5
for the right / wrong / no parsable verdict) and open prompts (neither): those are
scored by the CURRENT policy as referee, P(yes) of `urpo_tasks.SELF_JUDGE` from one
forward pass of `self.model` under no_grad (σ(l_yes − l_no) of the first tokens of
" yes" / " no", after the tokenizer's chat template), a constant reward (sg).

`urpo_trainer.URPOTrainer` (torch; imported when training) is TRL's GRPO (`online_trainers.AlignkitGRPOTrainer`: group-normalised
advantages per prompt, one batch over all kinds) whose `_calculate_rewards` replaces
the scorer's values of judge and open rows. The rest is `online.train_online`.

Judging accuracy: the greedy verdicts (`max_new_tokens` = --max-new-tokens) on held-out
judge tasks, before training and at the end: `--eval-pairs FILE` (pairs, recast with
the same template and --seed) or a seeded `--held-out` share of the file's judge-kind
records (default 0.1; they are not trained on). Written to metrics.jsonl (one line
`{"urpo/judge_acc_before", "urpo/judge_acc_after", "urpo/judge_eval_n"}`), to
alignkit.json's final_metrics and to stderr. An unparsable verdict counts as wrong.

Simplified vs the paper: pairwise verdicts, not N-way rankings; a pointwise P(yes)
self-judge, not listwise 1-10 scores; no mixing ratios (the file's mix is the batch
mix); rewards are combined per row (a judge or open row ignores --reward).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import console
from ..registry import Param
from . import add
from .common import PolicyRun, quiet
from .online import GRPO, ONLINE
from .pairs import GRPO_DEFAULT_LOSS

EVAL_PAIRS = Param("eval_pairs", str, None, "urpo: a pairs JSONL whose judging accuracy is "
                   "measured before and after training (default: a --held-out share of the "
                   "judge-kind records).", metavar="FILE")
HELD_OUT = Param("held_out", float, 0.1, "urpo: share of the judge-kind records held out "
                 "for the judging accuracy (without --eval-pairs).", low=0.0, high=0.9)

add("urpo", "URPO: one model as player and referee, one GRPO loop over verifiable prompts "
    "(--reward, default rules), judge tasks (relabel --strategy referee-tasks; reward 1/0/-0.5) "
    "and open prompts scored by the live policy's P(yes). Simplified: pairs not rankings, "
    "pointwise P(yes) self-judge, the file's mix",
    f"{__name__}:train_urpo", reads="prompts", params=ONLINE + GRPO + (EVAL_PAIRS, HELD_OUT),
    online=True, trainer_class="alignkit.policy.urpo_trainer:URPOTrainer", config_class="trl:GRPOConfig",
    pair_loss="", fixed={}, trainer_kwargs={}, mixture=False, default_loss=GRPO_DEFAULT_LOSS,
    default_beta=0.0, zero_beta_ok=True)


def eval_records(run: PolicyRun, kinds: list[str]) -> tuple[list[dict], set[int]]:
    """The judge records of the accuracy eval and the training indices they take away."""
    from . import urpo_tasks as T
    path = run.options["eval_pairs"]
    if path is not None:
        from ..recordset import load
        pairs = load(path, "pair")
        return [T.judge_record(r, run.opts.seed, T.flat_text) for r in pairs.records], set()
    held = T.split_held_out(kinds, run.options["held_out"], run.opts.seed)
    return [run.data.records[i] for i in sorted(held)], held


@quiet
def train_urpo(run: PolicyRun) -> Path:
    """urpo (see the module docstring): check the kinds, split the eval set, train_online."""
    from . import urpo_tasks as T
    from .online import train_online
    data = run.data
    kinds = T.check_records(data.records, data.name, data.lines)
    evals, held = eval_records(run, kinds)
    if held:
        keep = [i for i in range(len(data.records)) if i not in held]
        data = dataclasses.replace(data, records=[data.records[i] for i in keep],
                                   lines=[data.lines[i] for i in keep if i < len(data.lines)])
        kinds = [kinds[i] for i in keep]
    counts = {k: kinds.count(k) for k in ("verifiable", "judge", "open")}
    console.info(f"urpo: {counts['verifiable']} verifiable, {counts['judge']} judge, "
                 f"{counts['open']} open prompts; {len(evals)} judge tasks for the accuracy eval")
    run = dataclasses.replace(run, data=data, rewards=run.rewards or ["rules"])
    return train_online(run, trainer_kwargs={"eval_records": evals})


def write_accuracy(work: Path, row: dict) -> None:
    with open(Path(work) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
