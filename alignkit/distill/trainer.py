"""`DistillTrainer`: a transformers `Trainer` whose `compute_loss` runs a token-level
distillation objective against frozen teachers (alignkit's own losses: aligndistil,
tvdpp, context; TRL has none of them). It shares `alignkit.training.run_trainer` with
every other training command (metrics.jsonl, signals, checkpoints, resume).

A batch holds right-padded `input_ids`/`attention_mask` and a `completion_mask` marking
the completion tokens; the logits at position t−1 predict completion token t, so the
objective sees the student's and each teacher's logits at those N positions, flattened to
`[N, V]` in row order, with `seg[N]` (the row of each position). When the teacher reads
another prompt (context distillation: the policy in its context) the batch also holds
`teacher_input_ids`/`teacher_attention_mask`/`teacher_completion_mask`; the completion
tokens are the same, so the N positions line up.

On-policy (`rollout`): the batch carries only record indices; each training step samples
one completion per prompt from the current student (`alignkit.generation.sample`, seeded by
(seed, step)) and builds the batch from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import Trainer

# objective(student [N,V], teachers {name: [N,V]}, seg [N], n_rows) -> (loss, {stat: tensor})
Objective = Callable[..., tuple]
# metric(student [N,V], teachers {name: [N,V]}) -> per-position values [N]
Metric = Callable[..., torch.Tensor]


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded [len(seqs), longest] long tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class DistillCollator:
    """Rows -> a right-padded batch (see the module docstring); rows without
    `completion_ids` (on-policy) give only their `index`."""
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        out = {"index": torch.tensor([r["index"] for r in rows], dtype=torch.long)}
        if "completion_ids" not in rows[0]:
            return out
        for prefix, key in (("", "prompt_ids"), ("teacher_", "teacher_prompt_ids")):
            if key not in rows[0]:
                continue
            seqs = [r[key] + r["completion_ids"] for r in rows]
            cmask = [[0] * len(r[key]) + [1] * len(r["completion_ids"]) for r in rows]
            out[f"{prefix}input_ids"] = pad_right(seqs, self.pad_token_id)
            out[f"{prefix}attention_mask"] = pad_right([[1] * len(s) for s in seqs], 0)
            out[f"{prefix}completion_mask"] = pad_right(cmask, 0)
        return out


def selected_logits(model, input_ids, attention_mask, completion_mask, width: int) -> torch.Tensor:
    """The logits that predict the completion tokens, [N, width], in row order."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    sel = completion_mask[:, 1:].bool()
    return logits[:, :-1][sel][..., :width]


def segments(completion_mask) -> torch.Tensor:
    sel = completion_mask[:, 1:].bool()
    rows = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)
    return rows[sel]


def teacher_logits(teachers: dict, batch: dict, width: int) -> dict:
    """Each frozen teacher's selected logits (on the teacher's own inputs when the
    batch has them)."""
    p = "teacher_" if "teacher_input_ids" in batch else ""
    with torch.no_grad():
        return {name: selected_logits(m, batch[f"{p}input_ids"], batch[f"{p}attention_mask"],
                                      batch[f"{p}completion_mask"], width)
                for name, m in teachers.items()}


class DistillTrainer(Trainer):
    """A Trainer for token-level distillation; `objective` is the method's loss."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the GA steps

    def __init__(self, *args, teachers: dict, objective: Objective, width: int,
                 rollout: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teachers = {k: m.to(self.args.device).eval().requires_grad_(False)
                         for k, m in teachers.items()}
        self.objective = objective
        self.width = width
        self.rollout = rollout
        self._stats: dict[str, list[float]] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.rollout is not None and "input_ids" not in inputs:
            inputs = self.rollout(self.accelerator.unwrap_model(model),
                                  inputs["index"].tolist(), self.state.global_step)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = selected_logits(model, inputs["input_ids"], inputs["attention_mask"],
                                  inputs["completion_mask"], self.width)
        teachers = teacher_logits(self.teachers, inputs, self.width)
        loss, stats = self.objective(student, teachers, segments(inputs["completion_mask"]),
                                     inputs["input_ids"].shape[0])
        for k, v in stats.items():
            self._stats.setdefault(k, []).append(float(v.float().mean()) if v.numel() else 0.0)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:
            for k, vals in self._stats.items():
                logs[k] = round(sum(vals) / len(vals), 6)
            self._stats = {}
        super().log(logs, start_time)


def divergence(student, teachers: dict, rows: list[dict], collator, metric: Metric,
               width: int, batch_size: int = 8) -> dict:
    """The token-weighted mean of `metric` over `rows` (no gradient): {"value", "tokens",
    "responses"}; value None when there are no rows."""
    if not rows:
        return {"value": None, "tokens": 0, "responses": 0}
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collator(rows[s:s + batch_size]).items()}
            sl = selected_logits(student, batch["input_ids"], batch["attention_mask"],
                                 batch["completion_mask"], width)
            vals = metric(sl, teacher_logits(teachers, batch, width))
            total += float(vals.double().sum())
            count += int(vals.numel())
    student.train(was_training)
    return {"value": total / count if count else None, "tokens": count, "responses": len(rows)}
