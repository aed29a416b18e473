"""`gkd`: generalized knowledge distillation through TRL's `trl.experimental.gkd.GKDTrainer`.

The loss is TRL's generalised JSD (`--beta`: 0 is KL(teacher‖student), 1 is
KL(student‖teacher)) on the completion tokens; at each step, with probability `--lmbda`
(TRL's `random.random()`, seeded by `--seed`), the batch's completions are replaced by
ones the student generates (`model.generate`, `--temperature`, `--max-new-tokens`). The
defaults of `--beta` and `--temperature` are TRL's GKDConfig defaults (on the method's
`DISTILL` entry; `distill --list-methods`). The off-policy completions are the given
ones (chosen side of pairs) or, for prompt-only data, samples from the teacher.

alignkit only feeds it: rows tokenized like every other method (the sampler's
tokenization), a collator producing TRL's keys (`input_ids`, `attention_mask`, `labels`
with −100 outside the completion, left-padded `prompts`/`prompt_attention_mask` for
generation), and TRL's config built from the shared training flags.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import generalized_jsd
from .trainer import pad_right


@dataclass
class GKDCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
        labels = [[-100] * len(r["prompt_ids"]) + r["completion_ids"] for r in rows]
        width = max(len(r["prompt_ids"]) for r in rows)
        prompts = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        pmask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["prompt_ids"])
            prompts[i, width - n:] = torch.tensor(r["prompt_ids"], dtype=torch.long)
            pmask[i, width - n:] = 1
        return {"input_ids": pad_right(seqs, self.pad_token_id),
                "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
                "labels": pad_right(labels, -100),
                "prompts": prompts, "prompt_attention_mask": pmask}


def make_trainer(cfg, *, student, teachers, tokenizer, train_rows, kwargs, opts, peft):
    """TRL's GKDTrainer on alignkit rows (`kwargs`: alignkit.training.trainer_kwargs)."""
    import warnings

    from datasets import Dataset

    from ..errors import UsageError
    sizes = (student.config.get_text_config().vocab_size,
             teachers["teacher"].config.get_text_config().vocab_size)
    if sizes[0] != sizes[1]:
        raise UsageError(f"gkd (TRL's GKDTrainer) needs the same vocab_size in the student and "
                         f"teacher configs, got {sizes[0]} and {sizes[1]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "experimental" and deprecation notices
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        args = GKDConfig(**kwargs, lmbda=cfg.lmbda, beta=cfg.beta, temperature=cfg.temperature,
                         max_new_tokens=cfg.max_new_tokens, max_length=opts.max_length,
                         seq_kd=False, disable_dropout=True)
        return GKDTrainer(model=student, teacher_model=teachers["teacher"], args=args,
                          data_collator=GKDCollator(tokenizer.pad_token_id),
                          train_dataset=Dataset.from_list(train_rows),
                          processing_class=tokenizer, peft_config=peft)


def metric(cfg, on_policy: bool):
    return lambda student, teachers: generalized_jsd(student, teachers["teacher"], cfg.beta)


METRIC_NAME = "generalized_jsd(beta)"
