"""The online trainers' log-prob passes on alignkit's CPU head (`cpu_head`).

TRL's GRPOTrainer and RLOOTrainer score completions with `model(..., labels=labels,
fused_lm_head=True)` at the sampling temperature. On CPU, `OnlineHeadMixin` computes the
same per-token log-probs (and entropies) with `cpu_head.fused_forward`, as the DPO
trainer does: same values and gradients (tests compare them with TRL's head), in a
fraction of the time (`bench/online_head.py`). It keeps TRL's head where cpu_head does
not apply: an entropy that needs its gradient (--entropy-coef > 0 in a pass with
gradients; cpu_head's entropy has none), images or other extra inputs, MoE router
losses, a model it does not cover (`cpu_head.enabled`: wrapped, soft-capped, not on CPU,
or ALIGNKIT_CPU_HEAD=0).
"""
from __future__ import annotations

import torch

from . import cpu_head


class OnlineHeadMixin:
    """Before TRL's trainer in the MRO: its `_get_per_token_logps_and_entropies`."""

    ak_entropy_coef = 0.0

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False,
                                           **extra):
        entropy_grad = compute_entropy and self.ak_entropy_coef and torch.is_grad_enabled()
        if (compute_aux_loss or entropy_grad or any(v is not None for v in extra.values())
                or not cpu_head.enabled(model)):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                compute_aux_loss, **extra)
        return self._ak_cpu_logps(model, input_ids, attention_mask, logits_to_keep,
                                  batch_size or input_ids.size(0), compute_entropy)

    def _ak_cpu_logps(self, model, input_ids, attention_mask, logits_to_keep: int,
                      batch_size: int, compute_entropy: bool):
        """TRL's loop of `_get_per_token_logps_and_entropies` (only the completion tokens
        are labelled) with `cpu_head.fused_forward` at the sampling temperature and, where
        the config asks (GRPO's `cast_lm_head_to_fp32`), the head in float32."""
        outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
        fp32 = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        logps, entropies = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[s:s + batch_size], attention_mask[s:s + batch_size]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                out = cpu_head.fused_forward(model, ids, mask, labels, outputs,
                                             temperature=self.temperature, fp32_head=fp32)
            logps.append(out.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(out.entropy[:, -logits_to_keep:])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None
