"""`step-dapo`: stage B of step-level DAPO, Direct Advantage Policy Optimization
(arXiv 2412.18279, Skywork; ALGORITHMS.md Part D §3). Not ByteDance's DAPO (the
`length` scorer's overlong penalty): this one is an offline, reference-anchored actor
fit on step advantages.

Input: samples records whose completions carry `mc_rollout` from
`score -s mc-rollout:MODEL` (stage A): `steps` [a_1..a_K], `step_values`
[v(s_0)..v(s_{K-1})] and `outcome` r. Every completion must have it (else a DataError
at file:line). Step advantages, with deterministic transitions (s_{k+1} = s_k ∘ a_{k+1}):

    A_k = v(s_{k+1}) − v(s_k),   k = 0..K-1,   v(s_K) = r (the verifier outcome).

Loss (`step_dapo_loss`), one term per step a of a completion in the state s before it:

    L = mean over steps of ( β·(log πθ(a|s) − log π_ref(a|s)) − A )²

log π(a|s) is the SUM of the step's token log-probs. The log Z(s) of the KL-regularised
optimum (log π*/π_ref = A/β − log Z(s)) is DROPPED, not centred over sibling steps
(ALGORITHMS.md: UNVERIFIED which the paper does; this is the plain reading). β: `--beta`,
default 0.1 (UNVERIFIED in the paper, ALGORITHMS.md's suggestion).

Tokenisation: the prompt as every trainer renders it (`data.Tokenization.prompt`), then
each step tokenised on its own as `step + separator` (the last step without separator,
then eos unless the completion has `finished: false`), as `prm` tokenises; step k's token
span is its piece. Steps that do not fit `--max-length` are dropped (a completion whose
first step does not fit is dropped). The separator is the one `mc_rollout` records
(`separator`, default "\\n\\n").

Reference: the frozen initial policy; its step log-probs are computed once before
training (LoRA: before the adapter is added, so it is the base). No `--ref-model`,
no reference cache. The values are the Monte-Carlo estimates of stage A by default;
with `--critic DIR` they come from the critic, trained apart as the paper does: `train-rm
--method prm` on the same mc-rollout file fits P(step k) to v̂(s_{k+1}) (soft BCE
labels, `reward_models.prm.mc_rollout_records`), and its step probabilities stand in
for v(s_k), k = 1..K-1 (`critic_values`). Simplification: one iteration (no iterative
DAPO).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .. import console
from ..errors import UsageError
from ..registry import Param
from . import add
from .common import (PolicyRun, check_offline, config, config_overrides, finish, hparams,
                     load_policy, method_beta, quiet)

SEPARATOR = "\n\n"
CRITIC = Param("critic", str, None, "step-dapo: the critic, a prm folder (train-rm --method "
               "prm on the same mc-rollout file) whose "
               "per-step P(correct) p_k gives v(s_k) for k = 1..K-1 instead of the Monte-Carlo "
               "values (v(s_0) stays mc_rollout's, v(s_K) the outcome).", metavar="DIR")

add("step-dapo", "step-level DAPO (Skywork, arXiv 2412.18279; not ByteDance's DAPO): "
    "offline actor, (beta*log-ratio of each step - A_k)^2 with A_k = v(s_k+1) - v(s_k) from "
    "mc_rollout step values or a prm --critic (simplified: log Z dropped)",
    f"{__name__}:train_step_dapo", reads="samples", params=(CRITIC,), default_lr=1e-6, default_beta=0.1,
    trainer="alignkit step-DAPO trainer")


# --- the math (pure) ----------------------------------------------------------------------

def advantages(step_values: list[float], outcome: float) -> list[float]:
    """A_k = v(s_{k+1}) − v(s_k), with v(s_K) = the outcome."""
    v = list(step_values) + [outcome]
    return [v[k + 1] - v[k] for k in range(len(step_values))]


def step_dapo_loss(policy_logps, ref_logps, adv, mask, beta: float):
    """Mean over the steps where `mask` is set of (β·(policy − ref) − A)²; tensors [B, K]."""
    m = mask.to(policy_logps.dtype)
    sq = (beta * (policy_logps - ref_logps) - adv) ** 2
    return (sq * m).sum() / m.sum().clamp(min=1)


def step_logps(model, prompts: list[list[int]], completions: list[list[int]],
               spans: list[list[list[int]]], pad_id: int, k_max: int):
    """Summed token log-probs of each step span [N, k_max] (0 where there is no step)."""
    import torch
    device = next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    step_of = torch.full((len(seqs), T), k_max, dtype=torch.long, device=device)
    for r, (p, s, sp) in enumerate(zip(prompts, seqs, spans)):
        ids[r, :len(s)] = torch.tensor(s, device=device)
        attn[r, :len(s)] = 1
        for k, (a, b) in enumerate(sp):
            step_of[r, len(p) + a:len(p) + b] = k
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    lp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = lp.new_zeros(len(seqs), k_max + 1).scatter_add(1, step_of[:, 1:], lp)
    return out[:, :k_max]


# --- records -> rows ------------------------------------------------------------------------

def _number(data, i: int, value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise data.error(i, field, "must be a finite number")
    return float(value)


def parse_mc(data, i: int, c: int, comp: dict):
    """(steps, step_values, outcome, separator) of completion c of record i (DataError if
    bad)."""
    where = f"completions[{c}].mc_rollout"
    mc = comp.get("mc_rollout")
    if not isinstance(mc, dict):
        raise data.error(i, where, "missing: score the samples with -s mc-rollout:MODEL first")
    steps, values = mc.get("steps"), mc.get("step_values")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise data.error(i, where + ".steps", "must be a list of strings")
    if not isinstance(values, list) or len(values) != len(steps):
        raise data.error(i, where + ".step_values", "must be a list with one number per step")
    values = [_number(data, i, v, where + ".step_values") for v in values]
    sep = mc.get("separator", SEPARATOR)
    if not isinstance(sep, str) or not sep:
        raise data.error(i, where + ".separator", "must be a non-empty string")
    return steps, values, _number(data, i, mc.get("outcome"), where + ".outcome"), sep


def critic_values(values: list[float], probs: list[float]) -> list[float]:
    """v(s_0..s_{K-1}) with a critic: v(s_0) = the MC value, v(s_k) = p_k (the critic's
    P(correct) after step k) for k = 1..K-1; steps the critic did not reach (past its
    max length) keep their MC value."""
    return [values[0]] + [probs[k - 1] if k - 1 < len(probs) else values[k]
                          for k in range(1, len(values))]


def step_rows(data, tk, critic=None) -> tuple[list[dict], int, int]:
    """One row per completion with steps: ids, per-step spans and advantages (the values
    from `critic`, a `reward_models.prm.PRMRewardModel`, when given). Returns (rows,
    dropped, cut)."""
    rows, dropped, cut = [], 0, 0
    for i, rec in enumerate(data.records):
        p_ids = tk.prompt(rec["prompt"])
        for c, comp in enumerate(rec["completions"]):
            steps, values, outcome, sep = parse_mc(data, i, c, comp)
            if not steps:
                continue
            if critic is not None:
                values = critic_values(values, critic.step_probs([rec["prompt"]], [steps])[0])
            adv = advantages(values, outcome)
            room = tk.max_length - len(p_ids)
            ids, spans = [], []
            for k, step in enumerate(steps):
                last = k == len(steps) - 1
                piece = list(tk.tok(step if last else step + sep,
                                    add_special_tokens=False)["input_ids"])
                if last and comp.get("finished", True) is not False:
                    piece.append(tk.tok.eos_token_id)
                if not piece or len(ids) + len(piece) > room:
                    cut += int(bool(piece))
                    break
                spans.append([len(ids), len(ids) + len(piece)])
                ids += piece
            if not spans:
                dropped += 1
                continue
            rows.append({"prompt_ids": p_ids, "completion_ids": ids, "spans": spans,
                         "advantages": adv[:len(spans)]})
    return rows, dropped, cut


class StepCollator:
    """Rows -> lists of ids/spans plus [B, K] advantages, reference log-probs and mask."""

    def __call__(self, examples: list[dict]) -> dict:
        import torch
        K = max(len(e["spans"]) for e in examples)
        adv = torch.zeros(len(examples), K)
        ref = torch.zeros(len(examples), K)
        mask = torch.zeros(len(examples), K, dtype=torch.bool)
        for r, e in enumerate(examples):
            n = len(e["spans"])
            adv[r, :n] = torch.tensor(e["advantages"], dtype=torch.float)
            ref[r, :n] = torch.tensor(e["ref_logps"], dtype=torch.float)
            mask[r, :n] = True
        return {"prompt_ids": [list(e["prompt_ids"]) for e in examples],
                "completion_ids": [list(e["completion_ids"]) for e in examples],
                "spans": [[list(s) for s in e["spans"]] for e in examples],
                "advantages": adv, "ref_logps": ref, "mask": mask}


def reference_logps(model, rows: list[dict], pad: int, batch_size: int) -> None:
    """Fill rows' `ref_logps` (per-step summed log-probs) under `model`, frozen."""
    import torch
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            b = rows[s:s + batch_size]
            k = max(len(r["spans"]) for r in b)
            lp = step_logps(model, [r["prompt_ids"] for r in b], [r["completion_ids"] for r in b],
                            [r["spans"] for r in b], pad, k)
            for r, row in zip(lp.tolist(), b):
                row["ref_logps"] = r[:len(row["spans"])]
    model.train(was)


_TRAINER: list = []


def trainer_class():
    """`StepDAPOTrainer` (transformers imported on first use)."""
    if _TRAINER:
        return _TRAINER[0]
    import torch
    from transformers import Trainer

    class StepDAPOTrainer(Trainer):
        """transformers Trainer whose `compute_loss` is `step_dapo_loss`."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args, beta: float, pad: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta, self.pad = beta, pad
            self._metrics: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs["mask"]
            pol = step_logps(model, inputs["prompt_ids"], inputs["completion_ids"],
                             inputs["spans"], self.pad, mask.shape[1])
            ref, adv = inputs["ref_logps"].to(pol.device), inputs["advantages"].to(pol.device)
            mask = mask.to(pol.device)
            loss = step_dapo_loss(pol, ref, adv, mask, self.beta)
            ratio = (pol - ref).detach()[mask]
            self._metrics.setdefault("step_dapo/log_ratio", []).append(ratio.mean().item())
            self._metrics.setdefault("step_dapo/advantage", []).append(adv[mask].mean().item())
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            means = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
            self._metrics = {}
            super().log({**logs, **means}, start_time)

    _TRAINER.append(StepDAPOTrainer)
    return StepDAPOTrainer


@quiet
def train_step_dapo(run: PolicyRun) -> Path:
    """step-dapo: see the module docstring."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from ..generation import pad_id
    from ..models import load_tokenizer
    from ..training import prepare_run, with_lora
    from .data import Tokenization
    check_offline(run)
    opts = run.opts
    beta = method_beta(run)
    config_overrides(TrainingArguments, run)
    started = time.time()
    tk = Tokenization(load_tokenizer(run.model, run.trust_remote_code), opts.max_length)
    critic = None
    if run.options.get("critic"):
        from ..reward_models.prm import load_folder
        critic = load_folder(run.options["critic"], max_length=opts.max_length,
                             batch_size=max(1, opts.batch_size))
    rows, dropped, cut = step_rows(run.data, tk, critic)
    del critic
    if not rows:
        raise UsageError("no usable completion (step-dapo needs completions with at least one "
                         "mc_rollout step that fits --max-length)")
    if dropped or cut:
        console.warn(f"{dropped} completions dropped and {cut} cut to --max-length "
                     f"{opts.max_length}")
    counts = {"records": len(run.data.records), "rows": len(rows), "dropped": dropped,
              "cut": cut, "steps": sum(len(r["spans"]) for r in rows)}
    work = prepare_run(run.out, opts)
    model, tok = load_policy(run)
    pad = pad_id(tok)
    reference_logps(model, rows, pad, max(1, opts.batch_size))
    model, _ = with_lora(model, opts)
    cfg = config(TrainingArguments, run, work)
    trainer = trainer_class()(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                              data_collator=StepCollator(), processing_class=tok,
                              beta=beta, pad=pad)
    reference = {"kind": "the initial policy (frozen), step log-probs computed before training"}
    hp = hparams(run, beta, **run.options, tokenization=tk.fingerprint(),
                 advantage="A_k = v(s_k+1) - v(s_k), v(s_K) = outcome",
                 loss="mean_steps (beta*(logp - ref_logp) - A)^2, log Z dropped")
    return finish(trainer, run, work, tok, started, hp, reference, counts)
